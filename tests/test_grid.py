import pytest
import torch

from llmslim.grid import (
    dequantize,
    dequantize_groups,
    find_params,
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
