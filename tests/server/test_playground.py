"""The chat playground at ``/`` in a real browser (slow suite): Playwright driving Chromium.

The server is the tests' tiny random model, slowed to ~25 tokens/s (a sleep in its embedding's
forward) and with no end-of-sequence token, so every answer streams for as long as asked and
Stop can land mid-stream. Screenshots are left in out/browser-tests/<test>/.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

from tests.browser import Console, browser, output_dir
from tests.server.conftest import API_KEY, start, stop

pytestmark = pytest.mark.slow

STEP_S = 0.04  # per forward: ~25 tokens/s, slow enough to watch, fast enough for a test
ALLOWED_401 = r"status of 401"  # Chromium logs every failed fetch; the 401s before the key is entered are expected


@pytest.fixture(scope="module")
def slow_server():
    running = start(api_key=API_KEY, max_batch=4, max_queue=16)
    running.engine.model.get_input_embeddings().register_forward_hook(lambda *a: time.sleep(STEP_S))
    running.engine.eos_ids = set()  # a random model may sample EOS at once; answers run to max_tokens
    yield running
    stop(running)


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def metric(server, name: str) -> float:
    import httpx

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def enter_key(page, key: str = API_KEY) -> None:
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    page.wait_for_selector('#facts-list dd[data-fact="id"]')


def last_answer(page):
    return page.locator("#log article.msg").last


def wait_done(page, timeout: float = 30_000) -> None:
    page.wait_for_function("() => { const a = [...document.querySelectorAll('#log article.msg')].pop();"
                           " return a && a.dataset.state; }", timeout=timeout)


def set_params(page, max_tokens: int, temperature: float = 0.0) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))


def test_chat_streams_stops_and_carries_the_conversation(page, slow_server, request):
    out = output_dir(request)
    console = Console(page)
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(slow_server.url + "/")

    # Without the key: the page says so and points at the key field; nothing else works yet.
    page.wait_for_selector("#key-status.error")
    assert "requires an API key" in page.inner_text("#key-status")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#prompt", "Hello there")
    page.click("#send")
    wait_done(page)
    assert last_answer(page).get_attribute("data-state") == "error"
    assert "API key" in last_answer(page).inner_text()
    assert page.input_value("#prompt") == "Hello there"  # kept, to send again once the key is in
    page.screenshot(path=out / "1-no-key.png", full_page=True)

    # With the key: model facts appear.
    enter_key(page)
    assert page.inner_text('dd[data-fact="id"]') == "tiny"
    assert "float32" in page.inner_text('dd[data-fact="quantization"]')
    assert "MiB" in page.inner_text('dd[data-fact="rss_bytes"]')
    assert "Key accepted" in page.inner_text("#key-status")

    # Turn 1 streams: the text grows over several observations before the answer is done.
    page.click("#clear")
    page.fill("#system", "You are terse.")
    set_params(page, max_tokens=40)
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    seen = []
    deadline = time.time() + 30
    while time.time() < deadline:
        state = last_answer(page).get_attribute("data-state")
        pieces = int(last_answer(page).get_attribute("data-pieces") or 0)
        if pieces and (not seen or pieces != seen[-1]):
            seen.append(pieces)
        if state:
            break
        time.sleep(0.05)
    assert last_answer(page).get_attribute("data-state") == "done"
    assert len(seen) >= 4 and seen == sorted(seen), seen  # incremental, not all at once
    assert last_answer(page).get_attribute("data-tokens") == "40"
    stats = last_answer(page).locator(".stats").inner_text()
    assert "40 tokens" in stats and "tok/s" in stats and "finish: length" in stats
    first_answer = last_answer(page).locator(".out").inner_text()
    assert first_answer

    # Turn 2 carries turn 1 (and the system prompt).
    set_params(page, max_tokens=8)
    page.fill("#prompt", "And of Italy?")
    page.press("#prompt", "Enter")
    wait_done(page)
    sent = bodies[-1]["messages"]
    assert sent == [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": first_answer},
                    {"role": "user", "content": "And of Italy?"}]
    assert bodies[-1]["stream"] is True and bodies[-1]["max_tokens"] == 8 and bodies[-1]["temperature"] == 0

    # Stop mid-stream: the server's running count drops and the request counts as aborted.
    aborted = metric(slow_server, "llmslim_requests_aborted_total")
    page.click("#clear")  # the tiny model's context is 256 tokens
    set_params(page, max_tokens=200)
    page.fill("#prompt", "Tell me a long story.")
    page.click("#send")
    page.wait_for_function("() => Number([...document.querySelectorAll('#log article.msg')].pop()"
                           ".dataset.pieces || 0) >= 5")
    assert metric(slow_server, "llmslim_requests_running") == 1
    page.screenshot(path=out / "2-streaming.png", full_page=True)
    page.click("#stop")
    wait_done(page)
    assert last_answer(page).get_attribute("data-state") == "stopped"
    deadline = time.time() + 5
    while metric(slow_server, "llmslim_requests_running") != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(slow_server, "llmslim_requests_running") == 0
    assert metric(slow_server, "llmslim_requests_aborted_total") == aborted + 1
    stopped_at = int(last_answer(page).get_attribute("data-pieces"))
    assert 5 <= stopped_at < 200
    time.sleep(0.3)
    assert int(last_answer(page).get_attribute("data-pieces")) == stopped_at  # nothing more arrives
    assert "stopped" in last_answer(page).locator(".stats").inner_text()
    page.screenshot(path=out / "3-stopped.png", full_page=True)

    # Completion mode: the prompt is continued, no chat template.
    page.check('input[name="mode"][value="completion"]')
    assert page.is_disabled("#system")
    set_params(page, max_tokens=12)
    page.fill("#prompt", "Once upon a time")
    page.click("#send")
    wait_done(page)
    assert bodies[-1]["prompt"] == "Once upon a time" and "messages" not in bodies[-1]
    assert last_answer(page).get_attribute("data-state") == "done"
    assert last_answer(page).get_attribute("data-tokens") == "12"
    assert last_answer(page).locator(".text").inner_text().startswith("Once upon a time")
    page.screenshot(path=out / "4-completion.png", full_page=True)
    assert console.unexpected(allowed=ALLOWED_401) == []


def test_wrong_key_fails_clearly(page, slow_server):
    page.goto(slow_server.url + "/")
    page.wait_for_selector("#key-status.error")
    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.querySelector('#key-status').textContent.includes('refused')")
    assert page.get_attribute("#api-key", "aria-invalid") == "true"
    page.fill("#prompt", "Hi")
    page.click("#send")
    wait_done(page)
    assert "refused this API key" in last_answer(page).inner_text()


def test_keyboard_alone(page, slow_server, request):
    """Key, prompt, send and stop, with the keyboard only."""
    out = output_dir(request)
    page.goto(slow_server.url + "/")
    page.wait_for_selector("#key-status.error")
    assert page.evaluate("document.activeElement.id") == "api-key"  # the page puts the cursor there
    page.keyboard.type(API_KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector('#facts-list dd[data-fact="id"]')
    for _ in range(25):  # Tab until the prompt: every control on the way is reachable
        if page.evaluate("document.activeElement.id") == "prompt":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.press("Shift+Tab")  # and back: the log, then the settings
    assert page.evaluate("document.activeElement.id") == "log"
    page.keyboard.press("Tab")
    page.keyboard.type("Tell me about Paris")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("in detail.")
    assert page.input_value("#prompt") == "Tell me about Paris\nin detail."
    page.keyboard.press("Enter")
    page.wait_for_function("() => Number([...document.querySelectorAll('#log article.msg')].pop()"
                           ".dataset.pieces || 0) >= 3")
    page.keyboard.press("Escape")
    wait_done(page)
    assert last_answer(page).get_attribute("data-state") == "stopped"
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.screenshot(path=out / "keyboard.png", full_page=True)


# ---- behind a reverse proxy at a sub-path ------------------------------------------------------


def proxy_app(target: str):
    """What nginx's ``location /llm { proxy_pass http://backend/; proxy_buffering off; }`` does."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=target, timeout=None)
    hop = {"host", "content-length", "transfer-encoding", "connection"}

    async def forward(request):
        path = "/" + request.path_params.get("path", "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in hop]
        upstream = client.build_request(request.method, httpx.URL(path, query=request.url.query.encode()),
                                        headers=headers, content=await request.body())
        response = await client.send(upstream, stream=True)

        async def body():
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        kept = {k: v for k, v in response.headers.items() if k.lower() not in hop}
        return StreamingResponse(body(), response.status_code, headers=kept)

    methods = ["GET", "POST"]
    return Starlette(routes=[Route("/llm", forward, methods=methods), Route("/llm/{path:path}", forward, methods=methods)])


def serve_in_thread(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def test_behind_a_reverse_proxy_at_a_sub_path(page, slow_server, request):
    out = output_dir(request)
    url, server, thread = serve_in_thread(proxy_app(slow_server.url))
    try:
        console = Console(page)
        urls = []
        page.on("request", lambda r: urls.append(r.url))
        page.goto(url + "/llm")  # no trailing slash: the page moves itself to /llm/
        page.wait_for_url(url + "/llm/")
        enter_key(page)
        set_params(page, max_tokens=10)
        page.fill("#prompt", "Hello through the proxy")
        page.press("#prompt", "Enter")
        wait_done(page)
        assert last_answer(page).get_attribute("data-state") == "done"
        assert last_answer(page).get_attribute("data-tokens") == "10"
        page.screenshot(path=out / "proxy.png", full_page=True)
        # Every request of the page at /llm/ stays under the sub-path. (Before the redirect, Chromium's
        # preload scanner may have asked for /static/*: a miss the real page never depends on.)
        urls = urls[urls.index(url + "/llm/"):]
        assert all(u.startswith(url + "/llm/") for u in urls), urls
        assert {u.removeprefix(url) for u in urls} >= {"/llm/", "/llm/static/app.js", "/llm/static/style.css",
                                                       "/llm/v1/llmslim/info", "/llm/v1/chat/completions"}
        assert console.unexpected(allowed=ALLOWED_401 + rf"|status of 404 .* @ {url}/static/") == []
    finally:
        server.should_exit = True
        thread.join(timeout=10)
