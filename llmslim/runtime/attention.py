"""Attention for one new token: transformers' SDPA with a cheaper single-query path.

Kept apart from the kernels because it changes no weights: it is an attention function that
``accelerate`` registers with transformers, and it works on float models as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "llmslim_sdpa"


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with a faster path for decoding one token without a mask.

    With grouped-query attention transformers calls SDPA with ``enable_gqa=True``; on CPU that
    costs ~5x more for a single query than folding the query heads of each group into the
    query-length axis (``[b, kv_heads, group, d]``), which is the same computation (no mask,
    so the group's rows are independent). Anything unusual (a mask, several queries,
    soft-capping, attention sinks, position biases, dropout) goes to transformers' own
    SDPA function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q_len, d = query.shape
    hk = key.shape[1]
    plain = all(kwargs.get(k) is None for k in ("softcap", "s_aux", "sinks", "position_bias", "sliding_window"))
    if q_len != 1 or attention_mask is not None or dropout or not plain or hq % hk or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(b, hk, hq // hk, d)  # query head h reads kv head h // group, as repeat_kv does
    out = F.scaled_dot_product_attention(q, key, value, scale=scaling)  # [b, hk, group, dv]
    return out.reshape(b, 1, hq, value.shape[-1]), None


def use_decode_attention(model: nn.Module) -> bool:
    """Route a model that runs transformers' SDPA attention through ``decode_attention``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks are built exactly as for SDPA
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, AttributeError):
        return False
    return getattr(model.config, "_attn_implementation", None) == ATTENTION
