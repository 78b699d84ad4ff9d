"""The OpenAI API over real HTTP on 127.0.0.1, through the official ``openai`` client."""

from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL

PROMPT = "Once upon a time there was"


def test_models_health_metrics(server, http):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in ("llmslim_requests_running", "llmslim_requests_waiting", "llmslim_generation_tokens_total",
                 "llmslim_request_latency_seconds_bucket", "llmslim_batch_size_count"):
        assert name in text


def test_completion(server):
    r = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.index == 0
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens == len(server.state.encode(PROMPT))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_completion_stream_matches_non_stream(server):
    c = server.client()
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = c.completions.create(**kw).choices[0].text
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_sse_ends_with_done(server, http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    json.loads(lines[0][len("data: "):])


def test_prompt_forms(server):
    c = server.client()
    ids = server.state.encode(PROMPT)
    kw = dict(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    by_text = c.completions.create(prompt=PROMPT, **kw).choices[0].text
    assert c.completions.create(prompt=ids, **kw).choices[0].text == by_text
    r = c.completions.create(prompt=[PROMPT, "The quick brown fox"], **kw)
    assert [ch.index for ch in r.choices] == [0, 1] and r.choices[0].text == by_text
    r = c.completions.create(prompt=[ids, ids[:3]], **kw)
    assert r.choices[0].text == by_text and r.usage.prompt_tokens == len(ids) + 3


def test_n_choices(server):
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=7,
                             extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) > 1  # different samples
    again = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=7,
                                 extra_body={"ignore_eos": True})
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]  # the seed reproduces
    assert r.usage.completion_tokens == 24
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=5)
    assert sorted(ch.index for ch in chat.choices) == [0, 1]


def test_stop_strings(server):
    c = server.client()
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    full = c.completions.create(**kw).choices[0].text
    visible = full.replace("\ufffd", "")
    assert len(visible) >= 4, "the tiny model produced too little text to test stop strings"
    stop = visible[len(visible) // 2:len(visible) // 2 + 2]
    cut = full.index(stop)
    r = c.completions.create(**kw, stop=[stop, "never-appears"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:cut]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stop=stop, stream=True))
    assert streamed == full[:cut]  # nothing of the stop string leaks out while streaming


def test_logprobs(server):
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 3 <= len(top) <= 4
        assert value == max(top.values())  # greedy: the chosen token is the most likely one
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)


def test_echo_max_tokens_zero_gives_prompt_logprobs(server):
    """How lm-eval's local-completions scores log-likelihoods."""
    ids = server.state.encode(PROMPT)
    r = server.client().completions.create(model=MODEL, prompt=[ids], max_tokens=0, echo=True, logprobs=1,
                                           temperature=0)
    choice = r.choices[0]
    assert choice.text == server.state.decode(ids)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) and all(x < 0 for x in lp.token_logprobs[1:])
    assert r.usage.completion_tokens == 0 and choice.finish_reason == "length"
    # lm-eval's own request: echo with max_tokens 1; it drops the last (generated) entry
    r1 = server.client().completions.create(model=MODEL, prompt=[ids], max_tokens=1, echo=True, logprobs=1,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert r1.choices[0].logprobs.token_logprobs[:-1] == lp.token_logprobs


def test_chat(server):
    c = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    template = server.state.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(server.state.encode(template, add_special_tokens=False))
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 7
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}]
    assert c.chat.completions.create(model=MODEL, messages=parts, max_tokens=2).choices


def test_tokenize_detokenize(server, http):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert r["tokens"] == server.state.encode(PROMPT) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.engine.max_model_len
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == PROMPT
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 1
    info = http.get("/tokenizer_info").json()  # what lm-eval's remote tokenizer reads
    assert info["eos_token"] == "<|endoftext|>" and "im_start" in info["chat_template"]


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_open_routes_need_no_key(server, path):
    import httpx

    assert httpx.get(server.url + path, timeout=30).status_code == 200
