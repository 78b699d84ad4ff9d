"""Units of the allocation: fused siblings choose together, in every combination the fast kernels
still fuse (one group size at 2-4 bits each, or one grid), without dominated combinations."""

from __future__ import annotations

import pytest

from llmslim.pipeline.tune import fusable, uniform_points, units
from llmslim.quant.sensitivity import Sensitivities, SensitivityLog, layer_bytes

CANDS = ["2:32", "4:32", "4:64", "8:32"]


def _table() -> Sensitivities:
    shapes, layers = {}, []
    costs = {"q_proj": [0.5, 0.1, 0.12, 0.001], "k_proj": [0.9, 0.2, 0.25, 0.002], "v_proj": [0.3, 0.05, 0.06, 0.001],
             "o_proj": [0.4, 0.4, 0.5, 0.001]}
    for child, kl in costs.items():
        name = f"model.layers.0.self_attn.{child}"
        shapes[name] = (64, 64 if child in ("q_proj", "o_proj") else 32, False)
        layers.append(SensitivityLog(name, shapes[name][1], 64, False, list(CANDS), kl, list(kl), {}, 0.0))
    return Sensitivities(layers, shapes, 0)


def test_fusable():
    assert fusable(("4:32", "4:32", "4:32")) and fusable(("2:32", "4:32", "3:32")) and fusable(("8:32", "8:32"))
    assert not fusable(("4:32", "4:64")) and not fusable(("4:32", "8:32")) and not fusable(("8:32", "8:64"))


def test_siblings_choose_their_own_bits_within_one_kernel():
    s = _table()
    qkv, o = units(s)
    assert qkv.names == tuple(f"model.layers.0.self_attn.{c}_proj" for c in "qkv") and o.names[0].endswith("o_proj")
    assert all(fusable(opt) for opt in qkv.options)
    assert ("2:32", "4:32", "2:32") in qkv.options  # mixed bits, one group
    assert ("8:32", "8:32", "8:32") in qkv.options and ("4:32", "4:32", "8:32") not in qkv.options
    assert not any("4:64" in opt and "4:32" in opt for opt in qkv.options)  # one group size
    # o_proj: 4:32 costs what 2:32 does but is larger, 4:64 is larger and costlier than 2:32: both dominated.
    assert o.options == (("2:32",), ("8:32",))
    for opt, size, kl in zip(qkv.options, qkv.bytes, qkv.kl, strict=True):
        names = qkv.names
        assert size == sum(layer_bytes(s.shapes[n][0], s.shapes[n][1], *map(int, c.split(":")), False)
                           for n, c in zip(names, opt, strict=True))
        assert kl == sum(x.kl[x.candidates.index(c)] for x, c in zip(s.layers, opt, strict=False) if x.name in names)
    # No option is beaten in both size and cost by another.
    pairs = list(zip(qkv.bytes, qkv.kl, strict=True))
    assert not any(a[0] <= b[0] and a[1] <= b[1] and a != b for a in pairs for b in pairs)


def test_uniform_points_price_every_layer_at_the_setting():
    s = _table()
    u = {p["setting"]: p for p in uniform_points(s, 0)}
    assert set(u) == set(CANDS)
    assert u["4:64"]["predicted_sum"] == sum(x.kl[2] for x in s.layers)


def test_uniform_points_stand_in_for_a_group_a_layer_cannot_take():
    # o_proj's input is not a multiple of 64 (a divisible space): its candidates lack 4:64 and 8:64.
    s = _table()
    o = next(x for x in s.layers if x.name.endswith("o_proj"))
    o.candidates, o.kl = ["2:32", "4:32", "8:32"], [0.4, 0.4, 0.001]
    s.layers.append(SensitivityLog("model.layers.0.mlp.down_proj", 64, 64, False, ["4:64", "8:64"], [0.05, 0.002],
                                   [0.05, 0.002], {}, 0.0))
    s.shapes["model.layers.0.mlp.down_proj"] = (64, 64, False)
    u = {p["setting"]: p for p in uniform_points(s, 0)}
    assert u["4:64"]["substituted"] == 1  # o_proj at 4:32, the same bits' largest smaller group
    assert sum(x.kl[x.candidates.index("4:64")] for x in s.layers if x is not o) + 0.4 == pytest.approx(
        u["4:64"]["predicted_sum"])
    assert u["8:64"]["substituted"] == 4  # q, k, v and o at 8:32
    # down_proj has no 2-bit candidate, nor a 4-bit group at or below 32: no uniform point for those.
    assert "2:32" not in u and "4:32" not in u
