"""A real server on 127.0.0.1 (uvicorn in a thread, a free port) over a tiny random model."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest

API_KEY = "test-key"
MODEL = "tiny"


@dataclass
class Running:
    url: str
    app: object
    engine: object
    server: object
    thread: threading.Thread

    @property
    def state(self):
        return self.app.state.llmslim

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60, **kw)

    def async_client(self, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120, **kw)


def start(api_key: str | None = API_KEY, arch: str = "llama", checkpoint: str | None = None, **options) -> Running:
    """Serve a tiny model of ``arch`` built in memory, or ``checkpoint`` loaded from disk."""
    import uvicorn

    from llmslim.server import build
    from tests.conftest import make_tiny_model, make_tiny_tokenizer

    if checkpoint is not None:
        app, engine = build(checkpoint, MODEL, api_key=api_key, fast=False, **options)
    else:
        app, engine = build(MODEL, api_key=api_key, fast=False, model=make_tiny_model(arch),
                            tokenizer=make_tiny_tokenizer(), **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; uvicorn serves on this very socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{port}", app, engine, server, thread)


def stop(running: Running) -> None:
    running.server.should_exit = True
    running.thread.join(timeout=30)
    running.engine.stop()


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """The tiny models are all overhead: one thread avoids OpenMP barrier waits, which on a
    busy machine made each decode step of a 2-layer model take 60 ms instead of 3."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def server():
    running = start(max_batch=8, max_queue=64)
    yield running
    stop(running)


@pytest.fixture
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c
