"""Perplexity and divergence on a tiny random model, against token-by-token hand computation."""

from __future__ import annotations

import math
import re

import pytest
import torch

from llmslim.errors import UserError
from llmslim.metrics import perplexity
from llmslim.metrics.ppl import encode

from .conftest import tiny_llama


def hand_nll(model, ids, start):
    """-log p(ids[j] | ids[:j]) summed for j >= start, one forward per token."""
    total = 0.0
    with torch.no_grad():
        for j in range(start, len(ids)):
            logits = model(input_ids=torch.tensor([ids[:j]])).logits[0, -1]
            total -= float(torch.log_softmax(logits.double(), -1)[ids[j]])
    return total


def test_gptq_equals_hand_computation(model, tiny_tokenizer, text):
    tokens = encode(tiny_tokenizer, text)[:60]
    r = perplexity(model, tiny_tokenizer, text, "gptq", seqlen=16, max_tokens=60, progress=False)
    windows = [tokens[i * 16:(i + 1) * 16] for i in range(3)]  # the 12-token tail is dropped
    nll = sum(hand_nll(model, w, 1) for w in windows)
    assert r["tokens_scored"] == 15 * len(windows) and r["windows"] == len(windows)
    assert r["perplexity"] == pytest.approx(math.exp(nll / r["tokens_scored"]), rel=1e-5)
    assert (r["method"], r["seqlen"], r["stride"], r["add_bos"]) == ("gptq", 16, 16, False)


def test_gptq_with_bos_equals_hand_computation(model, tiny_tokenizer, text):
    tokens = encode(tiny_tokenizer, text)[:45]
    bos = tiny_tokenizer.bos_token_id
    r = perplexity(model, tiny_tokenizer, text, "gptq", seqlen=16, add_bos=True, max_tokens=45, progress=False)
    nll = sum(hand_nll(model, [bos] + tokens[i:i + 15], 1) for i in range(0, 45, 15))
    assert r["tokens_scored"] == 45
    assert r["perplexity"] == pytest.approx(math.exp(nll / 45), rel=1e-5)


def test_sliding_equals_hand_computation(model, tiny_tokenizer, text):
    tokens = encode(tiny_tokenizer, text)[:50]
    r = perplexity(model, tiny_tokenizer, text, "sliding", seqlen=16, stride=6, max_tokens=50, progress=False)
    # Every token after the first, each with the context of the window that first contains it.
    nll, prev_end = 0.0, 0
    for begin in range(0, 50, 6):
        end = min(begin + 16, 50)
        w = tokens[begin:end]
        nll += hand_nll(model, w, max(1, len(w) - (end - prev_end)))
        prev_end = end
        if end == 50:
            break
    assert r["tokens_scored"] == 49 and r["stride"] == 6
    assert r["perplexity"] == pytest.approx(math.exp(nll / 49), rel=1e-5)


def test_sliding_with_stride_seqlen_equals_gptq_on_exact_multiple(model, tiny_tokenizer, text):
    a = perplexity(model, tiny_tokenizer, text, "gptq", seqlen=16, max_tokens=64, progress=False)
    b = perplexity(model, tiny_tokenizer, text, "sliding", seqlen=16, stride=16, max_tokens=64, progress=False)
    assert a["tokens_scored"] == b["tokens_scored"] == 60
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)


def test_rolling_scores_every_token_and_reports_lm_eval_metrics(model, tiny_tokenizer, text):
    tokens = encode(tiny_tokenizer, text, add_special_tokens=True)
    n = len(tokens)
    r = perplexity(model, tiny_tokenizer, text, "rolling", seqlen=16, progress=False)
    assert r["tokens_scored"] == n and r["add_bos"] is True
    # First 16 tokens from BOS, then blocks of 16 with the 16 tokens before each target as input.
    nll = hand_nll(model, [tiny_tokenizer.bos_token_id] + tokens[:16], 1)
    predicted = 16
    while predicted < n:
        block = min(n - predicted, 16)
        end = predicted + block
        seq = tokens[end - 17:end]
        nll += hand_nll(model, seq, len(seq) - block)
        predicted = end
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    words, nbytes = len(re.split(r"\s+", text)), len(text.encode())
    assert (r["words"], r["bytes"]) == (words, nbytes)
    assert r["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert r["byte_perplexity"] == pytest.approx(math.exp(nll / nbytes), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)


def test_batching_does_not_change_the_result(model, tiny_tokenizer, text):
    kw = dict(method="sliding", seqlen=16, stride=5, max_tokens=100, progress=False)
    one = perplexity(model, tiny_tokenizer, text, token_budget=1, **kw)
    many = perplexity(model, tiny_tokenizer, text, token_budget=10_000, **kw)
    assert one["perplexity"] == pytest.approx(many["perplexity"], rel=1e-5)


def test_kl_is_zero_for_identical_models(model, tiny_tokenizer, text):
    r = perplexity(model, tiny_tokenizer, text, "gptq", seqlen=16, baseline=(model, tiny_tokenizer), progress=False)
    d = r["divergence"]
    assert abs(d["kl_mean"]) < 1e-6 and d["top1_agreement"] == 1.0
    assert d["baseline_perplexity"] == pytest.approx(r["perplexity"], rel=1e-6)


def test_kl_is_positive_for_different_models(model, tiny_tokenizer, text):
    other = tiny_llama(len(tiny_tokenizer), seed=1)
    r = perplexity(model, tiny_tokenizer, text, "gptq", seqlen=16, baseline=(other, tiny_tokenizer), progress=False)
    d = r["divergence"]
    assert d["kl_mean"] > 1e-4 and 0.0 <= d["top1_agreement"] <= 1.0
    ref = perplexity(other, tiny_tokenizer, text, "gptq", seqlen=16, progress=False)
    assert d["baseline_perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)


def test_mismatched_tokenizer_vocabularies(model, tiny_tokenizer, text):
    from tests.conftest import make_tiny_tokenizer

    other = make_tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(UserError, match="tokenizer"):
        perplexity(model, tiny_tokenizer, text, "gptq", seqlen=16, baseline=(model, other), progress=False)


def test_mismatched_model_vocabularies(model, tiny_tokenizer, text):
    bigger = tiny_llama(len(tiny_tokenizer) + 8)
    with pytest.raises(UserError, match="tokenizer"):
        perplexity(model, tiny_tokenizer, text, "gptq", seqlen=16, baseline=(bigger, tiny_tokenizer), progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "bogus"}, "unknown perplexity method"),
    ({"seqlen": 1}, "at least 2"),
    ({"seqlen": 65}, "exceeds the model's context"),
    ({"stride": 4}, "only to --ppl-method sliding"),
    ({"method": "sliding", "seqlen": 16, "stride": 17}, "--stride"),
    ({"seqlen": 64, "max_tokens": 20}, "fewer than one window"),
    ({"max_tokens": 1}, "at least 2"),
])
def test_bad_arguments(model, tiny_tokenizer, text, kwargs, message):
    with pytest.raises(UserError, match=message):
        perplexity(model, tiny_tokenizer, text, progress=False, **kwargs)


def test_default_seqlen_is_capped_by_the_model_context(model, tiny_tokenizer, text):
    assert perplexity(model, tiny_tokenizer, text, progress=False)["seqlen"] == 64


def test_bos_without_a_bos_token(model, tiny_tokenizer, text):
    tiny_tokenizer.bos_token = None
    with pytest.raises(UserError, match="no BOS"):
        perplexity(model, tiny_tokenizer, text, seqlen=16, add_bos=True, progress=False)
