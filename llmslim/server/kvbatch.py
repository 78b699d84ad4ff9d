"""The running sequences' KV caches as one left-padded batch, so one forward decodes them all.

Each new sequence is prefilled alone (batch 1, no padding) into its own ``DynamicCache`` and
then merged into the batch: every cache row is left-padded to the longest row, an attention
mask hides the padding, and explicit position ids keep each row's positions its own. Rows
leave between steps (``remove``); padding columns that no row needs any more are cut off.

Why left padding: the new token of every row is then written to the same cache column, so
the whole batch is an ordinary HF ``DynamicCache`` and the model's own attention runs it.
Masked keys get exactly zero weight, so a row's output does not depend on its neighbours
beyond float summation order.

Only plain ``DynamicLayer`` caches can be merged this way (sliding-window or recurrent layers
keep extra state); ``mergeable`` says so and the engine then decodes each sequence alone.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5 calls the cache argument ``cache``; older releases ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except (TypeError, ValueError, AttributeError):  # older transformers or odd configs
        return DynamicCache()


def mergeable(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


class PaddedBatch:
    """A left-padded ``DynamicCache`` over the running rows, and one decode step for all of them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache_arg = cache_kwarg(model)
        self.cache = None
        self.pad: list[int] = []  # left padding columns of each row
        self.length = 0  # cache columns (the same for every row)

    def __len__(self) -> int:
        return len(self.pad)

    def add(self, cache, tokens: int, copies: int = 1) -> None:
        """Append ``copies`` rows holding the batch-1 ``cache`` of ``tokens`` positions."""
        if self.cache is None:
            self.cache, self.length, self.pad = cache, tokens, [0] * copies
            if copies > 1:
                self.cache.batch_repeat_interleave(copies)
            return
        if tokens > self.length:  # the newcomer is longer: pad the running rows further
            grow = tokens - self.length
            for layer in self.cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, grow, 0))
                layer.values = F.pad(layer.values, (0, 0, grow, 0))
            self.pad = [p + grow for p in self.pad]
            self.length = tokens
        extra = self.length - tokens
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            k = F.pad(theirs.keys, (0, 0, extra, 0)).expand(copies, -1, -1, -1)
            v = F.pad(theirs.values, (0, 0, extra, 0)).expand(copies, -1, -1, -1)
            mine.keys = torch.cat([mine.keys, k], dim=0)
            mine.values = torch.cat([mine.values, v], dim=0)
        self.pad += [extra] * copies

    def remove(self, rows: list[int]) -> None:
        """Drop ``rows`` (indices into the current batch) and padding no remaining row needs."""
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self.pad)) if i not in gone]
        if not keep:
            self.cache, self.pad, self.length = None, [], 0
            return
        self.pad = [self.pad[i] for i in keep]
        trim = min(self.pad)
        index = torch.tensor(keep)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self.pad = [p - trim for p in self.pad]
        self.length -= trim

    def positions(self) -> list[int]:
        """The position the next token of each row takes (its real length so far)."""
        return [self.length - p for p in self.pad]

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; returns the next-token logits ``[rows, vocab]``."""
        rows = len(self.pad)
        input_ids = torch.tensor(tokens, dtype=torch.long).view(rows, 1)
        position_ids = torch.tensor(self.positions(), dtype=torch.long).view(rows, 1)
        pad = torch.tensor(self.pad).view(rows, 1)
        mask = (torch.arange(self.length + 1).view(1, -1) >= pad).long()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        self.length += 1
        return out.logits[:, -1]


@torch.inference_mode()
def prefill(model: nn.Module, prompt: list[int], all_logits: bool) -> tuple[object, torch.Tensor]:
    """Run ``prompt`` alone into a fresh cache; returns the cache and logits ``[positions, vocab]``.

    ``all_logits`` keeps the logits of every position (for prompt log-probs), else only the last.
    """
    cache = new_cache(model)
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model(input_ids=ids, position_ids=torch.arange(len(prompt)).view(1, -1), use_cache=True,
                logits_to_keep=0 if all_logits else 1, **{cache_kwarg(model): cache})
    return cache, out.logits[0]
