"""The stage registry: config type -> handler, as torchao's ``quantize_(model, config)`` dispatches.

A handler takes the model (or, for a stage that builds its model while loading, the untouched
source folder), its frozen config and the run's ``Context``, and returns the compressed model
with a report. It also says which kinds of model it takes and makes ("float", "gptq", "bnb"),
so a recipe's order is checked before any work, and whether it needs calibration tokens.
New stages (pruning, recovery, export) plug in by adding one entry to ``HANDLERS``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import BnbConfig, GPTQConfig, IntConfig, RTNConfig
from ..errors import UserError
from ..formats.hf import from_pretrained, save_hf
from ..models import read_config
from ..nn import GPTQLinear, can_pack
from ..quant.bnb import bnb_quantization_config, plan_layers, require_bnb, storage_dtype
from ..quant.rtn import rtn_layers
from ..quant.sequential import gptq_blocks, gptq_lm_head
from ..quant.walk import select_layers


@dataclass
class QuantReport:
    stage: str
    layers: list = field(default_factory=list)  # per-layer logs (dicts)
    skipped: list[str] = field(default_factory=list)  # layers left in float (shape or filter)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # stage-specific facts (library versions, ...)


@dataclass
class Context:
    """What a stage may need besides the model and its config."""

    calib: torch.Tensor | None = None  # calibration token ids [nsamples, seqlen]
    state_dir: Path | None = None  # where a resumable stage checkpoints its progress
    resume: bool = False
    batch_size: int | None = None  # calibration samples per forward (None: automatic)
    source: str | None = None  # folder of the input model while no stage has changed it
    allow_pickle: bool = False


Run = Callable[[nn.Module | None, Any, Context], tuple[nn.Module, QuantReport]]


@dataclass(frozen=True)
class Handler:
    run: Run
    takes: frozenset[str]  # kinds of input model: "float", "gptq", "bnb"
    makes: str
    calibrated: bool  # needs ``Context.calib``
    loads_source: bool = False  # given ``Context.source``, it needs no model loaded beforehand


def int_targets(model: nn.Module, config: IntConfig) -> tuple[dict[str, nn.Module], list[str]]:
    """Linears to quantize and linears left in float because the GPTQ format can't hold them."""
    targets, skipped = select_layers(model, config.layers, lambda i, o: can_pack(i, o, config.bits))
    for name in skipped:
        tqdm.write(f"note: {name} kept in float: its shape does not pack at {config.bits} bits")
    return targets, skipped


def run_rtn(model: nn.Module, config: RTNConfig, ctx: Context) -> tuple[nn.Module, QuantReport]:
    t0 = time.perf_counter()
    targets, skipped = int_targets(model, config)
    logs = rtn_layers(model, config, targets)
    return model, QuantReport(config.stage, logs, skipped, time.perf_counter() - t0)


def run_gptq(model: nn.Module, config: GPTQConfig, ctx: Context) -> tuple[nn.Module, QuantReport]:
    if ctx.calib is None:
        raise UserError("GPTQ needs calibration data (--calib)")
    t0 = time.perf_counter()
    _, skipped = int_targets(model, config)
    logs = [asdict(x) for x in gptq_blocks(model, config, ctx.calib, state_dir=ctx.state_dir, resume=ctx.resume,
                                            batch_size=ctx.batch_size)]
    if config.layers.quantize_lm_head and not isinstance(model.get_output_embeddings(), GPTQLinear):
        logs.append(gptq_lm_head(model, config, ctx.calib, ctx.batch_size))
    return model, QuantReport(config.stage, logs, skipped, time.perf_counter() - t0)


def run_bnb(model: nn.Module | None, config: BnbConfig, ctx: Context) -> tuple[nn.Module, QuantReport]:
    """bitsandbytes quantizes while transformers loads a float folder: the untouched source when
    this is the first stage, else the model written to a scratch folder first."""
    bnb = require_bnb()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmslim-bnb-") as scratch:
        folder = ctx.source
        if folder is None:
            save_hf(model, None, Path(scratch))
            folder = scratch
        hf_config = read_config(folder)
        layers, skipped, notes = plan_layers(hf_config, config)
        for note in notes:
            tqdm.write(note)
        if not layers:
            raise UserError("no linear layer is left to quantize; check --include/--exclude")
        quantized = from_pretrained(folder, dtype=storage_dtype(config),
                                    use_safetensors=not ctx.allow_pickle or None,
                                    quantization_config=bnb_quantization_config(config, skipped))
    report = QuantReport(config.stage, layers, skipped, time.perf_counter() - t0,
                         {"library": {"bitsandbytes": bnb.__version__}})
    return quantized, report


HANDLERS: dict[type, Handler] = {
    RTNConfig: Handler(run_rtn, frozenset({"float"}), "gptq", calibrated=False),
    GPTQConfig: Handler(run_gptq, frozenset({"float"}), "gptq", calibrated=True),
    BnbConfig: Handler(run_bnb, frozenset({"float"}), "bnb", calibrated=False, loads_source=True),
}


def handler_for(config: object) -> Handler:
    try:
        return HANDLERS[type(config)]
    except KeyError:
        raise UserError(f"unsupported stage config {type(config).__name__}; "
                        f"known: {', '.join(t.__name__ for t in HANDLERS)}") from None


def quantize(
    model: nn.Module,
    config: IntConfig | BnbConfig,
    calib: torch.Tensor | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
    batch_size: int | None = None,
) -> QuantReport:
    """Quantize ``model`` in place with one stage config; returns the stage's report.

    bitsandbytes builds a new model while loading, so it cannot work in place: use
    ``llmslim.compress``, which returns the model.
    """
    handler = handler_for(config)
    if handler.loads_source:
        raise UserError(f"{config.stage} builds a new model; use llmslim.compress(model, recipe), "
                        "which returns it")
    _, report = handler.run(model, config, Context(calib, state_dir, resume, batch_size))
    return report
