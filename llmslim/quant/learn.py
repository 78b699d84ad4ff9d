"""Trainable stand-ins for compressed layers, each of which goes back exactly to what it replaced.

- ``LearnedGrid`` replaces a ``GPTQLinear`` while its grid is learned. With the layer's codes ``Q``,
  scales ``S`` and zeros ``Z`` (per group, ``[groups, out]``), and ``g`` the group of each column::

      q = clamp(round(u + V), 0, maxq)      u: the codes, nudged toward the teacher's weight;
                                            V: rounding offsets in [-0.5, 0.5] (AutoRound, arXiv:2309.05516)
      s = fp16(S * (1 + a))                 a: per-group scale adjustment
      z = clamp(round(Z + b), 1, maxq)      b: per-group zero adjustment (asymmetric grids only)
      w = s[g] * (q - z[g])

  With ``follow`` the codes are not fixed but the input weight rounded anew on the learned grid,
  ``q = clamp(round((u - Z) S / s + z + V), 0, maxq)`` (AutoRound's min/max tuning): a smaller scale
  clips a group's extremes and refines the rest.
  Rounding passes gradients straight through (the STE of Bengio et al., arXiv:1308.3432), so the
  forward is always the exact weight ``to_gptq`` will store: integer codes, fp16 scales, zeros in
  [1, maxq] (the v1 format's range). Without ``V`` (end-to-end mode) the codes stay fixed and only
  scales and zeros move (EfficientQAT's E2E-QP, arXiv:2407.11062). Pruned weights (a sparse student)
  follow their group's zero, so they stay exactly 0.
- ``LoRALinear``: a frozen linear plus a low-rank update ``B A`` (Hu et al., arXiv:2106.09685), masked
  to a sparse layer's kept weights; ``merge`` folds it into the weight.
- ``keep_zeros``: a float weight trained in place whose pruned entries get no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..grid import maxq_for
from ..nn import GPTQLinear
from .walk import is_conv1d, linear_weight


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """The value the checkpoint stores (fp16) forward, identity backward. The magnitude is kept
    above fp16's underflow, the sign as it is: GGUF Q4_0's scales are signed (``d = m / -8``)."""
    v = x.detach()
    stored = (torch.where(v < 0, -1.0, 1.0) * v.abs().clamp(min=2**-20)).half().float()
    return x + (stored - x).detach()


def is_symmetric(layer: GPTQLinear) -> bool:
    """A symmetric grid has every zero at (maxq + 1) / 2 (and consumers may assume it): keep it fixed."""
    _, zeros = layer.codes()
    return bool((zeros == (maxq_for(layer.bits) + 1) // 2).all())


class LearnedGrid(nn.Module):
    # Bounds of the learned offsets (signed-gradient steps are clamped to them).
    BOUNDS = {"V": 0.5, "a": 0.5, "b": 1.0}

    def __init__(self, layer: GPTQLinear, reference: torch.Tensor | None = None, rounding: bool = True,
                 mask: torch.Tensor | None = None, follow: bool = False):
        super().__init__()
        self.follow = follow
        self.bits, self.group_size = layer.bits, layer.group_size
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.maxq = maxq_for(layer.bits)
        Q, Z = layer.codes()
        S = layer.scales.float()
        g = layer.g_idx.long()
        self.register_buffer("S", S)
        self.register_buffer("Z", Z.float())
        self.register_buffer("g_idx", layer.g_idx.clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone())
        self.register_buffer("mask", mask)  # True = pruned: the weight stays 0
        u = Q.float()
        if reference is not None and rounding:
            # Where the teacher's weight sits relative to the chosen code, when that code is its nearest
            # (as in AutoRound, which starts from round-to-nearest): small offsets first flip the codes
            # the teacher leans away from. A code the solver moved further (GPTQ's compensation) starts at
            # its center: flipping it back toward the teacher would undo the compensation. V = 0
            # reproduces the codes exactly either way.
            offset = reference.float() / S[g].T + Z[g].T.float() - u
            u = u + torch.where(offset.abs() < 0.499, offset, torch.zeros_like(offset))
        self.register_buffer("u", u)
        self.V = nn.Parameter(torch.zeros_like(u)) if rounding else None
        self.a = nn.Parameter(torch.zeros_like(S))
        self.b = None if is_symmetric(layer) else nn.Parameter(torch.zeros_like(S))

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes ``[out, in]``, scales and zeros ``[groups, out]`` as floats (differentiable)."""
        s = fp16_ste(self.S * (1 + self.a))
        z = self.Z if self.b is None else round_ste(self.Z + self.b).clamp(1, self.maxq)
        u = self.u
        if self.follow:  # the input weight rounded anew on the learned grid, as AutoRound's min/max tuning does
            g = self.g_idx.long()
            u = (u - self.Z[g].T) * self.S[g].T / s[g].T + z[g].T
        u = u if self.V is None else u + self.V
        q = round_ste(u).clamp(0, self.maxq)
        if self.mask is not None:
            q = torch.where(self.mask, z[self.g_idx.long()].T, q)
        return q, s, z

    def weight(self) -> torch.Tensor:
        q, s, z = self.grid()
        g = self.g_idx.long()
        return (q - z[g].T) * s[g].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    def clamp_(self) -> None:
        with torch.no_grad():
            for name, bound in self.BOUNDS.items():
                p = getattr(self, name)
                if p is not None:
                    p.clamp_(-bound, bound)

    @torch.no_grad()
    def to_gptq(self) -> GPTQLinear:
        q, s, z = self.grid()
        return GPTQLinear.from_codes(q.to(torch.int32), s, z.to(torch.int32), self.g_idx, self.group_size,
                                     self.bits, self.bias).to(self.S.device)


class LoRALinear(nn.Module):
    """``base(x) + scale * x (B A)^T``: ``A`` random (from ``generator``), ``B`` zero, so it starts
    as ``base``. With ``mask`` (True = pruned) the update never touches a pruned weight."""

    def __init__(self, base: nn.Module, rank: int, generator: torch.Generator, alpha: float | None = None,
                 mask: torch.Tensor | None = None):
        super().__init__()
        out_f, in_f = linear_weight(base).shape
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = (alpha or rank) / rank
        self.A = nn.Parameter(torch.randn(rank, in_f, generator=generator) / math.sqrt(in_f))
        self.B = nn.Parameter(torch.zeros(out_f, rank))
        self.register_buffer("mask", mask)

    def delta(self) -> torch.Tensor:
        d = (self.B @ self.A) * self.scale
        return d if self.mask is None else d.masked_fill(self.mask, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:  # two thin matmuls instead of forming the full update
            return self.base(x) + F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale
        return self.base(x) + F.linear(x, self.delta().to(x.dtype))

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The base layer with the update folded into its weight."""
        d = self.delta()
        w = self.base.weight
        w.add_((d.T if is_conv1d(self.base) else d).to(w.dtype))
        return self.base


def keep_zeros(weight: nn.Parameter):
    """Make the exact zeros of a float weight stay zero while it trains: their gradient is dropped
    (with no gradient and no weight decay, Adam leaves them at 0). Returns the hook's handle."""
    keep = weight.detach() != 0
    return weight.register_hook(lambda grad: grad * keep)


def sign_sgd_(params: list[nn.Parameter], lr: float) -> None:
    """AutoRound's update: a step of ``lr`` against the sign of each gradient."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(torch.sign(p.grad), alpha=-lr)
                p.grad = None
