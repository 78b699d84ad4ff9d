"""The tune solver: exact on hand-made tables whose optimum is known, and on brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from llmslim.quant.allocate import Allocation, Unreachable, allocate, pareto_front

# Three layers, options (size, cost) = (8-bit, 4-bit, 2-bit)-like. Layer 1 is sensitive, layer 2
# is not: the optimum spends the bits on layer 1.
SIZES = [[8, 4, 2], [8, 4, 2], [8, 4, 2]]
COSTS = [[0.0, 0.10, 1.00], [0.0, 0.01, 0.05], [0.0, 0.02, 0.30]]


def brute(sizes, costs, max_cost=None, max_size=None):
    best = None
    for choice in itertools.product(*(range(len(s)) for s in sizes)):
        s = sum(sizes[i][j] for i, j in enumerate(choice))
        c = sum(costs[i][j] for i, j in enumerate(choice))
        if max_cost is not None and c <= max_cost + 1e-12:
            key = (s, c)
        elif max_size is not None and s <= max_size:
            key = (c, s)
        else:
            continue
        if best is None or key < best[0]:
            best = (key, choice)
    return best


def test_quality_budget_picks_the_known_optimum():
    # cost <= 0.2: layer 1 at 4 bits (0.10), layer 2 at 2 bits (0.05), layer 3 at 4 bits (0.02): 10 bits, 0.17.
    a = allocate(SIZES, COSTS, max_cost=0.2)
    assert a == Allocation((1, 2, 1), 10.0, pytest.approx(0.17))
    # Nothing lost allowed: everything at 8 bits.
    assert allocate(SIZES, COSTS, max_cost=0.0).choice == (0, 0, 0)


def test_size_budget_picks_the_known_optimum():
    # 12 bits: 4+2+4 (10 bits) costs 0.17, 8+2+2 costs 0.35, 4+4+4 costs 0.13: the optimum.
    a = allocate(SIZES, COSTS, max_size=12)
    assert a.choice == (1, 1, 1) and a.size == 12 and a.cost == pytest.approx(0.13)
    # 14 bits: 8+2+4 costs 0.07 (8+4+2 0.31, 4+4+4 0.13): the optimum.
    assert allocate(SIZES, COSTS, max_size=14).choice == (0, 2, 1)


def test_unreachable_budgets_name_the_best_reachable():
    r = allocate(SIZES, COSTS, max_size=5)
    assert isinstance(r, Unreachable) and r.best.size == 6 and r.best.choice == (2, 2, 2)
    r = allocate([[8, 4]], [[0.5, 0.9]], max_cost=0.1)
    assert isinstance(r, Unreachable) and r.best.cost == 0.5


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_on_random_tables(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 5), rng.randint(1, 4)
    sizes = [[rng.randint(1, 20) for _ in range(k)] for _ in range(n)]
    costs = [[round(rng.random(), 3) for _ in range(k)] for _ in range(n)]
    total_c = sum(min(c) for c in costs)
    for max_cost in (total_c, total_c + 0.3, total_c + 1.5):
        (s, c), _ = brute(sizes, costs, max_cost=max_cost)
        a = allocate(sizes, costs, max_cost=max_cost)
        assert a.size == s and a.cost <= max_cost + 1e-9
    for max_size in (sum(min(x) for x in sizes), sum(max(x) for x in sizes) // 2 + n, 10**6):
        found = brute(sizes, costs, max_size=max_size)
        a = allocate(sizes, costs, max_size=max_size)
        if found is None:
            assert isinstance(a, Unreachable)
            continue
        (c, s), _ = found
        assert a.cost == pytest.approx(c) and a.size <= max_size


def test_binned_sizes_never_exceed_a_size_budget():
    rng = random.Random(0)
    sizes = [[rng.uniform(1e5, 1e6) for _ in range(4)] for _ in range(50)]
    costs = [[rng.random() for _ in range(4)] for _ in range(50)]
    budget = sum(sum(s) / 4 for s in sizes)
    a = allocate(sizes, costs, max_size=budget, bins=4096)
    assert a.size <= budget


def test_pareto_front_is_monotone():
    front = pareto_front(SIZES, COSTS)
    assert front[0].size == 6 and front[-1].cost == 0.0
    assert all(a.size < b.size and a.cost > b.cost for a, b in zip(front, front[1:], strict=False))


def test_bad_tables_are_refused():
    with pytest.raises(ValueError):
        allocate([[]], [[]], max_cost=1)
    with pytest.raises(ValueError):
        allocate(SIZES, COSTS, max_cost=1, max_size=1)


def test_a_size_budget_at_the_smallest_choice_is_reachable_exactly():
    """Binning never rounds the all-smallest choice up: a budget a byte above it is reachable."""
    rng = random.Random(1)
    sizes = [[rng.uniform(1e5, 1e6) for _ in range(4)] for _ in range(120)]
    costs = [[rng.random() for _ in range(4)] for _ in range(120)]
    smallest = sum(min(s) for s in sizes)
    a = allocate(sizes, costs, max_size=smallest + 1)
    assert isinstance(a, Allocation) and a.size <= smallest + 1
    assert isinstance(allocate(sizes, costs, max_size=smallest - 1), Unreachable)
