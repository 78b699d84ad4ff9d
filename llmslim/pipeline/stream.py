"""Compressing a model bigger than memory: decoder block by decoder block, from the checkpoint's
shards to the output's shards.

The model is built on the ``meta`` device (no weights). Before the first block, only the small
tensors outside the decoder blocks are loaded (final norm, position tables ...): the calibration
tokens' embeddings are read row by row from the embedding matrix, which is never loaded whole.
Then each block is loaded in float32, quantized (GPTQ through the same block driver and solver as
in memory; RTN), written to its place in the output shards, and freed. Last, the tensors outside
the blocks are copied into the output piece by piece. Memory therefore follows the size of one
block and of the calibration activations (which go to disk beyond a share of ``max_memory``), not
the size of the model, and the checkpoint is byte for byte what the in-memory path writes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import UNSTRUCTURED_METHODS, GPTQConfig, RTNConfig
from ..formats import gptq as gptq_format
from ..formats.gptq import gptq_tensors, stored, stored_dtype
from ..formats.stream import (
    ShardWriter,
    WeightSource,
    as_saved,
    checkpoint_names,
    empty_model,
    materialize,
    missing_tensors,
    names_under,
    release,
)
from ..nn import GPTQLinear
from ..quant.rtn import rtn_layers
from ..quant.sequential import BlockIO, gptq_blocks
from ..quant.walk import find_blocks, linear_shape, module_name, set_module
from ..util import release_free_memory
from .recipe import Recipe
from .stages import Context, QuantReport, int_targets


def prepare(recipe: Recipe, folder: str, hf_config) -> Streamed | str:
    """A streamed run of ``recipe`` on the model in ``folder``, or why it cannot be one (then the
    model is loaded whole). Unreadable weight files are an error here, before any work."""
    if len(recipe.stages) != 1 or type(recipe.stages[0]) not in (GPTQConfig, RTNConfig):
        return "only a recipe of one gptq or rtn stage is streamed"
    config = recipe.stages[0]
    if isinstance(config, GPTQConfig) and config.layers.quantize_lm_head:
        return "GPTQ on lm_head needs the whole model's outputs"
    if not Path(folder).is_dir() or not any(Path(folder).glob("*.safetensors")):
        return "the model is not a local folder of safetensors files"
    run = Streamed(WeightSource(folder), empty_model(hf_config))
    return run.why_not or run


class Streamed:
    """One streamed run: the model on ``meta``, its checkpoint, the output's shards."""

    def __init__(self, source: WeightSource, model: nn.Module):
        self.source = source
        self.model = model
        self.blocks_name, self.blocks = find_blocks(model)
        self.dtype = stored_dtype(model)
        self.why_not = None
        names = checkpoint_names(model, source)
        if names is None:
            self.why_not = "transformers converts this checkpoint's tensors while loading (merged or split)"
            return
        self.ckpt = names  # model name -> checkpoint name
        missing = missing_tensors(model, names)
        if missing:
            self.why_not = f"the checkpoint lacks {len(missing)} of the model's tensors by name, e.g. {missing[0]}"

    def run(self, config, ctx: Context, out_dir: Path, max_shard_size: str | None = None) -> tuple[nn.Module, QuantReport]:
        """Compress into ``out_dir``'s shards; returns the model as the checkpoint describes it (on
        ``meta``, linears swapped for ``GPTQLinear``: what ``save_gptq`` needs for the rest) and the
        report."""
        t0 = time.perf_counter()
        release_free_memory()  # what tokenizing the calibration text left behind
        model = self.model
        found, skipped = int_targets(model, config)
        # Names and shapes only: a module kept in a dict would keep its weights after its block is freed.
        shapes = {n: (*linear_shape(m), getattr(m, "bias", None) is not None) for n, m in found.items()}
        del found
        targets = list(shapes)
        # The output's plan: the same model with every target swapped, on meta.
        planned = copy.deepcopy(model)
        with torch.device("meta"):
            for name, (in_f, out_f, bias) in shapes.items():
                own = config.for_layer(name)  # per-layer grids of a tuned model
                set_module(planned, name, GPTQLinear(in_f, out_f, own.bits, own.group_size, bias))
        saved = as_saved(planned, gptq_tensors(planned, self.dtype))
        if saved is None:  # the same model as in __init__: not reached
            raise RuntimeError("the checkpoint's tensors cannot be written one by one")
        plan, self.out_name = saved
        writer = ShardWriter(out_dir, plan, max_shard_size or gptq_format.MAX_SHARD_SIZE,
                             total_parameters=planned.num_parameters())
        try:
            outside = [n for n in model.state_dict(keep_vars=True) if not n.startswith(self.blocks_name + ".")]
            big = self._embedding_names()
            materialize(model, [n for n in outside if n not in big], self.source, self.ckpt)
            io = _BlockIO(self, writer)
            if isinstance(config, GPTQConfig):
                pruned = any(r.get("method") in UNSTRUCTURED_METHODS
                             for r in getattr(model.config, "pruning", None) or [])
                logs = [asdict(x) for x in gptq_blocks(
                    model, config, ctx.calib, state_dir=ctx.state_dir, resume=ctx.resume, batch_size=ctx.batch_size,
                    keep_zeros=pruned, io=io, device=ctx.device, max_memory=ctx.max_memory)]
            else:
                logs = self._rtn(config, targets, io, writer)
            self._write_outside(writer, plan, targets, config)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        report = QuantReport(config.stage, logs, skipped, time.perf_counter() - t0,
                             {"streamed": {"source_bytes": self.source.nbytes()}})
        return planned, report

    def _embedding_names(self) -> set[str]:
        """Tensors outside the blocks too large to load whole: the embedding matrices."""
        names = set()
        for m in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
            if m is not None and getattr(m, "weight", None) is not None:
                names.add(f"{module_name(self.model, m)}.weight")
        return names

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of ``ids``: the embedding module's own forward on the rows ``ids`` use."""
        emb = self.model.get_input_embeddings()
        name = self.ckpt[f"{module_name(self.model, emb)}.weight"]
        used, inverse = torch.unique(ids, return_inverse=True)
        rows = self.source.gather_rows(name, used, torch.float32)
        weight, padding = emb.weight, getattr(emb, "padding_idx", None)
        emb.weight = nn.Parameter(rows, requires_grad=False)
        emb.padding_idx = None  # an index into the full table; it only matters for gradients
        try:
            return emb(inverse)
        finally:
            emb.weight, emb.padding_idx = weight, padding

    def _rtn(self, config: RTNConfig, targets: list[str], io: BlockIO, writer: ShardWriter) -> list[dict]:
        logs = []
        for i, block in enumerate(tqdm(self.blocks, desc="RTN blocks", unit="block")):
            io.load(i, block)
            prefix = f"{self.blocks_name}.{i}."
            mine = {n: self.model.get_submodule(n) for n in targets if n.startswith(prefix)}
            logs += rtn_layers(self.model, config, mine, progress=False)
            io.done(i, block)
        return logs

    def _write_outside(self, writer: ShardWriter, plan: dict, targets: list[str], config) -> None:
        """The tensors outside the blocks, copied piece by piece (quantized first, for RTN's lm_head)."""
        model, out = self.model, self.out_name
        outside_targets = [n for n in targets if not n.startswith(self.blocks_name + ".")]
        for name in outside_targets:
            layer = model.get_submodule(name)
            materialize(model, [f"{name}.{k}" for k in layer.state_dict(keep_vars=True)], self.source,
                        self.ckpt)
            rtn_layers(model, config, {name: layer}, progress=False)
            for k, v in model.get_submodule(name).state_dict().items():
                writer.write(out[f"{name}.{k}"], stored(v, self.dtype))
            release(model.get_submodule(name))
        done = {f"{n}." for n in outside_targets}
        for name in out:
            if name.startswith(self.blocks_name + ".") or any(name.startswith(p) for p in done):
                continue
            src = self.ckpt.get(name)
            if src is None:  # a buffer computed at construction
                writer.write(out[name], stored(_tensor(model, name), self.dtype))
                continue
            for first, rows in self.source.row_chunks(src):
                writer.write(out[name], stored(rows.to(torch.float32) if rows.is_floating_point() else rows,
                                               self.dtype), first_row=first)


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return model.get_submodule(owner).state_dict(keep_vars=True)[leaf]


class _BlockIO(BlockIO):
    def __init__(self, run: Streamed, writer: ShardWriter):
        self.run = run
        self.writer = writer
        self.embed = run.embed

    def load(self, i: int, block: nn.Module) -> None:
        materialize(self.run.model, names_under(self.run.model, f"{self.run.blocks_name}.{i}"), self.run.source,
                    self.run.ckpt)

    def done(self, i: int, block: nn.Module) -> None:
        prefix = f"{self.run.blocks_name}.{i}."
        for k, v in block.state_dict().items():
            name = self.run.out_name.get(prefix + k)
            if name is not None:
                self.writer.write(name, stored(v, self.run.dtype))
        release(block)
        # glibc keeps freed blocks of a few MB in its heap, fragmented: without this, resident memory
        # grows by most of a block per block (measured: 0.5 -> 1.5 GB over 20 blocks of a 1024-wide Llama).
        release_free_memory()
