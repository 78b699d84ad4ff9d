"""Bit packing of the GPTQ v1 checkpoint format, as AutoGPTQ, GPTQModel and vLLM read it.

Integers of ``bits`` width are laid out as one little-endian bit stream along a dimension and
cut into int32 words: value ``j`` of a run occupies stream bits ``[bits*j, bits*j + bits)``.
For 2/4/8 bits this is the familiar "value j at shift bits*(j % (32/bits))"; for 3 bits a run
of 32 values fills 3 words and values 10 and 21 straddle word boundaries, exactly as
AutoGPTQ's ``QuantLinear.pack`` writes them and its kernels read them.

``qweight`` packs along the input dimension (rows of the transposed ``[in, out]`` codes);
``qzeros`` packs along the output dimension.
"""

from __future__ import annotations

from math import gcd

import torch


def _run(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest run of values that fills whole int32 words."""
    g = gcd(bits, 32)
    return 32 // g, bits // g


def packed_len(n: int, bits: int) -> int:
    values, words = _run(bits)
    if n % values:
        raise ValueError(f"{n} values cannot be packed at {bits} bits: need a multiple of {values}")
    return n // values * words


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack non-negative ints ``< 2**bits`` along ``dim`` into int32 words."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # Fast path (2/4/8 bits): each value stays within its word, so int32 shifts and ORs build
        # the words directly (torch's shift wraps into the sign bit: the signed reading of the
        # word). 4-5x faster than the int64 path below, and half its temporaries.
        per = 32 // bits
        packed_len(values.shape[dim], bits)  # whole words, or a clear error
        v = values.movedim(dim, 0).to(torch.int32)
        v = v.reshape(v.shape[0] // per, per, *v.shape[1:]) & mask
        out = v[:, 0].clone()
        for j in range(1, per):
            out.bitwise_or_(v[:, j] << (bits * j))
        return out.movedim(0, dim).contiguous()
    v = values.movedim(dim, 0).to(torch.int64)
    n, rest = v.shape[0], v.shape[1:]
    nvalues, nwords = _run(bits)
    words_total = packed_len(n, bits)
    v = v.reshape(n // nvalues, nvalues, *rest)
    out = torch.zeros(n // nvalues, nwords, *rest, dtype=torch.int64, device=v.device)
    for j in range(nvalues):
        word, shift = divmod(bits * j, 32)
        x = v[:, j] & mask
        out[:, word] |= (x << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the value straddles two words (3 bits only)
            out[:, word + 1] |= x >> (32 - shift)
    out = out.reshape(words_total, *rest)
    out = torch.where(out >= 2**31, out - 2**32, out)  # reinterpret as signed int32
    return out.to(torch.int32).movedim(0, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack``: int32 words -> int32 values in ``[0, 2**bits)``."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # Fast path (2/4/8 bits): one broadcast shift. The arithmetic shift of negative words
        # drags sign bits in from the left, which the mask removes.
        w = packed.movedim(dim, 0)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=w.device).view(1, -1, *([1] * (w.dim() - 1)))
        out = (w.unsqueeze(1) >> shifts) & mask
        return out.reshape(-1, *w.shape[1:]).movedim(0, dim).contiguous()
    w = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    nwords_total, rest = w.shape[0], w.shape[1:]
    nvalues, nwords = _run(bits)
    if nwords_total % nwords:
        raise ValueError(f"{nwords_total} words do not hold whole runs of {bits}-bit values")
    w = w.reshape(nwords_total // nwords, nwords, *rest)
    out = torch.empty(w.shape[0], nvalues, *rest, dtype=torch.int64, device=w.device)
    for j in range(nvalues):
        word, shift = divmod(bits * j, 32)
        x = w[:, word] >> shift
        if shift + bits > 32:
            x = x | (w[:, word + 1] << (32 - shift))
        out[:, j] = x & mask
    return out.reshape(-1, *rest).to(torch.int32).movedim(0, dim).contiguous()
