"""Every layer of a decode step in one C++ call (``csrc/decode_step.cpp``), where the layers allow it.

``LeanDecoder`` decodes a step as ~10 Python calls per layer; at batch 1 on SmolLM2-135M that
Python costs a third of the step (eval/inference.md). ``DecodeStep`` makes the very same kernel
calls, in the same order, from C++: the same bits, minus the interpreter. It covers a layer when
each of its pieces is one of those kernels -- llmslim's int4 or bf16 products (one module per
projection, no padded rows), the fused RMSNorm in the compute dtype, SiLU -- or the same torch ops
as the Python loop's, called from C++: q/k norms (Qwen3, Gemma 3), Gemma's sandwich norms and GELU
(tanh). That is every family llmslim's lean forward covers, on a CPU with AVX512-BF16 (a float
Qwen2's biased projections excepted: torch's ``F.linear``); anything else keeps the Python loop.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ext
from .kernels import Int4Linear


def _proj(mods: list[nn.Module] | None, dtype: torch.dtype):
    """The C++ ``Proj`` for a projection computed by one llmslim kernel, else None."""
    module = ext.matmuls()
    if module is None or mods is None or len(mods) != 1 or dtype != torch.bfloat16:
        return None
    m = mods[0]
    if isinstance(m, Int4Linear) and m.mode == "none" and not m.n_pad and m.weight_packed.dim() == 3:
        return module.Proj(m.weight_packed, m.scale_zeros, m.kg, m.bias)
    if type(m) is nn.Linear and m.bias is None and m.weight.dtype == dtype and m.weight.is_contiguous():
        return module.Proj(m.weight, m.weight.new_empty(0), 0)
    return None


def _norm_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight as the fused C++ norm takes it (1-D, the compute dtype), else None: as lean's ``_add_norm``."""
    return w.contiguous() if w.dim() == 1 and w.dtype == dtype else None


def build(blocks: list, rope_keys: list, n_heads: int, n_kv: int, head_dim: int, scaling: float,
          softcap: float | None, gemma: bool, dtype: torch.dtype):
    """A ``DecodeStep`` over ``blocks`` (lean's ``Block``s), or None when one of them is not covered.
    ``rope_keys``: the rotary tables in the order the step's ``cos``/``sin`` lists will come."""
    module = ext.matmuls()
    if module is None:
        return None
    layers = []
    for b in blocks:
        if not (b.silu or b.gelu_tanh):
            return None
        projs = [_proj(b.parts[k], dtype) for k in ("qkv", "o", "gate_up", "down")]
        w_in, w_mlp = (_norm_weight(w, dtype) for w, _ in b.norms)
        eps = {e for _, e in b.norms}
        if any(p is None for p in projs) or w_in is None or w_mlp is None or len(eps) != 1:
            return None
        post = [n for n in (b.post_attn, b.post_mlp) if n is not None]
        if len({n.eps for n in post}) > 1:
            return None
        layers.append(module.Layer(
            w_in, w_mlp, eps.pop(), *projs, b.inter, b.window or 0, rope_keys.index(b.rope_key), not b.silu,
            None if b.qk_norm is None else b.qk_norm.weight, 0.0 if b.qk_norm is None else b.qk_norm.eps,
            None if b.post_attn is None else b.post_attn.weight, None if b.post_mlp is None else b.post_mlp.weight,
            post[0].eps if post else 0.0))
    return module.DecodeStep(layers, n_heads, n_kv, head_dim, scaling, softcap or 0.0, gemma)
