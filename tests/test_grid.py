import pytest
import torch

from llmslim.grid import (
    dequantize,
    dequantize_groups,
    find_params,
    find_params_gguf,
    gguf_grid,
    group_slices,
    maxq_for,
    quantize,
    quantize_rtn,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_on_grid(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(16, 40)
    scale, zero = find_params(w, bits, sym)
    q = quantize(w, scale, zero, maxq_for(bits))
    assert q.min() >= 0 and q.max() <= maxq_for(bits)
    w_hat = dequantize(q, scale, zero)
    # Values already on the grid come back exactly.
    assert torch.equal(quantize(w_hat, scale, zero, maxq_for(bits)), q)
    # RTN error bound: half a step (plus the fp16 rounding of the scale, ~2**-11 per step).
    assert ((w - w_hat).abs() <= scale * (0.5 + 2**-11 * 2**bits)).all()


def test_scales_are_fp16_exact_and_zero_conventions():
    w = torch.randn(8, 64)
    s, z = find_params(w, 4, sym=True)
    assert torch.equal(s, s.half().float())
    assert (z == 8).all()  # GPTQ's symmetric zero (maxq + 1) / 2
    # Asymmetric zeros stay in [1, maxq] so the v1 format (zero - 1) can always store them.
    w_pos = torch.rand(8, 64) + 0.5  # all positive: the min/max zero would be 0
    s, z = find_params(w_pos, 4, sym=False)
    assert (z >= 1).all() and (z <= 15).all()
    w_hat = dequantize(quantize(w_pos, s, z, 15), s, z)
    assert ((w_pos - w_hat).abs() <= s / 2 + 1e-6).all()


def test_dead_rows_stay_zero():
    w = torch.zeros(4, 32)
    s, z = find_params(w, 4, sym=False)
    assert torch.equal(dequantize(quantize(w, s, z, 15), s, z), w)


def test_mse_clipping_never_worse():
    torch.manual_seed(0)
    w = torch.randn(64, 128) ** 3  # heavy tails: clipping helps
    for sym in (True, False):
        errs = []
        for mse in (False, True):
            s, z = find_params(w, 3, sym, mse=mse)
            errs.append((dequantize(quantize(w, s, z, 7), s, z) - w).abs().pow(2.4).sum(1))
        assert (errs[1] <= errs[0] + 1e-5).all()
        assert errs[1].sum() < errs[0].sum()


def test_group_slices_partial_last_group():
    assert group_slices(576, 128)[-1] == slice(512, 576)
    assert len(group_slices(576, 128)) == 5
    assert group_slices(100, -1) == [slice(0, 100)]


def test_rtn_layout_and_dequant():
    torch.manual_seed(1)
    W = torch.randn(32, 96)
    Q, scales, zeros = quantize_rtn(W, 4, 32, sym=False)
    assert Q.shape == W.shape and scales.shape == (3, 32) and zeros.shape == (3, 32)
    g_idx = torch.arange(96) // 32
    W_hat = dequantize_groups(Q, scales, zeros, g_idx)
    assert ((W - W_hat).abs() <= scales[g_idx].T / 2 + 1e-6).all()


def test_bad_bits():
    with pytest.raises(ValueError):
        maxq_for(5)


def _weighted_error(w, s, z, maxq, imp):
    return (imp * (dequantize(quantize(w, s, z, maxq), s, z) - w).square()).sum(1)


@pytest.mark.parametrize("bits,sym", [(4, True), (3, True), (4, False), (2, False), (8, True)])
def test_importance_weighted_search_never_worse_on_its_objective(bits, sym):
    """The weighted search's candidates include every one of the unweighted search's, so on the
    weighted squared error it is never worse, row by row; with uneven importance it is better."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(96, 128, generator=g) ** 3
    imp = torch.rand(128, generator=g) ** 4 * 100  # a few columns matter most, as real activations
    s0, z0 = find_params(w, bits, sym, mse=True)
    s1, z1 = find_params(w, bits, sym, mse=True, importance=imp)
    assert torch.equal(s1, s1.half().float()) and (s1 > 0).all()
    if sym:
        assert (z1 == (maxq_for(bits) + 1) // 2).all()
    else:
        assert (z1 >= 1).all() and (z1 <= maxq_for(bits)).all()
    e0, e1 = (_weighted_error(w, s, z, maxq_for(bits), imp) for s, z in ((s0, z0), (s1, z1)))
    assert (e1 <= e0 * (1 + 1e-6)).all()
    assert e1.sum() < 0.97 * e0.sum()
    # A uniform importance still beats the |w - w^|^2.4 search on squared error (it has more candidates).
    s2, z2 = find_params(w, bits, sym, mse=True, importance=torch.ones(128))
    ones = torch.ones(128)
    assert (_weighted_error(w, s2, z2, maxq_for(bits), ones) <= _weighted_error(w, s0, z0, maxq_for(bits), ones)
            * (1 + 1e-6)).all()


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_importance_weighted_gguf_search_keeps_the_grid_and_is_never_worse(kind):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 32, generator=g) ** 3
    imp = torch.rand(32, generator=g) ** 4 * 100
    _, zero, maxq = gguf_grid(kind)
    s0, z0 = find_params_gguf(w, kind, mse=True)
    s1, z1 = find_params_gguf(w, kind, mse=True, importance=imp)
    assert (z1 == zero).all() and torch.equal(s1.abs(), s1.abs().half().float())
    if kind == "q4_0":  # llama.cpp's signed scale: the block's largest magnitude sits at q = 0
        assert torch.equal(torch.sign(s1), torch.sign(s0))
    e0, e1 = (_weighted_error(w, s, z, maxq, imp) for s, z in ((s0, z0), (s1, z1)))
    assert (e1 <= e0 * (1 + 1e-6)).all() and e1.sum() < e0.sum()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_full_range_grid_puts_each_rows_extreme_on_code_0_with_a_finer_step(bits):
    """The signed-scale symmetric grid (llama.cpp's Q4_0 rule, AutoRound's default): the row's value of
    largest magnitude lands exactly on code 0, every level is used, and the step is (maxq + 1) / maxq
    finer than GPTQ's symmetric grid, which spends half a step beyond each end."""
    torch.manual_seed(bits)
    w = torch.randn(64, 128)
    maxq = maxq_for(bits)
    s, z = find_params(w, bits, sym=True, full_range=True)
    extreme = w.gather(1, w.abs().argmax(1, keepdim=True))
    assert (z == (maxq + 1) // 2).all()
    assert torch.equal(torch.sign(s), -torch.sign(extreme))  # signed: the extreme's side gets the extra level
    assert torch.equal(s, s.half().float())
    assert (quantize(extreme, s, z, maxq) == 0).all()
    assert torch.allclose(dequantize(torch.zeros_like(extreme), s, z), extreme, rtol=1e-3)
    s_gptq, z_gptq = find_params(w, bits, sym=True)
    assert (s.abs() < s_gptq).all()
    err = (dequantize(quantize(w, s, z, maxq), s, z) - w).square().sum()
    err_gptq = (dequantize(quantize(w, s_gptq, z_gptq, maxq), s_gptq, z_gptq) - w).square().sum()
    assert err < err_gptq


@pytest.mark.parametrize("weighted", [False, True])
def test_full_range_clipping_search_keeps_signed_scales_and_is_never_worse(weighted):
    torch.manual_seed(0)
    w = torch.randn(64, 128) ** 3
    imp = torch.rand(128) + 0.1 if weighted else None
    s1, z1 = find_params(w, 3, sym=True, full_range=True)
    s2, z2 = find_params(w, 3, sym=True, mse=True, importance=imp, full_range=True)
    assert torch.equal(torch.sign(s2), torch.sign(s1)) and torch.equal(z2, z1)
    weight = imp if weighted else torch.ones(128)

    def err(s, z):
        return (weight * (dequantize(quantize(w, s, z, 7), s, z) - w).square()).sum(1)

    if weighted:  # the weighted search minimizes exactly this objective, the full range among its candidates
        assert (err(s2, z2) <= err(s1, z1) * (1 + 1e-5)).all()
    assert err(s2, z2).sum() < err(s1, z1).sum()
    # asymmetric grids have no full-range variant: the flag changes nothing there
    assert all(torch.equal(a, b) for a, b in zip(find_params(w, 3, sym=False, full_range=True),
                                                  find_params(w, 3, sym=False), strict=True))
