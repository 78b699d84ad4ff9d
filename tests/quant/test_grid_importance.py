"""GPTQ's MSE scale search weighted by each column's importance (``gptq_quantize(importance=...)``)."""

import pytest
import torch

from llmslim.quant.gptq import accumulate_hessian, gptq_quantize, layer_loss


def outlier_layer(seed: int, rows: int = 96, columns: int = 256):
    """Correlated inputs of very uneven scale (real activations) and a few outlier weight columns."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    W[:, :4] *= 8
    mix = torch.randn(columns, columns, generator=g) / columns**0.5
    X = (torch.randn(2048, columns, generator=g) @ (torch.eye(columns) + mix)) * (
        torch.rand(columns, generator=g) ** 2 * 4 + 0.05)
    H, _ = accumulate_hessian(torch.zeros(columns, columns), 0, X)
    return W, H


@pytest.mark.parametrize("bits,group_size,sym,grid", [(4, 128, True, None), (3, 128, True, None),
                                                      (4, 64, False, None), (4, 32, True, "q4_0")])
def test_hessian_weighted_scale_search_lowers_gptq_layer_loss(bits, group_size, sym, grid):
    losses = {}
    for importance in (None, "hessian", "imatrix"):
        total = 0.0
        for seed in range(2):
            W, H = outlier_layer(seed)
            r = gptq_quantize(W, H, bits, group_size, sym, mse=True, grid=grid, act_group_aware=True,
                              importance=importance)
            assert r.fallback is None and r.Q.min() >= 0 and r.Q.max() < 2**bits
            assert torch.equal(r.scales.abs(), r.scales.abs().half().float())
            total += layer_loss(W, r.dequantize(), H)
        losses[importance] = total
    assert losses["hessian"] < losses[None]


def test_importance_only_changes_the_mse_search():
    W, H = outlier_layer(0)
    plain = gptq_quantize(W, H, 4, 128, mse=False)
    weighted = gptq_quantize(W, H, 4, 128, mse=False, importance="hessian")
    assert torch.equal(plain.Q, weighted.Q) and torch.equal(plain.scales, weighted.scales)
    with pytest.raises(ValueError, match="importance"):
        gptq_quantize(W, H, 4, 128, mse=True, importance="diag")


@pytest.mark.parametrize("target,importance,expected", [
    ("gguf-q4_0", "auto", "hessian"), ("gguf-q8_0", "auto", "hessian"), ("", "auto", None),
    ("gguf-q4_0", "none", None), ("", "imatrix", "imatrix"), ("", "hessian", "hessian"),
])
def test_importance_auto_is_hessian_on_the_gguf_block_grids_only(target, importance, expected):
    from llmslim.config import GPTQConfig
    from llmslim.quant.sequential import solver_options

    config = GPTQConfig(target=target, importance=importance)
    assert config.scale_importance == expected
    assert solver_options(config)["importance"] == expected
    assert solver_options(GPTQConfig(target=target, importance=importance, mse=False))["importance"] is None


def test_importance_must_be_known():
    from llmslim.config import GPTQConfig
    from llmslim.errors import UserError

    with pytest.raises(UserError, match="--importance must be one of auto, none, hessian, imatrix"):
        GPTQConfig(importance="fisher")


def test_the_cli_default_on_q4_0_is_the_hessian_search(tiny_folder, tmp_path):
    """``--target gguf-q4_0`` with no ``--importance`` writes what ``--importance hessian`` writes, and
    not what the unweighted search writes."""
    from safetensors.torch import load_file

    from llmslim.cli import main

    common = ["quantize", str(tiny_folder("llama")), "--method", "gptq", "--target", "gguf-q4_0",
              "--calib", "wiki", "--nsamples", "8", "--seqlen", "64"]
    for name, extra in (("auto", []), ("hessian", ["--importance", "hessian"]), ("none", ["--importance", "none"])):
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
    auto, hessian, none = (load_file(tmp_path / n / "model.safetensors") for n in ("auto", "hessian", "none"))
    scales = [k for k in auto if k.endswith(".scales")]
    assert scales and all(torch.equal(auto[k], hessian[k]) for k in auto)
    assert any(not torch.equal(auto[k], none[k]) for k in scales)
