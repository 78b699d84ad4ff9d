"""The plain Hugging Face folder: float weights in safetensors, config, tokenizer.

Every other format is this folder plus something (GPTQ buffers, bitsandbytes state), so their
loaders build on these helpers. transformers' own errors are turned into one-line ``UserError``s
that say what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError


def from_pretrained(folder: str, **kw) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with user-facing errors."""
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


def load_tokenizer(folder: str, config=None):
    """The checkpoint's tokenizer; ``config`` (the model's, when already read) spares transformers
    reading it again (``runtime.bare`` passes a plain ``PretrainedConfig``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **({"config": config} if config is not None else {}))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {folder}: {str(e).splitlines()[0]}") from None


@contextmanager
def no_init() -> Iterator[None]:
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
        with no_init():
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


def load_hf(folder: str, dtype: torch.dtype, allow_pickle: bool = False) -> nn.Module:
    """A float (or GGUF-dequantized) model."""
    return from_pretrained(folder, dtype=dtype, use_safetensors=not allow_pickle or None)


def save_hf(model: nn.Module, tokenizer, out_dir: Path, max_shard_size: str = "2GB") -> None:
    """A float model as an ordinary HF folder (shards of at most ``max_shard_size``)."""
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the weight files of a folder (0 for a hub id)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
