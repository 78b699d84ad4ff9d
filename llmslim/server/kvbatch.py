"""The running sequences' KV caches as one left-padded batch, so one forward decodes them all.

Each new sequence is prefilled alone (batch 1, no padding), a chunk at a time (``Prefill``),
into its own ``DynamicCache`` and then merged into the batch: every cache row is left-padded to
the longest row, an attention mask hides the padding, and explicit position ids keep each row's
positions its own. Rows leave between steps (``remove``: the last rows fill the holes); padding
columns that no row needs any more are cut off.

Why left padding: the new token of every row is then written to the same cache column, so
the whole batch is an ordinary HF ``DynamicCache`` and the model's own attention runs it.
Masked keys get exactly zero weight, so a row's output does not depend on its neighbours
beyond float summation order.

The batch lives in ``runtime.cache.BatchLayer`` buffers with spare rows and columns: a decode
step writes one column in place and the attention reads views, so no step copies the cache (a
``DynamicCache`` concatenates every layer's keys and values on every step: at 16 rows of a few
hundred tokens that is ~100 MB moved per step on SmolLM2-135M). Buffers grow by doubling.

Models that ``llmslim.runtime.fast.accelerate`` prepared, of a family ``runtime.families`` covers,
decode the batch through ``runtime.lean.LeanDecoder.decode_batch`` — the same arithmetic without
transformers' per-module Python, batch-invariant (a row's logits are bit for bit those of the row
decoded alone) — and a lone row through the batch-1 lean forward, which computes the same bits;
every other model through its own ``forward``.

Only plain ``DynamicLayer`` caches can be merged this way (sliding-window or recurrent layers
keep extra state); ``runtime.cache.mergeable`` says so and the engine then decodes each
sequence alone. The caches themselves live in ``runtime.cache``; this module is only the
bookkeeping of which row is where.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..runtime.cache import BatchLayer, cache_kwarg, new_cache
from ..runtime.lean import LeanDecoder


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

    def remove(self, rows: list[int]) -> list[int]:
        """Drop ``rows`` (indices into the current batch) and padding no remaining row needs.

        Returns the new order: new row ``i`` is old row ``order[i]``. The rows after the last hole
        move into the holes, so a removal copies one row per row that left, never the batch; the
        caller reorders whatever it keeps per row the same way. (A row's results do not depend on
        its place in the batch: the lean forward is batch-invariant.)"""
        if not rows:
            return list(range(len(self.pad)))
        gone = set(rows)
        n = len(self.pad) - len(gone)
        order = list(range(n))
        movers = (i for i in range(n, len(self.pad)) if i not in gone)
        for hole in (i for i in range(n) if i in gone):
            order[hole] = next(movers)
        if not order:
            self.cache, self.pad, self.length = None, [], 0
            return order
        self.pad = [self.pad[i] for i in order]
        trim = min(self.pad)
        for layer in self.cache.layers:
            layer.keep_rows(order, trim)
        self.pad = [p - trim for p in self.pad]
        self.length -= trim
        return order

    def positions(self) -> list[int]:
        """The position the next token of each row takes (its real length so far)."""
        return [self.length - p for p in self.pad]

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; returns the next-token logits ``[rows, vocab]``."""
        if not torch.is_inference_mode_enabled():  # the engine's thread already runs in it: no cost there
            with torch.inference_mode():
                return self.step(tokens)
        rows = len(self.pad)
        # llmslim's lean forward when the model has one (after ``accelerate``, families.py): the
        # same arithmetic without transformers' per-module Python, which at this model size costs
        # about as much as the batch-1 compute.
        if not self._lean_checked:  # the structure check walks every layer: once, not per step
            self._lean, self._lean_checked = LeanDecoder.for_model(self.model, self.cache), True
        lean = self._lean
        input_ids = torch.tensor(tokens, dtype=torch.long)
        if lean is not None and rows == 1 and self.pad[0] == 0:  # a batch of one: the batch-1 forward
            logits = lean(input_ids, self.length, self.cache).view(1, -1)
            self.length += 1
            return logits
        if lean is not None:
            positions = torch.tensor(self.positions(), dtype=torch.long)
            logits = lean.decode_batch(input_ids, positions, self.cache)
            self.length += 1
            return logits
        pad = torch.tensor(self.pad).view(rows, 1)
        attend = torch.arange(self.length + 1).view(1, -1) >= pad
        input_ids = input_ids.view(rows, 1)
        position_ids = torch.tensor(self.positions(), dtype=torch.long).view(rows, 1)
        mask = attend.long()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        self.length += 1
        return out.logits[:, -1]


class Prefill:
    """One prompt's prefill in progress: ``chunk`` positions per ``step`` into its own batch-1 cache.

    The engine runs a chunk per step while other rows keep decoding, so one long prompt never
    stalls them for its whole prefill. Each chunk attends to the cache the chunks before it
    filled (the lean forward where the model has one, else transformers' own forward with explicit
    positions). The chunks lie on the prompt's own
    grid -- positions ``[k * chunk, (k + 1) * chunk)`` -- whichever engine step runs them, so the
    cache depends only on the prompt and ``chunk``, never on what else the engine is doing.

    ``on_logits(start, logits [<= chunk, vocab])`` (prompt log-probs) gets every position's
    logits, a chunk at a time: the logits of the whole prompt never exist at once. Without it
    only the last position's logits are computed. ``last`` holds them once ``finished``.
    """

    def __init__(self, model: nn.Module, prompt: list[int], chunk: int,
                 on_logits: Callable[[int, torch.Tensor], None] | None = None):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model, self.prompt, self.chunk, self.on_logits = model, prompt, chunk, on_logits
        self.cache = new_cache(model)
        self.done = 0  # positions prefilled so far
        self.last: torch.Tensor | None = None  # the last position's logits [vocab], when finished

    @property
    def finished(self) -> bool:
        return self.done >= len(self.prompt)

    @property
    def next_size(self) -> int:
        """Positions the next ``step`` runs."""
        return min(self.chunk, len(self.prompt) - self.done)

    @torch.inference_mode()
    def step(self) -> int:
        """Run the next chunk into the cache; returns how many positions it took."""
        start, end = self.done, self.done + self.next_size
        ids = torch.tensor([self.prompt[start:end]], dtype=torch.long)
        lean = LeanDecoder.of(self.model)  # the lean forward where the decode steps use it: the same arithmetic
        if lean is not None:
            logits = lean.prefill(ids[0], start, self.cache, all_logits=self.on_logits is not None)
        else:
            out = self.model(input_ids=ids, position_ids=torch.arange(start, end).view(1, -1), use_cache=True,
                             logits_to_keep=0 if self.on_logits else 1, **{cache_kwarg(self.model): self.cache})
            logits = out.logits[0]
        if self.on_logits is not None:
            self.on_logits(start, logits)
        self.done = end
        if self.finished:
            self.last = logits[-1].clone()  # not a view: the chunk's [chunk, vocab] logits can go
        return end - start


def prefill(model: nn.Module, prompt: list[int], all_logits: bool) -> tuple[object, torch.Tensor]:
    """Run ``prompt`` alone, in one forward, into a fresh cache; returns the cache and logits
    ``[positions, vocab]`` -- every position's with ``all_logits``, else only the last one's."""
    kept: list[torch.Tensor] = []
    run = Prefill(model, prompt, len(prompt), (lambda start, logits: kept.append(logits)) if all_logits else None)
    run.step()
    return run.cache, kept[0] if all_logits else run.last.view(1, -1)
