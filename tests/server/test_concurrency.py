"""Continuous batching under load: many streams at once, same greedy text as one at a time;
a client that disconnects frees its batch slot."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.server.conftest import API_KEY, MODEL, start, stop

WORDS = "Once upon a time there was a little girl named Lily who liked to play in the park".split()


def prompts(count: int) -> list[tuple[str, int]]:
    """Prompts of different lengths and different output lengths, so rows join and leave at different steps."""
    return [(" ".join(WORDS[i % 7: i % 7 + 2 + i % 11]), 4 + (i * 7) % 29) for i in range(count)]


def test_32_concurrent_streams_equal_sequential(server):
    cases = prompts(32)
    client = server.client()
    sequential = [client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text for p, n in cases]
    steps_before = server.engine.stats.steps
    rows_before = server.engine.stats.batch_size.sum

    async def one(aclient, prompt: str, n: int) -> tuple[str, str | None]:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        text, reason = [], None
        async for chunk in stream:
            text.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(text), reason

    async def main():
        async with server.async_client(http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64))) as c:
            return await asyncio.gather(*(one(c, p, n) for p, n in cases))

    results = asyncio.run(main())
    assert [r[0] for r in results] == sequential
    assert all(r[1] == "length" for r in results)
    steps = server.engine.stats.steps - steps_before
    mean_batch = (server.engine.stats.batch_size.sum - rows_before) / steps
    assert mean_batch > 2, f"requests were not batched (mean batch {mean_batch:.2f})"
    assert server.engine.running == 0 and server.engine.waiting == 0


def _slow_server():
    """A server whose decode steps take 20 ms, so a long request is surely still running."""
    running = start(max_batch=2, max_queue=4)
    engine = running.engine
    decode = engine._decode

    def slow_decode():
        time.sleep(0.02)
        decode()

    engine._decode = slow_decode
    return running


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_disconnect_mid_stream_frees_the_slot():
    running = _slow_server()
    engine = running.engine
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        with httpx.Client(base_url=running.url, headers=headers, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(4)]
                assert any(line.startswith("data: ") for line in got)
                assert engine.running == 1
            # leaving the block closed the connection mid-stream
            assert _wait(lambda: engine.running == 0), "the disconnected request kept its slot"
            assert engine.stats.aborted == 1
            # a queued (not yet running) request is dropped too when its client leaves
            engine._admit, admit = (lambda: None), engine._admit
            with http.stream("POST", "/v1/completions", json=body):
                assert _wait(lambda: engine.waiting == 1)
            assert _wait(lambda: engine.waiting == 0) and engine.stats.aborted == 2
            engine._admit = admit
            # and a non-streaming client that gives up is noticed as well
            try:
                http.post("/v1/completions", json=body | {"stream": False}, timeout=0.5)
            except httpx.TimeoutException:
                pass
            assert _wait(lambda: engine.stats.aborted == 3 and engine.running == 0), (engine.stats, engine.running, engine.waiting)
            assert http.post("/v1/completions", json=body | {"stream": False, "max_tokens": 3}).status_code == 200
    finally:
        stop(running)
