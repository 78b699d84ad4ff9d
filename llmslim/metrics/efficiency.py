"""What a model costs: bytes on disk and in memory, and batch-1 speed with plain HF forward calls.

Speed is measured with ``model(...)`` and its KV cache, not ``generate``, so that every model
llmslim loads (float, GPTQ, bitsandbytes) is timed by the same loop with no sampling overhead.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..runtime.cache import cache_kwarg
from ..runtime.model_info import model_context
from .scoring import model_device

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def checkpoint_bytes(*candidates: str | Path | None) -> int | None:
    """Size on disk of the first candidate that is a weight file or a folder holding weight files.

    Pass the user's source and ``model.name_or_path``: aliases and GGUF files resolve to a cached
    folder that only the loaded model knows. Hub ids that are not local give ``None``.
    """
    for cand in candidates:
        if not cand:
            continue
        path = Path(cand).expanduser()
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            return path.stat().st_size
        if path.is_dir():
            total = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
            if total:
                return total
    return None


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers as loaded (packed quantized weights count as stored)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:  # tied embeddings count once
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def speed(
    model: nn.Module,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
) -> dict:
    """Median prefill and decode tokens/s at batch 1 (after one warm-up run).

    The prompt is a fixed spread of token ids: content does not change the arithmetic. Decoding feeds
    the argmax back one token at a time through the KV cache, as greedy generation does.
    """
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise UserError("speed needs at least 1 prompt token, 1 new token and 1 repeat")
    if prompt_tokens + new_tokens > model_context(model):
        raise UserError(f"{prompt_tokens}+{new_tokens} tokens exceed the model's context")
    ids = (torch.arange(prompt_tokens) * 7919 % _vocab_size(model)).unsqueeze(0).to(model_device(model))
    _run(model, ids, new_tokens)  # warm-up: first calls allocate, some kernels repack weights
    runs = [_run(model, ids, new_tokens) for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "batch_size": 1,
        "prefill_tokens_per_s": prompt_tokens / prefill, "decode_tokens_per_s": new_tokens / decode,
        "device": str(model_device(model)), "threads": torch.get_num_threads(),
    }


def _vocab_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else model.get_input_embeddings().num_embeddings


def _run(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    cache_arg = cache_kwarg(model)
    _sync(ids.device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{cache_arg: _cache_of(out)})
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return t1 - t0, time.perf_counter() - t1


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
