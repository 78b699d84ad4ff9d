"""The anchors: each unit's cost at its anchor grids is its exact KL (measured with only that unit
quantized), other grids follow the prediction scaled between the anchors; the interpolation and the
unit measurement that starts at the unit's own block."""

from __future__ import annotations

import math

import pytest
import torch

from llmslim.config import GPTQConfig
from llmslim.quant.anchors import anchor_setting, factor, interpolated, unit_factors
from llmslim.quant.exact import base_log_probs, measured_kl, unit_kls
from llmslim.quant.sensitivity import group_order, measure
from tests.conftest import make_tiny_model

SPACE = [(2, 32), (3, 32), (4, 32), (4, 64), (8, -1)]


def test_interpolation_is_log_linear_between_anchors_and_constant_beyond():
    f = {2: 4.0, 4: 1.0}
    assert interpolated(f, 2) == 4.0 and interpolated(f, 4) == 1.0
    assert interpolated(f, 3) == pytest.approx(2.0)  # the geometric mean
    assert interpolated(f, 8) == 1.0 and interpolated(f, 1) == 4.0
    assert interpolated({4: 3.0}, 2) == 3.0 and interpolated({}, 3) == 1.0
    assert factor(0.01, 0.03) == pytest.approx(3.0)
    assert factor(0.0, 0.02) == 1.0 and factor(0.01, 0.0) == 1.0 and factor(0.01, -1e-6) == 1.0


def test_anchor_setting():
    assert anchor_setting(SPACE, "4:64", group_order) == {2: "2:32"}
    three = [(2, 32), (2, 64), (2, 128), (4, 64)]
    assert anchor_setting(three, "4:64", group_order) == {2: "2:64"}  # the middle group
    assert anchor_setting([(4, 32), (4, -1)], "4:-1", group_order) == {}  # nothing below the reference
    assert anchor_setting([(2, 32)], None, group_order) == {2: "2:32"}


def test_unit_factors_are_relative_to_the_typical_unit_at_the_reference():
    records = [{"names": ["a", "b"], "bits": 2, "predicted": 1.0, "measured": 1.5},
               {"names": ["c"], "bits": 2, "predicted": 1.0, "measured": 6.0}]
    scale = [{"names": ["a", "b"], "bits": 4, "predicted": 1.0, "measured": 1.5},
             {"names": ["c"], "bits": 4, "predicted": 1.0, "measured": 1.4},
             {"names": ["d"], "bits": 4, "predicted": 1.0, "measured": 2.0}]
    f = unit_factors(records, scale)
    assert f["a"] == f["b"] == {2: 1.0, 4: 1.0} and f["c"] == {2: 4.0, 4: 1.0}
    assert interpolated(f["c"], 3) == pytest.approx(2.0) and interpolated(f["c"], 8) == 1.0
    assert unit_factors(records, [])["c"] == {2: 1.0}  # no sample: relative to the median anchor (6.0 here)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unit_kls_replays_the_blocks_before_the_unit(arch):
    """Each unit's KL is what a full forward with only that unit replaced measures, whichever block
    it sits in (the earlier blocks replay the original's recorded outputs)."""
    model = make_tiny_model(arch).float().eval()
    calib = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    names = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and "lm_head" not in n]
    picked = [names[0], names[len(names) // 2], names[-1]]
    units = [{n: model.get_submodule(n).weight.detach().clone() + 0.05 * torch.randn(
        model.get_submodule(n).weight.shape, generator=gen)} for n in picked]
    units = [{n: (w.T if type(model.get_submodule(n)).__name__ == "Conv1D" else w) for n, w in u.items()} for u in units]
    got = unit_kls(model, units, calib)
    base = base_log_probs(model, calib)
    want = [measured_kl(model, u, base, calib) for u in units]
    assert all(g > 0 for g in got)
    assert got == pytest.approx(want, rel=1e-4)


def test_costs_at_the_anchor_are_the_units_measured_kl_relative_to_the_typical_unit():
    """After the pass, each unit's cost at the anchor grid is the exact KL of the unit alone quantized
    by GPTQ on that grid (the fused q/k/v measured together, on the sequence the pass kept out) over
    the typical unit's measured / predicted at the reference grid; the reference's grid keeps the
    prediction, and the bits between take the geometric mean."""
    model = make_tiny_model("llama").float()
    calib = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    qkv = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    down = "model.layers.0.mlp.down_proj"
    keep = {(n, c) for n in [*qkv, down] for c in ("2:32",)}

    def unit_of(name):
        return "qkv" if name in qkv else name

    s, kept = measure(model, GPTQConfig(forward_dtype="fp32"), SPACE, calib, fisher_samples=8, keep=keep,
                      unit_of=unit_of)  # float32 forwards: the anchors as measured_kl measures them
    check = calib[:1]  # an eighth of 8 sequences: the one kept out of the pass
    base = base_log_probs(model, check)
    scale = sorted(r["measured"] / r["predicted"] for r in s.anchors if r.get("scale"))
    typical = scale[len(scale) // 2]  # the typical unit's ratio at the reference grid
    by_name = {x.name: x for x in s.layers}
    for names in (qkv, [down]):
        cost = sum(by_name[n].kl[by_name[n].candidates.index("2:32")] for n in names)
        exact = measured_kl(model, {n: kept[(n, "2:32")] for n in names}, base, check)
        assert cost * typical == pytest.approx(exact, rel=1e-3), names
        x = by_name[names[0]]
        f2 = x.anchor["2"]
        assert x.anchor["4"] == 1.0 and x.kl[x.candidates.index("4:64")] == x.second_order[x.candidates.index("4:64")]
        three = x.candidates.index("3:32")
        assert x.kl[three] == pytest.approx(x.second_order[three] * math.sqrt(f2))
    anchors = [r for r in s.anchors if not r.get("scale")]
    assert len(anchors) == len(s.layers) - 2 and {r["bits"] for r in anchors} == {2} and "anchors" in s.seconds
    assert len(scale) == 8 and {r["bits"] for r in s.anchors if r.get("scale")} == {4}
