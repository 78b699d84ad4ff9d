"""How sparse a model is, and how many parameters it has: what ``llmslim eval`` and ``info`` report.

Zeros are counted in the decoder blocks' linears (the ones pruning touches), as stored: float
weights directly, GPTQ layers after dequantization (a pruned weight is stored as its group's zero
point, which dequantizes to exactly 0). bitsandbytes layers are packed and are not counted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import GPTQLinear
from .masks import nm_holds
from .walk import find_blocks, find_linears, linear_weight

COMMON_NM = ((1, 4), (2, 4), (4, 8))  # most restrictive first: a 2:4 model is also 4:8


def _float_weight(m: nn.Module) -> torch.Tensor | None:
    if isinstance(m, GPTQLinear):
        return m.dequantized_weight()
    w = getattr(m, "weight", None)
    if w is None or not w.is_floating_point() or getattr(w, "quant_state", None) is not None:
        return None  # packed (bitsandbytes): not measured
    return linear_weight(m)


def parameter_count(model: nn.Module) -> int:
    """Logical parameters: a quantized or packed weight counts as its ``out x in`` entries."""
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, GPTQLinear):
            total += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue  # tied embeddings count once
            seen.add(id(p))
            qs = getattr(p, "quant_state", None)
            total += math.prod(qs.shape) if qs is not None and getattr(qs, "shape", None) else p.numel()
    return total


def was_pruned(model: nn.Module) -> bool:
    """Whether a pruning stage ran on the model: alone (``config.pruning``) or joint with GPTQ
    (``quantization_config.meta``)."""
    config = getattr(model, "config", None)
    if getattr(config, "pruning", None):
        return True
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else qc.to_dict() if hasattr(qc, "to_dict") else {}
    meta = qc.get("meta") or {}
    return bool(meta.get("sparsity") or meta.get("nm"))


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict:
    """Overall and per-layer-type sparsity of the decoder blocks' linears, the N:M pattern they all
    follow (if any), and the parameter count."""
    blocks_name, blocks = find_blocks(model)
    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    patterns = set(COMMON_NM)
    for name, m in find_linears(blocks, quantized=True).items():
        W = _float_weight(m)
        if W is None:
            continue
        kind = name.split(".", 1)[1]  # "0.self_attn.q_proj" -> "self_attn.q_proj"
        zeros[kind] = zeros.get(kind, 0) + int((W == 0).sum())
        sizes[kind] = sizes.get(kind, 0) + W.numel()
        patterns = {p for p in patterns if nm_holds(W, *p)}
    total = sum(sizes.values())
    overall = sum(zeros.values()) / total if total else None
    nm = next((f"{n}:{m}" for n, m in COMMON_NM if (n, m) in patterns), None) if total and overall else None
    return {
        "parameters": parameter_count(model),
        # Zeros are not pruning unless something pruned: a 4-bit code can round to exactly 0 (~14%
        # of a GPTQ checkpoint's weights), and a float model has a few exact zeros of its own.
        "pruned": was_pruned(model),
        "blocks": len(blocks),
        "measured_weights": total,
        "sparsity": overall,
        "by_type": {k: zeros[k] / sizes[k] for k in sizes},
        "nm": nm,
    }
