"""Linear calls whose result for one row does not depend on how many rows share the call.

Served greedily, a request's tokens must not depend on what else is in the batch. A matmul
library picks its blocking, and so the order in which a row's products are summed, from the
shape: fp32 ``F.linear`` differs from M = 2 rows on (M = 1 is a GEMV); bf16 differs at some
shapes and row counts and not at others, by CPU (on an AVX-512-bf16 Zen 4, 64x64 weights differ
from M = 2 on, 576x576 not at all); the int4 weight-only kernel computes each row by itself. One
row's logits would then change, by rounding, with the number of requests decoded beside it, and
a near tie flips its greedy token.

vLLM's batch-invariant mode fixes the reduction order inside its own kernels. Here the kernels
are torch's, so the order is measured instead of fixed: the first time a projection of a given
signature meets M rows, calls over M probe rows are compared bit for bit with M one-row calls
(on this thread, with this thread count). Where they agree the M rows go in one call; where not,
they are cut into chunks of sizes that do agree (powers of two, down to one row at a time). A
kernel's summation order depends on shapes, dtypes and threads, never on the values, so probe
rows decide it, once per (signature, M).

The probe rows must make a different order visible. With random rows it mostly is not: a bf16
output keeps 8 of the float32 sum's 24 bits, so two orders' sums (a few float32 ulps apart) round
to the same bf16 number except near a rounding boundary (on a Zen 4, 64x64 weights, M = 5: 3 of
32,000 outputs over 100 random probe batches; eval/inference.md). Where the weights are known
(``cancelling_rows``) each probe row holds two large entries whose products cancel exactly for
one output, and small entries elsewhere: the small products are then summed into a partial sum
that is ~2^20 times larger than the result, and where they meet it depends on the order, so the
result differs in its leading bits between orders instead of its last (398 of those 32,000; 8-130x
more than random rows on the shapes that differ; several trials make a miss unlikely).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]
Rows = Callable[[torch.Generator, int], torch.Tensor]  # (generator, M) -> probe rows [M, K] in float32
PROBE_SEED = 1234
TRIALS = 8  # independent probe batches per (signature, M)


def random_rows(in_features: int) -> Rows:
    return lambda gen, m: torch.randn(m, in_features, generator=gen)


def cancelling_rows(weights: Sequence[torch.Tensor]) -> Rows:
    """Probe rows for ``x @ cat(weights).T``: in row r, entries j1, j2 (one in the first and one in
    the last quarter of the input, so that most of the sum happens between them) are set so that
    w[o, j1] x[j1] + w[o, j2] x[j2] = 0 exactly for a random output o. Both are 2^10 times a weight
    of that row (a power of two: exact in any float format, and the products exact in float32); the
    other entries are ~2^-14, so the partial sum's float32 ulp is about a small product's size."""
    sizes = [w.shape[0] for w in weights]
    total, K = sum(sizes), weights[0].shape[1]

    def weight_row(o: int) -> torch.Tensor:
        for w, n in zip(weights, sizes, strict=True):
            if o < n:
                return w[o].float()
            o -= n
        raise IndexError(o)

    def rows(gen: torch.Generator, m: int) -> torch.Tensor:
        x = torch.randn(m, K, generator=gen) * 2.0 ** -14
        quarter = max(1, K // 4)
        for r in range(m):
            w = weight_row(int(torch.randint(total, (1,), generator=gen)))
            first = [j for j in torch.randperm(quarter, generator=gen).tolist() if w[j] != 0]
            last = [K - 1 - j for j in torch.randperm(quarter, generator=gen).tolist() if w[K - 1 - j] != 0]
            if first and last and first[0] != last[0]:
                j1, j2 = first[0], last[0]
                x[r, j1], x[r, j2] = 2.0 ** 10 * w[j2], -(2.0 ** 10) * w[j1]
        return x

    return rows


def one_row_calls(fn: Fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` over ``x``'s rows one at a time: what each row gets alone."""
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])


class RowInvariant:
    """Runs ``fn(x [M, K])`` so that every row equals ``fn`` of that row alone, bit for bit."""

    def __init__(self):
        self._agrees: dict[tuple, bool] = {}
        self._plans: dict[tuple, list[int]] = {}

    def agrees(self, fn: Fn, key: Hashable, rows: int, in_features: int, dtype: torch.dtype,
               probe: Rows | None = None) -> bool:
        """Whether ``fn`` over ``rows`` rows at once equals ``rows`` one-row calls (probed once).
        ``probe`` makes the probe rows (default: random)."""
        k = (key, rows, in_features, dtype, torch.get_num_threads())
        found = self._agrees.get(k)
        if found is None:
            gen = torch.Generator().manual_seed(PROBE_SEED)
            make = probe or random_rows(in_features)
            found = True
            for _ in range(TRIALS):
                x = make(gen, rows).to(dtype)
                if not torch.equal(fn(x), one_row_calls(fn, x)):
                    found = False
                    break
            self._agrees[k] = found
        return found

    def plan(self, fn: Fn, key: Hashable, rows: int, in_features: int, dtype: torch.dtype,
             probe: Rows | None = None) -> list[int]:
        """Chunk sizes (summing to ``rows``) whose calls each agree with one-row calls."""
        k = (key, rows, in_features, dtype, torch.get_num_threads())
        plan = self._plans.get(k)
        if plan is None:
            if rows == 1 or self.agrees(fn, key, rows, in_features, dtype, probe):
                plan = [rows]
            else:
                size = 1 << (rows - 1).bit_length() - 1  # the largest power of two below rows
                while size > 1 and not self.agrees(fn, key, size, in_features, dtype, probe):
                    size //= 2
                rest = rows % size
                plan = [size] * (rows // size) + (self.plan(fn, key, rest, in_features, dtype, probe) if rest else [])
            self._plans[k] = plan
        return plan

    def __call__(self, fn: Fn, key: Hashable, x: torch.Tensor, probe: Rows | None = None) -> torch.Tensor:
        rows = x.shape[0]
        if rows == 1:
            return fn(x)
        plan = self.plan(fn, key, rows, x.shape[1], x.dtype, probe)
        if len(plan) == 1:
            return fn(x)
        return torch.cat([fn(part) for part in x.split(plan)])
