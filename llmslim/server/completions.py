"""``POST /v1/completions`` and ``POST /v1/chat/completions``: requests in, engine events out.

A handler turns the body into prompt token ids and ``SamplingParams``, submits one engine
request per prompt, and then either collects every event into one JSON response or streams
them as server-sent events ending with ``data: [DONE]``. Whatever way the handler ends
(finished, error, client gone, ``--request-timeout`` passed), unfinished engine requests are
aborted, so a disconnected client frees its batch slots at the next decode step.

Nothing here calls the tokenizer on the event loop: prompts are tokenized (and chat templates
rendered) in the threadpool after their size is checked, and log-prob token texts come from a
table (``ServerState.token_text``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from ..runtime.sampling import SamplingParams
from .engine import Done, EngineDown, Event, Failed, LengthError, Output, PromptLogprobs, QueueFull
from .outputs import TopLogprobs
from .schemas import ChatRequest, CompletionRequest, Sampling
from .state import APIError, ServerState, error_body

router = APIRouter()

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks for its client
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way


def _lp(x: float) -> float:
    return x if x > LOGPROB_FLOOR else LOGPROB_FLOOR


class ClientGone(Exception):
    pass


class TimedOut(Exception):
    pass


def _timeout_error(state: ServerState) -> APIError:
    return APIError(504, f"the request took longer than this server allows ({state.request_timeout:g} s)",
                    "timeout_error", None, "request_timeout")


class Submission:
    """The engine requests of one HTTP request, and their events on this event loop.

    The hand-off is built for batch 1, where one decode step takes ~15 ms and every wake-up of
    the event loop competes with the decode for the CPU: the engine thread appends events to a
    deque and wakes the loop only when it has to -- for a streamed response when no wake-up is
    already pending (events that arrive meanwhile ride along), for a whole response only when a
    request ends (nothing is sent before then). A whole response thus costs the event loop one
    wake-up, not one per token; the loop still looks for a gone client every
    ``DISCONNECT_POLL_S`` and for the request timeout.
    """

    def __init__(self, state: ServerState, stream: bool = False, arrival: float | None = None):
        """``arrival``: when the request came (the loop's clock); the request timeout counts from
        there, so time spent tokenizing or waiting for the tokenizer counts too."""
        self.state, self.stream = state, stream
        self.loop = asyncio.get_running_loop()
        self.items: deque[tuple[int, Event]] = deque()
        self.rids: list[str] = []
        self.ended: set[int] = set()
        self.closed = False
        self._waiter: asyncio.Future | None = None
        self._pending = False  # a wake-up is scheduled on the loop and has not run yet
        timeout = state.request_timeout
        self.deadline = (self.loop.time() if arrival is None else arrival) + timeout if timeout else None

    def _sink(self, k: int) -> Callable[[Event], None]:
        items, stream = self.items, self.stream

        def put(event: Event) -> None:  # called on the engine thread
            items.append((k, event))
            if self._pending or not (stream or isinstance(event, Done | Failed)):
                return
            self._pending = True
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        return put

    def _wake(self) -> None:  # on the event loop
        self._pending = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        """Until the engine wakes us or ``timeout`` seconds pass (no task per wait, unlike wait_for)."""
        waiter = self._waiter = self.loop.create_future()
        if self.items:  # arrived before the waiter existed: do not sleep on it
            self._waiter = None
            return
        timer = self.loop.call_later(timeout, _resolve, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], param: str) -> None:
        if self.deadline is not None and self.loop.time() >= self.deadline:
            raise _timeout_error(self.state)  # spent before the engine saw it: do not queue it
        try:
            for k, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                self.rids.append(self.state.engine.submit(ids, p, self._sink(k)))
        except QueueFull as e:
            self.close()
            raise APIError(503, str(e), "server_overloaded", None, "queue_full") from None
        except EngineDown as e:
            self.close()
            raise APIError(503, str(e), "server_error", None, "engine_down") from None
        except LengthError as e:
            self.close()
            raise APIError(400, str(e), "BadRequestError", param, "context_length_exceeded") from None
        except ValueError as e:
            self.close()
            raise APIError(400, str(e), "BadRequestError", param) from None

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Events until every request is done; with ``request``, stops if its client leaves
        (``ClientGone``); past the request timeout, raises ``TimedOut``."""
        next_check = self.loop.time() + DISCONNECT_POLL_S
        items = self.items
        while len(self.ended) < len(self.rids):
            if not items:
                wait = DISCONNECT_POLL_S if request else None
                if self.deadline is not None:
                    left = self.deadline - self.loop.time()
                    if left <= 0:
                        raise TimedOut()
                    wait = left if wait is None else min(wait, left)
                await self._wait(wait)
            # Checked on a clock, not only when idle: tokens may arrive faster than the poll interval.
            if request is not None and self.loop.time() >= next_check:
                next_check = self.loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    raise ClientGone()
            while items:
                k, event = items.popleft()
                if isinstance(event, Done | Failed):
                    self.ended.add(k)
                yield k, event

    def close(self) -> None:
        """Abort whatever has not finished (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for k, rid in enumerate(self.rids):
            if k not in self.ended:
                self.state.engine.abort(rid)


class EngineStream(StreamingResponse):
    """SSE response that notices a client disconnect even while no token is flowing.

    Starlette, under ASGI spec 2.4, only learns of a disconnect when a send fails; a request
    still waiting in the queue would then keep its place. Listening for ``http.disconnect``
    alongside the stream, as Starlette does for older servers, ends it at once; ``on_close``
    then aborts the engine requests.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: dict) -> str:
    return f"data: {_json(obj)}\n\n"


class Chunks:
    """The SSE chunks of one stream: ``head`` (id, object, created, model) is serialized once,
    each chunk only adds its choice (the same bytes ``_sse(head | {"choices": [...], ...})`` gives)."""

    def __init__(self, head: dict, usage_null: bool):
        self.prefix = "data: " + _json(head)[:-1] + ',"choices":['
        self.suffix = '],"usage":null}\n\n' if usage_null else "]}\n\n"

    def __call__(self, choice: dict) -> str:
        return self.prefix + _json(choice) + self.suffix


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _failure(event: Failed) -> APIError:
    if event.status == 503:
        return APIError(503, event.message, "server_error", None, event.code)
    return APIError(500, event.message, "InternalServerError")


def _max_tokens(state: ServerState, requested: int | None, prompt_len: int, param: str, n: int = 1) -> int:
    """The request's max_tokens, or what is left of the context (and of the KV budget); over the
    server's cap -> 400."""
    cap = state.max_tokens_cap
    if requested is None:
        left = max(state.engine.max_model_len - prompt_len, 0)
        budget = state.engine.max_kv_tokens
        if budget is not None:
            left = max(min(left, budget // n - prompt_len), 0)
        return min(left, cap) if cap else left
    if cap and requested > cap:
        raise APIError(400, f"{param}={requested} is more than this server allows ({cap})", param=param)
    return requested


def _check_lengths(state: ServerState, prompt_len: int, max_tokens: int, param: str) -> None:
    try:
        state.engine.check_lengths(prompt_len, max_tokens)
    except LengthError as e:
        raise APIError(400, str(e), "BadRequestError", param, "context_length_exceeded") from None


def _check_supported(body: Sampling) -> None:
    refused = body.unsupported()
    if refused is not None:
        param, message = refused
        raise APIError(400, message, param=param)


def _params(state: ServerState, body: Sampling, max_tokens: int, logprobs: int | None,
            prompt_logprobs: int | None) -> SamplingParams:
    """``SamplingParams`` of a request, or a 400 naming the parameter that is wrong."""
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must be at most max_tokens ({max_tokens})",
                       param="min_tokens")
    if body.logit_bias:
        state.check_ids([int(k) for k in body.logit_bias], "logit_bias")
    try:
        return body.sampling(max_tokens, logprobs, prompt_logprobs)
    except ValueError as e:
        raise APIError(400, str(e)) from None


# --- completions --------------------------------------------------------------------------------


class TextChoice:
    """One choice of a completion, in OpenAI's ``text_completion`` shape."""

    def __init__(self, state: ServerState, logprobs: bool):
        self.state, self.want_lp = state, logprobs
        self.text: list[str] = []
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[dict | None] = []
        self.offsets: list[int] = []
        self.offset = 0
        self.finish_reason: str | None = None

    def add_logprobs(self, ids: list[int], entries: Iterable[tuple[float, TopLogprobs] | None]) -> None:
        for token, entry in zip(ids, entries, strict=True):
            s = self.state.token_text(token)
            self.tokens.append(s)
            self.offsets.append(self.offset)
            self.offset += len(s)
            if entry is None:
                self.token_logprobs.append(None)
                self.top.append(None)
                continue
            lp, tops = entry
            self.token_logprobs.append(_lp(lp))
            top = {self.state.token_text(t): _lp(v) for t, v in tops}
            top.setdefault(s, _lp(lp))  # the chosen token is always listed, as in vLLM
            self.top.append(top)

    def logprobs_block(self, start: int = 0) -> dict | None:
        if not self.want_lp:
            return None
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top[start:], "text_offset": self.offsets[start:]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    arrival = asyncio.get_running_loop().time()
    state: ServerState = request.app.state.llmslim
    state.check_model(body.model)
    _check_supported(body)
    prompts, texts = await _completion_prompts(state, body.prompt)
    want_lp = body.logprobs is not None
    params = [_params(state, body, _max_tokens(state, body.max_tokens, len(ids), "max_tokens", body.n),
                      body.logprobs, body.logprobs if body.echo and want_lp else None) for ids in prompts]
    for ids, p in zip(prompts, params, strict=True):  # before echo decodes a prompt that cannot fit
        _check_lengths(state, len(ids), p.max_tokens, "prompt")
    if body.echo and any(t is None for t in texts):  # token-id prompts: their text, off the event loop
        texts = await run_in_threadpool(lambda: [t if t is not None else state.decode(p)
                                                 for t, p in zip(texts, prompts, strict=True)])
    sub = Submission(state, body.stream, arrival)
    sub.submit(prompts, params, "prompt")
    rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.n
    choices = {k * n + i: TextChoice(state, want_lp) for k in range(len(prompts)) for i in range(n)}
    prompt_tokens = sum(len(p) for p in prompts)

    def echo_prefix(k: int, i: int, event: PromptLogprobs | None) -> None:
        c = choices[k * n + i]
        c.text.append(texts[k])
        if event is not None:
            c.add_logprobs(prompts[k], event.entries)

    def apply(k: int, event: Event, pending_echo: dict) -> int | None:
        """Fold ``event`` into its choice; returns the choice index it changed, if any."""
        if isinstance(event, PromptLogprobs):
            pending_echo[k] = event
            return None
        if not isinstance(event, Output):
            return None
        idx = k * n + event.index
        if body.echo and idx not in echoed:
            echoed.add(idx)
            echo_prefix(k, event.index, pending_echo.get(k))
        c = choices[idx]
        c.text.append(event.text)
        if want_lp and event.logprobs is not None:
            c.add_logprobs(event.token_ids, event.logprobs)
        c.finish_reason = event.finish_reason or c.finish_reason
        return idx

    echoed: set[int] = set()
    pending: dict[int, PromptLogprobs] = {}
    completion_tokens = 0

    if not body.stream:
        try:
            async for k, event in sub.events(request):
                if isinstance(event, Failed):
                    raise _failure(event)
                if isinstance(event, Done):
                    completion_tokens += event.completion_tokens
                apply(k, event, pending)
        except ClientGone:
            return JSONResponse(error_body("client disconnected", "invalid_request_error"), 499)
        except TimedOut:
            raise _timeout_error(state) from None
        finally:
            sub.close()
        return {"id": rid, "object": "text_completion", "created": created, "model": state.name,
                "choices": [{"index": i, "text": "".join(c.text), "logprobs": c.logprobs_block(),
                             "finish_reason": c.finish_reason} for i, c in sorted(choices.items())],
                "usage": _usage(prompt_tokens, completion_tokens)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream() -> AsyncIterator[str]:
        nonlocal completion_tokens
        sent_lp = dict.fromkeys(choices, 0)  # log-prob entries already streamed per choice
        sent_text = dict.fromkeys(choices, 0)
        chunks = Chunks({"id": rid, "object": "text_completion", "created": created, "model": state.name},
                        include_usage)
        try:
            async for k, event in _until_timeout(sub):
                if isinstance(event, Failed):
                    yield _sse(error_body(event.message, "server_error", None, event.code))
                    break
                if isinstance(event, Done):
                    completion_tokens += event.completion_tokens
                idx = apply(k, event, pending)
                if idx is None:
                    continue
                c = choices[idx]
                text = "".join(c.text[sent_text[idx]:])
                if not text and not want_lp and c.finish_reason is None:
                    continue
                sent_text[idx] = len(c.text)
                chunk = chunks({"index": idx, "text": text, "logprobs": c.logprobs_block(sent_lp[idx]),
                                "finish_reason": c.finish_reason})
                sent_lp[idx] = len(c.tokens)
                yield chunk
            if include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": state.name,
                            "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            sub.close()

    return EngineStream(stream(), sub.close)


async def _until_timeout(sub: Submission) -> AsyncIterator[tuple[int, Event]]:
    """A stream's events; past the request timeout, one ``Failed`` that says so (then the stream ends)."""
    try:
        async for item in sub.events():
            yield item
    except TimedOut:
        err = _timeout_error(sub.state)
        yield -1, Failed(err.message, err.status, err.code)


async def _completion_prompts(state: ServerState, prompt) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of each prompt, and its text when it came as text (for echo)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if isinstance(prompt[0], str):
        # A token covers at least one character of ordinary text, so text far beyond
        # max_model_len * (longest token) cannot fit: refuse it before spending time tokenizing.
        for p in prompt:
            state.check_text_size(len(p), "prompt")
        ids = [await run_in_threadpool(state.encode, p) for p in prompt]
        if not all(ids):
            raise APIError(400, "the prompt is empty after tokenization", param="prompt")
        return ids, list(prompt)
    for p in prompt:
        if not p:
            raise APIError(400, "a token-id prompt is empty", param="prompt")
        state.check_ids(p, "prompt")
    return [list(p) for p in prompt], [None] * len(prompt)


# --- chat ---------------------------------------------------------------------------------------


def _chat_logprobs(state: ServerState, ids: list[int], entries: list[tuple[float, TopLogprobs]]) -> list[dict]:
    def item(token: int, lp: float) -> dict:
        s = state.token_text(token)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

    return [item(t, lp) | {"top_logprobs": [item(a, v) for a, v in tops]}
            for t, (lp, tops) in zip(ids, entries, strict=True)]


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request):
    arrival = asyncio.get_running_loop().time()
    state: ServerState = request.app.state.llmslim
    state.check_model(body.model)
    _check_supported(body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    state.check_messages_size(body.messages)  # before rendering: that is the slow part
    ids = await run_in_threadpool(state.apply_template, body.messages, body.add_generation_prompt)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = _params(state, body, _max_tokens(state, requested, len(ids), param, body.n),
                     (body.top_logprobs or 0) if body.logprobs else None, None)
    sub = Submission(state, body.stream, arrival)
    sub.submit([ids], [params], "messages")
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": state.name}

    if not body.stream:
        text = {i: [] for i in range(body.n)}
        lps: dict[int, list] = {i: [] for i in range(body.n)}
        reasons: dict[int, str | None] = {}
        completion_tokens = 0
        try:
            async for _, event in sub.events(request):
                if isinstance(event, Failed):
                    raise _failure(event)
                if isinstance(event, Done):
                    completion_tokens = event.completion_tokens
                if isinstance(event, Output):
                    text[event.index].append(event.text)
                    if event.logprobs is not None:
                        lps[event.index] += _chat_logprobs(state, event.token_ids, event.logprobs)
                    reasons[event.index] = event.finish_reason
        except ClientGone:
            return JSONResponse(error_body("client disconnected", "invalid_request_error"), 499)
        except TimedOut:
            raise _timeout_error(state) from None
        finally:
            sub.close()
        return head | {"object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(text[i])},
             "logprobs": {"content": lps[i]} if body.logprobs else None, "finish_reason": reasons.get(i)}
            for i in range(body.n)], "usage": _usage(len(ids), completion_tokens)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream() -> AsyncIterator[str]:
        chunk_head = head | {"object": "chat.completion.chunk"}
        chunks = Chunks(chunk_head, include_usage)
        started: set[int] = set()
        try:
            async for _, event in _until_timeout(sub):
                if isinstance(event, Failed):
                    yield _sse(error_body(event.message, "server_error", None, event.code))
                    break
                if isinstance(event, Done) and include_usage:
                    yield _sse(chunk_head | {"choices": [], "usage": _usage(len(ids), event.completion_tokens)})
                if not isinstance(event, Output):
                    continue
                if event.index not in started:
                    started.add(event.index)
                    yield chunks({"index": event.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None})
                if not event.text and event.finish_reason is None and event.logprobs is None:
                    continue
                lp = ({"content": _chat_logprobs(state, event.token_ids, event.logprobs)}
                      if event.logprobs is not None else None)
                delta = {"content": event.text} if event.text or event.finish_reason is None else {}
                yield chunks({"index": event.index, "delta": delta, "logprobs": lp,
                              "finish_reason": event.finish_reason})
            yield "data: [DONE]\n\n"
        finally:
            sub.close()

    return EngineStream(stream(), sub.close)
