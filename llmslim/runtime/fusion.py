"""Fused sibling projections (q/k/v, gate/up): one kernel call instead of three or two.

At batch 1 a small model's linear layers are dominated by per-call overhead, not arithmetic,
so projections that read the very same input are concatenated into one module. The model's
own code keeps working unchanged: the old names become slices of the fused output.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import FUSE_GROUPS, GPTQLinear


class FusedLinear(nn.Module):
    """One linear module over the concatenated outputs of sibling projections.

    The model's own code still calls ``q_proj``/``k_proj``/``v_proj`` one by one: each is a
    ``FusedPart`` that returns its slice of the fused output. The fused product is computed
    when a part asks for an input it has not seen, and dropped as soon as every part has
    taken its slice, so a result is only ever reused within one q/k/v (gate/up) sequence on
    the very same tensor object. Code that knows about the fusion (``llmslim.runtime.lean``)
    calls ``inner`` directly.
    """

    def __init__(self, inner: nn.Module, sizes: list[int]):
        super().__init__()
        self.inner = inner
        self.sizes = list(sizes)
        self._x: torch.Tensor | None = None  # held, so its id cannot be reused by another tensor
        self._out: torch.Tensor | None = None
        self._served: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def part(self, x: torch.Tensor, index: int, start: int, end: int) -> torch.Tensor:
        if self._x is not x or index in self._served:
            self._x, self._out, self._served = x, self.inner(x), set()
        out = self._out[..., start:end]
        self._served.add(index)
        if len(self._served) == len(self.sizes):
            self._x = self._out = None
        return out


class FusedPart(nn.Module):
    """``q_proj`` (say) of a ``FusedLinear``: its slice of the fused output."""

    def __init__(self, fused: FusedLinear, index: int, start: int, end: int, in_features: int):
        super().__init__()
        self.__dict__["fused"] = fused  # not a registered child: the parent registers it once
        self.index, self.start, self.end = index, start, end
        self.in_features, self.out_features = in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index, self.start, self.end)

    def extra_repr(self) -> str:
        return f"slice [{self.start}:{self.end}] of the fused projection"


def concat_gptq(mods: list[GPTQLinear]) -> GPTQLinear | None:
    """One GPTQLinear with the outputs of ``mods`` side by side, or None when they do not share a layout.

    Both packed tensors concatenate as they are: ``qweight`` packs along the input dimension and
    ``qzeros`` along outputs in whole words (every output size here is a multiple of the run).
    """
    first = mods[0]
    same = all(m.bits == first.bits and m.group_size == first.group_size and m.in_features == first.in_features
               and torch.equal(m.g_idx, first.g_idx) for m in mods)
    if not same:
        return None
    out = sum(m.out_features for m in mods)
    bias = any(m.bias is not None for m in mods)
    fused = GPTQLinear(first.in_features, out, first.bits, first.group_size, bias)
    fused.qweight = torch.cat([m.qweight for m in mods], 1)
    fused.qzeros = torch.cat([m.qzeros for m in mods], 1)
    fused.scales = torch.cat([m.scales for m in mods], 1)
    fused.g_idx = first.g_idx.clone()
    if bias:
        fused.bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=torch.float16)
                                for m in mods])
    return fused


def concat_float(mods: list[nn.Linear]) -> nn.Linear | None:
    """One ``nn.Linear`` with the outputs of ``mods`` side by side, or None unless all are plain
    ``nn.Linear`` of one input size and dtype."""
    first = mods[0]
    if not all(type(m) is nn.Linear and m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               for m in mods):
        return None
    out = sum(m.out_features for m in mods)
    bias = any(m.bias is not None for m in mods)
    lin = nn.Linear(first.in_features, out, bias=bias, device="meta")
    lin.weight = nn.Parameter(torch.cat([m.weight.detach() for m in mods]), requires_grad=False)
    if bias:
        lin.bias = nn.Parameter(torch.cat([m.bias.detach() if m.bias is not None else
                                           torch.zeros(m.out_features, dtype=first.weight.dtype) for m in mods]),
                                requires_grad=False)
    return lin


def fuse_projections(model: nn.Module, build) -> int:
    """Fuse q/k/v and gate/up siblings everywhere in ``model``; ``build(mods)`` makes the fused
    inner module or returns None to leave them alone. Returns how many groups were fused."""
    count = 0
    for parent in list(model.modules()):
        for fused_name, names in FUSE_GROUPS.items():
            mods = [getattr(parent, n, None) for n in names]
            if any(m is None for m in mods) or hasattr(parent, fused_name):
                continue
            inner = build(mods)
            if inner is None:
                continue
            sizes = [m.out_features for m in mods]
            fused = FusedLinear(inner, sizes)
            setattr(parent, fused_name, fused)
            start = 0
            for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
                setattr(parent, name, FusedPart(fused, i, start, start + size, mods[0].in_features))
                start += size
            count += 1
    return count
