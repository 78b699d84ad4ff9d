"""Per-layer sensitivities: zero where compression changes nothing, the model left untouched, a
prediction that ranks (layer, candidate) pairs like the exact KL measurement, GPTQ's cost exactly
where the correction measured it, and a calibrated sum that predicts a real uniform GPTQ model's KL."""

from __future__ import annotations

import math

import pytest
import torch

from llmslim.config import GPTQConfig
from llmslim.grid import dequantize_groups, quantize_rtn
from llmslim.quant.exact import base_log_probs, kl_to, measured_kl
from llmslim.quant.gptq import gptq_quantize
from llmslim.quant.sensitivity import (
    Calibration,
    SensitivitySolver,
    layer_bytes,
    measure,
    round_to_grid,
    spearman,
)
from llmslim.quant.sequential import gptq_blocks
from tests.conftest import make_tiny_model

SPACE = [(2, 32), (3, 32), (4, 32), (4, 64), (8, -1)]
ON_GRID = "model.layers.0.mlp.down_proj"


def _model_and_calib():
    model = make_tiny_model("llama").float()
    # One layer's weights already lie on an asymmetric 4-bit g32 grid that min/max finds again (every
    # group uses codes 0 and 15, power-of-two scales): that candidate changes nothing.
    layer = model.get_submodule(ON_GRID)
    gen = torch.Generator().manual_seed(3)
    out_f, in_f = layer.weight.shape
    Q = torch.randint(0, 16, (out_f, in_f), generator=gen)
    Q[:, ::32], Q[:, 1::32] = 0, 15
    zeros = torch.randint(1, 15, (out_f, in_f // 32), generator=gen).repeat_interleave(32, 1)
    scales = 2.0 ** -torch.randint(4, 7, (out_f, in_f // 32), generator=gen).repeat_interleave(32, 1)
    layer.weight.data = (Q - zeros).float() * scales
    calib = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, calib


def test_untouched_layer_costs_zero_and_the_model_is_left_as_it_was():
    model, calib = _model_and_calib()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = GPTQConfig(sym=False, mse=False)
    s, kept = measure(model, config, SPACE, calib, fisher_samples=8, keep={(ON_GRID, "4:32"), (ON_GRID, "2:32")})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    log = next(x for x in s.layers if x.name == ON_GRID)
    assert log.kl[log.candidates.index("4:32")] == 0.0 and log.proxy[log.candidates.index("4:32")] == 0.0
    assert log.kl[log.candidates.index("2:32")] > 0
    base = base_log_probs(model, calib)
    assert measured_kl(model, {ON_GRID: kept[(ON_GRID, "4:32")]}, base, calib) == 0.0
    assert measured_kl(model, {ON_GRID: kept[(ON_GRID, "2:32")]}, base, calib) > 0
    # Every layer of the 2-block model is priced, and fewer bits always cost more.
    assert len(s.layers) == 14 and s.fisher_tokens == 8 * 32
    for x in s.layers:
        kl = dict(zip(x.candidates, x.kl, strict=True))
        assert kl["2:32"] > kl["3:32"] > kl["4:32"] >= 0, x.name


def test_prediction_ranks_like_the_measured_kl():
    model, calib = _model_and_calib()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj",
             "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    keep = {(n, c) for n in names for c in ("2:32", "3:32", "4:64")}
    s, kept = measure(model, GPTQConfig(), SPACE, calib, fisher_samples=8, keep=keep)
    by_name = {x.name: x for x in s.layers}
    base = base_log_probs(model, calib)
    predicted, measured = [], []
    for n, c in sorted(keep):
        predicted.append(by_name[n].kl[by_name[n].candidates.index(c)])
        measured.append(measured_kl(model, {n: kept[(n, c)]}, base, calib))
    assert spearman(predicted, measured) > 0.8, (predicted, measured)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_calibrated_prediction_of_uniform_gptq_is_its_measured_kl(arch):
    """The calibration is fitted on one reference model (GPTQ per layer at 4 bits, every layer on its
    original inputs, measured on a calibration sequence the pass kept out); applied to the layer sums
    of the table it predicts what real, sequential GPTQ at other uniform grids, solved on all the
    calibration, measures on held-out text."""
    import copy

    model = make_tiny_model(arch).float()
    calib = torch.randint(0, 320, (16, 32), generator=torch.Generator().manual_seed(1))
    s, _ = measure(model, GPTQConfig(), SPACE, calib, fisher_samples=8)
    cal = s.calibration
    assert [p["setting"] for p in cal.points] == ["uniform 4-bit (GPTQ per layer)"]
    assert cal.tokens == 2 * 32 and cal.unseen  # an eighth of the calibration, kept out of the pass
    (point,) = cal.points  # the scale through it; its prediction is the table's own 4:64 sum (the coarsest)
    assert cal.b == 1.0 and cal.kl(point["predicted"]) == pytest.approx(point["measured"], rel=1e-6)
    assert point["predicted"] == pytest.approx(sum(x.kl[x.candidates.index("4:64")] for x in s.layers))
    held = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(2))
    base = base_log_probs(model, held)
    for bits, group in ((4, 32), (3, 32), (2, 32), (8, -1)):
        quantized = copy.deepcopy(model)
        gptq_blocks(quantized, GPTQConfig(bits=bits, group_size=group), calib)
        key = f"{bits}:{group}"
        predicted = cal.kl(sum(x.kl[x.candidates.index(key)] for x in s.layers))
        assert kl_to(quantized, base, held) == pytest.approx(predicted, rel=0.3), key


def test_the_correction_makes_the_sampled_candidate_gptqs_cost():
    """With at most SAMPLE_ROWS rows every row is sampled: each bit width's middle group is priced
    at exactly GPTQ's Fisher-weighted cost, the others by the proxy times that ratio."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 96, generator=gen) * torch.rand(96, generator=gen) * 3
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(64, 96, generator=gen)
    f = torch.rand(64, generator=gen)
    config = GPTQConfig()
    solver = SensitivitySolver(config, {"x": [(3, 32), (3, 16), (3, 96), (4, 32)]}, {"x": f})
    _, _, log = solver.solve("x", torch.nn.Linear(96, 64, bias=False), W, H)
    for bits, group in ((3, 32), (4, 32)):
        r = gptq_quantize(W, H, bits=bits, group_size=group, sym=True, mse=True, act_group_aware=True)
        D = W - r.dequantize()
        exact = float((f * ((D @ H) * D).sum(1)).sum() / 4)
        assert log.kl[log.candidates.index(f"{bits}:{group}")] == pytest.approx(exact, rel=1e-4)
    ratio = log.ratio["3"]
    assert log.kl[1] == pytest.approx(log.proxy[1] * ratio) and log.kl[2] == pytest.approx(log.proxy[2] * ratio)
    # The proxy alone is already close to GPTQ's cost (the LDL form): a ratio near 1.
    assert 0.7 < ratio < 1.5 and 0.7 < log.ratio["4"] < 1.5


@pytest.mark.parametrize("columns,group,sym", [(128, 32, True), (96, 64, False), (96, -1, True), (64, 64, False)])
def test_round_to_grid_is_rtn_on_every_group_at_once(columns, group, sym):
    W = torch.randn(48, columns, generator=torch.Generator().manual_seed(2))
    g_idx = torch.arange(columns) // (columns if group == -1 else group)
    for bits in (2, 3, 4, 8):
        r = round_to_grid(W, bits, group, sym, True, g_idx, grid=100)  # GPTQ's resolution: RTN's own search
        Q, scales, zeros = quantize_rtn(W, bits, group, sym, True)
        assert torch.equal(r.codes.int(), Q) and torch.equal(r.scale, scales)
        assert torch.equal(r.weight(), dequantize_groups(Q, scales, zeros, g_idx))
        if sym:  # the full-range grid prices what GPTQ on that grid will store (signed scales)
            r = round_to_grid(W, bits, group, sym, True, g_idx, grid=100, full_range=True)
            Q, scales, zeros = quantize_rtn(W, bits, group, sym, True, full_range=True)
            assert (scales < 0).any() and torch.equal(r.codes.int(), Q) and torch.equal(r.scale, scales)


def test_calibration_fit():
    two = Calibration.fit([{"setting": "a", "predicted": 1e-3, "measured": 4e-3},
                           {"setting": "b", "predicted": 0.1, "measured": 0.8}], 100)
    assert two.kl(1e-3) == pytest.approx(4e-3) and two.kl(0.1) == pytest.approx(0.8)
    assert two.b == pytest.approx(math.log(200) / math.log(100))  # KL grows faster than the sum
    assert two.predicted_for(two.kl(0.02)) == pytest.approx(0.02)
    one = Calibration.fit([{"setting": "a", "predicted": 0.1, "measured": 0.3}], 100)
    assert (one.a, one.b) == (pytest.approx(3.0), 1.0)
    # More predicted cost, less measured KL: no slope to trust, a scale (geometric mean ratio) instead.
    flat = Calibration.fit([{"setting": "a", "predicted": 0.01, "measured": 0.2},
                            {"setting": "b", "predicted": 0.1, "measured": 0.1}], 100)
    assert flat.b == 1.0 and flat.a == pytest.approx((20 * 1) ** 0.5)
    assert Calibration.fit([], 0).kl(0.5) == 0.5  # nothing measured: the sum itself


def test_layer_bytes_is_what_the_checkpoint_stores():
    from llmslim.nn import GPTQLinear

    for bits, group, bias in ((4, 32, False), (3, 64, True), (8, -1, False), (2, 128, True)):
        m = GPTQLinear(192, 96, bits, group, bias)
        stored = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        assert layer_bytes(192, 96, bits, group, bias) == stored


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)


def test_the_calibration_reference_takes_a_group_over_per_channel():
    from llmslim.quant.sensitivity import reference_setting

    label, choice = reference_setting({"a": [(4, -1), (4, 32), (4, 64)], "b": [(4, -1)], "c": [(2, 64), (3, 64)],
                                       "d": [(4, 32), (4, 64), (4, 128), (8, 128)]})
    assert label == "uniform 4-bit (GPTQ per layer)"
    assert choice == {"a": "4:64", "b": "4:-1", "d": "4:128"}  # c has no 4 bits: it stays in float
