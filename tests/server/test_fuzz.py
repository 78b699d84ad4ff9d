"""Bounded fuzzing: no request body, however wrong, gets a 5xx or harms the server."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, start, stop

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def fuzz_server():
    # a short context and a max_tokens cap keep the valid requests fuzzing produces cheap
    running = start(max_batch=4, max_queue=16, max_model_len=96, max_tokens_cap=16)
    yield running
    stop(running)


def check(response: httpx.Response | object, what: str, failures: list[str]) -> None:
    status = response.status_code
    if status >= 500:
        failures.append(f"{status} for {what}: {response.text[:300]}")
    elif status >= 400:
        err = response.json().get("error")
        if not isinstance(err, dict) or not {"message", "type", "param", "code"} <= set(err):
            failures.append(f"{status} not in OpenAI error shape for {what}: {response.text[:300]}")


VALUES = [None, True, -1, 0, 1, 3, 2**31, 2**64, -(2**63), 1e308, -1e-300, 0.5, "", "x", "é" * 50, "\x00",
          [], [0], [-5], [[1, 2]], [[]], ["a", 1], {}, {"a": 1}, [{"role": "user"}], "<|im_end|>" * 20]
VALID = {
    "/v1/completions": {"model": MODEL, "prompt": "Once upon", "max_tokens": 3, "temperature": 0.7, "top_p": 0.9,
                        "top_k": 5, "n": 2, "stop": ["a"], "seed": 1, "logprobs": 2, "echo": True,
                        "stream": False, "min_tokens": 1, "repetition_penalty": 1.1, "stop_token_ids": [3]},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                             "logprobs": True, "top_logprobs": 2, "n": 1, "stream": False, "seed": 3,
                             "stream_options": {"include_usage": True}, "ignore_eos": True},
    "/tokenize": {"model": MODEL, "prompt": "hello"},
    "/detokenize": {"model": MODEL, "tokens": [5, 6]},
}


def test_hand_rolled_fuzz(fuzz_server):
    rng = random.Random(0)
    failures: list[str] = []
    with httpx.Client(base_url=fuzz_server.url, headers=AUTH, timeout=60) as http:
        for i in range(240):
            path = rng.choice(list(VALID))
            body = dict(VALID[path])
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(list(body) + ["junk"])
                if rng.random() < 0.2:
                    body.pop(key, None)
                else:
                    body[key] = rng.choice(VALUES)
            if i % 4 == 0:
                body["stream"] = True
            r = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            check(r, f"{path} {body}", failures)
        assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2}).status_code == 200
    assert not failures, "\n".join(failures[:10])
    assert fuzz_server.engine.running == 0 and fuzz_server.engine.waiting == 0


def test_schemathesis_finds_no_5xx(fuzz_server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures: list[str] = []
    calls: dict[str, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=15, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case):
                response = case.call(headers=AUTH, timeout=60)
                path = case.operation.path
                calls[path] = calls.get(path, 0) + 1
                check(response, f"{case.method} {path} {case.body!r:.300}", failures)

            try:
                run()
            except Unsatisfiable:  # no parameters to get wrong (GET /health): nothing to fuzz
                assert mode == schemathesis.GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures[:10])
    assert calls.get("/v1/completions", 0) >= 20 and calls.get("/v1/chat/completions", 0) >= 20, calls
    with httpx.Client(base_url=fuzz_server.url, headers=AUTH, timeout=60) as http:
        assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2}).status_code == 200


def test_max_tokens_cap(fuzz_server):
    """``--max-tokens`` refuses bigger requests and bounds the default of chat."""
    with httpx.Client(base_url=fuzz_server.url, headers=AUTH, timeout=60) as http:
        r = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 17})
        assert r.status_code == 400 and "16" in r.json()["error"]["message"]
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "ignore_eos": True}).json()
        assert chat["usage"]["completion_tokens"] == 16
