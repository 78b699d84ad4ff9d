"""Exact costs at the lowest bit width per unit, and the correction they give the prediction.

Why: the second-order prediction (``sensitivity``) ranks (layer, candidate) pairs well overall
(Spearman 0.966 on SmolLM2-135M) but some pairs are off by up to 9x, always low: k_proj and v_proj,
whose output channels act together (a head's q.k dot product, a head's values through o_proj),
which the diagonal Fisher cannot see, and gate/up at 2 bits, where the expansion fails for large
perturbations. A knapsack exploits exactly such errors (the optimizer's curse: an under-predicted
unit looks cheap and gets the fewest bits): tuned models near 3 bits/weight came out 0.91x uniform
3-bit's KL at equal size where the prediction said far less (eval/tune.md).

So every unit (the layers that share a grid: q/k/v, o, gate/up, down) is measured exactly --
KL(original || model with only that unit GPTQ-quantized), on calibration sequences the pass did
not see -- at the space's lowest bit width (its middle group: the grid the pass's correction
solves anyway, now on all rows), where the errors are large and so is the KL (bf16 forwards' noise
is ~1e-4 nats, a unit at 4 bits costs about that much: an anchor there would measure noise). The
unit's factor measured / predicted, relative to the typical unit's at the reference grid (the
calibration's, 4 bits: it fixes the overall scale there; the median of ``SCALE_UNITS`` units spread
over the model, measured in float32, whose rounding noise is far below a 4-bit unit's KL), scales its
predictions at that bit width, and log-linearly less toward the reference's bit width, where the
factor is 1. Data behind it (SmolLM2-135M,
eval/results/tune_session11.partial.json's rank row): most layers' ratio is 1.3-1.7 at every bit width;
the outliers are 3-9x at 2 bits and smaller at 3 and 4 (an up_proj 4.57 at 2 bits, 2.25 at 4).

Cost: per unit, one forward on ``ANCHOR_SEQUENCES`` sequences starting at the unit's block
(``exact.unit_kls``), and the full-row GPTQ solve at the lowest bit width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .exact import Rounded, unit_kls

ANCHOR_SEQUENCES = 2  # calibration sequences each unit is measured on (of those the pass kept out)
SCALE_UNITS = 8  # units measured at the reference grid, in float32, for the typical ratio there


def anchor_setting(candidates: list[tuple[int, int]], reference: str | None, group_order: Callable[[int], int]
                   ) -> dict[int, str]:
    """A layer's anchor, {bits: candidate}: the lowest bit width's middle group (the group the pass's
    GPTQ correction uses for those bits), when it lies below the reference's bits; else none."""
    low = min(b for b, _ in candidates)
    if reference is not None and low >= int(reference.split(":")[0]):
        return {}
    groups = sorted((g for b, g in candidates if b == low), key=group_order)
    return {low: f"{low}:{groups[len(groups) // 2]}"}


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
        for bits in sorted(set.intersection(*(set(anchors.get(n, {})) for n in names))):
            chosen = {n: anchors[n][bits] for n in names}
            jobs.append({"names": names, "bits": bits, "candidates": [chosen[n] for n in names],
                         "predicted": sum(predicted[n][c] for n, c in chosen.items()),
                         "weights": {n: rounded[(n, c)] for n, c in chosen.items()}})
    measured = unit_kls(model, [j.pop("weights") for j in jobs], calib, dtype, desc="anchors (exact KL per unit)")
    return [j | {"measured": m} for j, m in zip(jobs, measured, strict=True)]


def unit_factors(records: list[dict], scale: list[dict]) -> dict[str, dict[int, float]]:
    """layer -> {bits: factor} from ``measure_anchors``'s records: at the anchor its unit's measured /
    predicted over the typical unit's at the reference grid (the median of ``scale``, a sample of units
    measured there; the median anchor when there is none), and 1 at the reference's bits, where the
    calibration measures the whole model."""
    ratios = [factor(r["predicted"], r["measured"]) for r in records]
    typical = [factor(r["predicted"], r["measured"]) for r in scale] or ratios
    typical_ratio = sorted(typical)[len(typical) // 2] if typical else 1.0
    reference_bits = {r["bits"] for r in scale}
    out: dict[str, dict[int, float]] = {}
    for r, ratio in zip(records, ratios, strict=True):
        for n in r["names"]:
            out.setdefault(n, {})[r["bits"]] = ratio / typical_ratio
            out[n].update(dict.fromkeys(reference_bits, 1.0))
    return out
