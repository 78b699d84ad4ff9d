"""Hostile and heavy traffic (issue 17): each numbered item of the issue has its tests here.

1 body limit on a chunked stream, 2 lone surrogates, 3 logit_bias and refused extras,
4 min_tokens > max_tokens, 5 caps on stop lists, 6 engine death, 7 no tokenizer work on the
event loop, 8 echo + logprobs in bounded memory, 9 timeout / loading / concurrency limit,
10 KV-memory admission.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import threading
import time

import httpx
import pytest
import torch

from llmslim.runtime.sampling import SamplingParams
from llmslim.server.engine import Done, Engine, Failed, Output, PromptLogprobs
from llmslim.util import free_port
from tests.conftest import make_tiny_model, make_tiny_tokenizer
from tests.server.conftest import API_KEY, MODEL, start, stop
from tests.server.test_errors import GOOD, assert_error, assert_still_serving

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post_raw(http: httpx.Client, path: str, raw: str) -> httpx.Response:
    return http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})


def port_of(running) -> int:
    return int(running.url.rsplit(":", 1)[1])


# --- 1: the body limit holds on a chunked stream ---------------------------------------------------


def send_chunked(port: int, total: int, chunk: int = 2**16) -> tuple[str, int]:
    """POST a chunked body of up to ``total`` bytes; returns (the reply, bytes sent before it came)."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        start = b'{"prompt": "'
        s.sendall(head.encode() + f"{len(start):x}\r\n".encode() + start + b"\r\n")
        while sent < total:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                break
            try:
                s.sendall(piece)
            except OSError:  # the server answered and closed: read what it said
                break
            sent += chunk
        s.settimeout(30)
        reply = b""
        while b"}}" not in reply:  # the whole JSON error body, or whatever came before the close
            try:
                data = s.recv(65536)
            except OSError:
                break
            if not data:
                break
            reply += data
    return reply.decode("latin-1"), sent


def test_chunked_body_over_the_limit_is_refused_without_reading_it_all():
    running = start(max_batch=2, max_body_bytes=2**20)
    try:
        reply, sent = send_chunked(port_of(running), 64 * 2**20)
        assert reply.startswith("HTTP/1.1 413"), reply[:200]
        assert '"request_too_large"' in reply
        # the server stopped reading at the limit: the client got its answer long before 64 MiB
        assert sent < 24 * 2**20, sent
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=60) as http:
            # a chunked body under the limit is read as usual
            r = http.post("/v1/completions", content=iter([json.dumps(GOOD).encode()]),
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.text
            assert_still_serving(http)
    finally:
        stop(running)


# --- 2: lone surrogates are a 400 on every route ---------------------------------------------------

SURROGATE = "ok\\ud800bad"  # as it travels in JSON text: valid JSON, invalid Unicode


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", '{"prompt": "SURR", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": ["fine", "SURR"], "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "fine", "max_tokens": 2, "stop": ["SURR"]}'),
    ("/v1/completions", '{"prompt": "fine", "max_tokens": 2, "model": "SURR"}'),
    ("/v1/completions", '{"prompt": "fine", "max_tokens": 2, "stream": true, "user": "SURR"}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "SURR"}], "max_tokens": 2}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "SURR"}]}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "SURR", "content": "hi"}], "max_tokens": 2}'),
    ("/tokenize", '{"prompt": "SURR"}'),
    ("/tokenize", '{"messages": [{"role": "user", "content": "SURR"}]}'),
    ("/detokenize", '{"tokens": [5], "model": "SURR"}'),
])
def test_lone_surrogates_are_a_400(http, path, body):
    err = assert_error(post_raw(http, path, body.replace("SURR", SURROGATE)), 400)
    assert "surrogate" in err["message"]


def test_lone_surrogates_leave_the_server_serving(http):
    post_raw(http, "/v1/completions", '{"prompt": "SURR"}'.replace("SURR", SURROGATE))
    assert_still_serving(http)


# --- 3: logit_bias works like vLLM's; what is not supported says so --------------------------------


def test_logit_bias_changes_the_choice(server, http):
    prompt = [5, 6, 7, 8]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    forced = http.post("/v1/completions", json=body | {"logit_bias": {"77": 100}}).json()["choices"][0]["text"]
    assert forced == server.state.decode([77] * 4) != plain
    # sampling too: +100 leaves no other token any probability
    sampled = http.post("/v1/completions", json=body | {"temperature": 1.0, "seed": 3, "logit_bias": {"77": 100}})
    assert sampled.json()["choices"][0]["text"] == forced
    # -100 bans the greedy token
    with torch.inference_mode():
        top = int(server.engine.model(torch.tensor([prompt])).logits[0, -1].argmax())
    assert http.post("/v1/completions", json=body | {"max_tokens": 1, "logprobs": 0}).json()[
        "choices"][0]["logprobs"]["tokens"] == [server.state.token_text(top)]
    banned = http.post("/v1/completions", json=body | {"max_tokens": 1, "logprobs": 0,
                                                       "logit_bias": {str(top): -100}})
    assert banned.json()["choices"][0]["logprobs"]["tokens"] != [server.state.token_text(top)]
    chat = http.post("/v1/chat/completions", json=CHAT | {"max_tokens": 3, "temperature": 0, "ignore_eos": True,
                                                          "logit_bias": {"77": 100}})
    assert chat.json()["choices"][0]["message"]["content"] == server.state.decode([77] * 3)


@pytest.mark.parametrize("bias", [{"x": 1}, {"1.5": 1}, {"-1": 1}, {"999999": 1}, {"7": 101}, {"7": -100.5},
                                  {"7": "much"}, [1, 2]])
def test_bad_logit_bias_is_a_400(http, bias):
    assert_error(http.post("/v1/completions", json=GOOD | {"logit_bias": bias}), 400)
    assert_error(http.post("/v1/chat/completions", json=CHAT | {"logit_bias": bias}), 400)


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"best_of": 3}),
    ("/v1/completions", {"suffix": "and then"}),
    ("/v1/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("/v1/chat/completions", {"tool_choice": "required"}),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}),
    ("/v1/completions", {"guided_json": {"type": "object"}}),
])
def test_unsupported_features_are_refused(http, path, extra):
    base = GOOD if path == "/v1/completions" else CHAT
    err = assert_error(http.post(path, json=base | extra), 400)
    assert "not supported" in err["message"] and err["param"] == next(iter(extra))


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"best_of": 1}), ("/v1/completions", {"suffix": None}), ("/v1/completions", {"suffix": ""}),
    ("/v1/chat/completions", {"response_format": {"type": "text"}}), ("/v1/chat/completions", {"tools": []}),
    ("/v1/chat/completions", {"tool_choice": "none"}), ("/v1/chat/completions", {"tools": None}),
])
def test_no_op_values_of_those_fields_are_fine(http, path, extra):
    base = GOOD if path == "/v1/completions" else CHAT
    assert http.post(path, json=base | extra).status_code == 200


def test_logit_bias_in_the_one_sampler():
    from llmslim.runtime.sampling import LogitsProcessor, sample

    logits = torch.zeros(10)
    logits[3] = 5.0
    p = SamplingParams(temperature=0, logit_bias={7: 100.0, 3: -100.0})
    out = LogitsProcessor(p, prompt=[1], stop_ids=set())(logits, [])
    assert out is not logits and int(out.argmax()) == 7 and logits[3] == 5.0  # the input is not changed
    assert sample(out, p, torch.Generator()) == 7
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={7: 100.5})


# --- 4: min_tokens above max_tokens ----------------------------------------------------------------


def test_min_tokens_above_max_tokens_is_a_400(http):
    err = assert_error(http.post("/v1/completions", json=GOOD | {"min_tokens": 3, "max_tokens": 2}), 400)
    assert err["param"] == "min_tokens"
    assert_error(http.post("/v1/chat/completions", json=CHAT | {"min_tokens": 5, "max_tokens": 4}), 400)
    assert http.post("/v1/completions", json=GOOD | {"min_tokens": 2, "max_tokens": 2}).status_code == 200
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


# --- 5: bounded stop lists ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra,param", [
    ({"stop": [f"s{i}" for i in range(1000)]}, "stop"),
    ({"stop": "x" * 100_000}, "stop"),
    ({"stop": ["ok", "y" * 5000]}, "stop"),
    ({"stop_token_ids": list(range(300)) * 10}, "stop_token_ids"),
])
def test_stop_lists_are_capped(http, extra, param):
    for path, base in (("/v1/completions", GOOD), ("/v1/chat/completions", CHAT)):
        err = assert_error(http.post(path, json=base | extra), 400)
        assert err["param"] == param


def test_stop_ids_are_built_once_per_request(monkeypatch):
    """The per-token path reads precomputed per-request state: no set(...) of the stop ids per token."""
    import llmslim.server.engine as eng

    built = []
    original = eng.LogitsProcessor.__init__

    def counting(self, *a, **kw):
        built.append(1)
        original(self, *a, **kw)

    monkeypatch.setattr(eng.LogitsProcessor, "__init__", counting)
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    try:
        q: queue.Queue = queue.Queue()
        engine.submit([5, 6, 7], SamplingParams(max_tokens=20, n=2, temperature=0, ignore_eos=True,
                                                stop_token_ids=[3, 4], min_tokens=5), q.put)
        while not isinstance(q.get(timeout=60), Done):
            pass
    finally:
        engine.stop()
    assert len(built) == 1  # one request: one processor, shared by its choices, whatever the tokens


# --- 6: engine death fails fast and the engine restarts ----------------------------------------------


def test_a_failing_decode_step_fails_fast_and_the_engine_restarts():
    running = start(max_batch=4)
    engine = running.engine
    decode = engine._decode
    calls = {"n": 0}

    def fail_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        decode()

    engine._decode = fail_once
    try:
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as http:
            r = http.post("/v1/completions", json=GOOD | {"max_tokens": 5, "ignore_eos": True})
            assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
            # restarted: healthy again, and new requests are served
            deadline = time.time() + 20
            while http.get("/health").status_code != 200:
                assert time.time() < deadline, "the engine did not restart"
                time.sleep(0.05)
            assert_still_serving(http)
            assert "llmslim_engine_restarts_total 1" in http.get("/metrics").text
    finally:
        stop(running)


def test_an_engine_that_keeps_failing_refuses_fast_instead_of_hanging():
    running = start(max_batch=4)
    engine = running.engine

    def always_fail():
        raise RuntimeError("injected fault")

    engine._decode = always_fail
    try:
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as http:
            for _ in range(engine.max_restarts + 1):
                r = http.post("/v1/completions", json=GOOD | {"max_tokens": 5, "ignore_eos": True})
                assert r.status_code in (500, 503)
            deadline = time.time() + 20
            while engine.healthy:
                assert time.time() < deadline
                time.sleep(0.05)
            assert_error(http.get("/health"), 503)
            t0 = time.perf_counter()
            r = http.post("/v1/completions", json=GOOD)  # must not hang: refused at once
            assert_error(r, 503)
            assert time.perf_counter() - t0 < 5
            with http.stream("POST", "/v1/completions", json=GOOD | {"stream": True}) as s:
                assert s.status_code == 503
    finally:
        stop(running)


def test_engine_down_calls_back_once():
    """The CLI uses ``on_down`` to exit (so a supervisor restarts the process)."""
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    down = []
    engine = Engine(model, tok, max_batch=2, max_restarts=0, on_down=lambda reason: down.append(reason))
    engine._decode = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
    engine.start()
    try:
        q: queue.Queue = queue.Queue()
        # ignore_eos: a random tiny model may sample EOS first, and the request would end before a decode
        engine.submit([5, 6], SamplingParams(max_tokens=4, ignore_eos=True), q.put)
        events = [q.get(timeout=30)]
        while not isinstance(events[-1], Failed | Done):
            events.append(q.get(timeout=30))
        assert isinstance(events[-1], Failed) and "boom" in events[-1].message
        deadline = time.time() + 10
        while not down:
            assert time.time() < deadline
            time.sleep(0.02)
        assert "boom" in down[0] and len(down) == 1
        with pytest.raises(Exception, match="engine"):
            engine.submit([5, 6], SamplingParams(max_tokens=4), q.put)
    finally:
        engine.stop()


# --- 7: the event loop never waits for the tokenizer ---------------------------------------------------


class SlowTokenizer:
    """Wraps a tokenizer; encoding takes ``delay`` seconds (like a 30 MB message would)."""

    def __init__(self, tok, delay: float):
        self._tok, self.delay = tok, delay

    def __call__(self, *a, **kw):
        time.sleep(self.delay)
        return self._tok(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_slow_tokenization_does_not_freeze_health_or_other_requests():
    running = start(max_batch=4)
    state = running.state
    state.tokenizer = SlowTokenizer(state.tokenizer, 4.0)
    try:
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=60) as http:
            slow = threading.Thread(target=lambda: http.post("/v1/completions", json=GOOD))
            slow.start()
            time.sleep(0.5)  # the slow request now holds the tokenizer
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            # log-probs and echo of a token-id prompt need token texts, never the tokenizer's lock
            r = http.post("/v1/completions", json={"prompt": [40, 41, 42], "max_tokens": 3, "logprobs": 2,
                                                   "echo": True, "ignore_eos": True})
            took = time.perf_counter() - t0
            # a chat needs the (slow) tokenizer itself: it waits, off the event loop, and is served
            chat = http.post("/v1/chat/completions", json=CHAT | {"logprobs": True, "top_logprobs": 2})
            slow.join(60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 6
        assert chat.status_code == 200
        assert took < 3.0, f"waited {took:.1f} s behind the tokenizer"
    finally:
        stop(running)


def test_input_size_is_checked_before_rendering_or_tokenizing(server, http, monkeypatch):
    limit = server.engine.max_model_len * 64
    calls = []
    tok = server.state.tokenizer
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **kw: calls.append("template"), raising=False)
    monkeypatch.setattr(server.state, "encode", lambda *a, **kw: calls.append("encode"))
    big = "a" * (limit + 1)
    assert_error(http.post("/v1/chat/completions", json=CHAT | {"messages": [{"role": "user", "content": big}]}),
                 400, "context_length_exceeded")
    parts = [{"role": "user", "content": [{"type": "text", "text": "b" * (limit // 2 + 1)}] * 2}]
    assert_error(http.post("/v1/chat/completions", json=CHAT | {"messages": parts}), 400, "context_length_exceeded")
    many = [{"role": "user", "content": "c" * (limit // 8)}] * 9
    assert_error(http.post("/v1/chat/completions", json=CHAT | {"messages": many}), 400, "context_length_exceeded")
    assert_error(http.post("/tokenize", json={"prompt": big}), 400, "context_length_exceeded")
    assert_error(http.post("/tokenize", json={"messages": [{"role": "user", "content": big}]}), 400,
                 "context_length_exceeded")
    assert_error(http.post("/v1/completions", json=GOOD | {"prompt": [big[:100], big]}), 400,
                 "context_length_exceeded")
    assert calls == []


def test_token_id_prompts_are_length_checked_before_echo_decodes_them(server, http, monkeypatch):
    """echo of a token-id prompt needs its text: a prompt that cannot fit is refused before that decode."""
    calls = []
    decode = server.state.decode
    monkeypatch.setattr(server.state, "decode", lambda ids: calls.append(len(ids)) or decode(ids))
    long = [40] * (server.engine.max_model_len + 1)
    for prompt in (long, [[5, 6], long]):
        assert_error(http.post("/v1/completions", json=GOOD | {"prompt": prompt, "echo": True, "max_tokens": 1}),
                     400, "context_length_exceeded")
    assert calls == []
    ok = http.post("/v1/completions", json=GOOD | {"prompt": [40, 41], "echo": True, "max_tokens": 1})
    assert ok.status_code == 200 and calls == [2]


def test_raw_invalid_utf8_is_a_400(http):
    """A surrogate written as raw UTF-8 bytes (not as a JSON escape) is not valid UTF-8: still a 400."""
    for path, raw in (("/v1/completions", b'{"prompt": "ok\xed\xa0\x80bad"}'),
                      ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
                      ("/tokenize", b'{"prompt": "\xed\xa0\x80"}')):
        assert_error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), 400)
    assert_still_serving(http)


# --- 8: echo + logprobs in bounded memory ---------------------------------------------------------------


def test_prompt_logprobs_are_computed_in_chunks():
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    prompt = list(range(10, 110))
    with torch.inference_mode():
        full = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: rows.append(out.shape[-2]))
    engine = Engine(model, tok, max_batch=2, prompt_logprobs_chunk=16)
    engine.start()
    try:
        q: queue.Queue = queue.Queue()
        engine.submit(prompt, SamplingParams(max_tokens=2, prompt_logprobs=3, logprobs=1, temperature=0,
                                             ignore_eos=True), q.put)
        entries, tokens = None, []
        while True:
            event = q.get(timeout=60)
            assert not isinstance(event, Failed), event.message
            if isinstance(event, PromptLogprobs):
                entries = event.entries
            if isinstance(event, Output):
                tokens += event.token_ids
            if isinstance(event, Done):
                break
    finally:
        engine.stop()
        hook.remove()
    assert max(rows) <= 16  # never the logits of the whole prompt at once
    expected = full[:-1].gather(1, torch.tensor(prompt[1:]).view(-1, 1)).view(-1)
    assert entries[0] is None and len(entries) == len(prompt)
    torch.testing.assert_close(torch.tensor([e[0] for e in entries[1:]]), expected, rtol=1e-4, atol=1e-4)
    top = full[:-1].topk(3, -1).indices.tolist()
    assert [[t for t, _ in e[1]] for e in entries[1:]] == top
    with torch.inference_mode():  # and the generation after the chunked prefill is the usual one
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert tokens == ref[0, len(prompt):].tolist()


# --- 9: request timeout, loading, concurrency limit ----------------------------------------------------


def slow_steps(engine: Engine, seconds: float) -> None:
    decode = engine._decode

    def slow():
        time.sleep(seconds)
        decode()

    engine._decode = slow


def test_request_timeout():
    running = start(max_batch=4, request_timeout=1.0)
    slow_steps(running.engine, 0.05)
    try:
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as http:
            t0 = time.perf_counter()
            r = http.post("/v1/completions", json=GOOD | {"max_tokens": 200, "ignore_eos": True})
            assert_error(r, 504, "request_timeout")
            assert time.perf_counter() - t0 < 5
            with http.stream("POST", "/v1/completions", json=GOOD | {"max_tokens": 200, "ignore_eos": True,
                                                                     "stream": True}) as s:
                lines = [line for line in s.iter_lines() if line]
            assert "request_timeout" in lines[-2] and lines[-1] == "data: [DONE]"
            deadline = time.time() + 10
            while running.engine.running:
                assert time.time() < deadline, "the timed-out requests were not aborted"
                time.sleep(0.05)
            assert http.post("/v1/completions", json=GOOD).status_code == 200
    finally:
        stop(running)


def test_request_timeout_counts_from_arrival():
    """Time spent tokenizing (or waiting for the tokenizer) counts: the timeout is from arrival."""
    running = start(max_batch=4, request_timeout=1.0)
    running.state.tokenizer = SlowTokenizer(running.state.tokenizer, 1.5)
    try:
        with httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as http:
            assert_error(http.post("/v1/completions", json=GOOD), 504, "request_timeout")
            assert_error(http.post("/v1/chat/completions", json=CHAT), 504, "request_timeout")
            # token ids need no tokenizer: served as usual
            assert http.post("/v1/completions", json=GOOD | {"prompt": [5, 6, 7]}).status_code == 200
    finally:
        stop(running)


def test_port_answers_503_while_the_model_loads():
    from llmslim.server.startup import Loading

    gate = threading.Event()

    def load():
        gate.wait(60)
        from llmslim.server import build

        return build(MODEL, api_key=None, fast=False, model=make_tiny_model("llama"), tokenizer=make_tiny_tokenizer())

    import uvicorn

    loading = Loading(load)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(loading, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline
            time.sleep(0.02)
        loading.start()
        for path in ("/health", "/v1/models"):
            r = httpx.get(url + path, timeout=10)
            assert_error(r, 503, "model_loading")
            assert r.headers["retry-after"]
        assert_error(httpx.post(url + "/v1/completions", json=GOOD, timeout=10), 503, "model_loading")
        gate.set()
        deadline = time.time() + 60
        while httpx.get(url + "/health", timeout=10).status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        assert httpx.post(url + "/v1/completions", json=GOOD, timeout=30).status_code == 200
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)
        if loading.engine is not None:
            loading.engine.stop()


def test_loading_failure_is_reported():
    from llmslim.server.startup import Loading

    def load():
        raise ValueError("no such checkpoint")

    loading = Loading(load)
    done = threading.Event()
    loading.start(on_error=lambda e: done.set())
    assert done.wait(10) and isinstance(loading.error, ValueError)


def test_cli_sets_concurrency_limit_and_timeout():
    import argparse

    from llmslim.server import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "ckpt", "--request-timeout", "30", "--limit-concurrency", "100",
                              "--max-kv-memory", "1.5GiB"])
    assert args.request_timeout == 30 and args.limit_concurrency == 100 and args.max_kv_memory == int(1.5 * 2**30)
    defaults = parser.parse_args(["serve", "ckpt"])
    config = commands.uvicorn_config(defaults, app=None)
    assert config.app.limit >= 16 + 64
    for bad in (["--max-kv-memory", "lots"], ["--request-timeout", "-1"], ["--max-kv-tokens", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "ckpt", *bad])


# --- 10: admission bounded by KV memory ---------------------------------------------------------------


def run_all(engine: Engine, requests: list[tuple[list[int], dict]]) -> list[list[int]]:
    queues = []
    for prompt, kw in requests:
        q: queue.Queue = queue.Queue()
        engine.submit(prompt, SamplingParams(**kw), q.put)
        queues.append(q)
    out = []
    for q in queues:
        tokens = []
        while True:
            event = q.get(timeout=60)
            assert not isinstance(event, Failed), event.message
            if isinstance(event, Output):
                tokens += event.token_ids
            if isinstance(event, Done):
                break
        out.append(tokens)
    return out


def test_long_prompts_queue_when_the_kv_budget_is_spent():
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    kw = dict(max_tokens=10, temperature=0, ignore_eos=True)
    requests = [(list(range(20 + i, 60 + i)), kw) for i in range(4)]  # 40 + 10 tokens each
    alone = Engine(model, tok, max_batch=8, batched=False)
    alone.start()
    try:
        want = run_all(alone, requests)
    finally:
        alone.stop()
    engine = Engine(model, tok, max_batch=8, max_kv_tokens=120)  # room for two such rows, not four
    engine.start()
    try:
        peak = []
        observe = engine.stats.observe_step
        engine.stats.observe_step = lambda rows, s: (peak.append(rows), observe(rows, s))
        assert run_all(engine, requests) == want
        assert max(peak) == 2
        deadline = time.time() + 10
        while engine.kv_tokens:  # the last rows leave right after their last token is sent
            assert time.time() < deadline
            time.sleep(0.01)
        with pytest.raises(ValueError, match="KV"):  # could never fit: refused, not queued forever
            engine.submit(list(range(100)), SamplingParams(max_tokens=30), print)
        with pytest.raises(ValueError, match="KV"):
            engine.submit(list(range(40)), SamplingParams(max_tokens=30, n=3), print)
    finally:
        engine.stop()


def test_kv_memory_in_bytes_becomes_a_token_budget():
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    # 2 layers x (keys + values) x 2 KV heads x 16 dims x 4 bytes (float32) = 512 bytes a token
    engine = Engine(model, tok, max_batch=4, max_kv_memory=512 * 1000)
    assert engine.kv_bytes_per_token == 512 and engine.max_kv_tokens == 1000


def test_over_the_concurrency_limit_is_a_503_in_openai_shape():
    """Beyond --limit-concurrency a request gets OpenAI's error shape (uvicorn's own limit answers
    plain text), while /health is still answered; freed slots serve again."""
    import asyncio

    import uvicorn
    from starlette.responses import JSONResponse

    from llmslim.server.startup import ConcurrencyLimit

    release = threading.Event()

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/slow":
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 20)
        await JSONResponse({"ok": scope["path"]})(scope, receive, send)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(ConcurrencyLimit(app, 2), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        slow = [threading.Thread(target=httpx.get, args=(base + "/slow",), kwargs={"timeout": 30}) for _ in range(2)]
        for t in slow:
            t.start()
        time.sleep(0.5)
        r = httpx.get(base + "/v1/models", timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "server_error"
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        release.set()
        for t in slow:
            t.join(10)
        assert httpx.get(base + "/v1/models", timeout=5).json() == {"ok": "/v1/models"}
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)
