"""The KV caches llmslim's decode loops write into, and how to make and pass a cache.

Two layouts, one per loop:

- ``PreallocLayer`` (batch 1, ``runtime.generate``): buffers allocated once for prompt +
  ``max_new_tokens``, written in place, read as views of the filled part.
- ``BatchLayer`` (the server's running batch, ``server.kvbatch``): buffers with spare rows and
  columns holding left-padded rows that join and leave between steps.

Both are ``AppendLayer``s: besides transformers' ``update`` they take keys/values in the
``[T, heads, d]`` layout the lean forward (``runtime.lean``) produces, so that forward can
write into either without transposing through transformers' layout. Holding both here keeps
that contract in one place instead of a duck-typed ``hasattr(layer, "append")``.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod

import torch
from torch import nn
from transformers.cache_utils import CacheLayerMixin

from .families import lean_ready

CACHE_BUCKET = 256  # cache lengths are rounded up to a multiple of this, so calls can share one


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5 calls the cache argument ``cache``; older releases ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class AppendLayer(CacheLayerMixin):
    """A cache layer ``runtime.lean.LeanDecoder`` can write its single-row decode step into."""

    @abstractmethod
    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` for row 0 with keys/values laid out ``[T, heads, d]``: returns all keys/values."""

    @abstractmethod
    def next_column(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Room for one more token of every row, written by someone else (``runtime.step``): the key
        and value buffers ``[rows_cap, heads, cols_cap, d]``, the first live column and the column to
        write. ``commit_column`` then counts it."""

    @abstractmethod
    def commit_column(self) -> None:
        """The column ``next_column`` gave is written: it is live now."""


# ---------------------------------------------------------------------------------------------
# Batch 1: preallocated
# ---------------------------------------------------------------------------------------------


class PreallocLayer(AppendLayer):
    """One layer's keys/values in buffers allocated once; ``update`` copies in and returns views.

    transformers' ``DynamicLayer`` concatenates on every step (a new tensor per layer per
    token); its ``StaticLayer`` never reallocates but makes every step attend over the whole
    buffer behind a mask (on CPU, SDPA's cost grows with the buffer, not the text). This
    layer does neither: the returned keys/values are views of the filled part only, so the
    attention sees exactly the tokens so far and needs no mask when decoding.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.length = max_len, 0
        self._k = self._v = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self._k = torch.empty(b, h, self.max_len, d, dtype=key_states.dtype, device=self.device)
        self._v = torch.empty(b, value_states.shape[1], self.max_len, value_states.shape[-1],
                              dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self._k.dtype != key_states.dtype or self._k.shape[1] != key_states.shape[1]:
            self.lazy_initialization(key_states, value_states)  # first use, or a model of another dtype
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self._k[:, :, start:end].copy_(key_states)
        self._v[:, :, start:end].copy_(value_states)
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` for keys/values laid out ``[T, heads, d]`` (batch 1), fewer ops: the decode path."""
        start, end = self.length, self.length + k.shape[0]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self._k[0, :, start:end] = k.transpose(0, 1)
        self._v[0, :, start:end] = v.transpose(0, 1)
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def next_column(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if self.length + 1 > self.max_len:
            raise RuntimeError(f"KV cache full: {self.length + 1} positions needed, {self.max_len} allocated")
        return self._k, self._v, 0, self.length

    def commit_column(self) -> None:
        self.length += 1
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        self.length = 0  # the buffers stay; stale entries are never read (views stop at length)
        self.keys = self.values = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def _full_attention_only(config) -> bool:
    """Whether every layer is plain full attention (sliding-window/hybrid models keep HF's caches)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return getattr(text, "sliding_window", None) is None


def make_cache(model: nn.Module, length: int):
    """A KV cache for ``length`` positions, reused across calls on the same model when big enough.

    ``PreallocLayer``s for plain full-attention models and for every model the lean forward runs
    (it applies sliding windows itself, over a cache that keeps every key), transformers'
    ``StaticCache`` otherwise.
    Sizes are rounded up to ``CACHE_BUCKET`` so that calls of similar length share one.
    """
    from transformers import StaticCache
    from transformers.cache_utils import Cache

    size, cache = getattr(model, "_llmslim_kv_cache", (0, None))
    if cache is not None and size >= length:
        cache.reset()
        return cache
    size = -(-length // CACHE_BUCKET) * CACHE_BUCKET
    config = model.config
    if _full_attention_only(config) or lean_ready(model):
        n = config.get_text_config(decoder=True).num_hidden_layers
        cache = Cache(layers=[PreallocLayer(size) for _ in range(n)])
    else:
        cache = StaticCache(config=config, max_cache_len=size)
    model._llmslim_kv_cache = (size, cache)
    return cache


# ---------------------------------------------------------------------------------------------
# The server's running batch: transformers' own cache per prompt, merged into BatchLayers
# ---------------------------------------------------------------------------------------------


def new_cache(model: nn.Module):
    """A fresh transformers ``DynamicCache`` for one prompt's prefill.

    For a model the lean forward decodes, plain full layers even where the model has sliding
    windows: the cache keeps every key (transformers' forward masks the window itself), so it
    can join a ``BatchLayer`` batch, and the lean forward attends to each window's last columns.
    """
    from transformers import DynamicCache

    if lean_ready(model):
        return DynamicCache()
    try:
        return DynamicCache(config=model.config)
    except (TypeError, ValueError, AttributeError):  # older transformers or odd configs
        return DynamicCache()


def mergeable(cache) -> bool:
    """Whether a prefilled cache can join a ``BatchLayer`` batch: plain ``DynamicLayer``s only
    (sliding-window or recurrent layers keep extra state a padded batch cannot hold)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


class BatchLayer(AppendLayer):
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
        """Keep rows ``keep`` (new row ``i`` is old row ``keep[i] >= i``) and drop the first ``trim``
        live columns. Only rows that change place are copied, and only their live columns: with the
        order ``PaddedBatch.remove`` chooses (the last rows fill the holes) that is one row per row
        that left. Copying every row's whole buffer took 209 ms a removal at 64 rows of SmolLM2-135M
        (30 layers, 300 tokens, room for 600), more than a decode step; this takes 1.4 ms
        (serve/results/remove_rows_session23.txt)."""
        self.start += trim
        live = slice(self.start, self.end)
        for i, r in enumerate(keep):
            if i != r:  # a row to a lower place: where it lands no kept row is read any more
                self._k[i, :, live] = self._k[r, :, live]
                self._v[i, :, live] = self._v[r, :, live]
        self.rows = len(keep)
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
        """``update`` for a single row and keys/values laid out ``[T, heads, d]`` (``LeanDecoder``'s
        decode path)."""
        T = k.shape[0]
        self.reserve(self.rows, 0, T)
        self._k[0, :, self.end:self.end + T] = k.transpose(0, 1)
        self._v[0, :, self.end:self.end + T] = v.transpose(0, 1)
        self.end += T
        self._view()
        return self.keys, self.values

    def next_column(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        self.reserve(self.rows, 0, 1)
        return self._k, self._v, self.start, self.end

    def commit_column(self) -> None:
        self.end += 1
        self._view()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.end - self.start + query_length, 0

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_max_length(self) -> int:
        return -1
