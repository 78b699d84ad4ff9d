"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's sampling extras.

Unknown fields are ignored (clients send many we do not use); NaN and infinity are refused
for every float; text with lone surrogates (valid JSON, invalid Unicode: ``"\\ud800"``) is
refused anywhere in a body. Features the server does not have (``best_of``, ``suffix``,
``response_format``, tools, guided decoding) are accepted only at their no-op values and
refused with "not supported" otherwise (``unsupported``), rather than silently ignored. Bounds
that depend on the server (context, batch size, vocabulary) are checked later, where they are
known. Responses are plain dicts built in ``app.py`` and ``completions.py``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..runtime.sampling import LOGIT_BIAS_LIMIT, SamplingParams

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
# Stop lists are scanned on the engine thread for every token of every row: bounded. (OpenAI
# allows 4 stop strings, TGI 4 by default; vLLM has no bound.)
MAX_STOP_STRINGS = 32
MAX_STOP_LENGTH = 512  # characters of one stop string (streaming holds back this much text)
MAX_STOP_TOKEN_IDS = 256

NonNegInt = Annotated[int, Field(ge=0)]

_SURROGATE = re.compile("[\ud800-\udfff]")


def find_surrogate(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate (``"messages.0.content"``), or None."""
    if isinstance(value, str):
        return (path or "body") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return path or "body"
            if (found := find_surrogate(item, here)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := find_surrogate(item, f"{path}.{i}" if path else str(i))) is not None:
                return found
    return None


class Base(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class Request(Base):
    """A whole request body: its text must be valid Unicode (checked once, over the raw body)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = find_surrogate(data)
        if where is not None:
            # the message must not echo the text: a lone surrogate cannot be encoded in the reply
            raise PydanticCustomError("unicode", "the text at {where} contains a lone surrogate (e.g. \\ud800 "
                                      "without its pair): not valid Unicode", {"where": where})
        return data


class StreamOptions(Base):
    include_usage: bool = False


def _not_supported(param: str, what: str) -> tuple[str, str]:
    return param, f"{what} is not supported by this server"


class Sampling(Request):
    """Fields shared by completions and chat."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_tokens: NonNegInt = 0
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegInt] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = None
    ignore_eos: bool = False
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # OpenAI's: token id (a string in JSON) -> bias added to its logit, in [-100, 100]
    logit_bias: dict[str, float] | None = None
    # accepted at their no-op values only (see ``unsupported``)
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > MAX_STOP_STRINGS:
            raise PydanticCustomError("too_many", "at most {n} stop strings", {"n": MAX_STOP_STRINGS})
        if any(len(x) > MAX_STOP_LENGTH for x in items):
            raise PydanticCustomError("too_long", "a stop string may have at most {n} characters",
                                      {"n": MAX_STOP_LENGTH})
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _valid_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit() or not key.isascii():
                raise PydanticCustomError("token_id", "keys must be token ids (non-negative integers as strings), "
                                          "got {key}", {"key": repr(key[:40])})
            if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
                raise PydanticCustomError("range", "values must be in [-100, 100], got {value}", {"value": value})
        return bias

    def bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of the first feature asked for that this server does not have."""
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            return _not_supported("response_format", f"response_format {self.response_format.get('type')!r}")
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
            if getattr(self, name) is not None:
                return _not_supported(name, f"{name} (guided decoding)")
        return None

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            seed=self.seed,
            n=self.n,
            logit_bias=self.bias(),
        )


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: NonNegInt | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != self.n:
            return _not_supported("best_of", "best_of (other than n)")
        if self.suffix:
            return _not_supported("suffix", "suffix (insertion)")
        return super().unsupported()


class ContentPart(Base):
    type: str
    text: str | None = None


class ChatMessage(Base):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM extra
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return _not_supported("tools", "tool calling")
        if self.tool_choice not in (None, "none", "auto"):
            return _not_supported("tool_choice", "tool calling")
        if self.functions:
            return _not_supported("functions", "function calling")
        if self.function_call not in (None, "none", "auto"):
            return _not_supported("function_call", "function calling")
        return super().unsupported()


class TokenizeRequest(Request):
    """Either ``prompt`` (text) or ``messages`` (through the chat template), as in vLLM."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: list[int]
