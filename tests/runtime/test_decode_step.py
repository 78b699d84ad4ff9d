"""The one-call decode step (runtime/step.py, csrc/decode_step.cpp): where it covers a family's layers it
gives the Python loop's logits bit for bit, at batch 1 and in the server's batch, for every family the
lean forward covers; where it does not apply (fp32 compute) the loop runs as before."""

from __future__ import annotations

import pytest
import torch

from llmslim.runtime import ext
from llmslim.runtime.fast import accelerate
from llmslim.server.kvbatch import PaddedBatch, prefill
from tests.runtime.test_lean import IDS, PROMPTS, lean_logits, quantized, tiny, tokens_for

pytestmark = pytest.mark.skipif(ext.matmuls() is None, reason="DecodeStep runs on llmslim's AVX512-BF16 kernels")
COVERED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3")


def lean_of(model):
    lean_logits(model, IDS[:4], [3])  # builds the model's LeanDecoder
    return model._llmslim_lean


def without_step(model, fn):
    """``fn()`` with the model's decode step forced back onto the Python loop."""
    lean = model._llmslim_lean
    saved, lean.step = lean.step, None
    try:
        return fn()
    finally:
        lean.step = saved


def batch_logits(model) -> list[torch.Tensor]:
    batch = PaddedBatch(model)
    out = []
    for i in (0, 3, 1):  # rows of different lengths: left padding
        cache, _ = prefill(model, PROMPTS[i], all_logits=False)
        batch.add(cache, len(PROMPTS[i]))
    for k in range(5):
        out.append(batch.step([tokens_for(i, 5)[k] for i in (0, 3, 1)]).clone())
    batch.remove([1])
    out += [batch.step([7, 9]).clone() for _ in range(3)]
    return out


# (a float Qwen2's q/k/v biases run on torch's F.linear: not one of DecodeStep's kernels)
@pytest.mark.parametrize("family,weights", [(f, w) for f in COVERED for w in ("int4", "bf16")
                                            if (f, w) != ("qwen2", "bf16")])
def test_step_equals_python_loop(family, weights):
    model = accelerate(quantized(family) if weights == "int4" else tiny(family), torch.bfloat16)
    assert lean_of(model).step is not None, "this family's layers should be covered"
    want = without_step(model, lambda: lean_logits(model, IDS, [5, 3]))
    assert torch.equal(lean_logits(model, IDS, [5, 3]), want)
    want = without_step(model, lambda: batch_logits(model))
    got = batch_logits(model)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_fp32_compute_keeps_the_loop():
    assert lean_of(accelerate(tiny("llama"), torch.float32)).step is None


def test_a_full_cache_is_an_error_not_a_write_past_the_end():
    from llmslim.runtime.generate import Stepper

    model = accelerate(quantized("llama"), torch.bfloat16)
    step = Stepper(model, 6)
    n = step.cache.layers[0].max_len  # rounded up to a bucket
    step([t % 320 for t in range(n - 1)])
    step([1])  # the last position
    with pytest.raises(RuntimeError, match="KV cache full"):
        step([2])
