"""The bitsandbytes checkpoint: transformers' serialized NF4/FP4/LLM.int8 format, saved and loaded.

CPU speed: bitsandbytes 0.50 repacks a 4-bit layer into its AVX512-BF16 layout on the first
forward in eval mode without grad (``Linear4bit.forward``); until then every call dequantizes the
whole weight. ``load_bnb`` hands back an eval-mode model whose layers are already repacked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..quant.bnb import require_bnb
from .hf import from_pretrained


def save_bnb(model: nn.Module, tokenizer, out_dir: Path) -> None:
    """Write a model quantized by bitsandbytes (and not yet run) with ``save_pretrained``.

    Saved straight after quantizing, before any forward: an eval-mode forward repacks 4-bit
    weights for the CPU (scales rounded to bf16, double-quant scales expanded), and saving a
    repacked model re-quantizes them: reloaded, its logits differ (bitsandbytes 0.50.2).
    """
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def load_bnb(folder: str, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes checkpoint -> eval-mode model with its layers in bitsandbytes' fast CPU state.

    ``dtype`` is the dtype of the parts left in float; 4-bit layers compute in the checkpoint's
    ``bnb_4bit_compute_dtype`` (on AVX512-BF16 CPUs always bf16, the only fast kernel there).
    """
    require_bnb()
    model = from_pretrained(folder, dtype=dtype, use_safetensors=True)
    cast_float_parts(model, dtype)
    return to_fast_state(model)


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> None:
    """Give the parameters outside bitsandbytes layers ``dtype``.

    transformers 5.24 leaves them in the checkpoint's stored dtype whatever ``dtype=`` asks for
    (a float checkpoint is cast). Buffers are left alone: rotary frequencies stay float32 by design.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            continue
        for p in module.parameters(recurse=False):  # a tied embedding is one Parameter: cast once for both
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype


@torch.inference_mode()
def to_fast_state(model: nn.Module) -> nn.Module:
    """Eval mode, and every 4-bit layer repacked now rather than on the first real request.

    The repack happens inside ``Linear4bit.forward`` (eval mode, no grad, CPU input, AVX512-BF16
    CPU), so each layer is called once on a single zero row: bitsandbytes' own code decides and
    converts; nothing here depends on its private layout.
    """
    import bitsandbytes as bnb

    model.eval()
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cpu":
            if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
                layer(torch.zeros(1, layer.in_features, dtype=layer.compute_dtype or float_dtype))
    return model


def cpu_state(model: nn.Module) -> dict:
    """How many bitsandbytes layers the model has and how many are in the fast CPU state."""
    import bitsandbytes as bnb

    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    eight = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    return {
        "linear4bit": len(four),
        "repacked": sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in four),
        "cpu_has_fast_kernel": all(getattr(m, "support_avx512bf16_for_cpu", False) for m in four) if four else None,
        "linear8bit": len(eight),
        "training": sum(m.training for m in [*four, *eight]),
    }

