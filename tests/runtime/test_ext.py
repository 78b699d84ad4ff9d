"""llmslim's C++ decode attention (runtime/csrc/decode_attention.cpp): the attention a float64
reference computes, for every row over its own last keys (windows, soft-capping, grouped heads,
strided views), and batch-invariant by construction -- a row's bits do not depend on the other
rows, their lengths, the padding or the thread count. The lean forward's own invariance tests
(test_lean.py) run on this kernel; the SDPA fallback is checked here too."""

from __future__ import annotations

import math

import pytest
import torch

from llmslim.runtime import ext

kernel = ext.decode_attention()
needs_kernel = pytest.mark.skipif(kernel is None, reason=f"C++ kernel unavailable: {ext.why_not}")


def reference(q, k, v, lengths, window, scale, cap):
    """float64 attention of row b over its last min(lengths[b], window) columns."""
    B, H, D = q.shape
    KV, C = k.shape[1], k.shape[2]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = min(int(lengths[b]), C, window or C)
        for h in range(H):
            g = h // (H // KV)
            keys, vals = k[b, g, C - n:].double(), v[b, g, C - n:].double()
            s = keys @ q[b, h].double() * scale
            if cap:
                s = torch.tanh(s / cap) * cap
            out[b, h] = torch.softmax(s, 0) @ vals
    return out


def case(B=5, H=6, KV=2, C=23, D=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, KV, C, D, generator=g).to(dtype)
    v = torch.randn(B, KV, C, D, generator=g).to(dtype)
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    lengths[0] = C
    return q, k, v, lengths


@needs_kernel
@pytest.mark.parametrize("window,cap", [(0, 0.0), (7, 0.0), (0, 5.0), (4, 3.0)])
@pytest.mark.parametrize("D", [16, 40, 64])
def test_matches_float64_attention(window, cap, D):
    q, k, v, lengths = case(D=D)
    scale = 1 / math.sqrt(D)
    got = kernel(q, k, v, lengths, window, scale, cap)
    want = reference(q, k, v, lengths, window, scale, cap)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


@needs_kernel
def test_bf16_within_one_rounding():
    q, k, v, lengths = case(dtype=torch.bfloat16, D=64)
    got = kernel(q, k, v, lengths, 0, 0.125, 0.0).double()
    want = reference(q, k, v, lengths, 0, 0.125, 0.0)
    # float32 inside, one rounding to bf16 at the end: within half a bf16 ulp (2^-8 relative) plus a little
    assert ((got - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()


@needs_kernel
def test_strided_views_of_a_bigger_cache():
    # the server's batch hands over views: rows :B and columns start:end of bigger buffers
    q, k, v, lengths = case(B=4, C=30)
    big_k = torch.zeros(7, 2, 50, 40)
    big_v = torch.zeros(7, 2, 50, 40)
    big_k[:4, :, 10:40], big_v[:4, :, 10:40] = k, v
    big_q = torch.zeros(4, 9, 40)
    big_q[:, :6] = q  # q as a slice of a [M, heads + kv heads, d] tensor, like the lean forward's
    got = kernel(big_q[:, :6], big_k[:4, :, 10:40], big_v[:4, :, 10:40], lengths, 0, 0.2, 0.0)
    assert torch.equal(got, kernel(q.contiguous(), k.contiguous(), v.contiguous(), lengths, 0, 0.2, 0.0))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_is_the_same_bits_alone_as_in_any_batch(dtype):
    q, k, v, lengths = case(B=6, C=40, D=64, dtype=dtype, seed=3)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            batched = kernel(q, k, v, lengths, 0, 0.125, 0.0)
            for b in range(6):
                n = int(lengths[b])
                # alone: only its own columns, no padding, a batch of one
                one = kernel(q[b:b + 1], k[b:b + 1, :, -n:], v[b:b + 1, :, -n:], lengths[b:b + 1], 0, 0.125, 0.0)
                assert torch.equal(batched[b], one[0]), f"row {b} with {n_threads} threads"
            # other rows changed, more padding: row 0 unchanged
            k2, v2 = torch.cat([torch.randn_like(k[:, :, :9]), k], 2), torch.cat([torch.randn_like(v[:, :, :9]), v], 2)
            other = kernel(torch.cat([q[:1], torch.randn_like(q[1:])]), k2, v2, lengths, 0, 0.125, 0.0)
            assert torch.equal(other[0], batched[0])
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_bad_input_is_refused():
    q, k, v, lengths = case()
    with pytest.raises(RuntimeError, match="at least one key"):
        kernel(q, k, v, torch.zeros_like(lengths), 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        kernel(q[:, :5], k, v, lengths, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="dtype"):
        kernel(q.double(), k, v, lengths, 0, 1.0, 0.0)


def test_lean_forward_uses_the_kernel_where_built():
    from llmslim.runtime.fast import accelerate
    from llmslim.runtime.lean import LeanDecoder
    from tests.runtime.test_lean import tiny

    lean = LeanDecoder(accelerate(tiny("llama"), torch.bfloat16))
    assert (lean.kernel is None) == (kernel is None)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sdpa_fallback_is_batch_invariant_too(family, monkeypatch):
    # where the kernel cannot be built the lean forward attends with SDPA, row by row
    from llmslim.runtime.fast import accelerate
    from tests.runtime.test_lean import check_batch_invariance, tiny

    monkeypatch.setattr(ext, "decode_attention", lambda: None)
    model = accelerate(tiny(family), torch.bfloat16)
    check_batch_invariance(model)
    assert model._llmslim_lean.kernel is None


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_kernel_and_sdpa_paths_agree_to_rounding(family, monkeypatch):
    import copy

    from llmslim.runtime.fast import accelerate
    from tests.runtime.test_lean import IDS, lean_logits, tiny

    model = tiny(family)
    with_kernel = lean_logits(accelerate(copy.deepcopy(model), torch.float32), IDS, [8])
    monkeypatch.setattr(ext, "decode_attention", lambda: None)
    with_sdpa = lean_logits(accelerate(copy.deepcopy(model), torch.float32), IDS, [8])
    torch.testing.assert_close(with_kernel, with_sdpa, rtol=0, atol=2e-6 * with_sdpa.abs().max().item())
