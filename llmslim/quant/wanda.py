"""Wanda and magnitude pruning: a score per weight, a mask, no weight update.

Wanda (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", arXiv:2306.11695): score S_ij = |W_ij| * ||X_j||_2, the weight times the L2 norm of its
input feature over the calibration tokens (paper eq. 1), compared within each output row (Sec. 3,
"comparison group": per output, not per layer). N:M compares within each run of M inputs of a row.

Magnitude (Han et al. 2015): score |W_ij|, compared across the whole layer: the baseline every
other method must beat. Neither needs a Hessian; Wanda needs only its diagonal, which is
2 ||X_j||^2 / n in the running mean the block driver keeps.
"""

from __future__ import annotations

import torch

from . import masks
from .sparsegpt import PruneResult


def accumulate_sq_norms(S: torch.Tensor, nsamples: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add the inputs ``X [..., columns]`` to a running mean of 2 x_j^2: the diagonal of
    ``gptq.accumulate_hessian``'s H, without the d x d matrix."""
    X = X.reshape(-1, X.shape[-1]).float()
    n = X.shape[0]
    S.mul_(nsamples / (nsamples + n))
    nsamples += n
    S.add_(X.square().sum(0), alpha=2 / nsamples)
    return S, nsamples


def wanda_prune(W: torch.Tensor, sq_norms: torch.Tensor, sparsity: float = 0.0,
                nm: tuple[int, int] | None = None) -> PruneResult:
    """Prune ``W [rows, columns]`` with Wanda; ``sq_norms [columns]`` is proportional to ||X_j||^2."""
    W = W.detach().float()
    S = W.abs() * sq_norms.float().sqrt()[None, :]  # eq. 1; the scale of the norms does not matter
    if nm is not None:
        mask = masks.nm_mask(S, *nm)
    else:
        mask = masks.smallest_per_row(S, masks.count_for(W.shape[1], sparsity))
    return PruneResult(W.masked_fill(mask, 0), mask, float("nan"))


def magnitude_prune(W: torch.Tensor, sparsity: float = 0.0, nm: tuple[int, int] | None = None) -> PruneResult:
    """Prune ``W`` by |w|: the smallest per layer, or per run of M inputs for N:M."""
    W = W.detach().float()
    mask = masks.nm_mask(W.abs(), *nm) if nm is not None else masks.smallest(W.abs(), masks.count_for(
        W.numel(), sparsity))
    return PruneResult(W.masked_fill(mask, 0), mask, float("nan"))
