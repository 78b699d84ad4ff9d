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


@dataclass
class ServerState:
    engine: Engine
    tokenizer: object
    model_names: list[str]  # the first is the served name; the others are accepted aliases
    api_key: str | None = None
    max_tokens_cap: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    http_errors: dict[int, int] = field(default_factory=dict)
    token_lock: threading.Lock = field(default_factory=threading.Lock)
    _token_text: dict[int, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", "model_not_found")

    # Tokenizer calls run in the threadpool (they can take a while on long prompts); a fast
    # tokenizer is not safe to share between threads in every call, hence the lock.
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self.token_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.token_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token as text, for log-probs (cached: the same ids come back all the time)."""
        text = self._token_text.get(token)
        if text is None:
            with self.token_lock:
                text = self.tokenizer.decode([token])
            self._token_text[token] = text
        return text

    def apply_template(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
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
