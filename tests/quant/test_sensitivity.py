"""Per-layer sensitivities: zero where compression changes nothing, the model left untouched, and a
prediction that ranks (layer, candidate) pairs like the exact KL measurement."""

from __future__ import annotations

import pytest
import torch

from llmslim.config import GPTQConfig
from llmslim.quant.sensitivity import base_log_probs, layer_bytes, measure, measured_kl, spearman
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
    assert log.kl[log.candidates.index("4:32")] == 0.0 and log.loss[log.candidates.index("4:32")] == 0.0
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
