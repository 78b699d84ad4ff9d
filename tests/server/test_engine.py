"""The engine alone (no HTTP): greedy equals transformers, batching equals one-at-a-time,
seeds reproduce, and the vLLM sampling extras do what they say."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from llmslim.runtime.sampling import SamplingParams
from llmslim.server.engine import Done, Engine, Failed, Output, PromptLogprobs
from tests.conftest import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama"), make_tiny_tokenizer()


def submit(engine: Engine, prompt: list[int], **kw) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    engine.submit(prompt, SamplingParams(**kw), q.put)
    return q


def collect(q: queue.Queue) -> dict:
    """Tokens, text and finish reason per choice, and the prompt log-probs, until Done."""
    out: dict = {"choices": {}, "prompt_logprobs": None}
    while True:
        event = q.get(timeout=60)
        if isinstance(event, Failed):
            raise AssertionError(event.message)
        if isinstance(event, Done):
            out["usage"] = (event.prompt_tokens, event.completion_tokens)
            return out
        if isinstance(event, PromptLogprobs):
            out["prompt_logprobs"] = event.entries
            continue
        assert isinstance(event, Output)
        c = out["choices"].setdefault(event.index, {"tokens": [], "text": "", "finish": None, "logprobs": []})
        c["tokens"] += event.token_ids
        c["text"] += event.text
        c["finish"] = event.finish_reason
        c["logprobs"] += event.logprobs or []


def run(engine: Engine, prompt: list[int], **kw) -> dict:
    return collect(submit(engine, prompt, **kw))


@pytest.fixture
def engine(tiny):
    model, tok = tiny
    e = Engine(model, tok, max_batch=8, max_queue=32)
    e.start()
    yield e
    e.stop()


PROMPTS = [[5, 6, 7, 8], [40, 41], list(range(100, 137)), [3], [200, 17, 99, 250, 12, 60]]


def test_greedy_matches_transformers_generate(engine, tiny):
    model, _ = tiny
    for prompt in PROMPTS[:3]:
        got = run(engine, prompt, max_tokens=12, temperature=0, ignore_eos=True)["choices"][0]["tokens"]
        with torch.inference_mode():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gpt_neox"])
def test_batched_equals_alone(arch):
    model, tok = make_tiny_model(arch), make_tiny_tokenizer()
    alone = Engine(model, tok, max_batch=8, batched=False)
    alone.start()
    try:
        lengths = [20, 3, 11, 20, 7]
        ref = [run(alone, p, max_tokens=n, temperature=0, ignore_eos=True)["choices"][0]["tokens"]
               for p, n in zip(PROMPTS, lengths, strict=True)]
    finally:
        alone.stop()
    batched = Engine(model, tok, max_batch=3)  # fewer slots than requests: some wait and join later
    batched.start()
    try:
        queues = [submit(batched, p, max_tokens=n, temperature=0, ignore_eos=True)
                  for p, n in zip(PROMPTS, lengths, strict=True)]
        got = [collect(q)["choices"][0]["tokens"] for q in queues]
    finally:
        batched.stop()
    assert got == ref
    assert batched.stats.batch_size.count > 0 and batched.running == 0


def test_seed_reproduces_and_choices_differ(engine):
    kw = dict(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, n=3, ignore_eos=True)
    a = run(engine, PROMPTS[0], **kw)["choices"]
    b = run(engine, PROMPTS[0], **kw)["choices"]
    assert [a[i]["tokens"] for i in range(3)] == [b[i]["tokens"] for i in range(3)]
    assert len({tuple(a[i]["tokens"]) for i in range(3)}) > 1


def test_min_tokens_and_stop_token_ids(engine):
    greedy = run(engine, PROMPTS[1], max_tokens=8, temperature=0, ignore_eos=True)["choices"][0]["tokens"]
    stop_at = greedy[2]
    r = run(engine, PROMPTS[1], max_tokens=8, temperature=0, stop_token_ids=[stop_at])["choices"][0]
    assert r["finish"] == "stop" and r["tokens"] == greedy[:greedy.index(stop_at) + 1]
    # min_tokens bans the stop token until enough tokens exist
    r = run(engine, PROMPTS[1], max_tokens=8, temperature=0, stop_token_ids=[stop_at], min_tokens=6)["choices"][0]
    assert len(r["tokens"]) >= 6 and stop_at not in r["tokens"][:6]


def test_repetition_penalty_changes_greedy_output(engine):
    plain = run(engine, PROMPTS[2], max_tokens=20, temperature=0, ignore_eos=True)["choices"][0]["tokens"]
    penalized = run(engine, PROMPTS[2], max_tokens=20, temperature=0, ignore_eos=True,
                    repetition_penalty=5.0)["choices"][0]["tokens"]
    assert penalized != plain
    assert len(set(penalized)) >= len(set(plain))


def test_prompt_logprobs_match_a_forward_pass(engine, tiny):
    model, _ = tiny
    prompt = PROMPTS[2]
    r = run(engine, prompt, max_tokens=0, prompt_logprobs=2, logprobs=2)
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    expected = lp[:-1].gather(1, torch.tensor(prompt[1:]).view(-1, 1)).view(-1)
    entries = r["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt)
    torch.testing.assert_close(torch.tensor([e[0] for e in entries[1:]]), expected, rtol=1e-4, atol=1e-4)
    assert all(len(e[1]) == 2 for e in entries[1:])
    assert r["choices"][0]["finish"] == "length" and r["usage"] == (len(prompt), 0)


def test_context_cap_and_abort(tiny):
    model, tok = tiny
    e = Engine(model, tok, max_batch=2, max_model_len=64)
    e.start()
    try:
        with pytest.raises(ValueError, match="maximum context length"):
            e.submit(list(range(60)), SamplingParams(max_tokens=10), print)
        q: queue.Queue = queue.Queue()
        rid = e.submit([5, 6], SamplingParams(max_tokens=60, ignore_eos=True, temperature=0), q.put)
        q.get(timeout=60)  # it is running
        e.abort(rid)
        for _ in range(400):
            if e.running == 0 and e.stats.aborted:
                break
            time.sleep(0.05)
        assert e.running == 0 and e.stats.aborted == 1
    finally:
        e.stop()
