"""llmslim's fused small ops (runtime/csrc/fused.cpp): the lean forward's RMSNorm (+ residual add),
rotary embedding and SwiGLU gate, each equal to the torch ops it replaces (bit for bit where the
arithmetic is the same, within one rounding where only a float32 sum's order or exp differs), and a
row's result the same alone as in any batch. The lean forward's tests (test_lean.py) run on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmslim.runtime import ext
from llmslim.runtime.lean import _Norm, _rotate_torch

mod = ext.module()
pytestmark = pytest.mark.skipif(mod is None, reason=f"C++ kernels unavailable: {ext.why_not}")
DTYPES = [torch.bfloat16, torch.float32]


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of the dtype's rounding of b (eps * |b|, floored at tiny)."""
    eps = torch.finfo(b.dtype).eps
    return float(((a.double() - b.double()).abs() / (b.double().abs() * eps + 1e-30)).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_is_transformers_norm(dtype, gemma):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 576, generator=g) * 3).to(dtype)
    r = torch.randn(7, 576, generator=g).to(dtype)
    w = (torch.randn(576, generator=g) * 0.1 + (0 if gemma else 1)).to(dtype)
    want = _Norm(w, 1e-5, gemma)
    out, same = mod.rms_norm(x, w, 1e-5, gemma)
    assert same is x or torch.equal(same, x)
    tol = 1.0 if dtype == torch.bfloat16 else 4.0  # only the sum of squares' order (and 1/sqrt) differs
    assert ulps(out, want(x)) <= tol
    out, s = mod.rms_norm(x, w, 1e-5, gemma, r)
    assert torch.equal(s, x + r)  # the residual add is torch's, exactly
    assert ulps(out, want(x + r)) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [64, 32])  # full and partial rotary (Phi-3 / GPT-NeoX style)
def test_rope_is_torchs_mul_then_addcmul(dtype, r):
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 12 * 64 + 100, generator=g).to(dtype)
    qk = qkv[:, :12 * 64].view(5, 12, 64)  # a strided view, as the lean forward passes it
    cos = torch.randn(5, 1, r, generator=g).to(dtype)
    sin = torch.randn(5, 1, r, generator=g).to(dtype)
    got = mod.rope(qk, cos.reshape(5, r), sin.reshape(5, r))
    assert torch.equal(got, _rotate_torch(qk, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_torchs(dtype):
    g = torch.Generator().manual_seed(2)
    gu = (torch.randn(6, 2 * 1536, generator=g) * 4).to(dtype)
    want = F.silu(gu[:, :1536]) * gu[:, 1536:]
    got = mod.silu_mul(gu, 1536)
    # exp differs from torch's vectorized one in the last float bit: at most one rounding of the dtype apart
    assert ulps(got, want) <= 2.0
    assert float((got.double() - want.double()).abs().max()) <= 2 * torch.finfo(dtype).eps * float(want.abs().max())


def test_each_row_is_the_same_alone_as_in_a_batch():
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(9, 64, generator=g).bfloat16(), torch.randn(9, 64, generator=g).bfloat16()
    w = torch.randn(64, generator=g).bfloat16()
    full = mod.rms_norm(x, w, 1e-6, False, r)[0]
    alone = torch.cat([mod.rms_norm(x[i:i + 1], w, 1e-6, False, r[i:i + 1])[0] for i in range(9)])
    assert torch.equal(full, alone)
    gu = torch.randn(9, 128, generator=g).bfloat16()
    assert torch.equal(mod.silu_mul(gu, 64), torch.cat([mod.silu_mul(gu[i:i + 1], 64) for i in range(9)]))


def test_bad_input_is_refused():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight"):
        mod.rms_norm(x, torch.ones(4), 1e-6, False)
    with pytest.raises(RuntimeError, match="residual"):
        mod.rms_norm(x, torch.ones(8), 1e-6, False, torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="rotary"):
        mod.rope(torch.randn(2, 3, 8), torch.randn(2, 10), torch.randn(2, 10))
    with pytest.raises(RuntimeError, match="inter"):
        mod.silu_mul(torch.randn(2, 10), 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_argmax_rows_is_torchs(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 1000, generator=g).to(dtype)
    x[1, 10] = x[1, 500] = 100.0  # a tie: the first one
    x[2, :] = float("-inf")  # all -inf: index 0
    x[3, 7] = float("nan")  # a NaN beats everything
    x[4, 3] = x[4, 9] = float("nan")  # the first NaN
    x[5, 999] = float("inf")
    got = mod.argmax_rows(x)
    assert torch.equal(got, x.argmax(-1))
    assert got.tolist()[1:5] == [10, 0, 7, 3]
    from llmslim.runtime.sampling import argmax_rows

    assert torch.equal(argmax_rows(x[0]), x[0].argmax())  # 1-D, through the helper
    assert torch.equal(argmax_rows(x), x.argmax(-1))
