"""The running sequences' KV caches as one left-padded batch, so one forward decodes them all.

Each new sequence is prefilled alone (batch 1, no padding) into its own ``DynamicCache`` and
then merged into the batch: every cache row is left-padded to the longest row, an attention
mask hides the padding, and explicit position ids keep each row's positions its own. Rows
leave between steps (``remove``); padding columns that no row needs any more are cut off.

Why left padding: the new token of every row is then written to the same cache column, so
the whole batch is an ordinary HF ``DynamicCache`` and the model's own attention runs it.
Masked keys get exactly zero weight, so a row's output does not depend on its neighbours
beyond float summation order.

The batch lives in ``BatchLayer`` buffers with spare rows and columns: a decode step writes
one column in place and the attention reads views, so no step copies the cache (a
``DynamicCache`` concatenates every layer's keys and values on every step: at 16 rows of a few
hundred tokens that is ~100 MB moved per step on SmolLM2-135M). Buffers grow by doubling.

Models that ``llmslim.kernels.accelerate`` prepared (Llama family) decode the batch through
``LeanLlama.decode_batch`` — the same arithmetic without transformers' per-module Python — and a
lone row through the batch-1 lean forward; every other model through its own ``forward``.

Only plain ``DynamicLayer`` caches can be merged this way (sliding-window or recurrent layers
keep extra state); ``mergeable`` says so and the engine then decodes each sequence alone.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin


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


class BatchLayer(CacheLayerMixin):
    """One layer's keys/values for the running rows: buffers ``[row_cap, heads, col_cap, d]`` of
    which rows ``:rows`` and columns ``start:end`` are live. Padding columns hold zeros (finite,
    so a masked key contributes exactly nothing)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, copies: int):
        super().__init__()
        self.rows, self.start, self.end = 0, 0, 0
        self._k = keys.new_zeros(0, keys.shape[1], 0, keys.shape[3])
        self._v = values.new_zeros(0, values.shape[1], 0, values.shape[3])
        self.is_initialized = True
        self.add_rows(keys, values, copies)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a BatchLayer is made from a prefilled cache")

    def _view(self) -> None:
        self.keys = self._k[: self.rows, :, self.start:self.end]
        self.values = self._v[: self.rows, :, self.start:self.end]

    def reserve(self, rows: int, left: int, right: int) -> None:
        """Room for ``rows`` rows, ``left`` free columns before ``start`` and ``right`` after ``end``."""
        if rows <= self._k.shape[0] and left <= self.start and right <= self._k.shape[2] - self.end:
            return
        length = self.end - self.start
        new_rows = max(rows, self._k.shape[0])
        if rows > self._k.shape[0]:
            new_rows = max(rows, 2 * self._k.shape[0])
        cols = left + length + max(right, length)  # grow by doubling: O(1) amortized per step
        k = self._k.new_zeros(new_rows, self._k.shape[1], cols, self._k.shape[3])
        v = self._v.new_zeros(new_rows, self._v.shape[1], cols, self._v.shape[3])
        k[: self.rows, :, left:left + length] = self._k[: self.rows, :, self.start:self.end]
        v[: self.rows, :, left:left + length] = self._v[: self.rows, :, self.start:self.end]
        self._k, self._v, self.start, self.end = k, v, left, left + length

    def pad_left(self, n: int) -> None:
        """``n`` more (zero) padding columns before every running row."""
        self.reserve(self.rows, n, 0)
        self.start -= n
        self._k[: self.rows, :, self.start:self.start + n] = 0
        self._v[: self.rows, :, self.start:self.start + n] = 0
        self._view()

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor, copies: int) -> None:
        """Append ``copies`` rows holding a batch-1 ``keys/values [1, heads, T, d]``, T <= live length
        (or any T for an empty layer)."""
        T = keys.shape[2]
        if self.rows == 0:
            self.start = self.end = 0
        self.reserve(self.rows + copies, 0, 0 if self.rows else T)
        if self.rows == 0:
            self.end = self.start + T
        r = slice(self.rows, self.rows + copies)
        self._k[r, :, self.start:self.end - T] = 0
        self._v[r, :, self.start:self.end - T] = 0
        self._k[r, :, self.end - T:self.end] = keys
        self._v[r, :, self.end - T:self.end] = values
        self.rows += copies
        self._view()

    def keep_rows(self, keep: list[int], trim: int) -> None:
        """Keep rows ``keep`` (in that order) and drop the first ``trim`` live columns."""
        index = torch.tensor(keep)
        self._k[: len(keep)] = self._k.index_select(0, index)
        self._v[: len(keep)] = self._v.index_select(0, index)
        self.rows, self.start = len(keep), self.start + trim
        self._view()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        T = key_states.shape[2]
        self.reserve(self.rows, 0, T)
        self._k[: self.rows, :, self.end:self.end + T] = key_states
        self._v[: self.rows, :, self.end:self.end + T] = value_states
        self.end += T
        self._view()
        return self.keys, self.values

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` for a single row and keys/values laid out ``[T, heads, d]`` (``LeanLlama``'s
        decode path)."""
        T = k.shape[0]
        self.reserve(self.rows, 0, T)
        self._k[0, :, self.end:self.end + T] = k.transpose(0, 1)
        self._v[0, :, self.end:self.end + T] = v.transpose(0, 1)
        self.end += T
        self._view()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.end - self.start + query_length, 0

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_max_length(self) -> int:
        return -1


class PaddedBatch:
    """A left-padded KV cache over the running rows, and one decode step for all of them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache_arg = cache_kwarg(model)
        self.cache = None
        self.pad: list[int] = []  # left padding columns of each row
        self.length = 0  # cache columns (the same for every row)
        self._lean: object = None  # decided at the first step (the model's structure does not change)
        self._lean_checked = False

    def __len__(self) -> int:
        return len(self.pad)

    def add(self, cache, tokens: int, copies: int = 1) -> None:
        """Append ``copies`` rows holding the batch-1 ``cache`` of ``tokens`` positions."""
        from transformers.cache_utils import Cache

        if self.cache is None:
            self.cache = Cache(layers=[BatchLayer(layer.keys, layer.values, copies) for layer in cache.layers])
            self.length, self.pad = tokens, [0] * copies
            return
        if tokens > self.length:  # the newcomer is longer: pad the running rows further
            grow = tokens - self.length
            for layer in self.cache.layers:
                layer.pad_left(grow)
            self.pad = [p + grow for p in self.pad]
            self.length = tokens
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.add_rows(theirs.keys, theirs.values, copies)
        self.pad += [self.length - tokens] * copies

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
        for layer in self.cache.layers:
            layer.keep_rows(keep, trim)
        self.pad = [p - trim for p in self.pad]
        self.length -= trim

    def positions(self) -> list[int]:
        """The position the next token of each row takes (its real length so far)."""
        return [self.length - p for p in self.pad]

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; returns the next-token logits ``[rows, vocab]``."""
        rows = len(self.pad)
        # llmslim's lean forward when the model has one (Llama family after ``accelerate``): the
        # same arithmetic without transformers' per-module Python, which at this model size costs
        # about as much as the batch-1 compute.
        if not self._lean_checked:  # the structure check walks every layer: once, not per step
            from ..generate import LeanLlama

            self._lean, self._lean_checked = LeanLlama.for_model(self.model, self.cache), True
        lean = self._lean
        input_ids = torch.tensor(tokens, dtype=torch.long)
        pad = torch.tensor(self.pad).view(rows, 1)
        if lean is not None and rows == 1 and self.pad[0] == 0:
            logits = lean(input_ids, self.length, self.cache).view(1, -1)
            self.length += 1
            return logits
        attend = torch.arange(self.length + 1).view(1, -1) >= pad
        if lean is not None:
            positions = torch.tensor(self.positions(), dtype=torch.long)
            logits = lean.decode_batch(input_ids, positions, attend, self.cache)
            self.length += 1
            return logits
        input_ids = input_ids.view(rows, 1)
        position_ids = torch.tensor(self.positions(), dtype=torch.long).view(rows, 1)
        mask = attend.long()
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
