"""Unstructured and N:M pruning of a whole model: which linears, and the block driver's solvers.

SparseGPT and Wanda run through the same block driver as GPTQ (``sequential.run_blocks``):
calibration activations one decoder block at a time; every layer's input read from one forward of
the block as it was (as the reference code does; ``true_sequential`` lets each group see the groups
before it pruned, as GPTQ does), checkpoints of finished blocks and ``resume``. Magnitude
pruning reads only the weights. Pruned layers stay ordinary float linears with exact zeros.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import UserError
from .gptq import layer_loss
from .refit import refit_kept
from .sequential import LayerSolver, run_blocks
from .sparsegpt import PruneResult, sparsegpt_prune
from .walk import is_conv1d, linear_weight, select_layers
from .wanda import accumulate_sq_norms, magnitude_prune, wanda_prune


@dataclass
class PruneLog:
    name: str
    rows: int
    columns: int
    sparsity: float  # zeros / weights of the layer after pruning
    layer_loss: float | None  # ||WX - ŴX||^2 / n from the Hessian (SparseGPT only)
    loss: float | None  # the sweep's own estimate (SparseGPT only)
    damp_percent: float | None
    seconds: float
    fallback: str | None = None


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def _log(name: str, W: torch.Tensor, r: PruneResult, t0: float, H: torch.Tensor | None = None) -> PruneLog:
    return PruneLog(name, W.shape[0], W.shape[1], float(r.mask.float().mean()),
                    None if H is None else layer_loss(W, r.W, H), _finite(r.loss), r.damp_percent,
                    time.perf_counter() - t0, r.fallback)


class SparseGPTSolver(LayerSolver):
    label = "SparseGPT blocks"

    def solve(self, name, layer, W, H):
        t0 = time.perf_counter()
        c = self.config
        r = sparsegpt_prune(W, H, c.sparsity, c.n_m, c.block_size, c.damp_percent,
                            act_order=c.act_order and c.n_m is not None)
        if c.refit and r.fallback is None:  # damped as the sweep needed it
            r = replace(r, W=refit_kept(W, r.W, H, r.mask, c.refit, r.damp_percent or c.damp_percent))
        return r.W, None, _log(name, W, r, t0, H)

    def postfix(self, log) -> str:
        return f"loss={log.loss or float('nan'):.3g}"

    log_type = PruneLog


class WandaSolver(LayerSolver):
    """Needs only ||X_j||^2: a vector per layer instead of SparseGPT's d x d Hessian, unless the
    kept weights are refit, which needs the whole Hessian (whose diagonal is the same statistic)."""

    label = "Wanda blocks"
    log_type = PruneLog

    def statistic(self, columns: int) -> torch.Tensor:
        return super().statistic(columns) if self.config.refit else torch.zeros(columns)

    def accumulate(self, stat, count, X):
        return super().accumulate(stat, count, X) if self.config.refit else accumulate_sq_norms(stat, count, X)

    def solve(self, name, layer, W, stat):
        t0 = time.perf_counter()
        c = self.config
        if not c.refit:  # stat: ||X_j||^2 (scaled)
            r = wanda_prune(W, stat, c.sparsity, c.n_m)
            return r.W, None, _log(name, W, r, t0)
        H = stat  # the whole Hessian; its diagonal is Wanda's statistic
        r = wanda_prune(W, H.diagonal(), c.sparsity, c.n_m)
        r = replace(r, W=refit_kept(W, r.W, H, r.mask, c.refit, c.damp_percent))
        return r.W, None, _log(name, W, r, t0, H)


def prune_targets(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """The linears of the decoder blocks the filter accepts; for N:M every one must have an input
    size that M divides (else: name them, and how to leave them out)."""
    targets, _ = select_layers(model, config.layers, lambda i, o: True)
    if not targets:
        raise UserError("no linear layer is left to prune; check --include/--exclude")
    n_m = config.n_m
    if n_m:
        bad = [(n, linear_weight(m).shape[1]) for n, m in targets.items() if linear_weight(m).shape[1] % n_m[1]]
        if bad:
            raise UserError(f"--nm {config.nm}: M={n_m[1]} does not divide the input size {bad[0][1]} of {bad[0][0]}"
                            f"{f' and {len(bad) - 1} more layers' if len(bad) > 1 else ''}; "
                            "leave them out with --exclude")
    return targets


def prune_blocks(
    model: nn.Module,
    config: PruneConfig,
    calib: torch.Tensor,
    state_dir: Path | None = None,
    resume: bool = False,
    batch_size: int | None = None,
    device: str = "cpu",
    max_memory: float | None = None,
) -> list[PruneLog]:
    """SparseGPT or Wanda on every target linear, in place (forwards and solves on ``device``)."""
    targets = set(prune_targets(model, config))  # names only
    solver = {"sparsegpt": SparseGPTSolver, "wanda": WandaSolver}[config.method](config)
    return run_blocks(model, solver, targets, calib, state_dir, resume, batch_size, device=device,
                      max_memory=max_memory)


@torch.no_grad()
def magnitude_layers(model: nn.Module, config: PruneConfig) -> list[PruneLog]:
    """Magnitude pruning of every target linear, in place: no calibration data."""
    logs = []
    for name, layer in prune_targets(model, config).items():
        t0 = time.perf_counter()
        W = linear_weight(layer).detach().float()
        r = magnitude_prune(W, config.sparsity, config.n_m)
        layer.weight.data.copy_((r.W.T if is_conv1d(layer) else r.W).to(layer.weight.dtype))
        logs.append(_log(name, W, r, t0))
    return logs
