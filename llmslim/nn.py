"""Quantized linear modules: a few buffers in the GPTQ v1 layout and a short ``forward``.

``GPTQLinear`` is the reference path: it dequantizes its weight on every call and runs a
plain ``F.linear``. It is exact (the same float weight the quantizer produced) and works for
every bit width; faster kernels swap in at load time without changing the buffers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .pack import pack, packed_len, unpack

# Children of one parent that read the very same input in every transformers model that has them, and
# the name of the one layer they make: llmslim's kernels fuse
# them (runtime.fusion), vLLM loads them as one layer under that name (formats.gptq's rules for it).
FUSE_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def can_pack(in_features: int, out_features: int, bits: int) -> bool:
    """Whether a layer's shape fits the format (3 bits needs multiples of 32 on both sides)."""
    try:
        packed_len(in_features, bits)
        packed_len(out_features, bits)
    except ValueError:
        return False
    return True


class GPTQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        self.register_buffer("qweight", torch.zeros(packed_len(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, packed_len(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self._decoded: torch.Tensor | None = None  # set only inside ``decoded_weights``

    @classmethod
    def from_codes(
        cls,
        Q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        group_size: int,
        bits: int,
        bias: torch.Tensor | None,
    ) -> GPTQLinear:
        """Build from integer codes ``Q [out, in]``, ``scales``/``zeros [groups, out]``, ``g_idx [in]``."""
        out_features, in_features = Q.shape
        m = cls(in_features, out_features, bits, group_size, bias is not None)
        m.qweight.copy_(pack(Q.T, bits, dim=0))
        # The v1 format stores zero - 1 (every v1 loader adds the 1 back).
        m.qzeros.copy_(pack(zeros.to(torch.int32) - 1, bits, dim=1))
        m.scales.copy_(scales.to(torch.float16))
        m.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            m.bias.copy_(bias.detach().to(torch.float16))
        return m

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes ``[out, in]`` and zeros ``[groups, out]`` (true zeros, not zero - 1)."""
        Q = unpack(self.qweight, self.bits, dim=0).T
        # No mask after the +1, exactly like the consumers' kernels: a stored all-ones field
        # reads back as 2**bits (which is why the quantizer never writes a zero of 0).
        zeros = unpack(self.qzeros, self.bits, dim=1) + 1
        return Q, zeros

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` weight: scale * (q - zero), per input column's group."""
        Qt = unpack(self.qweight, self.bits, dim=0)  # [in, out]
        zeros = (unpack(self.qzeros, self.bits, dim=1) + 1).float()  # [groups, out]
        g = self.g_idx.long()
        Wt = Qt.float().sub_(zeros.index_select(0, g)).mul_(self.scales.float().index_select(0, g))
        return Wt.T.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        W = self._decoded if self._decoded is not None else self.dequantized_weight(x.dtype)
        return F.linear(x, W.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


@contextmanager
def decoded_weights(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """Decode every ``GPTQLinear`` weight once and compute with it until the block ends.

    The numbers are exactly those of the reference path (same decoded weight), without paying
    the decode on every forward: for long evaluations. Costs a float copy of the weights while
    active, so memory measurements belong outside this block.
    """
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    try:
        for m in layers:
            m._decoded = m.dequantized_weight(dtype)
        yield model
    finally:
        for m in layers:
            m._decoded = None


class GGUFLinear(nn.Module):
    """A linear on a GGUF grid that has no GPTQ-checkpoint equivalent (K-quants, Q5_0, ...): the
    stored codes and block scales (``ggml_quants.Quantized`` as buffers, so a block checkpoint can
    restore it) and the exact float weight they decode to. It exists between a GPTQ run on such a
    grid and the GGUF export that writes its bytes; it is never saved as a checkpoint."""

    def __init__(self, quantized, bias: torch.Tensor | None):
        from .ggml_quants import Quantized

        super().__init__()
        q: Quantized = quantized
        self.kind = q.kind
        self.out_features, self.in_features = q.q.shape
        self.register_buffer("codes", torch.from_numpy(q.q.astype("uint8")))
        for name in ("d", "m", "sc", "mc"):
            value = getattr(q, name)
            self.register_buffer(name, None if value is None else torch.from_numpy(value.copy()))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("weight", torch.from_numpy(q.dequantize()), persistent=False)

    def quantized(self):
        """The ``ggml_quants.Quantized`` these buffers hold (``.encode()`` gives the GGUF bytes)."""
        from .ggml_quants import Quantized

        arr = {n: None if getattr(self, n) is None else getattr(self, n).numpy() for n in ("d", "m", "sc", "mc")}
        return Quantized(self.kind, self.codes.numpy(), **arr)

    @classmethod
    def from_state(cls, kind: str, tensors: dict[str, torch.Tensor]) -> GGUFLinear:
        from .ggml_quants import Quantized

        arr = {n: tensors[n].numpy() if n in tensors else None for n in ("d", "m", "sc", "mc")}
        return cls(Quantized(kind, tensors["codes"].numpy(), **arr), tensors.get("bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.kind}"
