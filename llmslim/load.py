"""One loader for every kind of model llmslim reads: float, GPTQ (ours or anyone's v1/v2), bitsandbytes.

It returns an ordinary ``nn.Module`` (quantized linears swapped in) and its tokenizer; nothing
downstream needs to know how the model was made.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .models import read_config, resolve


def load(
    source: str,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> tuple[nn.Module, object]:
    """Load ``source`` (alias, GGUF, folder, hub id, llmslim checkpoint) for inference."""
    folder = resolve(source)
    config = read_config(folder)
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    method = (qc or {}).get("quant_method")
    if method == "gptq":
        model = load_gptq(folder, config, dtype)
    elif method in (None, "gguf"):
        model = _from_pretrained(folder, dtype=dtype, use_safetensors=not allow_pickle or None)
    elif method == "bitsandbytes":
        from .quant.bnb import load_bnb

        model = load_bnb(folder, dtype)
    else:
        raise UserError(f"{source}: quantization method {method!r} is not supported (gptq, bitsandbytes, or float)")
    model.eval()
    return model, load_tokenizer(folder)


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {folder}: {str(e).splitlines()[0]}") from None


def _from_pretrained(folder: str, **kw) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kw)
    except ValueError as e:
        raise UserError(f"{folder} is not a causal language model: {str(e).splitlines()[0]}") from None
    except OSError as e:
        msg = str(e).splitlines()[0]
        if "safetensors" in msg.lower() or "pytorch_model.bin" in msg:
            raise UserError(f"{folder} has no safetensors weights; pickle files (.bin) are refused unless "
                            "you pass --allow-pickle (only for files you trust)") from None
        raise UserError(f"cannot load {folder}: {msg}") from None
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        if type(e).__name__ in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall"):
            raise UserError(f"{folder}: a weight file is unreadable or corrupt ({e})") from None
        raise


@contextmanager
def _no_init():
    """Build modules without running their random initializers (the weights are loaded next)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with _no_init():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise UserError(f"not a causal language model: {str(e).splitlines()[0]}") from None


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weight files")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(folder / name))
        except Exception as e:  # safetensors' own error type; corrupt or truncated file
            if type(e).__name__ == "SafetensorError" or isinstance(e, OSError):
                raise UserError(f"{folder / name} is unreadable or corrupt: {e}") from None
            raise
    return tensors


def load_gptq(folder: str, config, dtype: torch.dtype) -> nn.Module:
    """A GPTQ v1 (or v2) checkpoint -> model with ``GPTQLinear`` layers on the reference path."""
    from .formats.pack import pack, unpack
    from .nn import GPTQLinear
    from .quant.walk import linear_shape, set_module

    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    del config.quantization_config
    weights = read_safetensors(folder)
    model = empty_model(config, dtype)
    v2 = qc.get("checkpoint_format", "gptq") == "gptq_v2"
    for name in sorted(k[: -len(".qweight")] for k in weights if k.endswith(".qweight")):
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{folder}: quantized tensor {name}.qweight matches no layer of the model") from None
        in_f, out_f = linear_shape(layer)
        set_module(model, name, GPTQLinear(in_f, out_f, bits, group_size, f"{name}.bias" in weights))
        if v2:  # v2 stores true zeros; our buffers hold the v1 convention (zero - 1)
            weights[f"{name}.qzeros"] = pack(unpack(weights[f"{name}.qzeros"], bits, 1) - 1, bits, 1)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise UserError(f"{folder}: weights do not match the model config: {str(e).splitlines()[0]}") from None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    missing = [k for k in missing if "rotary" not in k]  # non-persistent buffers are computed, not stored
    if missing:
        raise UserError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    model.config.quantization_config = qc
    return model
