"""Bad requests get the right 4xx in OpenAI's error shape, and the server keeps answering."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL, start, stop

GOOD = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def assert_still_serving(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_malformed_json(http):
    for raw in (b"{", b"not json", b'{"prompt": "x",}', b"\xff\xfe", b"", b"[1, 2]", b"null"):
        r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert_error(r, 400)
    assert_still_serving(http)


@pytest.mark.parametrize("field,value", [
    ("prompt", 5), ("prompt", None), ("prompt", [{"a": 1}]), ("max_tokens", "many"), ("max_tokens", -1),
    ("temperature", -0.5), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("logprobs", 99),
    ("stop", 7), ("seed", "x"), ("stream", "maybe"), ("top_k", -5), ("repetition_penalty", 0),
])
def test_wrong_types_and_ranges(http, field, value):
    err = assert_error(http.post("/v1/completions", json=GOOD | {field: value}), 400)
    assert field in (err["param"] or "") or field in err["message"]


def test_nan_is_refused(http):
    raw = b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": NaN}'
    assert_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)


def test_chat_bad_bodies(http):
    url = "/v1/chat/completions"
    assert_error(http.post(url, json={"model": MODEL, "messages": "hi"}), 400)
    assert_error(http.post(url, json={"model": MODEL, "messages": []}), 400)
    assert_error(http.post(url, json={"model": MODEL, "messages": [{"content": "no role"}]}), 400)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(http.post(url, json={"model": MODEL, "messages": image}), 400)
    user = [{"role": "user", "content": "hi"}]
    assert_error(http.post(url, json={"model": MODEL, "messages": user, "top_logprobs": 2}), 400)
    assert_error(http.post(url, json={"model": MODEL, "messages": user, "max_tokens": 0}), 400)
    assert_still_serving(http)


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json=GOOD | {"user": "u", "suffix": None, "some_future_field": {"x": [1]}})
    assert r.status_code == 200


def test_overlong_prompt(server, http):
    limit = server.engine.max_model_len
    err = assert_error(http.post("/v1/completions", json=GOOD | {"prompt": [5] * (limit + 1)}), 400,
                       "context_length_exceeded")
    assert str(limit) in err["message"]
    assert_error(http.post("/v1/completions", json=GOOD | {"prompt": "word " * (limit * 100)}), 400,
                 "context_length_exceeded")
    long_chat = [{"role": "user", "content": "a b " * limit}]
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": long_chat}), 400,
                 "context_length_exceeded")
    assert_still_serving(http)


def test_huge_max_tokens(http):
    for value in (10**6, 10**30):
        assert_error(http.post("/v1/completions", json=GOOD | {"max_tokens": value}), 400)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**9}
    assert_error(http.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded")
    assert_still_serving(http)


def test_bad_token_ids(http):
    for ids in ([-1], [10**9], [[1, 2], []], [2**70]):
        assert_error(http.post("/v1/completions", json=GOOD | {"prompt": ids}), 400)
    assert_error(http.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert_error(http.post("/v1/completions", json=GOOD | {"stop_token_ids": [10**9]}), 400)
    assert_error(http.post("/v1/completions", json=GOOD | {"prompt": []}), 400)
    assert_error(http.post("/v1/completions", json=GOOD | {"prompt": ""}), 400)


def test_unknown_model_and_route(http):
    assert_error(http.post("/v1/completions", json=GOOD | {"model": "gpt-9"}), 404, "model_not_found")
    assert_error(http.get("/v1/models/gpt-9"), 404)
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_auth(server):
    url = server.url + "/v1/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": "Basic " + API_KEY}, {"Authorization": "Bearer t\u00e9st".encode()}):
        r = httpx.post(url, json=GOOD, headers=headers, timeout=30)
        assert_error(r, 401, "invalid_api_key")
    # auth comes before parsing: a bad body without a key is still a 401
    assert_error(httpx.post(url, content=b"{", timeout=30), 401)
    assert_error(httpx.post(server.url + "/tokenize", json={"prompt": "x"}, timeout=30), 401)
    assert_error(httpx.get(server.url + "/v1/models", timeout=30), 401)
    ok = httpx.post(url, json=GOOD, headers={"Authorization": f"bearer {API_KEY}"}, timeout=30)
    assert ok.status_code == 200


def test_body_too_large(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n")
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        reply = s.recv(4096).decode("latin-1")
    assert reply.startswith("HTTP/1.1 413")


def test_queue_full_then_recovers():
    running = start(max_batch=1, max_queue=1)
    engine = running.engine
    gate = threading.Event()
    admit = engine._admit

    def held_admit():  # keep the queue from draining while the test fills it
        gate.wait(60)
        admit()

    engine._admit = held_admit
    try:
        with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
            results: list[httpx.Response] = []
            first = threading.Thread(target=lambda: results.append(http.post("/v1/completions", json=GOOD)))
            first.start()
            for _ in range(400):
                if engine.waiting:
                    break
                threading.Event().wait(0.01)
            r = http.post("/v1/completions", json=GOOD)
            assert_error(r, 503, "queue_full")
            assert r.headers["retry-after"]
            # n above the batch size can never be scheduled: refused up front
            assert_error(http.post("/v1/completions", json=GOOD | {"n": 2}), 400)
            gate.set()
            first.join(60)
            assert results[0].status_code == 200
            assert "llmslim_requests_rejected_total 1" in http.get("/metrics").text
            engine._admit = admit
            assert_still_serving(http)
    finally:
        gate.set()
        engine._admit = admit
        stop(running)
