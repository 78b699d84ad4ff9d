"""``accelerate(model)``: swap every ``GPTQLinear`` for the fastest module that computes its product.

``GPTQLinear`` (llmslim/nn.py) dequantizes its whole weight on every call: exact, but slow.
At load time ``accelerate`` replaces each one, once (see ``kernels`` for the modules and
``fusion`` for the q/k/v and gate/up merge), casts the float parameters to the compute
dtype and routes attention through ``attention.decode_attention``. This module is only the
walk over the model and the choice per layer; it holds no arithmetic of its own.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from ..nn import GPTQLinear
from ..quant.walk import set_module
from ..util import release_free_memory
from .attention import use_decode_attention
from .fusion import concat_float, concat_gptq, fuse_projections
from .head import Q8Embedding, Q8Linear, fits, q8_kernel
from .kernels import Int4Linear, Int8Linear, Int8x2Linear, int4_available, int8_available

HEADS = ("auto", "keep", "int8")
# Attributes that ``runtime.cache`` (the preallocated KV cache) and ``runtime.lean`` (the lean
# forward) keep on a model; both were built for the modules ``accelerate`` replaces.
DERIVED_STATE = ("_llmslim_kv_cache", "_llmslim_lean")


def dense_linear(m: GPTQLinear, dtype: torch.dtype) -> nn.Linear:
    """The fallback: dequantize once into an ordinary ``nn.Linear`` of ``dtype``."""
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(m.dequantized_weight(dtype), requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.to(dtype), requires_grad=False)
    return lin


def fast_module(m: GPTQLinear, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The fastest correct replacement for one ``GPTQLinear``."""
    if m.bits <= 4 and int4_available():
        return Int4Linear.from_gptq(m)
    if m.bits == 8 and m.scales.shape[0] == 1 and int8_available():
        return Int8Linear.from_gptq(m)
    if m.bits == 8 and int4_available():
        return Int8x2Linear.from_gptq(m)
    return dense_linear(m, dtype)


def accelerate(model: nn.Module, dtype: torch.dtype = torch.bfloat16, head: str = "auto",
               attention: bool = True, fuse: bool = True) -> nn.Module:
    """Swap every ``GPTQLinear`` of ``model`` for a fast kernel module and cast the rest to ``dtype``.

    In place (returns ``model``). Each layer is converted and its GPTQ buffers dropped before
    the next, so the peak is one layer's temporaries, never a second model. The float
    parameters (embeddings, norms, float linears) become ``dtype``; computed buffers such as
    rotary frequencies stay as they are (the model computes them in fp32 on purpose).

    ``head="int8"`` also quantizes a float ``lm_head`` to 8 bits in blocks of 32 inputs (``runtime.head``:
    llama.cpp's Q8_0 idea, half bf16's bytes, within bf16's own error); ``"auto"`` (the default) does
    so where it pays: bf16 compute on a CPU where llmslim's ``q8_matmul`` is built, and an input size
    that splits into blocks. ``"keep"`` leaves the head as it is. (A 4-bit head, RTN in groups of 32,
    was measured too: 0 of 20 greedy continuations survived it on SmolLM2-135M, so it is not offered.)

    ``attention`` routes SDPA models through ``decode_attention`` (same results, faster
    single-token steps). ``fuse`` merges q/k/v and gate/up projections that share a layout
    into one module each (``FusedLinear``; the old names stay as slices of it): one grid, or
    (a tuned model's siblings) one group size at 2-4 bits each, which the int4 kernel holds alike.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    for attr in DERIVED_STATE:
        model.__dict__.pop(attr, None)
    def convert(m: GPTQLinear) -> nn.Module:
        fast = fast_module(m, dtype)
        # The previous layer's buffers and temporaries are free by now. Handed back at once: glibc
        # keeps freed heap pages resident, and depending on how its heap happened to grow (varying
        # from run to run) 30 layers' worth piled up: a load peak of 553-813 MiB on SmolLM2-135M,
        # 555-572 with this (eval/inference.md, serving memory).
        release_free_memory()
        return fast

    if fuse:
        def build_gptq(mods):
            if not all(isinstance(m, GPTQLinear) for m in mods):
                return None
            combined = concat_gptq(mods)
            if combined is not None:
                return convert(combined)
            # Siblings of different bits (a tuned model) share the int4 kernel's 4-bit codes.
            if not int4_available():
                return None
            try:
                return Int4Linear.from_gptq_parts(mods)
            except ValueError:  # 8 bits, or other groups: each keeps its own kernel
                return None

        fuse_projections(model, build_gptq)
    names = [n for n, m in model.named_modules() if isinstance(m, GPTQLinear)]
    for name in names:
        old = model.get_submodule(name)
        set_module(model, name, convert(old))
        del old  # the last reference: its packed buffers are freed here
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    if fuse:
        fuse_projections(model, concat_float)  # float models (and layers left in float) too
    if head == "int8" or (head == "auto" and dtype == torch.bfloat16 and q8_kernel() is not None):
        quantize_head(model, dtype)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    model._llmslim_accelerated = True  # the decode loops may run it on runtime.lean's forward
    if attention:
        use_decode_attention(model)
    gc.collect()
    release_free_memory()  # the GPTQ buffers and conversion temporaries: glibc would keep their pages
    return model


def quantize_head(model: nn.Module, dtype: torch.dtype) -> None:
    """A float ``lm_head`` -> ``Q8Linear``; when it is tied to the input embedding, the embedding
    becomes a ``Q8Embedding`` over the same codes, so no float copy of the matrix stays. A head
    whose input size does not split into blocks of 32 is left as it is."""
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(lm_head) is not nn.Linear or not fits(lm_head.weight):
        return
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = isinstance(embed, nn.Embedding) and embed.weight is lm_head.weight
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    q = Q8Linear(lm_head.weight, lm_head.bias)
    set_module(model, names[lm_head], q)
    if tied:
        set_module(model, names[embed], Q8Embedding(q, dtype, embed.padding_idx, getattr(embed, "embed_scale", None)))


def module_summary(model: nn.Module) -> dict[str, int]:
    """How many linear modules of each kind the model holds (for logs and tests)."""
    kinds = (GPTQLinear, Int4Linear, Int8Linear, Int8x2Linear, Q8Linear, nn.Linear)
    counts: dict[str, int] = {}
    for m in model.modules():
        for k in kinds:
            if isinstance(m, k):
                counts[k.__name__] = counts.get(k.__name__, 0) + 1
                break
    return counts
