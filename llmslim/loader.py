"""One loader for every kind of model llmslim reads: float, GPTQ (ours or anyone's v1/v2), bitsandbytes.

A small dispatcher: resolve the source, read its ``quantization_config``, hand the folder to the
format that wrote it. It returns an ordinary ``nn.Module`` (quantized linears swapped in) and its
tokenizer; nothing downstream needs to know how the model was made.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .formats.bnb import load_bnb
from .formats.gptq import load_gptq
from .formats.hf import load_hf, load_tokenizer
from .models import read_config, resolve


def load(
    source: str,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> tuple[nn.Module, object]:
    """Load ``source`` (alias, GGUF, folder, hub id, llmslim checkpoint) for inference."""
    folder = resolve(source)
    config = read_config(folder)
    method = quant_method(config)
    if method == "gptq":
        model = load_gptq(folder, config, dtype)
    elif method in (None, "gguf"):
        model = load_hf(folder, dtype, allow_pickle)
    elif method == "bitsandbytes":
        model = load_bnb(folder, dtype)
    else:
        raise UserError(f"{source}: quantization method {method!r} is not supported (gptq, bitsandbytes, or float)")
    model.eval()
    return model, load_tokenizer(folder)


def quantization_config(config) -> dict:
    """A config's ``quantization_config`` as a dict ({} for a float model)."""
    qc = getattr(config, "quantization_config", None)
    return (qc if isinstance(qc, dict) or qc is None else qc.to_dict()) or {}


def quant_method(config) -> str | None:
    """``quant_method`` of a config's ``quantization_config`` (None for a float model)."""
    return quantization_config(config).get("quant_method")
