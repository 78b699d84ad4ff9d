"""SparseGPT: one-shot pruning with the OBS update, as pure functions on one layer.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774 (reference code: IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``). Same notation
as the GPTQ solver next door:

    W     [rows, columns]  the layer weight (out x in)
    H     [columns, columns] = 2 X X^T, the Hessian of ||WX - ŴX||^2
    Hinv  the upper Cholesky factor of (H + damp I)^-1 (the rows of H^-1 the sweep needs, Sec. 3.2)
    Err   the scaled pruning error of the columns of one lazy block

The sweep goes column by column. Each pruned weight w is set to 0 and the error it makes,
(w - 0) / [Hinv]_cc, is spread over the columns not yet visited through the row [Hinv]_c,c: -- the
OBS update (Hassibi & Stork 1993; paper eq. 2-3) restricted to the columns after the current one,
which is what makes a single H^-1 serve every row (Sec. 3.2, "Hessian synchronization").

Joint pruning + quantization (Sec. 3.5) lives in ``gptq.gptq_quantize(sparsity=..., nm=...)``: the
same sweep with the quantizer applied to the kept weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import masks
from .gptq import column_order, inverse_cholesky, magnitude_mask, torch_threads


@dataclass
class PruneResult:
    W: torch.Tensor  # float32 [rows, columns], the pruned and updated weight
    mask: torch.Tensor  # bool [rows, columns], True where the weight was pruned
    loss: float  # the sweep's own error estimate: sum (w - ŵ)^2 / [Hinv]_cc^2 / 2
    damp_percent: float | None = None  # damping that made H positive definite (SparseGPT only)
    fallback: str | None = None  # why this layer fell back to magnitude pruning, if it did


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp_percent: float = 0.01,
    act_order: bool = False,
) -> PruneResult:
    """Prune ``W`` to ``sparsity`` (unstructured) or to ``nm`` = (N, M) with SparseGPT.

    ``act_order`` (N:M only) sweeps the runs of M columns in decreasing order of their largest
    Hessian diagonal entry (``gptq.column_order``), GPTQ's act-order heuristic (arXiv:2210.17323; the
    reference ``--act-order``) applied to whole runs, so the pattern is unchanged: the runs whose
    inputs carry the most energy are pruned first, while every other column can still absorb their
    error."""
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    rows, columns = W.shape
    if nm is not None and (columns % nm[1] or block_size % nm[1]):
        raise ValueError(f"M={nm[1]} must divide the {columns} columns and the block size {block_size}")
    if act_order:
        if nm is None:
            raise ValueError("act_order applies to N:M pruning only")
        perm, _ = column_order(torch.diag(H), torch.zeros(columns, dtype=torch.long), -1, desc_act=True,
                               static_groups=False, act_group_aware=False, unit=nm[1])
        r = sparsegpt_prune(W[:, perm], H[perm][:, perm], sparsity, nm, block_size, damp_percent)
        inv = torch.argsort(perm)
        return PruneResult(r.W[:, inv], r.mask[:, inv], r.loss, r.damp_percent, r.fallback)
    if not bool(torch.isfinite(H.sum())):
        return _magnitude_fallback(W, sparsity, nm, damp_percent, "Hessian is not finite")

    # Dead inputs (always zero in calibration): the reference fixes their diagonal and zeroes W.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Hinv, used_damp = inverse_cholesky(H, damp_percent)  # damping of Sec. 3.2, doubled until it works
    if Hinv is None:
        return _magnitude_fallback(W, sparsity, nm, used_damp, "Cholesky failed even at 100% damping")

    Mask = torch.zeros(rows, columns, dtype=torch.bool)
    Losses = torch.zeros(rows, columns)
    for i1 in range(0, columns, block_size):  # lazy batch updates (GPTQ, arXiv:2210.17323 Sec. 4)
        i2 = min(i1 + block_size, columns)
        # Held transposed ([columns, rows]) like the GPTQ sweep: each column is contiguous.
        W1 = W[:, i1:i2].T.clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)[:, None]
        if nm is None:
            # Adaptive mask selection (Sec. 3.3): the block's mask is chosen when the sweep reaches
            # it, by the OBS saliency w^2 / [Hinv]_cc^2 of the weights as updated so far. The count
            # per block makes the whole layer exactly floor(rows * columns * sparsity) zeros.
            k = masks.count_for(rows * i2, sparsity) - masks.count_for(rows * i1, sparsity)
            mask1 = masks.smallest(W1.square() / d1.square(), k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        with torch_threads(1):  # tiny per-column ops: a thread pool costs more than the work
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    # N:M (Sec. 3.5, "semi-structured"): in each run of M columns keep the N of
                    # highest saliency, chosen when the run is reached.
                    m = nm[1]
                    mask1[i:i + m] = masks.nm_mask((W1[i:i + m].square() / d1[i:i + m].square()).T, *nm).T
                w = W1[i]
                q = w.masked_fill(mask1[i], 0)  # pruned weights become 0, the others stay
                err1 = (w - q).div_(Hinv1[i, i])
                # OBS update of the not-yet-visited columns of this block (paper eq. 3).
                W1[i:].addr_(Hinv1[i, i:], err1, alpha=-1)
                W1[i] = q
                Err1[i] = err1
        W[:, i1:i2] = W1.T
        Mask[:, i1:i2] = mask1.T
        Losses[:, i1:i2] = Err1.T.square() / 2
        W[:, i2:] -= Err1.T @ Hinv[i1:i2, i2:]  # the lazy update of every later column
    W[Mask] = 0  # exact zeros, whatever the float updates did
    return PruneResult(W, Mask, float(Losses.sum()), used_damp)


def _magnitude_fallback(W, sparsity, nm, damp_percent, why) -> PruneResult:
    mask = magnitude_mask(W, sparsity, nm)
    return PruneResult(W.masked_fill(mask, 0), mask, float("nan"), damp_percent, f"{why}; magnitude pruning")
