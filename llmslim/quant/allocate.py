"""Which setting each layer gets: the multiple-choice knapsack behind ``llmslim tune``.

Every unit ``i`` (a layer, or layers that share one input and must share one setting) has
options ``j`` with a size ``s_ij`` (bits) and a predicted cost ``c_ij`` (KL increase to the
original, measured per unit and assumed additive over units). Pick exactly one option per unit:

    quality budget:  minimize sum_i s_i,j(i)   subject to  sum_i c_i,j(i) <= C
    size budget:     minimize sum_i c_i,j(i)   subject to  sum_i s_i,j(i) <= S

Both are the multiple-choice knapsack problem (Sinha & Zoltners 1979). The Lagrangian relaxation
(choose argmin_j c_ij + lambda s_ij per unit and search lambda) only reaches the points on the
lower convex hull of the size/cost trade-off, so a budget between two hull points wastes up to a
whole unit's step. Here one dynamic program over sizes solves both problems exactly: with sizes
counted in whole "bins" (rounded up, so a solution never exceeds its size budget),

    f_i[b] = min_j ( f_{i-1}[b - s_ij] + c_ij ),      f_0[b] = 0,

is the least cost of the first ``i`` units within ``b`` bins (counted above the all-smallest choice,
which stays exact); ``f_n`` is non-increasing in ``b``,
and it is the whole Pareto front of the model: the quality budget takes the smallest ``b`` with
``f_n[b] <= C``, the size budget reads ``f_n[S]``. O(units x options x bins) in numpy; 65,536 bins
lose at most one bin per unit to rounding (at most 0.2% of the span between the smallest and the
largest model for 120 units).

A pure function of its table: no torch, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 65536


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]  # option index per unit
    size: float  # sum of the chosen options' sizes (exact, not binned)
    cost: float  # sum of the chosen options' costs


@dataclass(frozen=True)
class Unreachable:
    """No choice meets the budget; ``best`` is the closest one can get (the least cost, or the
    smallest size), which the caller names to the user."""

    best: Allocation


def _front(sizes: list[list[float]], costs: list[list[float]], bins: int):
    """The DP table's last row and the back-pointers. ``unit`` is the size of one bin."""
    if not sizes or any(len(s) == 0 for s in sizes):
        raise ValueError("every unit needs at least one option")
    if any(len(s) != len(c) for s, c in zip(sizes, costs, strict=True)):
        raise ValueError("sizes and costs must have the same shape")
    # Only what each option adds to its unit's smallest one is binned: the all-smallest choice (and
    # any budget near it) stays exact. Integer sizes whose total fits the bins are exact (unit 1).
    extra = [[x - min(s) for x in s] for s in sizes]
    most = sum(max(e) for e in extra)
    integral = all(float(x).is_integer() for e in extra for x in e)
    unit = 1.0 if integral and most <= bins else max(most / bins, 1e-12)
    width = int(np.ceil(most / unit - 1e-9)) + 1
    f = np.zeros(width)
    back = np.zeros((len(sizes), width), dtype=np.int16)
    for i, (e_i, c_i) in enumerate(zip(extra, costs, strict=True)):
        new = np.full(width, np.inf)
        for j, (s, c) in enumerate(zip(e_i, c_i, strict=True)):
            k = int(np.ceil(s / unit - 1e-9))
            cand = np.full(width, np.inf)
            cand[k:] = f[: width - k] + c
            better = cand < new
            new[better] = cand[better]
            back[i, better] = j
        f = new
    return f, back, unit


def _trace(back: np.ndarray, sizes: list[list[float]], unit: float, b: int) -> tuple[int, ...]:
    choice = []
    for i in range(len(sizes) - 1, -1, -1):
        j = int(back[i, b])
        choice.append(j)
        b -= int(np.ceil((sizes[i][j] - min(sizes[i])) / unit - 1e-9))
    return tuple(reversed(choice))


def _allocation(sizes, costs, choice) -> Allocation:
    return Allocation(choice, float(sum(sizes[i][j] for i, j in enumerate(choice))),
                      float(sum(costs[i][j] for i, j in enumerate(choice))))


def allocate(
    sizes: list[list[float]],
    costs: list[list[float]],
    max_cost: float | None = None,
    max_size: float | None = None,
    bins: int = BINS,
) -> Allocation | Unreachable:
    """One option per unit: the smallest total size with total cost <= ``max_cost``, or the least
    total cost with total size <= ``max_size`` (exactly one of the two)."""
    if (max_cost is None) == (max_size is None):
        raise ValueError("give exactly one of max_cost and max_size")
    f, back, unit = _front(sizes, costs, bins)
    if max_size is not None:
        b = min(int(np.floor((max_size - sum(min(s) for s in sizes)) / unit + 1e-9)), len(f) - 1)
        if b < 0 or not np.isfinite(f[b]):
            smallest = tuple(int(np.argmin(s)) for s in sizes)
            return Unreachable(_allocation(sizes, costs, smallest))
        # The least cost within b bins may also be reached with fewer: take the smallest such b.
        b = int(np.argmax(f <= f[b]))
        return _allocation(sizes, costs, _trace(back, sizes, unit, b))
    ok = np.nonzero(f <= max_cost * (1 + 1e-12))[0]
    if not ok.size:
        return Unreachable(_allocation(sizes, costs, _trace(back, sizes, unit, len(f) - 1)))
    return _allocation(sizes, costs, _trace(back, sizes, unit, int(ok[0])))


def pareto_front(sizes: list[list[float]], costs: list[list[float]], points: int = 64,
                 bins: int = BINS) -> list[Allocation]:
    """Up to ``points`` allocations along the predicted size/cost front, smallest size first (each
    the least cost at its size): what the tune plot draws against the uniform settings."""
    f, back, unit = _front(sizes, costs, bins)
    finite = np.nonzero(np.isfinite(f))[0]
    out: list[Allocation] = []
    seen = set()
    for b in np.unique(np.linspace(finite[0], len(f) - 1, points).round().astype(int)):
        b = int(np.argmax(f <= f[b]))  # the smallest size with this cost
        if b in seen:
            continue
        seen.add(b)
        out.append(_allocation(sizes, costs, _trace(back, sizes, unit, b)))
    return out
