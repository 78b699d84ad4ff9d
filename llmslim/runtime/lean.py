"""One decoder forward for every family in ``runtime.families``, with the Python around the
arithmetic stripped.

Both decode loops (``runtime.generate`` at batch 1, the server's ``kvbatch.PaddedBatch``) use
it when ``LeanDecoder.for_model`` finds a family it computes on a model ``accelerate`` prepared
and a cache of ``AppendLayer``s; every other model runs its own ``forward``. It lives apart
from either loop because it is the one piece both share.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import ext, step
from .cache import AppendLayer
from .families import FAMILIES, activation, activation_kind, layer_windows, lean_ready, projection
from .head import Q8Linear
from .invariant import RowInvariant, Rows, cancelling_rows
from .kernels import Int4Linear

Fn = Callable[[torch.Tensor], torch.Tensor]


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or norm.eps


class _Norm:
    """transformers' RMSNorm of either kind as torch ops (normalize in fp32).

    Llama's casts back before the weight; Gemma's multiplies by ``1 + w`` in fp32 and casts after.
    ``weight`` is what multiplies (``1 + w`` in fp32 for Gemma): ``runtime.step`` calls the same ops
    from C++ with it.
    """

    def __init__(self, weight: torch.Tensor, eps: float, gemma: bool):
        self.weight = 1.0 + weight.float() if gemma else weight
        self.eps, self.gemma, self.n = eps, gemma, weight.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (self.n,), eps=self.eps)
        return (y * self.weight).to(x.dtype) if self.gemma else self.weight * y.to(x.dtype)


def _add_norm(weight: torch.Tensor, eps: float, gemma: bool, dtype: torch.dtype):
    """``(x, r) -> (norm(x + r), x + r)``: a residual add and the norm after it (``r`` None: no add).

    One call of the C++ ``rms_norm`` where it is built (a 1-D weight in the compute dtype), else torch's ops.
    """
    module = ext.module()
    if module is not None and weight.dim() == 1 and weight.dtype == dtype:
        op = module.rms_norm
        w = weight.contiguous()

        def fused(x, r):
            return tuple(op(x, w, eps, gemma, r))

        return fused
    norm = _Norm(weight, eps, gemma)

    def plain(x, r):
        if r is not None:
            x = x + r
        return norm(x), x

    return plain


def _direct(module: nn.Module, dtype: torch.dtype) -> Fn:
    """A plain function for a linear module whose forward is one kernel call, else the module.

    Calling the int4 kernel directly skips the module's reshapes, casts and ``nn.Module.__call__``:
    four calls per layer per token add up at this size. A bf16 ``nn.Linear`` without bias (a float
    model's projections, the output head) runs on llmslim's bf16 kernel where it is built.
    """
    if isinstance(module, Q8Linear) and module.bias is None and module.codes.shape[0] * 16 == module.out_features:
        return module.product()  # any dtype: it casts x to bf16 only for its kernel
    if dtype != torch.bfloat16:
        return module
    if isinstance(module, Int4Linear) and module.mode == "none" and not module.n_pad and module.bias is None:
        return module.product()
    matmuls = ext.matmuls()
    if matmuls is not None and type(module) is nn.Linear and module.bias is None \
            and module.weight.dtype == torch.bfloat16 and module.weight.is_contiguous():
        op, w = matmuls.bf16_matmul, module.weight
        return lambda x: op(x, w)
    return module


def _signature(module: nn.Module) -> tuple:
    """What decides a linear module's kernel path: its type, shapes/layout and dtype."""
    first = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    return type(module).__name__, module.extra_repr(), getattr(first, "dtype", None)


class Linear:
    """One projection: a fused module, or sibling modules whose outputs are concatenated."""

    def __init__(self, modules: list[nn.Module], dtype: torch.dtype):
        fns = [_direct(m, dtype) for m in modules]
        self.fn: Fn = fns[0] if len(fns) == 1 else (lambda x: torch.cat([f(x) for f in fns], -1))
        self.key = tuple(_signature(m) for m in modules)
        # Dense weights are known, so the batch-invariance probe can use rows that expose the
        # summation order (see invariant.py); other kernels are probed with random rows.
        dense = all(isinstance(m, nn.Linear) and m.weight.is_floating_point()
                    and m.weight.shape == (m.out_features, m.in_features) for m in modules)
        self.probe: Rows | None = cancelling_rows([m.weight for m in modules]) if dense else None


def _rotate_torch(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``qk [M, heads, d]`` by ``cos``/``sin [M, 1, r]`` (r < d: the first r dims only).

    ``sin`` comes with its first half negated: ``rotate_half(x) * sin == roll(x, r/2) * sin'``, one
    op fewer per layer than transformers' ``cat(-x2, x1)``.
    """
    r = cos.shape[-1]
    if r == qk.shape[-1]:
        return torch.addcmul(qk * cos, torch.roll(qk, r // 2, -1), sin)
    rot = qk[..., :r]
    return torch.cat((torch.addcmul(rot * cos, torch.roll(rot, r // 2, -1), sin), qk[..., r:]), -1)


def _rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``_rotate_torch`` in one C++ call where it is built (same roundings)."""
    module = ext.module()
    if module is None or not (qk.dtype == cos.dtype == sin.dtype):
        return _rotate_torch(qk, cos, sin)
    M, r = cos.shape[0], cos.shape[-1]
    return module.rope(qk, cos.reshape(M, r), sin.reshape(M, r))


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cap: float,
           mask: torch.Tensor | None) -> torch.Tensor:
    """Soft-capped attention as transformers' eager path computes it (SDPA has no soft-cap).

    ``q [1, h, T, d]``, ``k``/``v [1, h_kv, L, d]`` with ``h`` a multiple of ``h_kv``; ``mask [T, L]``
    (True: attend). A decode step's query heads may come folded as ``[1, h_kv, group, d]``.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    w = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / cap) * cap
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf"))
    return torch.matmul(F.softmax(w, -1, dtype=torch.float32).to(q.dtype), v)


class Block:
    """One decoder layer's weights as plain functions, and its few switches."""

    def __init__(self, layer: nn.Module, family, window: int | None, dtype: torch.dtype, n_heads: int, n_kv: int):
        attn, mlp = layer.self_attn, layer.mlp
        gemma = family.gemma_norm
        self.norm_in = _add_norm(layer.input_layernorm.weight, _eps(layer.input_layernorm), gemma, dtype)
        # the modules behind each projection, for runtime.step's one-call decode step
        self.parts = {"qkv": projection(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")), "o": [attn.o_proj],
                      "gate_up": projection(mlp, "gate_up_proj", ("gate_proj", "up_proj")), "down": [mlp.down_proj]}
        self.qkv, self.o = Linear(self.parts["qkv"], dtype), Linear(self.parts["o"], dtype)
        self.gate_up, self.down = Linear(self.parts["gate_up"], dtype), Linear(self.parts["down"], dtype)
        self.inter = mlp.down_proj.in_features
        act = activation(mlp)
        module = ext.module()
        kind = activation_kind(act)  # runtime.step computes these two itself
        self.silu, self.gelu_tanh = kind == "silu", kind == "gelu_tanh"
        if self.silu:
            self.gate: Callable = (lambda gu: module.silu_mul(gu, self.inter)) if module is not None \
                else (lambda gu: F.silu(gu[:, :self.inter]) * gu[:, self.inter:])
        else:
            self.gate = lambda gu: act(gu[:, :self.inter]) * gu[:, self.inter:]
        if family.sandwich:  # Gemma 2/3: the attention output and the MLP are normed before the residual
            pre = (layer.input_layernorm, layer.pre_feedforward_layernorm)
            self.post_attn = _Norm(layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm), gemma)
            self.norm_mlp = _add_norm(layer.pre_feedforward_layernorm.weight, _eps(layer.pre_feedforward_layernorm),
                                      gemma, dtype)
            self.post_mlp = _Norm(layer.post_feedforward_layernorm.weight, _eps(layer.post_feedforward_layernorm),
                                  gemma)
        else:
            self.post_attn = self.post_mlp = None
            pre = (layer.input_layernorm, layer.post_attention_layernorm)
            self.norm_mlp = _add_norm(layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm),
                                      gemma, dtype)
        # the pre-attention and pre-MLP norms' (weight, eps), for runtime.step
        self.norms = tuple((n.weight, _eps(n)) for n in pre)
        self.qk_norm = None
        if family.qk_norm:  # q's and k's weights stacked per head: one norm over [M, heads + kv_heads, d]
            d = attn.head_dim
            w = torch.cat((attn.q_norm.weight.expand(n_heads, d), attn.k_norm.weight.expand(n_kv, d)))
            self.qk_norm = _Norm(w, _eps(attn.q_norm), gemma)
        self.window = window
        self.rope_key = getattr(attn, "layer_type", None) if family.rope_per_layer_type else None


class LeanDecoder:
    """The forward of a decoder of any family in ``runtime.families``, in as few ops as possible.

    At batch 1 and SmolLM2-135M size the int4 kernels take a few microseconds per layer and
    transformers' modular forward (module calls, decorators, mask and cache bookkeeping,
    separate q/k/v and gate/up calls) costs several times that. This forward does the same
    arithmetic on the same modules with the Python around it stripped: fused q/k/v and gate/up
    projections, the rotary embedding applied to q and k in one go, keys/values written straight
    into the ``AppendLayer`` buffers, single-query attention with grouped heads folded into the
    query axis. Sliding-window layers keep every key and attend to the window's last columns.
    Where every piece of every layer is one of llmslim's C++ kernels, a decode step (one token per
    row) goes through all layers in one C++ call instead (``runtime.step``): the same calls, the same bits.

    Batched decoding (``decode_batch``) is batch-invariant: a row's logits are bit for bit what
    the same row decoded alone gives, whatever else is in the batch and however long the other
    rows are. Attention runs per row over that row's own columns (no padding enters a
    reduction), and every projection runs through ``invariant.RowInvariant`` (row counts whose
    kernel sums in another order are cut into chunks that do not).
    """

    def __init__(self, model: nn.Module):
        from torch.nn.functional import scaled_dot_product_attention

        inner, config = model.model, model.config
        self.family = FAMILIES[config.model_type]
        attn = inner.layers[0].self_attn
        self.sdpa = scaled_dot_product_attention
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.attn_cap = getattr(config, "attn_logit_softcapping", None)
        self.final_cap = getattr(config, "final_logit_softcapping", None)
        self.rope_keyed = "layer_type" in inspect.signature(self.rotary.forward).parameters
        dtype = inner.norm.weight.dtype  # the compute dtype (the embedding may be 8-bit rows: Q8Embedding)
        windows = layer_windows(config)
        self.layers = [Block(layer, self.family, windows[i], dtype, self.n_heads, self.n_kv)
                       for i, layer in enumerate(inner.layers)]
        self.head = Linear([model.lm_head], dtype)
        self.rows = RowInvariant()
        # One call per layer over every row's own keys (llmslim's C++ kernel), else SDPA row by row.
        self.kernel = ext.decode_attention()
        # A decode step's layers in one C++ call where every piece is one of llmslim's kernels.
        self.rope_keys = sorted({b.rope_key for b in self.layers}, key=str)
        self.step = None if self.kernel is None else step.build(
            self.layers, self.rope_keys, self.n_heads, self.n_kv, self.head_dim, self.scaling, self.attn_cap,
            self.family.gemma_norm, dtype)

    @classmethod
    def for_model(cls, model: nn.Module, cache) -> LeanDecoder | None:
        """A ``LeanDecoder`` for ``model`` if ``accelerate`` prepared it, its family is covered and
        ``cache`` is made of layers this forward writes into (``PreallocLayer``, ``BatchLayer``)."""
        if not all(isinstance(layer, AppendLayer) for layer in cache.layers):
            return None
        lean = cls.of(model)
        return lean if lean is not None and len(cache.layers) == len(lean.layers) else None

    @classmethod
    def of(cls, model: nn.Module) -> LeanDecoder | None:
        """``model``'s ``LeanDecoder`` (built once) if ``accelerate`` prepared it and its family is covered."""
        lean = getattr(model, "_llmslim_lean", None)
        if lean is None and lean_ready(model):
            lean = model._llmslim_lean = cls(model)
        return lean

    # --- pieces shared by every path ---

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> dict:
        """cos and sign-folded sin ``[M, 1, r]`` for tokens at ``positions [M]``, per rotary table."""
        keys = {b.rope_key for b in self.layers}
        out = {}
        for key in keys:
            args = (key,) if self.rope_keyed else ()
            cos, sin = self.rotary(x, positions.view(-1, 1), *args)  # [M, 1, r]: one "sequence" per token
            half = cos.shape[-1] // 2
            out[key] = cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return out

    def _attend_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None):
        """One new token of one sequence: ``q [nh, d]`` against its own ``keys``/``values [1, kv, L, d]``."""
        if window is not None and keys.shape[2] > window:
            keys, values = keys[:, :, -window:], values[:, :, -window:]
        nkv, d = self.n_kv, self.head_dim
        q = q.reshape(1, nkv, self.n_heads // nkv, d)  # grouped heads folded into the query axis
        if self.attn_cap:
            a = _eager(q, keys, values, self.scaling, self.attn_cap, None)
        else:
            a = self.sdpa(q, keys, values, scale=self.scaling)
        return a.reshape(1, self.n_heads * d)

    def _attend_rows(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     window: int | None) -> torch.Tensor:
        """One new token per row: ``q [B, nh, d]``; row ``b`` attends to the last ``lengths[b]`` columns
        of ``keys``/``values [B, kv, C, d]`` (its own; the rest is padding). -> ``[B, nh * d]``.

        Each row is computed alone, in an order that depends on nothing but that row, by either path:
        the C++ kernel (one call for all rows) or SDPA called per row.
        """
        if self.kernel is not None:
            a = self.kernel(q, keys, values, lengths, window or 0, self.scaling, self.attn_cap or 0.0)
            return a.view(q.shape[0], self.n_heads * self.head_dim)
        return torch.cat([self._attend_one(q[r], keys[r:r + 1, :, -n:], values[r:r + 1, :, -n:], window)
                          for r, n in enumerate(lengths.tolist())])

    def _attend_chunk(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int,
                      window: int | None) -> torch.Tensor:
        """``T`` tokens at ``pos..`` (a prompt or a chunk of one): ``q [T, nh, d]``, keys of all ``pos + T``."""
        T = q.shape[0]
        start = max(0, pos - window + 1) if window is not None else 0  # older keys are outside every window
        keys, values = keys[:, :, start:], values[:, :, start:]
        mask = None
        if pos or start or (window is not None and T > window) or (self.attn_cap and T > 1):
            qpos = torch.arange(pos, pos + T).view(T, 1)
            kpos = torch.arange(start, pos + T).view(1, -1)
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
        q = q.transpose(0, 1)[None]
        if self.attn_cap:
            a = _eager(q, keys, values, self.scaling, self.attn_cap, mask)
        else:
            a = self.sdpa(q, keys, values, attn_mask=mask, is_causal=mask is None, scale=self.scaling,
                          enable_gqa=self.n_kv != self.n_heads)
        return a[0].transpose(0, 1).reshape(T, self.n_heads * self.head_dim)

    def _blocks(self, x: torch.Tensor, rope: dict, attend, linear) -> torch.Tensor:
        """Every layer over ``x [M, hidden]``; ``attend(i, block, q, k, v)`` is the path's attention,
        ``linear(proj, x)`` its way of calling a projection."""
        M = x.shape[0]
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        nqk = (nh + nkv) * d
        m = None  # the last MLP's output, added to the residual stream together with the next norm
        for i, b in enumerate(self.layers):
            h, x = b.norm_in(x, m)
            qkv = linear(b.qkv, h)
            qk = qkv[:, :nqk].view(M, nh + nkv, d)
            if b.qk_norm is not None:
                qk = b.qk_norm(qk)
            cos, sin = rope[b.rope_key]
            qk = _rotate(qk, cos, sin)
            a = linear(b.o, attend(i, b, qk[:, :nh], qk[:, nh:], qkv[:, nqk:].view(M, nkv, d)))
            h, x = b.norm_mlp(x, a if b.post_attn is None else b.post_attn(a))
            m = linear(b.down, b.gate(linear(b.gate_up, h)))
            if b.post_mlp is not None:
                m = b.post_mlp(m)
        return x + m

    def _logits(self, x: torch.Tensor, linear) -> torch.Tensor:
        logits = linear(self.head, self.norm(x))
        if self.final_cap:
            logits = torch.tanh(logits / self.final_cap) * self.final_cap
        return logits

    def _one_call(self, x: torch.Tensor, rope: dict, lengths: torch.Tensor, layers) -> torch.Tensor | None:
        """``_blocks`` for one new token per row as one ``DecodeStep`` call (None where it does not apply)."""
        if self.step is None:
            return None
        M = x.shape[0]
        cos = [rope[k][0].reshape(M, -1) for k in self.rope_keys]
        sin = [rope[k][1].reshape(M, -1) for k in self.rope_keys]
        if any(c.dtype != x.dtype for c in cos):
            return None
        cols = [layer.next_column() for layer in layers]
        start, col = cols[0][2:]
        if any(c[2:] != (start, col) for c in cols):
            raise RuntimeError("the cache layers disagree on their columns")
        out = self.step(x, cos, sin, lengths, [c[0] for c in cols], [c[1] for c in cols], start, col)
        for layer in layers:
            layer.commit_column()
        return out

    # --- the paths ---

    def __call__(self, input_ids: torch.Tensor, pos: int, cache) -> torch.Tensor:
        """``input_ids [T]`` of one sequence at positions ``pos..pos+T-1`` -> logits of the last ``[vocab]``.

        One token is exactly one row of ``decode_batch``; a longer chunk (a prompt, or a piece of
        one) attends causally to what the cache holds and itself.
        """
        layers = cache.layers
        if input_ids.shape[0] > 1 or not all(layer.is_initialized for layer in layers):
            return self.prefill(input_ids, pos, cache, all_logits=False)[0]
        x = self.embed(input_ids)
        rope = self._rope(x, torch.tensor([pos]))
        length = torch.tensor([pos + 1])
        out = self._one_call(x, rope, length, layers)
        if out is not None:
            return self._logits(out, _plain)[0]

        def attend(i, b, q, k, v):
            keys, values = layers[i].append(k, v)
            return self._attend_rows(q, keys, values, length, b.window)

        x = self._blocks(x, rope, attend, _plain)
        return self._logits(x, _plain)[0]

    def prefill(self, input_ids: torch.Tensor, pos: int, cache, all_logits: bool) -> torch.Tensor:
        """``input_ids [T]`` of one sequence at ``pos..pos+T-1`` into ``cache`` (any transformers ``Cache``:
        each layer's keys/values go through ``cache.update``) -> the logits of every position ``[T, vocab]``
        with ``all_logits``, else of the last one ``[1, vocab]``.

        The server's chunked prefill: the chunk attends causally to what the cache holds and to itself,
        as ``__call__``'s chunk path does, whatever kind of cache layer holds the keys.
        """
        T = input_ids.shape[0]
        x = self.embed(input_ids)
        rope = self._rope(x, torch.arange(pos, pos + T))

        def attend(i, b, q, k, v):
            keys, values = cache.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], i)
            return self._attend_chunk(q, keys, values, pos, b.window)

        x = self._blocks(x, rope, attend, _plain)
        return self._logits(x if all_logits else x[-1:], _plain)

    def decode_batch(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One token for each of ``B`` rows of a left-padded batch -> next-token logits ``[B, vocab]``.

        ``positions [B]`` are each row's own positions (its real length so far). The cache layers
        take ``update(keys [B, kv, 1, d], values)`` and return every column (the server's
        ``BatchLayer``); row ``b``'s own columns are the last ``positions[b] + 1``.
        """
        x = self.embed(input_ids)
        rope = self._rope(x, positions)
        lengths = positions + 1
        layers = cache.layers

        def attend(i, b, q, k, v):
            keys, values = layers[i].update(k[:, :, None, :], v[:, :, None, :])
            return self._attend_rows(q, keys, values, lengths, b.window)

        rows = self.rows

        def linear(proj, h):
            return rows(proj.fn, proj.key, h, proj.probe)

        out = self._one_call(x, rope, lengths, layers)
        if out is None:
            out = self._blocks(x, rope, attend, linear)
        return self._logits(out, linear)


def _plain(proj, h: torch.Tensor) -> torch.Tensor:
    return proj.fn(h)
