"""Pruning masks from scores: the selection rules every pruning method shares.

A mask is a bool tensor shaped like the weight ``[rows, columns]`` (out x in), ``True`` where the
weight is pruned (set to zero). Scores are "how much it costs to remove this weight": lower is
pruned first. Selection is by rank, never by a threshold, so that ties cannot push a layer past
its target: exactly ``k`` weights are chosen.

N:M follows NVIDIA's convention (Mishra et al., arXiv:2104.08378): at most ``N`` nonzero weights
in every ``M`` consecutive inputs of a row, i.e. ``M - N`` pruned; 2:4 and 4:8 are 50% sparse.
"""

from __future__ import annotations

import torch


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` smallest scores of the whole tensor (a per-layer comparison group)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.argsort(scores.flatten(), stable=True)[:k]] = True
    return mask.view(scores.shape)


def smallest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` smallest scores of each row (Wanda's per-output comparison group)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every ``m`` consecutive columns of each row, prune all but the ``n`` largest scores."""
    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"{columns} columns are not a multiple of M={m}")
    s = scores.reshape(rows, columns // m, m)
    drop = torch.argsort(s, dim=2, stable=True)[..., : m - n]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(2, drop, True).reshape(rows, columns)


def nm_holds(W: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``W [rows, columns]`` has at most ``n`` nonzeros in every ``m`` consecutive columns."""
    rows, columns = W.shape
    if columns % m:
        return False
    return bool(((W.reshape(rows, columns // m, m) != 0).sum(-1) <= n).all())


def count_for(numel: int, sparsity: float) -> int:
    """Weights to prune for a target sparsity (rounded down: never more than asked)."""
    return int(numel * sparsity)
