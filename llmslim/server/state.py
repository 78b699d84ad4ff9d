"""What every route shares: the server's state (engine, tokenizer, names, auth) and its errors.

Kept apart from ``app.py`` (which builds the FastAPI app and the small routes) so that the
route modules (``completions.py``) and the app both import it and imports run one way:
``app`` -> ``completions`` -> ``state``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .engine import Engine
from .schemas import ChatMessage


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


MAX_BODY_BYTES = 32 * 2**20  # far above any prompt the context allows; refuses memory bombs early
CHARS_PER_TOKEN = 64  # no ordinary token is longer: text beyond context x this cannot fit


@dataclass
class ServerState:
    engine: Engine
    tokenizer: object
    model_names: list[str]  # the first is the served name; the others are accepted aliases
    api_key: str | None = None
    max_tokens_cap: int | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout: float | None = None  # seconds from arrival to the last token; None: no limit
    created: int = field(default_factory=lambda: int(time.time()))
    http_errors: dict[int, int] = field(default_factory=dict)
    token_lock: threading.Lock = field(default_factory=threading.Lock)
    token_texts: list[str] = field(default_factory=list)

    def __post_init__(self):
        # Every token's text, once, here (off the event loop): log-probs need them per token,
        # and the event loop must never call the tokenizer (or wait for its lock).
        if not self.token_texts:
            decode = self.tokenizer.decode
            self.token_texts = [decode([t]) for t in range(self.engine.vocab_size)]

    @property
    def name(self) -> str:
        return self.model_names[0]

    @property
    def text_limit(self) -> int:
        """Characters of input beyond which a prompt cannot fit the context (checked before tokenizing)."""
        return self.engine.max_model_len * CHARS_PER_TOKEN

    def check_text_size(self, chars: int, param: str) -> None:
        if chars > self.text_limit:
            raise APIError(400, f"the {param} ({chars} characters) is far longer than the model's context "
                           f"({self.engine.max_model_len} tokens)", param=param, code="context_length_exceeded")

    def check_messages_size(self, messages: list[ChatMessage], param: str = "messages") -> None:
        """The chat's text, summed before the template renders it (rendering and tokenizing a
        30 MB message is the slow part: refuse it first)."""
        chars = 0
        for m in messages:
            chars += len(m.role) + len(m.name or "")
            if isinstance(m.content, str):
                chars += len(m.content)
            elif m.content is not None:
                chars += sum(len(part.text or "") for part in m.content)
        self.check_text_size(chars, param)

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")

    # Tokenizer calls run in the threadpool (they can take a while on long prompts), never on the
    # event loop. Encoding goes through transformers' __call__, which may reconfigure the shared
    # Rust tokenizer (truncation, padding) and so is not safe to run in two threads at once:
    # hence the lock. Decoding only reads (the engine thread decodes all the time): no lock.
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self.token_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token as text, for log-probs (a table lookup: safe on the event loop)."""
        return self.token_texts[token] if 0 <= token < len(self.token_texts) else ""

    def apply_template(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        self.check_messages_size(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        plain = [{"role": m.role, "content": _text_content(m)} | ({"name": m.name} if m.name else {})
                 for m in messages]
        try:
            with self.token_lock:
                text = self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors raised by the template itself ("roles must alternate")
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
        # The template writes any BOS itself; adding special tokens again would double it.
        return self.encode(text, add_special_tokens=False)

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab})", param=param)


def _text_content(m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"only text content is supported, got a {part.type!r} part", param="messages")
        parts.append(part.text)
    return "\n".join(parts)
