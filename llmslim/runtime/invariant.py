"""Linear calls whose result for one row does not depend on how many rows share the call.

Served greedily, a request's tokens must not depend on what else is in the batch. A matmul
library picks its blocking, and so the order in which a row's products are summed, from the
shape: measured here (torch 2.13, oneDNN, AVX-512 with bf16), a bf16 ``F.linear`` gives row i the
very same bits for M <= 32 rows and others from M = 33 on; fp32 differs from M = 2 on (M = 1 is a
GEMV); the int4 and int8 weight-only kernels agree at every M tried. One row's logits would then
change, by rounding, with the number of requests decoded beside it, and a near tie flips its
greedy token.

vLLM's batch-invariant mode fixes the reduction order inside its own kernels. Here the kernels
are torch's, so the order is measured instead of fixed: the first time a projection of a given
signature meets M rows, one call over M random rows is compared bit for bit with M one-row calls
(on this thread, with this thread count). Where they agree the M rows go in one call; where not,
they are cut into chunks of sizes that do agree (powers of two, down to one row at a time). A
kernel's summation order depends on shapes, dtypes and threads, never on the values, so random
rows decide it, once per (signature, M).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]
PROBE_SEED = 1234


class RowInvariant:
    """Runs ``fn(x [M, K])`` so that every row equals ``fn`` of that row alone, bit for bit."""

    def __init__(self):
        self._agrees: dict[tuple, bool] = {}
        self._plans: dict[tuple, list[int]] = {}

    def agrees(self, fn: Fn, key: Hashable, rows: int, in_features: int, dtype: torch.dtype) -> bool:
        """Whether ``fn`` over ``rows`` rows at once equals ``rows`` one-row calls (probed once)."""
        k = (key, rows, in_features, dtype, torch.get_num_threads())
        found = self._agrees.get(k)
        if found is None:
            gen = torch.Generator().manual_seed(PROBE_SEED)
            x = torch.randn(rows, in_features, generator=gen).to(dtype)
            together = fn(x)
            alone = torch.cat([fn(x[i:i + 1]) for i in range(rows)])
            found = self._agrees[k] = torch.equal(together, alone)
        return found

    def plan(self, fn: Fn, key: Hashable, rows: int, in_features: int, dtype: torch.dtype) -> list[int]:
        """Chunk sizes (summing to ``rows``) whose calls each agree with one-row calls."""
        k = (key, rows, in_features, dtype, torch.get_num_threads())
        plan = self._plans.get(k)
        if plan is None:
            if rows == 1 or self.agrees(fn, key, rows, in_features, dtype):
                plan = [rows]
            else:
                size = 1 << (rows - 1).bit_length() - 1  # the largest power of two below rows
                while size > 1 and not self.agrees(fn, key, size, in_features, dtype):
                    size //= 2
                rest = rows % size
                plan = [size] * (rows // size) + (self.plan(fn, key, rest, in_features, dtype) if rest else [])
            self._plans[k] = plan
        return plan

    def __call__(self, fn: Fn, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows == 1:
            return fn(x)
        plan = self.plan(fn, key, rows, x.shape[1], x.dtype)
        if len(plan) == 1:
            return fn(x)
        return torch.cat([fn(part) for part in x.split(plan)])
