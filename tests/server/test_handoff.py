"""The engine -> event loop hand-off and the per-token text (issue 20): a whole response wakes the
event loop once, not once per token; a stream at most once per token; incremental text equals the
tokenizer's own decode."""

from __future__ import annotations

import random

import httpx

from llmslim.server import completions
from llmslim.server.outputs import Detokenizer, decoder
from tests.conftest import make_tiny_tokenizer
from tests.server.conftest import API_KEY, MODEL


def count_wakes(monkeypatch) -> list[int]:
    wakes = [0]
    wake = completions.Submission._wake

    def counted(self):
        wakes[0] += 1
        wake(self)

    monkeypatch.setattr(completions.Submission, "_wake", counted)
    return wakes


def test_a_whole_response_wakes_the_event_loop_once(server, monkeypatch):
    wakes = count_wakes(monkeypatch)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
        assert wakes[0] == 1  # on Done; the 40 tokens waited in the deque
        r = http.post("/v1/completions", json=body | {"n": 3, "prompt": ["a b", "c d"]})
        assert r.status_code == 200 and len(r.json()["choices"]) == 6
        assert wakes[0] <= 1 + 2  # one per finished prompt at most


def test_a_stream_wakes_the_event_loop_at_most_once_per_token(server, monkeypatch):
    wakes = count_wakes(monkeypatch)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert 1 <= wakes[0] <= 41  # 40 tokens + Done, fewer when events queued up while the loop was busy


def test_incremental_text_equals_the_tokenizers_decode():
    tok = make_tiny_tokenizer()
    rng = random.Random(0)
    fast = decoder(tok, True)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]  # byte pieces and specials too
        want = tok.decode(ids, skip_special_tokens=True)
        assert fast(ids) == want
        d = Detokenizer(tok)
        assert "".join(d.add(t) for t in ids) + d.flush() == want
