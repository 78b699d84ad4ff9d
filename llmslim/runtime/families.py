"""The decoder families the lean forward computes, and the few switches that tell them apart.

Llama, Mistral, Qwen2/3, Phi-3 and Gemma 1/2/3 are one block: norm, attention with rotary
positions, residual, norm, gated MLP, residual. What differs is small and is read from here
(``Family``) or from the model's own config and modules (``runtime.lean``):

- the RMSNorm: ``w * norm(x)`` cast first (Llama), or ``norm(x) * (1 + w)`` in fp32, cast after
  (Gemma; transformers PR 29402);
- Gemma 2/3's "sandwich": extra norms on the attention output and around the MLP;
- a per-head RMSNorm of q and k before the rotary embedding (Qwen3, Gemma 3);
- Gemma 3's two rotary tables (local layers use another base);
- from the config: sliding-window layers (``layer_types`` or one ``sliding_window`` for all),
  attention and final-logit soft-capping (Gemma 2); from the modules: the attention scale
  (Gemma's ``query_pre_attn_scalar``), the activation, the embedding scale (Gemma), a partial
  rotary embedding (Phi-3 variants), fused or separate q/k/v and gate/up projections (Phi-3
  ships them fused), biases (Qwen2).

Anything else (another architecture, a multimodal wrapper, bidirectional attention) runs on the
model's own ``forward``; ``lean_support`` says why, and ``llmslim info`` prints it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Family:
    gemma_norm: bool = False  # RMSNorm scales by (1 + w) in fp32, then casts (else: casts, then w)
    sandwich: bool = False  # post-attention, pre- and post-feedforward norms (Gemma 2/3)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotary embedding
    rope_per_layer_type: bool = False  # the rotary module takes the layer type (Gemma 3)


FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "phi3": Family(),
    "qwen3": Family(qk_norm=True),
    "gemma": Family(gemma_norm=True),
    "gemma2": Family(gemma_norm=True, sandwich=True),
    "gemma3_text": Family(gemma_norm=True, sandwich=True, qk_norm=True, rope_per_layer_type=True),
}


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (keys ``q - w < k <= q``), or None for full attention.

    transformers' rule: per layer by ``layer_types`` where the config has them (Qwen2/3, Gemma 2/3),
    else the one ``sliding_window`` for every layer (Mistral, Phi-3), else none (Llama).
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types[:n]]
    return [window] * n


def projection(parent: nn.Module, fused: str, parts: tuple[str, ...]) -> list[nn.Module] | None:
    """The module(s) computing ``fused`` (e.g. qkv_proj): one fused module, or its parts in order."""
    from .fusion import FusedLinear

    one = getattr(parent, fused, None)
    if isinstance(one, FusedLinear):
        return [one.inner]
    if isinstance(one, nn.Module):
        return [one]
    mods = [getattr(parent, p, None) for p in parts]
    return mods if all(isinstance(m, nn.Module) for m in mods) else None


def activation(mlp: nn.Module) -> nn.Module | None:
    return getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)


def activation_kind(act: nn.Module) -> str | None:
    """"silu", "gelu_tanh" or "gelu" (exact) for transformers' modules or torch's own that compute
    exactly that op, else None."""
    name = type(act).__name__
    if name in ("SiLUActivation", "SiLU"):
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    inner = getattr(act, "act", None)  # transformers' GELUTanh / GELUActivation keep the function they call
    if name == "GELUTanh" and isinstance(inner, functools.partial) and inner.func is F.gelu \
            and inner.keywords == {"approximate": "tanh"}:
        return "gelu_tanh"
    if name == "GELUActivation" and inner is F.gelu:
        return "gelu"
    return None


def lean_support(model: nn.Module) -> str | None:
    """None when ``runtime.lean`` computes ``model``'s forward, else why not (one line)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one the lean forward computes ({', '.join(FAMILIES)})"
    family = FAMILIES[kind]
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(model, "lm_head", None), nn.Module):
        return "no decoder (model.model) or no lm_head"
    for part in ("embed_tokens", "norm", "rotary_emb", "layers"):
        if not hasattr(inner, part):
            return f"the decoder has no {part}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    norms = ["input_layernorm", "post_attention_layernorm"]
    if family.sandwich:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i, layer in enumerate(inner.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return f"layer {i} has no self_attn or mlp"
        if projection(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")) is None or not hasattr(attn, "o_proj"):
            return f"layer {i}: no q/k/v or o projection"
        if projection(mlp, "gate_up_proj", ("gate_proj", "up_proj")) is None or not hasattr(mlp, "down_proj"):
            return f"layer {i}: no gate/up or down projection"
        if activation(mlp) is None:
            return f"layer {i}: no activation"
        if not all(hasattr(layer, n) for n in norms):
            return f"layer {i}: not the norms of the {kind} block"
        if family.qk_norm and not (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
            return f"layer {i}: no q/k norms"
        if not hasattr(attn, "head_dim") or not hasattr(attn, "scaling"):
            return f"layer {i}: no head_dim or scaling"
    return None


def lean_ready(model: nn.Module) -> bool:
    """Whether the decode loops run ``model`` on the lean forward: ``accelerate`` prepared it (the
    reference path, ``--no-fast``, stays transformers' own) and its family is covered."""
    return bool(getattr(model, "_llmslim_accelerated", False)) and lean_support(model) is None


def describe(model: nn.Module) -> str:
    """What ``llmslim serve``/``generate`` decode this model with, for ``llmslim info``."""
    why = lean_support(model)
    if why is None:
        return f"lean forward ({model.config.model_type}) when served fast (default): batch-invariant batching"
    return f"transformers' own forward ({why})"
