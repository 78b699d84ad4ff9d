"""Exact KL measurements: the quantity ``sensitivity`` predicts, measured by forwards of the model.

``Rounded`` holds a weight on a quantization grid compactly (a byte per weight) and decodes it on
the spot; ``replaced_weights`` runs the model with some layers' weights swapped in for their own
forward only (nothing copied, the model left as it was). ``reference_kl``/``kl_to``/``measured_kl``
measure KL(original || model) per token; ``unit_kls`` measures many single-unit replacements at
once, each forward starting at the unit's own block: the blocks before it replay the outputs the
original forward recorded (``structured.replaying``), so a unit in the last block costs little
more than the head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..grid import dequantize_groups
from .gptq import GPTQResult
from .structured import replaying
from .walk import find_blocks, is_conv1d


@dataclass
class Rounded:
    """One weight on a candidate grid, kept compact (a byte per weight; the reference model's GPTQ
    result, or the proxy's round-to-nearest): codes ``[rows, columns]``, ``scale``/``zero``
    ``[groups, rows]``, ``g_idx`` the group of each column (the checkpoint's layout)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor

    def weight(self) -> torch.Tensor:
        return dequantize_groups(self.codes, self.scale, self.zero, self.g_idx)

    def cpu(self) -> Rounded:
        return Rounded(*(t.cpu() for t in (self.codes, self.scale, self.zero, self.g_idx)))

    @classmethod
    def of(cls, r: GPTQResult) -> Rounded:
        return cls(r.Q.to(torch.uint8), r.scales, r.zeros, r.g_idx.long())



@contextmanager
def replaced_weights(model: nn.Module, weights: dict[str, torch.Tensor | Rounded]) -> Iterator[None]:
    """Within the block, each named layer computes with the given weight (``[out, in]`` floats, or
    ``Rounded`` codes decoded on the spot) and every other layer as it is. The weight is swapped in
    only for the layer's own forward: nothing is copied, and the model is as it was afterwards."""
    saved: dict[str, torch.Tensor] = {}

    def swap_in(name, module, args):
        w = weights[name]
        w = w.weight() if isinstance(w, Rounded) else w
        saved[name] = module.weight.data
        module.weight.data = (w.T if is_conv1d(module) else w).to(module.weight.dtype)

    def swap_out(name, module, args, out):
        module.weight.data = saved.pop(name)

    handles = []
    try:
        for name in weights:
            m = model.get_submodule(name)
            handles.append(m.register_forward_pre_hook(lambda m, a, n=name: swap_in(n, m, a)))
            handles.append(m.register_forward_hook(lambda m, a, o, n=name: swap_out(n, m, a, o)))
        yield
    finally:
        for h in handles:
            h.remove()
        for name, w in saved.items():  # a forward that failed midway
            model.get_submodule(name).weight.data = w


@torch.inference_mode()
def reference_kl(model: nn.Module, references: dict[str, dict[str, torch.Tensor | Rounded]], calib: torch.Tensor,
                 batch_size: int = 1) -> dict[str, float]:
    """Mean KL(original || model) per token on ``calib`` of each reference model (label -> the
    weights of its quantized layers): one forward of the original and one of each reference per
    batch, so the original's log-probabilities are never all held at once."""
    totals = dict.fromkeys(references, 0.0)
    tokens = 0
    for ids in calib.split(batch_size):
        lq = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        for label, weights in references.items():
            with replaced_weights(model, weights):
                lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            totals[label] += float((lq.exp() * (lq - lp)).sum())
        tokens += ids.numel()
    return {k: v / tokens for k, v in totals.items()}


@torch.inference_mode()
def kl_to(model: nn.Module, base_logp: list[torch.Tensor], calib: torch.Tensor, batch_size: int = 1) -> float:
    """Mean KL(original || model) per token on ``calib``, given the original's log-probabilities
    per batch (``base_log_probs``)."""
    total, n = 0.0, 0
    for ids, lq in zip(calib.split(batch_size), base_logp, strict=True):
        lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        total += float((lq.exp() * (lq - lp)).sum())
        n += ids.numel()
    return total / n


@torch.inference_mode()
def base_log_probs(model: nn.Module, calib: torch.Tensor, batch_size: int = 1) -> list[torch.Tensor]:
    return [torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            for ids in calib.split(batch_size)]


def measured_kl(model: nn.Module, weights: dict[str, torch.Tensor], base_logp: list[torch.Tensor],
                calib: torch.Tensor, batch_size: int = 1) -> float:
    """The exact KL increase with the named layers' weights replaced (``[out, in]`` floats) and
    every other layer as it is; the model is left as it was."""
    with replaced_weights(model, weights):
        return kl_to(model, base_logp, calib, batch_size)


def _block_of(name: str, prefix: str) -> int:
    """Index of the decoder block holding layer ``name`` (0 for a layer outside the blocks)."""
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else 0


@torch.inference_mode()
def unit_kls(model: nn.Module, units: list[dict[str, torch.Tensor | Rounded]], calib: torch.Tensor,
             dtype: torch.dtype | None = None, desc: str = "exact KL") -> list[float]:
    """Mean KL(original || model) per token on ``calib`` with only unit ``u``'s layers replaced (its
    weights, as ``replaced_weights`` takes them), for every ``u``. One sequence at a time: the original
    forward records every block's output, and each unit's forward replays the blocks before its first
    layer's block. ``dtype``: the forwards autocast to it (the original's too, so both see the same
    rounding)."""
    blocks_name, blocks = find_blocks(model)
    prefix = blocks_name + "."
    starts = [min((_block_of(n, prefix) for n in u), default=0) for u in units]
    totals = [0.0] * len(units)
    tokens = 0
    outputs: list = [None] * len(blocks)

    def record(i):
        def hook(module, args, output):
            outputs[i] = output
        return hook

    autocast = torch.autocast(calib.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    bar = tqdm(total=len(units) * len(calib), desc=desc, unit="forward")
    with autocast:
        for ids in calib.split(1):
            handles = [b.register_forward_hook(record(i)) for i, b in enumerate(blocks)]
            try:
                lq = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            finally:
                for h in handles:
                    h.remove()
            pq = lq.exp()
            for k, weights in enumerate(units):
                with replaying(blocks, {j: outputs[j] for j in range(starts[k])}), replaced_weights(model, weights):
                    lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
                totals[k] += float((pq * (lq - lp)).sum())
                bar.update()
            tokens += ids.numel()
    bar.close()
    return [t / tokens for t in totals]
