"""llmslim's int4 and bf16 matrix products (runtime/csrc/int4_matmul.cpp, AVX512-BF16 CPUs): the
product a float64 reference computes from the same weights, within one bf16 rounding; a row's bits
the same alone as in any batch and with any thread count; the same weights as torch's int4 kernel
through ``Int4Linear`` in every layout. Elsewhere (no AVX512-BF16) these tests skip and
test_kernels.py covers torch's kernels."""

from __future__ import annotations

import pytest
import torch

from llmslim.runtime import ext
from llmslim.runtime.kernels import Int4Linear, Int8x2Linear, pack_int4
from tests.runtime.test_kernels import make_layer

mm = ext.matmuls()
pytestmark = pytest.mark.skipif(mm is None, reason=f"int4/bf16 kernels unavailable: {ext.why_not or 'no AVX512-BF16'}")


def int4_case(M, K, N, kg, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g)
    s = (torch.rand(K // kg, N, generator=g) * 0.02 + 0.001).bfloat16()
    z = (torch.randn(K // kg, N, generator=g) * 0.05).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    W = (q.double() - 8).view(N, K // kg, kg) * s.double().T[..., None] + z.double().T[..., None]
    return x, q, torch.stack([s, z], -1).contiguous(), x.double() @ W.view(N, K).T


def within_one_rounding(y: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 keeps 8 significant bits: the result is the float64 one rounded once (plus fp32 sums)."""
    err = (y.double() - ref).abs()
    assert bool((err <= ref.abs() * 2**-8 + 1e-5 * ref.abs().max()).all()), f"max error {err.max():.3g}"


@pytest.mark.parametrize("M,K,N,kg", [(1, 576, 960, 64), (3, 512, 48, 128), (9, 256, 32, 32), (17, 512, 160, 256)])
def test_int4_matches_float64(M, K, N, kg):
    x, q, sz, ref = int4_case(M, K, N, kg)
    within_one_rounding(mm.int4_matmul(x, pack_int4(q), sz, kg), ref)


def test_pack_int4_layout():
    q = torch.randint(0, 16, (32, 8), generator=torch.Generator().manual_seed(3))
    p = pack_int4(q)
    assert p.shape == (2, 4, 16) and p.dtype == torch.uint8
    flat = p.view(2, 2, 32)  # 32 bytes per tile of 16 outputs and 4 inputs
    for n, k in [(0, 0), (5, 1), (17, 4), (31, 5), (9, 1)]:
        j, h = k // 4, k % 2  # inputs 4j + h (low nibble) and 4j + 2 + h (high) share a byte
        assert int(flat[n // 16, j, 2 * (n % 16) + h]) == int(q[n, 4 * j + h]) | int(q[n, 4 * j + 2 + h]) << 4


@pytest.mark.parametrize("threads", [1, 2])
def test_int4_row_alone_equals_row_in_any_batch(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, q, sz, _ = int4_case(20, 256, 64, 64, seed=1)  # 20 rows: tiles of 8, 8 and 4
        w = pack_int4(q)
        full = mm.int4_matmul(x, w, sz, 64)
        for m in (1, 3, 8, 13):
            part = mm.int4_matmul(x[:m].contiguous(), w, sz, 64)
            assert torch.equal(part, full[:m])
        alone = torch.cat([mm.int4_matmul(x[i:i + 1].contiguous(), w, sz, 64) for i in range(20)])
        assert torch.equal(alone, full)
    finally:
        torch.set_num_threads(old)
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        assert torch.equal(mm.int4_matmul(x, w, sz, 64), full)  # other thread count, same bits
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("M,K,N", [(1, 576, 1000), (5, 100, 37), (6, 64, 7), (4, 33, 130)])
def test_bf16_matches_float64_and_is_row_invariant(M, K, N):
    g = torch.Generator().manual_seed(M)
    W, x = torch.randn(N, K, generator=g).bfloat16(), torch.randn(M, K, generator=g).bfloat16()
    y = mm.bf16_matmul(x, W)
    within_one_rounding(y, x.double() @ W.double().T)
    alone = torch.cat([mm.bf16_matmul(x[i:i + 1].contiguous(), W) for i in range(M)])
    assert torch.equal(alone, y)


@pytest.mark.parametrize("out_f,in_f,group,act,sym,bias", [
    (64, 256, 64, False, True, False),   # the plain layout
    (40, 200, 64, False, False, True),   # K padded, N padded, asymmetric, bias
    (48, 192, 32, True, True, False),    # act-order: a permuted input
    (40, 96, 48, True, False, False),    # permuted and padded
])
def test_int4linear_same_weights_as_torchs_kernel(out_f, in_f, group, act, sym, bias, monkeypatch):
    layer = make_layer(out_f, in_f, 4, group, act_order=act, sym=sym, bias=bias)
    ours = Int4Linear.from_gptq(layer)
    assert ours.weight_packed.dim() == 3 and ours.n_pad == ours.scale_zeros.shape[1] - out_f >= 0
    monkeypatch.setenv("LLMSLIM_NO_EXT_MATMUL", "1")
    theirs = Int4Linear.from_gptq(layer)
    assert theirs.weight_packed.dim() == 2
    x = torch.randn(7, in_f, generator=torch.Generator().manual_seed(2)).bfloat16()
    a, b = ours(x).double(), theirs(x).double()
    assert (a - b).abs().max() <= 2 * 2**-8 * b.abs().max()
    want = layer(x.float()).double()
    assert (a - want).abs().max() <= 3 * 2**-8 * want.abs().max()


def test_int8x2_runs_on_either_kernel(monkeypatch):
    layer = make_layer(32, 128, 8, 32, sym=False)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    ours = Int8x2Linear.from_gptq(layer)(x).double()
    monkeypatch.setenv("LLMSLIM_NO_EXT_MATMUL", "1")
    theirs = Int8x2Linear.from_gptq(layer)(x).double()
    assert (ours - theirs).abs().max() <= 2 * 2**-8 * theirs.abs().max()


def test_bad_input_is_refused():
    x, q, sz, _ = int4_case(2, 128, 32, 64)
    w = pack_int4(q)
    with pytest.raises(RuntimeError, match="group"):
        mm.int4_matmul(x, w, sz, 48)
    with pytest.raises(RuntimeError, match="columns"):
        mm.int4_matmul(x[:, :64].contiguous(), w, sz, 64)
    with pytest.raises(RuntimeError, match="bf16"):
        mm.int4_matmul(x.float(), w, sz, 64)
    with pytest.raises(RuntimeError, match="K = x"):
        mm.bf16_matmul(x, torch.zeros(4, 64, dtype=torch.bfloat16))
