"""Fast CPU linear modules for GPTQ weights (``runtime.fast.accelerate`` swaps them in).

``GPTQLinear`` (llmslim/nn.py) dequantizes its whole weight on every call: exact, but slow.
At load time ``accelerate`` replaces each one, once, by the fastest module here that computes
the same product:

- 2/3/4 bits -> ``Int4Linear``: torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``), or
  on CPUs with AVX512-BF16 llmslim's own (``ext.matmuls()``, ``csrc/int4_matmul.cpp``: same
  weights, decoded once for up to 8 rows instead of per row; batch-invariant by construction).
  2- and 3-bit codes are valid 4-bit codes, so they run there too, exactly (at 4-bit size).
- 8 bits per channel -> ``Int8Linear``: torch's ``_weight_int8pack_mm`` (per-channel scales).
- 8 bits with groups -> ``Int8x2Linear``: the 8-bit code split into two 4-bit halves, two
  int4 kernel calls (see ``benchmarks`` in eval/inference.md for why this beats bf16).

Both torch kernels are fast only with bf16 activations (3-60x slower in fp32), so the
modules compute in bf16 and cast back when the model runs in another dtype.

The int4 kernel computes ``w = (q - 8) * scale + zero`` per group of ``kg`` input columns,
``kg`` in {32, 64, 128, 256}, K a multiple of ``kg``, N a multiple of 16. GPTQ's
``w = (q - z) * s`` with arbitrary ``g_idx`` (act-order), any group size and any K is mapped
onto that once, at load time (``int4_layout``): columns are sorted by group, each group
starts on a kernel-group boundary (zero-padded when its size is not a multiple of ``kg``),
and N is padded to a multiple of 16. At run time that costs at most one ``index_select`` or
``F.pad`` of the activation, and nothing at all for the common case (contiguous groups, K a
multiple of a supported group size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import GPTQLinear
from . import ext

KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts
N_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu wants N % 16 == 0


def _have(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def int4_available() -> bool:
    return _have("_weight_int4pack_mm_for_cpu") and _have("_convert_weight_to_int4pack_for_cpu")


def int8_available() -> bool:
    return _have("_weight_int8pack_mm")


# ---------------------------------------------------------------------------------------------
# Column layout: GPTQ groups (any order, any size) -> kernel groups (contiguous, fixed size)
# ---------------------------------------------------------------------------------------------


class Int4Layout:
    """Where each kernel input column comes from, and how to build the activation for it.

    ``src[k']`` is the original input column of kernel column ``k'``, or ``K`` for a padding
    column (its activation is zero, so its weight does not matter). ``group[t]`` is the GPTQ
    group of kernel group ``t``.
    """

    def __init__(self, src: torch.Tensor, group: torch.Tensor, kg: int, in_features: int):
        self.src, self.group, self.kg, self.K = src, group, kg, in_features
        kp = src.numel()
        head = src[:in_features] if kp >= in_features else src
        in_order = kp >= in_features and torch.equal(head, torch.arange(in_features))
        if in_order and bool((src[in_features:] == in_features).all()):
            self.mode, self.pad = ("none" if kp == in_features else "pad"), kp - in_features
        elif kp == in_features:
            self.mode, self.pad = "perm", 0  # a pure permutation (act-order): one index_select
        else:
            self.mode, self.pad = "gather", 0  # permutation and padding: pad one zero column, gather

    @property
    def padded_k(self) -> int:
        return self.src.numel()


def int4_layout(g_idx: torch.Tensor, in_features: int) -> Int4Layout:
    """Sort columns by group and pick the kernel group size that needs the least padding."""
    g_idx = g_idx.long()
    order = torch.argsort(g_idx, stable=True)
    groups, counts = torch.unique_consecutive(g_idx[order], return_counts=True)
    best = None
    for kg in KERNEL_GROUPS:
        sizes = (counts + kg - 1) // kg * kg
        total = int(sizes.sum())
        if best is None or total < best[1]:  # ties keep the larger kg (fewer scales to read)
            best = (kg, total)
    kg, total = best
    src = torch.full((total,), in_features, dtype=torch.long)
    group = torch.empty(total // kg, dtype=torch.long)
    pos = start = 0
    for grp, count in zip(groups.tolist(), counts.tolist(), strict=True):
        src[pos : pos + count] = order[start : start + count]
        span = (count + kg - 1) // kg * kg
        group[pos // kg : (pos + span) // kg] = grp
        pos, start = pos + span, start + count
    return Int4Layout(src, group, kg, in_features)


def _prepare_input(x: torch.Tensor, layout_mode: str, index: torch.Tensor | None, pad: int) -> torch.Tensor:
    if layout_mode == "pad":
        return F.pad(x, (0, pad))
    if layout_mode == "perm":
        return x.index_select(-1, index)
    if layout_mode == "gather":
        return F.pad(x, (0, 1)).index_select(-1, index)
    return x


# ---------------------------------------------------------------------------------------------
# Int4Linear: 2/3/4-bit GPTQ (and one half of grouped 8-bit) on _weight_int4pack_mm_for_cpu
# ---------------------------------------------------------------------------------------------


def _int4_params(
    Q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layout: Int4Layout, code_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``Q [N, K]`` (values < 2**code_bits <= 16), per-GPTQ-group ``scale``/``zero [G, N]``
    -> (packed weight, scale-and-zeros ``[Kp/kg, Np, 2]`` in bf16).

    Each code gets a per-(kernel group, row) shift ``d`` so that ``q + d`` stays in [0, 15] and
    the kernel's float zero ``(8 - z - d) * s`` is as small as possible: 0 for 2/3 bits and for
    symmetric 4 bits, i.e. exact there (only the bf16 scale rounds). What cannot be shifted
    away (asymmetric 4 bits) goes into the float zero.
    """
    N, _ = Q.shape
    kg, kp, ng = layout.kg, layout.padded_k, layout.padded_k // layout.kg
    # Kernel-ordered codes; padding columns read a code of 8 (finite weight, zero activation).
    Qe = torch.cat([Q, torch.full((N, 1), 8, dtype=Q.dtype)], dim=1)
    Qk = Qe.index_select(1, layout.src).view(N, ng, kg)  # [N, ng, kg]
    real = (layout.src < layout.K).view(1, ng, kg)
    big = torch.iinfo(Q.dtype).max
    qmin = torch.where(real, Qk, big).amin(-1).T  # [ng, N]
    qmax = torch.where(real, Qk, -big).amax(-1).T
    z = zero.index_select(0, layout.group).to(torch.float32)  # [ng, N]
    s = scale.index_select(0, layout.group).to(torch.float32)
    top = (1 << 4) - 1
    # A whole-number shift (codes stay integers); any fractional rest of z goes to the float zero.
    d = torch.minimum(torch.maximum(torch.round(8 - z), -qmin.float()), top - qmax.float())
    d = torch.where(qmin > qmax, 0.0, d)  # an all-padding group (cannot happen; keeps it finite)
    del qmin, qmax
    q4 = (Qk + d.T.to(Q.dtype).unsqueeze(-1)).view(N, kp)
    q4 = torch.where(real.view(1, kp), q4, 8)
    zf = (8 - z - d) * s
    del Qk, Qe
    n_pad = (-N) % N_ALIGN
    if n_pad:  # zero rows: code 8, scale 0, zero 0 -> weight exactly 0; the output is sliced
        q4 = torch.cat([q4, torch.full((n_pad, kp), 8, dtype=q4.dtype)])
        s = torch.cat([s, torch.zeros(ng, n_pad)], 1)
        zf = torch.cat([zf, torch.zeros(ng, n_pad)], 1)
    packed = pack_int4(q4)
    sz = torch.stack([s, zf], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def pack_int4(q4: torch.Tensor) -> torch.Tensor:
    """Codes ``q4 [N, K]`` in [0, 15] (N a multiple of 16, K of 4) -> the layout of the kernel that
    will run them: where ``ext.matmuls()`` is built llmslim's, ``[N/16, K/2, 16]`` bytes whose 32
    bytes per (n/16, k/4) hold ``q[n, 4j+h] | q[n, 4j+2+h] << 4`` at byte ``2 (n%16) + h``
    (``csrc/int4_matmul.cpp`` says why); else torch's ``[N, K/2]``."""
    if ext.matmuls() is None:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32).contiguous(), 1)
    N, K = q4.shape
    q = q4.to(torch.uint8).view(N // 16, 16, K // 4, 2, 2)  # [tile, n%16, j, nibble, h]
    b = q[:, :, :, 0, :] | (q[:, :, :, 1, :] << 4)  # [tile, n%16, j, h]
    return b.permute(0, 2, 1, 3).reshape(N // 16, K // 2, 16).contiguous()


def int4_product(packed: torch.Tensor, kg: int, scale_zeros: torch.Tensor):
    """``x [M, Kp] bf16 -> x W^T [M, Np] bf16`` for a weight packed by ``pack_int4``: the kernel that
    layout belongs to, as one plain function."""
    if packed.dim() == 3:
        op = ext.module().int4_matmul  # the layout was made for it, whatever LLMSLIM_NO_EXT_MATMUL says now
        return lambda x: op(x, packed, scale_zeros, kg)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    return lambda x: op(x, packed, kg, scale_zeros)


class Int4Linear(nn.Module):
    """``y = x W^T + b`` with int4 W packed for the kernel that runs it (``pack_int4``); computes in bf16."""

    def __init__(self, in_features: int, out_features: int, layout: Int4Layout, packed: torch.Tensor,
                 scale_zeros: torch.Tensor, bias: torch.Tensor | None, bits: int):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.kg, self.mode, self.pad = layout.kg, layout.mode, layout.pad
        self.n_pad = scale_zeros.shape[1] - out_features  # rows padded to a multiple of 16
        self.register_buffer("weight_packed", packed)
        self.register_buffer("scale_zeros", scale_zeros)
        index = layout.src if layout.mode in ("perm", "gather") else None
        self.register_buffer("index", index)
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    def product(self):
        """The kernel call on an input already in kernel column order (``_prepare_input``), as a function."""
        return int4_product(self.weight_packed, self.kg, self.scale_zeros)

    @classmethod
    def from_gptq(cls, m: GPTQLinear) -> Int4Linear:
        return cls.from_gptq_parts([m])

    @classmethod
    def from_gptq_parts(cls, mods: list[GPTQLinear]) -> Int4Linear:
        """One kernel over the outputs of ``mods`` side by side (fused q/k/v or gate/up). The kernel's
        codes are 4-bit whatever the source's 2-4 bits, so siblings of different bits fuse as long as
        they share their input columns' groups (``g_idx``): a tuned model's mixed units."""
        first = mods[0]
        if any(m.bits > 4 for m in mods):
            raise ValueError(f"Int4Linear holds at most 4-bit codes, got {[m.bits for m in mods]}")
        if any(m.in_features != first.in_features or not torch.equal(m.g_idx, first.g_idx) for m in mods):
            raise ValueError("fused parts must share their input size and groups")
        parts = [m.codes() for m in mods]
        Q = torch.cat([q for q, _ in parts])
        zeros = torch.cat([z for _, z in parts], 1)
        scales = torch.cat([m.scales for m in mods], 1)
        bias = None
        if any(m.bias is not None for m in mods):
            bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=torch.float16)
                              for m in mods])
        layout = int4_layout(first.g_idx, first.in_features)
        bits = max(m.bits for m in mods)
        packed, sz = _int4_params(Q, scales, zeros, layout, bits)
        return cls(first.in_features, Q.shape[0], layout, packed, sz, bias, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, lead = x.dtype, x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)
        x = _prepare_input(x, self.mode, self.index, self.pad).contiguous()
        y = self.product()(x)
        if self.n_pad:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, kernel_group={self.kg}, "
                f"input={self.mode}")


# ---------------------------------------------------------------------------------------------
# Int8Linear: per-channel 8-bit on _weight_int8pack_mm
# ---------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W = (w8 + c) * s`` per output row, ``w8`` int8.

    The kernel knows only symmetric per-channel ``w8 * s``. GPTQ's ``(q - z) * s`` becomes
    ``(q - 128) * s + (128 - z) * s``: the second term is one number per row, so its product
    is ``sum(x) * (128 - z) * s``, one reduction per call (kept in fp32; skipped when every
    ``z`` is 128, i.e. symmetric checkpoints).
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
                 bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())
        self.register_buffer("offset", None if offset is None else offset.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    @classmethod
    def from_gptq(cls, m: GPTQLinear) -> Int8Linear:
        if m.bits != 8 or m.scales.shape[0] != 1:
            raise ValueError("Int8Linear needs 8-bit codes with one group (per-channel)")
        Q, zeros = m.codes()
        w8 = (Q - 128).to(torch.int8)
        z = zeros[0].float()
        s = m.scales[0].float()
        offset = None if bool((z == 128).all()) else (128 - z) * s
        return cls(w8, s, offset, m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, lead = x.dtype, x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        if self.offset is not None:
            y = (y.float() + x.sum(-1, keepdim=True, dtype=torch.float32) * self.offset).to(torch.bfloat16)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=8, per_channel"


# ---------------------------------------------------------------------------------------------
# Int8x2Linear: grouped 8-bit as two 4-bit halves
# ---------------------------------------------------------------------------------------------


class Int8x2Linear(nn.Module):
    """Grouped 8-bit: ``q = 16 hi + lo`` so ``(q - z) s = (hi - 8) 16s + (lo - 8) s + (136 - z) s``.

    Two int4 kernel calls on the same (permuted/padded) activation; 1 byte per weight, no
    float copy. ``_weight_int8pack_mm`` cannot do it: it takes one scale per output row.
    """

    def __init__(self, hi: Int4Linear, lo: Int4Linear):
        super().__init__()
        self.hi, self.lo = hi, lo
        self.in_features, self.out_features = hi.in_features, hi.out_features

    @classmethod
    def from_gptq(cls, m: GPTQLinear) -> Int8x2Linear:
        if m.bits != 8:
            raise ValueError(f"Int8x2Linear needs 8-bit codes, got {m.bits}")
        Q, zeros = m.codes()
        layout = int4_layout(m.g_idx, m.in_features)
        s = m.scales.float()
        # hi half carries the whole zero: lo's zero is 8 (so its kernel zero is exactly 0).
        packed_hi, sz_hi = _int4_params(Q >> 4, s * 16, (zeros.float() - 8) / 16, layout, 4)
        packed_lo, sz_lo = _int4_params(Q & 15, s, torch.full_like(s, 8.0), layout, 4)
        hi = Int4Linear(m.in_features, m.out_features, layout, packed_hi, sz_hi, m.bias, 8)
        lo = Int4Linear(m.in_features, m.out_features, layout, packed_lo, sz_lo, None, 8)
        return cls(hi, lo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, lead = x.dtype, x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)
        x = _prepare_input(x, self.hi.mode, self.hi.index, self.hi.pad).contiguous()
        y = self.hi.product()(x) + self.lo.product()(x)
        if self.hi.n_pad:
            y = y[:, : self.out_features]
        if self.hi.bias is not None:
            y = y + self.hi.bias
        return y.reshape(*lead, self.out_features).to(dtype)
