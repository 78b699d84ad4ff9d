"""The stage registry: config type -> handler, as torchao's ``quantize_(model, config)`` dispatches.

A handler takes the model (or, for a stage that builds its model while loading, the untouched
source folder), its frozen config and the run's ``Context``, and returns the compressed model
with a report. It also says which kinds of model it takes and makes ("float", "gptq", "bnb"),
so a recipe's order is checked before any work, and whether it needs calibration tokens.
New stages (pruning, recovery, export) plug in by adding one entry to ``HANDLERS``.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import (
    GGUF_MIX_TARGETS,
    REFIT_DEFAULT,
    UNSTRUCTURED_METHODS,
    BnbConfig,
    ExportConfig,
    GPTQConfig,
    IntConfig,
    PruneConfig,
    RecoverConfig,
    RTNConfig,
    TuneConfig,
)
from ..data import calibration_tokens
from ..errors import UserError
from ..formats.gguf import check_exportable, collect_imatrix
from ..formats.gguf_mix import layer_types
from ..formats.hf import from_pretrained, save_hf
from ..grid import GGUF_BLOCK
from ..models import read_config
from ..nn import GPTQLinear, can_pack
from ..quant.bnb import bnb_quantization_config, plan_layers, require_bnb, storage_dtype
from ..quant.distill import distill
from ..quant.prune import magnitude_layers, prune_blocks
from ..quant.reconstruct import recover_blocks
from ..quant.rtn import rtn_layers
from ..quant.sequential import gptq_blocks, gptq_lm_head, resolve_forward_dtype
from ..quant.sparsity import sparsity_report
from ..quant.structured import depth_prune, width_prune
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
    device: str = "cpu"  # where block forwards and solvers run (resolved: cpu, cuda, cuda:N)
    max_memory: float | None = None  # bytes the block driver may use (None: a share of what is available)
    teacher: Callable[[], nn.Module] | None = None  # the model before any stage (loaded on first call)
    tokenizer: Any = None
    earlier: tuple = ()  # configs of the stages that ran before this one


Run = Callable[[nn.Module | None, Any, Context], tuple[nn.Module, QuantReport]]


@dataclass(frozen=True)
class Handler:
    run: Run
    takes: frozenset[str]  # kinds of input model: "float", "gptq", "bnb"
    makes: str
    calibrated: bool | Callable[[Any], bool]  # needs ``Context.calib`` (a function: depends on the config)
    loads_source: bool = False  # given ``Context.source``, it needs no model loaded beforehand
    needs_teacher: bool = False  # reads ``Context.teacher``


SAME = "same"  # a ``makes`` for stages that keep the kind of model they are given (recover)


def int_targets(model: nn.Module, config: IntConfig) -> tuple[dict[str, nn.Module], list[str]]:
    """Linears to quantize and linears left in float because the GPTQ format can't hold them."""
    block = GGUF_BLOCK if config.gguf_grid else 1  # a GGUF grid needs whole blocks of 32 inputs
    targets, skipped = select_layers(model, config.layers, lambda i, o: can_pack(i, o, config.bits) and i % block == 0)
    for name in skipped:
        why = f"pack at {config.bits} bits" if block == 1 else f"fit {config.target} (blocks of {block} inputs)"
        tqdm.write(f"note: {name} kept in float: its shape does not {why}")
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
    if config.gguf_grid in GGUF_MIX_TARGETS:  # each layer on the type llama-quantize gives it
        config = layer_types(model, config)
    _, skipped = int_targets(model, config)
    # A model pruned before keeps its zeros (GPTQ's updates would fill them in): prune-then-quantize.
    pruned = any(r.get("method") in UNSTRUCTURED_METHODS for r in getattr(model.config, "pruning", None) or [])
    logs = [asdict(x) for x in gptq_blocks(model, config, ctx.calib, state_dir=ctx.state_dir, resume=ctx.resume,
                                            batch_size=ctx.batch_size, keep_zeros=pruned, device=ctx.device,
                                            max_memory=ctx.max_memory)]
    if config.layers.quantize_lm_head and not isinstance(model.get_output_embeddings(), GPTQLinear):
        logs.append(gptq_lm_head(model, config, ctx.calib, ctx.batch_size))
    return model, QuantReport(config.stage, logs, skipped, time.perf_counter() - t0)


def run_tune(model: nn.Module, config: TuneConfig, ctx: Context) -> tuple[nn.Module, QuantReport]:
    """Per-layer grids for a budget (``pipeline.tune``: measured sensitivities, exact allocation), then
    GPTQ with them. As a recipe stage the result is the prediction; ``llmslim tune`` also verifies it
    on held-out text and steps up when it misses."""
    from .tune import tune_stage_config

    if ctx.calib is None:
        raise UserError("tune needs calibration data (--calib)")
    t0 = time.perf_counter()
    gptq, facts = tune_stage_config(model, config, ctx.calib, ctx.batch_size, ctx.device, ctx.max_memory)
    model, report = run_gptq(model, gptq, dataclasses.replace(ctx, state_dir=None, resume=False))
    report.stage, report.seconds = config.stage, time.perf_counter() - t0
    report.extra["tune"] = facts
    return model, report


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


def run_export(model: nn.Module, config: ExportConfig, ctx: Context) -> tuple[nn.Module, QuantReport]:
    """Check, before anything is written, that every tensor can be exported as asked; the file
    itself is written by ``formats.gguf.save_gguf`` when the recipe's output is saved."""
    t0 = time.perf_counter()
    if config.imatrix:
        if ctx.calib is None:
            raise UserError("--imatrix needs calibration data (--calib)")
        # Read by formats.gguf.save_gguf when the file is written (after this stage).
        model.gguf_imatrix = collect_imatrix(model, ctx.calib, ctx.batch_size)
    layers = check_exportable(model, config)
    return model, QuantReport(config.stage, layers, [], time.perf_counter() - t0)


def run_prune(model: nn.Module, config: PruneConfig, ctx: Context) -> tuple[nn.Module, QuantReport]:
    """Pruning in place; the model stays float. What was done is recorded in ``config.json``
    (``pruning``, one entry per prune stage) beside the measured sparsity and parameter count."""
    if config.calibrated and ctx.calib is None:
        raise UserError(f"--method {config.method} needs calibration data (--calib)")
    t0 = time.perf_counter()
    before = sparsity_report(model)["parameters"]
    extra: dict = {}
    if config.method == "depth":
        extra = depth_prune(model, config.drop_blocks, config.importance, ctx.calib, ctx.batch_size,
                            resolve_forward_dtype(config.forward_dtype, ctx.device))
        logs = []
    elif config.method == "width":
        extra = width_prune(model, config.mlp_keep, config.heads_keep, ctx.calib, ctx.batch_size,
                            resolve_forward_dtype(config.forward_dtype, ctx.device))
        logs = []
    elif config.method == "magnitude":
        logs = [asdict(x) for x in magnitude_layers(model, config)]
    else:
        logs = [asdict(x) for x in prune_blocks(model, config, ctx.calib, ctx.state_dir, ctx.resume, ctx.batch_size,
                                                device=ctx.device, max_memory=ctx.max_memory)]
    measured = sparsity_report(model)
    own = [k for k in _PRUNE_OWN[config.method] if k != "act_order" or config.n_m]  # act-order: N:M sweeps only
    record = {"method": config.method, **{k: v for k, v in asdict(config).items() if k in own},
              **({"refit_iters": config.refit} if config.method in REFIT_DEFAULT else {}),
              "sparsity_measured": measured["sparsity"], "nm_measured": measured["nm"],
              "parameters": [before, measured["parameters"]],
              **{k: v for k, v in extra.items() if k not in ("kept", "scores")}}
    model.config.pruning = [*(getattr(model.config, "pruning", None) or []), record]
    report = QuantReport(config.stage, logs, [], time.perf_counter() - t0, {"pruning": record | extra})
    return model, report


def run_recover(model: nn.Module, config: RecoverConfig, ctx: Context) -> tuple[nn.Module, QuantReport]:
    """Recovery from the model before compression (``ctx.teacher``): block by block on the calibration
    tokens, or end to end on ``config.data``. The model keeps its kind (GPTQ stays GPTQ, same codes
    format; a pruned model keeps its zeros)."""
    if ctx.teacher is None:
        raise UserError("recover needs the original model as the teacher (llmslim recover STUDENT --teacher ORIGINAL)")
    t0 = time.perf_counter()
    teacher = ctx.teacher()
    pruned = was_pruned(model, ctx.earlier)
    if config.mode == "block":
        if ctx.calib is None:
            raise UserError("block recovery needs calibration data (the recipe's calibration)")
        logs = [asdict(x) for x in recover_blocks(model, teacher, ctx.calib, config, ctx.state_dir, ctx.resume,
                                                  pruned=pruned)]
        done = [x for x in logs if x["trained"]]
        summary = {"mode": "block", "blocks": len(logs), "blocks_recovered": sum(x["kept"] == "recovered" for x in logs),
                   "loss_before": sum(x["loss_before"] for x in done),
                   "loss_after": sum(min(x["loss_before"], x["loss_after"]) for x in done)}
    else:
        if ctx.tokenizer is None:
            raise UserError("end-to-end recovery needs the tokenizer (to read --data)")
        train, val = recover_tokens(config, ctx.tokenizer, getattr(model.config, "max_position_embeddings", None))
        r = distill(model, teacher, train, val, config, ctx.state_dir, ctx.resume, pruned=pruned)
        logs, summary = r.history, {"mode": "e2e", **asdict(r)}
        summary.pop("history")
    return model, QuantReport(config.stage, logs, [], time.perf_counter() - t0, {"recover": summary})


VAL_WINDOWS = 4  # end-to-end recovery: windows that pick the best student (training text, not held out)


def recover_tokens(config: RecoverConfig, tokenizer, max_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation windows for end-to-end recovery, from the calibration part of ``data``
    (the first 80% of a built-in corpus: held-out text is never trained on)."""
    seqlen = min(config.seqlen, max_len or config.seqlen)
    n = -(-config.tokens // seqlen)
    ids = calibration_tokens(config.data, tokenizer, n + VAL_WINDOWS, seqlen, config.seed, config.text_field)
    return ids[:n], ids[n:]


def was_pruned(model: nn.Module, earlier: tuple = ()) -> bool:
    """Whether the model's exact zeros are pruned weights: from its pruning record, its GPTQ config
    (joint sparsity), or the stages that ran before in this recipe."""
    if any(r.get("method") in UNSTRUCTURED_METHODS for r in getattr(model.config, "pruning", None) or []):
        return True
    qc = getattr(model.config, "quantization_config", None)
    meta = ((qc if isinstance(qc, dict) else {}) or {}).get("meta") or {}
    if meta.get("sparsity") or meta.get("nm"):
        return True
    return any((isinstance(c, PruneConfig) and c.method in UNSTRUCTURED_METHODS)
               or (isinstance(c, GPTQConfig) and c.joint) for c in earlier)


_PRUNE_OWN = {"sparsegpt": ("sparsity", "nm", "act_order"), "wanda": ("sparsity", "nm"), "magnitude": ("sparsity", "nm"),
              "depth": ("drop_blocks", "importance"), "width": ("mlp_keep", "heads_keep")}


def needs_calibration(config: object) -> bool:
    """Whether a stage reads calibration tokens (for pruning it depends on the method)."""
    calibrated = handler_for(config).calibrated
    return calibrated(config) if callable(calibrated) else calibrated


HANDLERS: dict[type, Handler] = {
    PruneConfig: Handler(run_prune, frozenset({"float"}), "float", calibrated=lambda c: c.calibrated),
    ExportConfig: Handler(run_export, frozenset({"gptq", "float"}), "gguf", calibrated=lambda c: c.imatrix),
    RTNConfig: Handler(run_rtn, frozenset({"float"}), "gptq", calibrated=False),
    GPTQConfig: Handler(run_gptq, frozenset({"float"}), "gptq", calibrated=True),
    TuneConfig: Handler(run_tune, frozenset({"float"}), "gptq", calibrated=True),
    BnbConfig: Handler(run_bnb, frozenset({"float"}), "bnb", calibrated=False, loads_source=True),
    RecoverConfig: Handler(run_recover, frozenset({"gptq", "float"}), SAME, calibrated=lambda c: c.mode == "block",
                           needs_teacher=True),
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
