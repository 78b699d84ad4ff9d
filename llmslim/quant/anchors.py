"""Exact costs at two anchor bit widths per unit, and the correction they give the prediction.

Why: the second-order prediction (``sensitivity``) ranks (layer, candidate) pairs well overall
(Spearman 0.966 on SmolLM2-135M) but some pairs are off by up to 9x, always low: k_proj and v_proj,
whose output channels act together (a head's q.k dot product, a head's values through o_proj),
which the diagonal Fisher cannot see, and gate/up at 2 bits, where the expansion fails for large
perturbations. A knapsack exploits exactly such errors (the optimizer's curse: an under-predicted
unit looks cheap and gets the fewest bits): tuned models near 3 bits/weight came out 0.91x uniform
3-bit's KL at equal size where the prediction said far less (eval/tune.md).

So every unit (the layers that share a grid: q/k/v, o, gate/up, down) is measured exactly --
KL(original || model with only that unit GPTQ-quantized), on calibration sequences the pass did
not see -- at two anchors: the space's lowest bit width (its middle group, the grid the pass's
correction solves anyway, now on all rows) and the reference's (the calibration's, already solved
on all rows). The unit's factor measured / predicted at each anchor is interpolated in log space
linearly over bits between the anchors (constant beyond them) and multiplies the unit's predicted
cost of every candidate: at the anchors the cost is the measurement, elsewhere the prediction's
shape between measured ends. Data behind the interpolation (SmolLM2-135M, eval/results/tune.partial.json's
rank row): a layer's ratio is mostly a property of the layer across bit widths (a v_proj 3.30 at
3 bits and 3.31 at 4, a down_proj 1.70 and 1.70), except where the expansion breaks at 2 bits (an
up_proj 4.57 at 2 bits, 2.25 at 4), which the two ends bracket.

Cost: per unit and anchor, one forward on ``ANCHOR_SEQUENCES`` sequences starting at the unit's
block (``exact.unit_kls``): on SmolLM2-135M 120 units x 2 anchors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .exact import Rounded, unit_kls

ANCHOR_SEQUENCES = 4  # calibration sequences each unit is measured on (of those the pass kept out)


def anchor_setting(candidates: list[tuple[int, int]], reference: str | None, group_order: Callable[[int], int]
                   ) -> dict[int, str]:
    """A layer's anchors, bits -> candidate: the reference's own, and the lowest bit width's middle
    group (the group the pass's GPTQ correction uses for those bits)."""
    out = {}
    if reference is not None:
        out[int(reference.split(":")[0])] = reference
    low = min(b for b, _ in candidates)
    if low not in out:
        groups = sorted((g for b, g in candidates if b == low), key=group_order)
        out[low] = f"{low}:{groups[len(groups) // 2]}"
    return out


def interpolated(factors: dict[int, float], bits: int) -> float:
    """The factor at ``bits``: log-linear between the anchors' bit widths, constant beyond them."""
    if not factors:
        return 1.0
    points = sorted(factors.items())
    if bits <= points[0][0]:
        return points[0][1]
    if bits >= points[-1][0]:
        return points[-1][1]
    for (b0, f0), (b1, f1) in zip(points, points[1:], strict=False):
        if b0 <= bits <= b1:
            t = (bits - b0) / (b1 - b0)
            return math.exp((1 - t) * math.log(f0) + t * math.log(f1))
    return 1.0  # not reached


def factor(predicted: float, measured: float) -> float:
    """measured / predicted, where both say something: a unit predicted (or measured) to cost
    nothing keeps its prediction (factor 1), and noise below zero is not a negative cost."""
    return measured / predicted if predicted > 0 and measured > 0 else 1.0


def measure_anchors(model: nn.Module, groups: list[list[str]], anchors: dict[str, dict[int, str]],
                    predicted: dict[str, dict[str, float]], rounded: dict[tuple[str, str], Rounded],
                    calib: torch.Tensor, dtype: torch.dtype | None = None) -> list[dict]:
    """Measure every unit (``groups``: lists of layer names) at each anchor bit width its layers share:
    one record per (unit, bits) with the layers' candidates, the predicted cost (the sum of
    ``predicted[layer][candidate]``) and the measured KL."""
    jobs = []
    for names in groups:
        for bits in sorted(set.intersection(*(set(anchors[n]) for n in names))):
            chosen = {n: anchors[n][bits] for n in names}
            jobs.append({"names": names, "bits": bits, "candidates": [chosen[n] for n in names],
                         "predicted": sum(predicted[n][c] for n, c in chosen.items()),
                         "weights": {n: rounded[(n, c)] for n, c in chosen.items()}})
    measured = unit_kls(model, [j.pop("weights") for j in jobs], calib, dtype, desc="anchors (exact KL per unit)")
    return [j | {"measured": m} for j, m in zip(jobs, measured, strict=True)]


def unit_factors(records: list[dict]) -> dict[str, dict[int, float]]:
    """layer -> {anchor bits: its unit's measured / predicted} from ``measure_anchors``'s records."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for n in r["names"]:
            out.setdefault(n, {})[r["bits"]] = factor(r["predicted"], r["measured"])
    return out
