"""The HTTP side: FastAPI app, OpenAI-shaped errors, API-key auth, and the small routes.

``create_app`` wires an ``Engine`` to the routes. Completions and chat live in
``completions.py``; what every route shares (``ServerState``, ``APIError``, tokenizer access)
lives in ``state.py``; this module holds the app, its error handlers and the routes that need
no engine step (models, tokenize, health, metrics).

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``, including
validation errors (400, not FastAPI's 422), unknown routes and unexpected exceptions, so a
client never has to parse two shapes, and a bad request never harms the engine thread.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .completions import router
from .metrics import render
from .page import router as page_router
from .schemas import DetokenizeRequest, TokenizeRequest
from .state import APIError, ServerState, error_body

log = logging.getLogger("llmslim.server")

PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: body size limit and API-key check, before any parsing happens.

    Doing auth here (not as a route dependency) means a request without the key is refused
    with 401 even when its body is malformed, and it costs no JSON parsing. The body limit
    holds whatever the framing: a ``Content-Length`` over it is refused before reading, and a
    chunked body is counted as it arrives and refused (413) the moment it passes the limit,
    without reading the rest.
    """

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.state.api_key is not None and path.startswith(PROTECTED) and not self._authorized(headers):
            return await self._reject(scope, send, 401, "Incorrect API key provided.", "invalid_api_key", "authentication_error")
        limit = self.state.max_body_bytes
        too_large = f"request body over {limit} bytes"
        length = headers.get("content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await self._reject(scope, send, 413, too_large, "request_too_large")

        received = 0
        over = False
        replied = False

        async def counted_receive():
            nonlocal received, over
            if over:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True  # nothing more is read: whoever was reading gets an exception
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal replied
            if over:  # whatever the app answers to the exception, the client gets the 413
                if not replied:
                    replied = True
                    await self._reject(scope, send, 413, too_large, "request_too_large")
                return
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not replied:
            replied = True
            await self._reject(scope, send, 413, too_large, "request_too_large")

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        # compare_digest on bytes: constant time, and no TypeError on non-ASCII input
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.state.api_key.encode())

    async def _reject(self, scope: Scope, send: Send, status: int, message: str, code: str,
                      type_: str = "invalid_request_error") -> None:
        self.state.http_errors[status] = self.state.http_errors.get(status, 0) + 1
        response = JSONResponse(error_body(message, type_, None, code), status_code=status)
        await response(scope, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}{more}", param


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llmslim", description="OpenAI-compatible server for llmslim models")
    app.state.llmslim = state

    def count(status: int) -> None:
        state.http_errors[status] = state.http_errors.get(status, 0) + 1

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        count(exc.status)
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        count(400)
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "BadRequestError", param, None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        count(exc.status_code)
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error in %s", request.url.path)
        count(500)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "InternalServerError"), 500)

    app.include_router(router)
    app.include_router(page_router)  # the chat playground at /, and the facts it shows

    @app.get("/health")
    async def health():
        if not state.engine.healthy:
            raise APIError(503, f"engine down: {state.engine.error or 'not running'}", "server_error",
                           code="engine_down")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        e = state.engine
        text = render(e.stats, e.running, e.waiting, state.http_errors, e.kv_tokens, e.max_kv_tokens, e.prefilling)
        return Response(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state, state.name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.check_model(model_id)
        return _model_card(state, model_id)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` or `messages`")
        if body.messages is not None:  # sizes checked before any rendering or tokenizing
            state.check_messages_size(body.messages)
            ids = await run_in_threadpool(state.apply_template, body.messages, body.add_generation_prompt)
        else:
            state.check_text_size(len(body.prompt), "prompt")
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await run_in_threadpool(state.encode, body.prompt, special)
        return {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """vLLM's endpoint; lm-eval's remote tokenizer backend reads it, so no local copy is needed."""
        tok = state.tokenizer
        template = getattr(tok, "chat_template", None)
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": getattr(tok, "unk_token", None),
                "chat_template": template if isinstance(template, str) else None,
                "model_max_length": state.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        state.check_ids(body.tokens, "tokens")
        return {"prompt": await run_in_threadpool(state.decode, body.tokens)}

    app.add_middleware(Guard, state=state)
    return app


def _model_card(state: ServerState, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "llmslim",
            "root": state.model_names[-1], "max_model_len": state.engine.max_model_len}
