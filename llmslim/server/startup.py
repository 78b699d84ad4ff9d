"""The port is open before the model is: ``Loading`` answers 503 "loading" until it is ready.

``llmslim serve`` binds its port first and loads the model in a background thread (seconds to
minutes), like llama.cpp's server: meanwhile every route, ``/health`` included, answers 503
with ``code: model_loading`` and ``Retry-After``, so clients and probes see a server that is
coming up rather than "connection refused". When loading ends, ``Loading`` hands every request
to the real app; if it fails, the error is kept for the caller (the CLI stops the server and
reports it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from .state import error_body

LOADING_MESSAGE = "the model is loading; retry shortly"


class Loading:
    """ASGI app that is the real app once ``load()`` has returned ``(app, engine)``."""

    def __init__(self, load: Callable[[], tuple[object, object]]):
        self._load = load
        self.app = None
        self.engine = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self, on_ready: Callable[[object, object], None] | None = None,
              on_error: Callable[[BaseException], None] | None = None) -> None:
        """Load in a background thread; then ``on_ready(app, engine)`` or ``on_error(exception)``."""

        def run() -> None:
            try:
                app, engine = self._load()
            except BaseException as e:  # reported by the caller, whatever it is
                self.error = e
                if on_error is not None:
                    on_error(e)
                return
            self.engine, self.app = engine, app
            if on_ready is not None:
                on_ready(app, engine)

        self.thread = threading.Thread(target=run, name="llmslim-load", daemon=True)
        self.thread.start()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        if app is not None:
            return await app(scope, receive, send)
        if scope["type"] == "lifespan":  # nothing to start or stop here: acknowledge
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http":
            body = error_body(LOADING_MESSAGE, "server_error", None, "model_loading")
            await JSONResponse(body, 503, headers={"Retry-After": "1"})(scope, receive, send)


OVERLOADED_MESSAGE = "too many requests in flight; retry shortly"
ALWAYS_ANSWERED = ("/health", "/metrics")  # cheap, and probes must see an overloaded server as alive


class ConcurrencyLimit:
    """ASGI wrapper: at most ``limit`` HTTP requests in flight; beyond that 503 in OpenAI's error
    shape with ``Retry-After`` (uvicorn's own ``limit_concurrency`` answers a plain-text 503 that
    OpenAI clients cannot parse). ``/health`` and ``/metrics`` are always answered."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in ALWAYS_ANSWERED:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            body = error_body(OVERLOADED_MESSAGE, "server_error", None, "overloaded")
            return await JSONResponse(body, 503, headers={"Retry-After": "1"})(scope, receive, send)
        self.in_flight += 1  # one event loop: no lock needed between the check and the increment
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
