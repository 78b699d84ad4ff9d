"""The layout of a checkpoint's model as transformers builds it, written down for ``runtime.bare``.

Run in a child process (``python -m llmslim.runtime.plan FOLDER``): it imports transformers' whole
modeling stack, builds the model on the ``meta`` device (no weights read), and prints one JSON
object: the resolved config (every default and derived field the config class fills in), the
generation config, and each module the lean forward reads -- linears (sizes, bias), the embedding
(and Gemma's scale), the RMSNorms (size, eps), the activation, the rotary tables (``inv_freq`` and
scaling per table, exactly as transformers computed them) and the attention modules' ``head_dim``,
``scaling`` and ``layer_type``. ``unsupported`` says why not when the serving process must load the
model through transformers after all.

Why a child: in transformers 5.x merely loading a config class imports its modeling integrations
(``torch.distributed.tensor``, ``torch._dynamo``, ``sympy``; eval/results/import_memory.json): tens
of MiB that a serving process would carry for nothing. The child pays them once and exits.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

from .families import FAMILIES, activation, activation_kind, lean_support

VERSION = 1  # of the plan's layout: part of the cache key in runtime.bare
# Rotary types whose tables are fixed at construction; "dynamic"/"longrope" recompute them by length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _rotary(rotary: nn.Module) -> dict | str:
    """``{table key: {"inv_freq": [...], "scaling": float}}`` ("" for a model with one table)."""
    types = rotary.rope_type if isinstance(rotary.rope_type, dict) else {"": rotary.rope_type}
    tables = {}
    for key, kind in types.items():
        if kind not in STATIC_ROPE:
            return f"rotary embedding of type {kind!r} (recomputed by sequence length)"
        prefix = f"{key}_" if key else ""
        inv_freq = getattr(rotary, f"{prefix}inv_freq")
        if inv_freq.device.type == "meta":
            return "rotary frequencies were not computed"
        tables[key] = {"inv_freq": inv_freq.float().tolist(), "scaling": float(getattr(rotary, f"{prefix}attention_scaling"))}
    return tables


def describe(folder: str) -> dict:
    from transformers import AutoConfig, GenerationConfig

    from ..formats.stream import empty_model

    config = AutoConfig.from_pretrained(folder)
    plan: dict = {"version": VERSION, "config": config.to_dict(), "unsupported": None}
    try:
        plan["generation_config"] = GenerationConfig.from_pretrained(folder).to_dict()
    except OSError:
        plan["generation_config"] = None
    if config.model_type not in FAMILIES:
        plan["unsupported"] = f"model type {config.model_type!r}"
        return plan
    if getattr(config, "quantization_config", None) is not None:
        qc = config.quantization_config
        method = (qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method")
        if method != "gptq":
            plan["unsupported"] = f"quantization method {method!r}"
            return plan
        del config.quantization_config  # the layout of the float model: load_gptq swaps the linears itself
    model = empty_model(config, torch.float32)
    why = lean_support(model)
    if why is not None:
        plan["unsupported"] = why
        return plan
    tables = _rotary(model.model.rotary_emb)
    if isinstance(tables, str):
        plan["unsupported"] = tables
        return plan
    modules: dict[str, dict] = {}  # in named_modules' order: parents before children
    acts = {id(activation(layer.mlp)): f"model.layers.{i}.mlp" for i, layer in enumerate(model.model.layers)}
    for name, m in model.named_modules():
        if not name:
            continue
        if m is model.model.rotary_emb:
            modules[name] = {"kind": "rotary", "tables": tables}
        elif isinstance(m, nn.Linear):
            modules[name] = {"kind": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
        elif isinstance(m, nn.Embedding):
            scale = getattr(m, "embed_scale", None)
            modules[name] = {"kind": "embedding", "num": m.num_embeddings, "dim": m.embedding_dim,
                             "padding_idx": m.padding_idx, "scale": None if scale is None else float(scale)}
        elif type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
            eps = getattr(m, "variance_epsilon", None) or m.eps
            modules[name] = {"kind": "norm", "dim": m.weight.shape[0], "eps": float(eps)}
        elif id(m) in acts:
            kind = activation_kind(m)
            if kind is None:
                plan["unsupported"] = f"activation {type(m).__name__}"
                return plan
            modules[name] = {"kind": "activation", "fn": kind}
        elif isinstance(m, nn.ModuleList):
            modules[name] = {"kind": "list", "size": len(m)}
        elif any(True for _ in m.parameters(recurse=False)):
            plan["unsupported"] = f"module {name} ({type(m).__name__})"
            return plan
        else:
            modules[name] = {"kind": "container"}
        attrs = {a: getattr(m, a) for a in ("head_dim", "scaling", "layer_type") if hasattr(m, a)}
        if attrs and name.endswith("self_attn"):
            modules[name]["attrs"] = attrs
    plan["modules"] = modules
    plan["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
    return plan


if __name__ == "__main__":
    sys.stdout.write(json.dumps(describe(sys.argv[1])) + "\n")
