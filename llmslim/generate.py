"""A lean batch-1 decode loop: preallocated KV cache, greedy or sampled, stop strings and EOS.

``model.generate`` of transformers is general and pays for it on every token (logits
processors, stopping criteria objects, a growing ``DynamicCache`` that concatenates each
step). At SmolLM2-135M scale with int4 kernels the per-token Python work is a large share of
the time, so this loop does only what batch-1 decoding needs:

- a KV cache preallocated for prompt + ``max_new_tokens`` (``PreallocLayer``: written in
  place, read as views of the filled part; sized in buckets and kept on the model, so
  repeated calls reuse the same memory);
- the next token is chosen from the last position's logits only (``logits_to_keep=1``);
- sampling uses a local ``torch.Generator`` (a ``seed`` makes it reproducible without
  touching the global RNG);
- stop strings are looked for only in the newly decoded tail of the text.

Greedy output is token-for-token what ``model.generate(do_sample=False)`` produces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import CacheLayerMixin

CACHE_BUCKET = 256  # cache lengths are rounded up to a multiple of this, so calls can share one


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids (an EOS that ended the run included, like transformers)
    text: str  # decoded generated text, special tokens skipped, cut before a stop string
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # prefill_s, decode_s, *_tok_s


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else eos)
    return ids


class PreallocLayer(CacheLayerMixin):
    """One layer's keys/values in buffers allocated once; ``update`` copies in and returns views.

    transformers' ``DynamicLayer`` concatenates on every step (a new tensor per layer per
    token); its ``StaticLayer`` never reallocates but makes every step attend over the whole
    buffer behind a mask (on CPU, SDPA's cost grows with the buffer, not the text). This
    layer does neither: the returned keys/values are views of the filled part only, so the
    attention sees exactly the tokens so far and needs no mask when decoding.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.length = max_len, 0
        self._k = self._v = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self._k = torch.empty(b, h, self.max_len, d, dtype=key_states.dtype, device=self.device)
        self._v = torch.empty(b, value_states.shape[1], self.max_len, value_states.shape[-1],
                              dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self._k.dtype != key_states.dtype or self._k.shape[1] != key_states.shape[1]:
            self.lazy_initialization(key_states, value_states)  # first use, or a model of another dtype
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self._k[:, :, start:end].copy_(key_states)
        self._v[:, :, start:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` for keys/values laid out ``[T, heads, d]`` (batch 1), fewer ops: the decode path."""
        start, end = self.length, self.length + k.shape[0]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self._k[0, :, start:end] = k.transpose(0, 1)
        self._v[0, :, start:end] = v.transpose(0, 1)
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        self.length = 0  # the buffers stay; stale entries are never read (views stop at length)
        self.keys = self.values = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def _full_attention_only(config) -> bool:
    """Whether every layer is plain full attention (sliding-window/hybrid models keep HF's caches)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return getattr(text, "sliding_window", None) is None


def make_cache(model: nn.Module, length: int):
    """A KV cache for ``length`` positions, reused across calls on the same model when big enough.

    ``PreallocLayer``s for plain full-attention models, transformers' ``StaticCache`` otherwise.
    Sizes are rounded up to ``CACHE_BUCKET`` so that calls of similar length share one.
    """
    from transformers import StaticCache
    from transformers.cache_utils import Cache

    size, cache = getattr(model, "_llmslim_kv_cache", (0, None))
    if cache is not None and size >= length:
        cache.reset()
        return cache
    size = -(-length // CACHE_BUCKET) * CACHE_BUCKET
    config = model.config
    if _full_attention_only(config):
        n = config.get_text_config(decoder=True).num_hidden_layers
        cache = Cache(layers=[PreallocLayer(size) for _ in range(n)])
    else:
        cache = StaticCache(config=config, max_cache_len=size)
    model._llmslim_kv_cache = (size, cache)
    return cache


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5 calls the cache argument ``cache``; older releases ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class Sampler:
    """Temperature, top-k, top-p (in that order, as transformers applies them), then a draw."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.greedy = temperature == 0 or top_k == 1
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """``logits [vocab]`` of the last position -> the next token id."""
        if self.greedy:
            return int(logits.argmax())
        logits = logits.float() / self.temperature
        if self.top_k:
            values, idx = logits.topk(min(self.top_k, logits.numel()))
        else:
            values, idx = logits.sort(descending=True)
        if self.top_p < 1:
            probs = values.softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            before = probs.cumsum(-1) - probs
            values = values.masked_fill(before >= self.top_p, float("-inf"))
        probs = values.softmax(-1)
        pick = torch.multinomial(probs, 1, generator=self.generator)
        return int(idx[pick])


class StopWatch:
    """Finds stop strings in text that grows a token at a time, scanning only the new tail."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.scanned = 0

    def find(self, text: str) -> int:
        """Index where the earliest stop string starts in ``text``, or -1."""
        if not self.stop:
            return -1
        start = max(0, self.scanned - self.longest + 1)
        self.scanned = len(text)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits, default=-1)


def _encode(tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    return [int(t) for t in prompt]


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str | list[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    ignore_eos: bool = False,
) -> GenerationResult:
    """Continue ``prompt`` (text, or token ids used as given) with batch-1 decoding.

    ``temperature=0`` is greedy. Ends at an EOS token (unless ``ignore_eos``, for
    benchmarks), at a stop string (the text is cut before it), or after ``max_new_tokens``.
    """
    ids = _encode(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampler = Sampler(temperature, top_p, top_k, seed)
    watch = StopWatch([stop] if isinstance(stop, str) else list(stop or []))
    eos = set() if ignore_eos else _eos_ids(model, tokenizer)
    step = Stepper(model, len(ids) + max_new_tokens)

    t0 = time.perf_counter()
    logits = step(ids) if max_new_tokens else None
    t1 = time.perf_counter()
    out: list[int] = []
    text, reason, cut_by_stop = "", "length", False
    while len(out) < max_new_tokens:
        token = sampler(logits)
        out.append(token)
        if token in eos:
            reason = "stop"
            break
        if watch.stop:
            text = tokenizer.decode(out, skip_special_tokens=True)
            cut = watch.find(text)
            if cut >= 0:
                text, reason, cut_by_stop = text[:cut], "stop", True
                break
        if len(out) == max_new_tokens:
            break
        logits = step([token])
    t2 = time.perf_counter()
    if not cut_by_stop:
        text = tokenizer.decode(out, skip_special_tokens=True)
    decode_steps = max(len(out) - 1, 0)  # forwards after the prefill
    timings = {
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "prefill_tok_s": len(ids) / (t1 - t0) if t1 > t0 else 0.0,
        "decode_tok_s": decode_steps / (t2 - t1) if decode_steps and t2 > t1 else 0.0,
    }
    return GenerationResult(out, text, reason, len(ids), timings)


class Stepper:
    """Runs the model one chunk at a time on a preallocated cache; returns the last logits.

    Llama-family models prepared by ``llmslim.kernels.accelerate`` run through ``LeanLlama``;
    every other model through its own ``forward``.
    """

    def __init__(self, model: nn.Module, max_len: int):
        self.model = model
        self.cache = make_cache(model, max_len)
        self.cache_arg = _cache_kwarg(model)
        self.lean = LeanLlama.for_model(model, self.cache)
        self.pos = 0

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        input_ids = torch.tensor(tokens, dtype=torch.long)
        if self.lean is not None:
            logits = self.lean(input_ids, self.pos, self.cache)
        else:
            position_ids = torch.arange(self.pos, self.pos + n).unsqueeze(0)
            out = self.model(input_ids=input_ids[None], position_ids=position_ids, use_cache=True,
                             logits_to_keep=1, **{self.cache_arg: self.cache})
            logits = out.logits[0, -1]
        self.pos += n
        return logits


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm (normalize in fp32, cast back, then the weight) in four ops."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _direct(module: nn.Module, dtype: torch.dtype):
    """A plain function for a linear module whose forward is one kernel call, else the module.

    Calling ``_weight_int4pack_mm_for_cpu`` directly skips the module's reshapes, casts and
    ``nn.Module.__call__``: four calls per layer per token add up at this size.
    """
    from .kernels import Int4Linear

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
        from .kernels import FusedLinear

        if getattr(model, "_llmslim_no_lean", False):
            return None
        lean = getattr(model, "_llmslim_lean", None)
        if lean is not None:
            return lean
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if config is None or inner is None or getattr(config, "model_type", None) not in cls.ARCHS:
            return None
        if not all(isinstance(layer, PreallocLayer) or hasattr(layer, "append") for layer in cache.layers):
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
