"""What a loaded model says about itself that every consumer needs alike: EOS ids, context length.

One copy for the decode loops, the server and the metrics, so they never disagree about where
a model stops or how long its context is. Imports nothing but torch, so ``llmslim.metrics``
can use it without loading the kernels.
"""

from __future__ import annotations

from torch import nn

# Config names HF architectures use for the context length, in the order they are trusted.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
DEFAULT_CONTEXT = 2048  # for a config that names none of CONTEXT_KEYS


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every EOS id the generation config, the model config and the tokenizer name."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return ids


def native_context(model: nn.Module) -> int | None:
    """The model's context length from its config, or None when the config does not say."""
    config = getattr(model, "config", None)
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_context(model: nn.Module, requested: int | None = None, default: int = DEFAULT_CONTEXT) -> int:
    """The context to use: the model's own, or ``requested`` when that is given and no longer.

    ``requested`` (the server's ``--max-model-len``) must be positive and within the model's
    context; ``default`` is used when the config names no context length.
    """
    if requested is not None and requested <= 0:
        raise ValueError(f"max_model_len must be positive, got {requested}")
    native = native_context(model)
    if native is None:
        return requested or default
    if requested is not None and requested > native:
        raise ValueError(f"max_model_len {requested} is more than the model's context ({native})")
    return requested or native
