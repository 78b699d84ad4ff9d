"""The forward of a Llama-family decoder with the Python around the arithmetic stripped.

Both decode loops (``runtime.generate`` at batch 1, the server's ``kvbatch.PaddedBatch``) use
it when ``LeanLlama.for_model`` finds exactly the structure it computes (fused projections
from ``accelerate``, a cache of ``AppendLayer``s); every other model runs its own ``forward``.
It lives apart from either loop because it is the one piece both share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import AppendLayer
from .fusion import FusedLinear
from .kernels import Int4Linear


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm (normalize in fp32, cast back, then the weight) in four ops."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _direct(module: nn.Module, dtype: torch.dtype):
    """A plain function for a linear module whose forward is one kernel call, else the module.

    Calling ``_weight_int4pack_mm_for_cpu`` directly skips the module's reshapes, casts and
    ``nn.Module.__call__``: four calls per layer per token add up at this size.
    """
    if isinstance(module, Int4Linear) and module.mode == "none" and not module.n_pad and module.bias is None \
            and dtype == torch.bfloat16:
        op, w, kg, sz = torch.ops.aten._weight_int4pack_mm_for_cpu, module.weight_packed, module.kg, module.scale_zeros
        return lambda x: op(x, w, kg, sz)
    return module


class LeanLlama:
    """The forward of a Llama-family decoder (Llama, Mistral, Qwen2) in as few ops as possible.

    At batch 1 and SmolLM2-135M size the int4 kernels take a few microseconds per layer and
    transformers' modular forward (module calls, decorators, mask and cache bookkeeping,
    separate q/k/v and gate/up calls) costs several times that. This forward does the same
    arithmetic on the same modules with the Python around it stripped: fused q/k/v and
    gate/up projections (made by ``accelerate``), rotary embedding applied to q and k in one
    go, keys/values written straight into the ``PreallocLayer`` buffers, single-query
    attention with grouped heads folded into the query axis. It is used only when the model
    has exactly that structure; the results match the model's own forward (tests compare).
    """

    ARCHS = ("llama", "mistral", "qwen2")

    def __init__(self, model: nn.Module):
        from torch.nn.functional import scaled_dot_product_attention

        inner = model.model
        config = model.config
        attn = inner.layers[0].self_attn
        self.sdpa = scaled_dot_product_attention
        self.embed, self.norm, self.rotary, self.head = inner.embed_tokens, inner.norm, inner.rotary_emb, model.lm_head
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        dtype = self.embed.weight.dtype
        self.layers = [
            (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
             _direct(layer.self_attn.qkv_proj.inner, dtype), _direct(layer.self_attn.o_proj, dtype),
             layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
             _direct(layer.mlp.gate_up_proj.inner, dtype), layer.mlp.gate_up_proj.sizes[0],
             _direct(layer.mlp.down_proj, dtype))
            for layer in inner.layers
        ]

    @classmethod
    def for_model(cls, model: nn.Module, cache) -> LeanLlama | None:
        """A ``LeanLlama`` for ``model`` if its structure is exactly the one this forward computes."""
        if getattr(model, "_llmslim_no_lean", False):
            return None
        lean = getattr(model, "_llmslim_lean", None)
        if lean is not None:
            return lean
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if config is None or inner is None or getattr(config, "model_type", None) not in cls.ARCHS:
            return None
        if not all(isinstance(layer, AppendLayer) for layer in cache.layers):
            return None  # caches it can write into directly (PreallocLayer, the server's BatchLayer)
        if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
            return None
        for part in ("embed_tokens", "norm", "rotary_emb", "layers"):
            if not hasattr(inner, part):
                return None
        if len(cache.layers) != len(inner.layers):
            return None
        for layer in inner.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if not isinstance(getattr(attn, "qkv_proj", None), FusedLinear):
                return None
            if not isinstance(getattr(mlp, "gate_up_proj", None), FusedLinear):
                return None
            if type(mlp).__name__ not in ("LlamaMLP", "MistralMLP", "Qwen2MLP"):
                return None
            if type(attn).__name__ not in ("LlamaAttention", "MistralAttention", "Qwen2Attention"):
                return None
        lean = cls(model)
        model._llmslim_lean = lean
        return lean

    def __call__(self, input_ids: torch.Tensor, pos: int, cache) -> torch.Tensor:
        """``input_ids [T]`` at positions ``pos..pos+T-1`` -> logits of the last position ``[vocab]``."""
        T = input_ids.shape[0]
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        nqk = (nh + nkv) * d
        x = self.embed(input_ids)  # [T, hidden]
        cos, sin = self.rotary(x, torch.arange(pos, pos + T).unsqueeze(0))
        cos = cos[0, :, None, :]  # [T, 1, d]: broadcast over heads
        # rotate_half(x) * sin == roll(x, d/2) * (sin with its first half negated): one op fewer per layer
        half = d // 2
        sin = torch.cat((-sin[0, :, None, :half], sin[0, :, None, half:]), dim=-1)
        mask = None
        if T > 1 and pos > 0:  # a chunk after earlier tokens: causal, shifted by what is cached
            mask = torch.ones(T, pos + T, dtype=torch.bool).tril(diagonal=pos)
        sdpa, scaling = self.sdpa, self.scaling
        for i, (w1, eps1, qkv_proj, o_proj, w2, eps2, gate_up, inter, down) in enumerate(self.layers):
            qkv = qkv_proj(_rms_norm(x, w1, eps1))
            qk = qkv[:, :nqk].view(T, nh + nkv, d)
            qk = torch.addcmul(qk * cos, torch.roll(qk, half, -1), sin)
            v = qkv[:, nqk:].view(T, nkv, d)
            layer = cache.layers[i]
            if T == 1 and layer.is_initialized:
                keys, values = layer.append(qk[:, nh:], v)
                # grouped heads folded into the query axis: [1, kv_heads, group, d]
                a = sdpa(qk[:, :nh].reshape(1, nkv, nh // nkv, d), keys, values, scale=scaling).view(1, nh * d)
            else:
                keys, values = layer.update(qk[:, nh:].transpose(0, 1)[None], v.transpose(0, 1)[None])
                a = sdpa(qk[:, :nh].transpose(0, 1)[None], keys, values, attn_mask=mask, is_causal=mask is None,
                         scale=scaling, enable_gqa=nkv != nh)
                a = a[0].transpose(0, 1).reshape(T, nh * d)
            x = x + o_proj(a)
            gu = gate_up(_rms_norm(x, w2, eps2))
            x = x + down(F.silu(gu[:, :inter]) * gu[:, inter:])
        x = self.norm(x[-1:])
        return self.head(x)[0]

    def decode_batch(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: torch.Tensor,
                     cache) -> torch.Tensor:
        """One token for each of ``B`` rows of a left-padded batch -> next-token logits ``[B, vocab]``.

        ``positions [B]`` are each row's own positions; ``attend [B, L+1]`` (bool) says which cache
        columns, the new one included, each row sees (its padding not). The cache layers take
        ``update(keys [B, kv, 1, d], values)`` and return every column (the server's ``BatchLayer``).
        """
        B = input_ids.shape[0]
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        nqk = (nh + nkv) * d
        x = self.embed(input_ids)  # [B, hidden]
        cos, sin = self.rotary(x, positions.view(B, 1))  # [B, 1, d]: broadcast over heads
        half = d // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        mask = attend[:, None, None, :]  # [B, 1, 1, L+1] against queries [B, kv_heads, group, 1]
        sdpa, scaling = self.sdpa, self.scaling
        for i, (w1, eps1, qkv_proj, o_proj, w2, eps2, gate_up, inter, down) in enumerate(self.layers):
            qkv = qkv_proj(_rms_norm(x, w1, eps1))
            qk = qkv[:, :nqk].view(B, nh + nkv, d)
            qk = torch.addcmul(qk * cos, torch.roll(qk, half, -1), sin)
            v = qkv[:, nqk:].view(B, nkv, 1, d)
            keys, values = cache.layers[i].update(qk[:, nh:, None, :], v)
            # grouped heads folded into the query axis: [B, kv_heads, group, d]
            a = sdpa(qk[:, :nh].reshape(B, nkv, nh // nkv, d), keys, values, attn_mask=mask, scale=scaling)
            x = x + o_proj(a.reshape(B, nh * d))
            gu = gate_up(_rms_norm(x, w2, eps2))
            x = x + down(F.silu(gu[:, :inter]) * gu[:, inter:])
        return self.head(self.norm(x))
