"""One sampler for both decode loops: extreme parameters and non-finite logits never crash or
give an invalid id, and greedy is the same token through ``generate`` and the server engine."""

from __future__ import annotations

import queue

import pytest
import torch

import llmslim.runtime.generate as gen
import llmslim.server.engine as eng
from llmslim.runtime.generate import generate
from llmslim.runtime.sampling import GREEDY_TEMPERATURE, Sampler, SamplingParams, sample
from llmslim.server.engine import Done, Engine, Failed, Output
from tests.conftest import make_tiny_model, make_tiny_tokenizer

PROMPT = "Once upon a time there was a little girl"
VOCAB = 320


def test_tiny_temperature_and_all_banned_degenerate_to_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert sample(logits, SamplingParams(temperature=1e-45), g) == 1
    assert sample(logits, SamplingParams(temperature=1e-30, top_p=0.5), g) == 1
    # Every token banned: no distribution to draw from, so the greedy choice (argmax: the first of
    # equal logits), whatever the filters -- not whichever token a sort happened to put first.
    banned = torch.full((VOCAB,), float("-inf"))
    for kw in PARAMS:
        assert sample(banned, SamplingParams(**kw), g) == int(banned.argmax()) == 0, kw
    # One token left: every parameter setting must take it.
    only = banned.index_fill(0, torch.tensor([123]), 0.0)
    for kw in PARAMS:
        assert sample(only, SamplingParams(**kw), g) == 123, kw


def test_both_loops_use_the_same_sampler():
    assert gen.Sampler is eng.Sampler is Sampler
    # vLLM's greedy rule, for both: a temperature under 1e-5, or top-k of 1
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=GREEDY_TEMPERATURE / 2).greedy
    assert SamplingParams(temperature=1.0, top_k=1).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy


NON_FINITE = {
    "nan": lambda x: x.index_fill(-1, torch.tensor([7]), float("nan")),
    "inf": lambda x: x.index_fill(-1, torch.tensor([9]), float("inf")),
    "nan+inf": lambda x: x.index_fill(-1, torch.tensor([7]), float("nan")).index_fill(-1, torch.tensor([9]),
                                                                                      float("inf")),
    "all-nan": lambda x: torch.full_like(x, float("nan")),
    "all--inf": lambda x: torch.full_like(x, float("-inf")),
}
PARAMS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=5),
          dict(temperature=1.3, top_p=0.9), dict(temperature=1e-6)]


@pytest.mark.parametrize("kind", NON_FINITE)
@pytest.mark.parametrize("kw", PARAMS)
def test_non_finite_logits_give_a_valid_id(kind, kw):
    logits = NON_FINITE[kind](torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)))
    for seed in range(5):
        token = Sampler(SamplingParams(seed=seed, **kw))(logits)
        assert 0 <= token < VOCAB


def poisoned_model(kind: str):
    """A tiny Llama whose every next-token logits carry the given non-finite values."""
    model = make_tiny_model("llama").eval()
    model.lm_head.register_forward_hook(lambda module, args, out: NON_FINITE[kind](out))
    return model


def engine_tokens(model, tok, prompt: list[int], **kw) -> list[int]:
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    try:
        q: queue.Queue = queue.Queue()
        engine.submit(prompt, SamplingParams(**kw), q.put)
        tokens = []
        while True:
            event = q.get(timeout=60)
            assert not isinstance(event, Failed), event.message
            if isinstance(event, Done):
                return tokens
            if isinstance(event, Output):
                tokens += event.token_ids
    finally:
        engine.stop()


@pytest.mark.parametrize("kind", ["nan+inf", "all-nan"])
def test_non_finite_logits_through_generate_and_the_server(kind):
    model, tok = poisoned_model(kind), make_tiny_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3), dict(temperature=0.8, top_p=0.9, seed=4)):
        a = generate(model, tok, ids, max_new_tokens=6, ignore_eos=True, **kw).tokens
        b = engine_tokens(model, tok, ids, max_tokens=6, ignore_eos=True, **kw)
        assert len(a) == len(b) == 6
        assert all(0 <= t < VOCAB for t in a + b)
        if kw["temperature"] == 0:
            assert a == b


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_greedy_is_the_same_token_in_generate_and_the_server(temperature):
    model, tok = make_tiny_model("llama").eval(), make_tiny_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    a = generate(model, tok, ids, max_new_tokens=12, temperature=temperature, ignore_eos=True).tokens
    b = engine_tokens(model, tok, ids, max_tokens=12, temperature=temperature, ignore_eos=True)
    assert a == b
