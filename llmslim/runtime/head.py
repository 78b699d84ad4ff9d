"""The output head in 8-bit blocks of 32 inputs (``accelerate(head="int8")``, the default where the
kernel is built).

At batch 1 the head is the largest matrix read per token (SmolLM2-135M: 49152 x 576, a fifth of
the model; Gemma 3: 262144 x 640). In bf16 it costs 2 bytes a weight; here 1 + 1/8, as llama.cpp's
Q8_0 (which a Q4_0 model's head gets when its rows are not a multiple of 256). Per block of 32
inputs one fp32 scale ``s = max|w| / 127`` and codes ``q = round(w / s)``: per output row instead
(torch's ``_weight_int8pack_mm``) doubled the KL that bf16 compute costs on SmolLM2 (eval/inference.md);
with 32-wide blocks the head is within bf16's own error.

A model whose head is tied to its input embedding holds one matrix for both: ``Q8Embedding``
looks token rows up in the head's own codes, so no float copy stays resident.

The product runs on llmslim's ``q8_matmul`` (``csrc/q8_matmul.cpp``, AVX512-BF16) and returns
fp32 logits; without it (another CPU, or fp32 compute) the same weights are dequantized a chunk of
outputs at a time and multiplied in fp32: correct, slower, and never chosen by ``head="auto"``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ext

BLOCK = 32  # inputs per scale
TILE = 16  # outputs per kernel tile; the rows are padded to a multiple
CHUNK = 4096  # rows quantized, or dequantized by the fallback, at a time: no full fp32 copy of a big head


def q8_kernel():
    """``q8_matmul`` where llmslim's kernels were built for this CPU (AVX512-BF16), else None."""
    module = ext.matmuls()
    return None if module is None else module.q8_matmul


def fits(weight: torch.Tensor) -> bool:
    """Whether a head's input size splits into blocks of 32 (every family llmslim covers: 576, 640, 2048...)."""
    return weight.dim() == 2 and weight.shape[1] % BLOCK == 0


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight ``[N, K]`` -> ``codes [Np/16, K/2, 16, 2]`` int8 and ``scales [Np/16, K/32, 16]``
    fp32, ``Np`` = N rounded up to 16 (padded rows: code 0, scale 0). ``w[n, k] ~ codes * scales`` at
    ``[n/16, k/2, n%16, k%2]`` and ``[n/16, k/32, n%16]``: 16 outputs side by side, pairs of inputs
    together, the order in which the kernel reads them."""
    N, K = weight.shape
    Np = N + (-N) % TILE
    # Filled a chunk of rows at a time (CHUNK is a multiple of TILE): the peak is the result and
    # one chunk's fp32 temporaries, never a float copy of the whole head. Padded rows stay 0.
    codes = torch.zeros(Np // TILE, K // 2, TILE, 2, dtype=torch.int8)
    scales = torch.zeros(Np // TILE, K // BLOCK, TILE)
    for i, rows in enumerate(weight.detach().split(CHUNK)):
        n = rows.shape[0]
        w = rows.float().view(n, K // BLOCK, BLOCK)
        s = w.abs().amax(-1) / 127  # [n, K/32]
        q = torch.round(w / torch.where(s > 0, s, 1.0).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        t0, tiles = i * CHUNK // TILE, (n + TILE - 1) // TILE
        if n % TILE:  # the last chunk of a vocabulary that is not a multiple of 16
            q = torch.cat([q.view(n, K), q.new_zeros(tiles * TILE - n, K)])
            s = torch.cat([s, s.new_zeros(tiles * TILE - n, K // BLOCK)])
        codes[t0:t0 + tiles] = q.view(tiles, TILE, K // 2, 2).transpose(1, 2)
        scales[t0:t0 + tiles] = s.view(tiles, TILE, K // BLOCK).transpose(1, 2)
    return codes, scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The fp32 weights of output ``rows [R]`` (exact: an 8-bit code times an fp32 scale, one rounding)."""
    tile, lane = rows // TILE, rows % TILE
    q = codes[tile, :, lane, :].reshape(rows.shape[0], -1).float()  # [R, K]
    s = scales[tile, :, lane]  # [R, K/32]
    return (q.view(rows.shape[0], -1, BLOCK) * s.unsqueeze(-1)).view_as(q)


class Q8Linear(nn.Module):
    """``y = x W^T + b`` for a head in 8-bit blocks; ``y`` in fp32 (logits need more than bf16's 8 bits)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not fits(weight):
            raise ValueError(f"an 8-bit head needs an input size that is a multiple of {BLOCK}, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        codes, scales = quantize_q8(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def product(self):
        """``x [M, K] -> x W^T [M, Np]`` fp32 (no bias, padded rows included), as one plain function."""
        op = q8_kernel()
        if op is not None:
            codes, scales = self.codes, self.scales
            return lambda x: op(x.to(torch.bfloat16).contiguous(), codes, scales)
        return self._reference

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        Np = self.codes.shape[0] * TILE
        parts = [x @ dequantize_rows(self.codes, self.scales, rows).T for rows in torch.arange(Np).split(CHUNK)]
        return torch.cat(parts, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.product()(x.reshape(-1, self.in_features))[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=8, blocks of {BLOCK}"


class Q8Embedding(nn.Module):
    """Token embeddings read from a ``Q8Linear`` head's codes: a tied model's one matrix.

    Only the rows looked up are dequantized (exact in fp32, then rounded to the compute dtype): the
    very weights the head multiplies by. ``embed_scale`` carries Gemma's scaled embeddings
    (``sqrt(hidden)``), applied as its module does: cast to the compute dtype, then multiplied.
    """

    def __init__(self, head: Q8Linear, dtype: torch.dtype, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx, self.dtype = padding_idx, dtype
        self.register_buffer("codes", head.codes)  # the head's tensors, not copies
        self.register_buffer("scales", head.scales)
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.clone(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.codes, self.scales, ids.reshape(-1))
        out = rows.to(self.dtype).view(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, 8-bit rows of the head"
