"""Running a recipe: in memory (``compress``) or from a model source to a checkpoint folder.

The folder is built in ``.OUT.partial`` and renamed into place only when complete; each stage
that can resume checkpoints into ``_state/stage_N`` there, so ``resume`` continues a killed run.
The checkpoint's format follows from the last stage (GPTQ v1, bitsandbytes, or plain float), and
it carries the recipe that made it (``recipe.yaml``) and a log of every stage (``quant_log.json``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import CalibConfig, IntConfig
from ..data import calibration_tokens, load_documents
from ..errors import UserError
from ..formats.bnb import save_bnb
from ..formats.gptq import divisibility_problems, largest_dividing_group, save_gptq
from ..formats.hf import folder_bytes, load_hf, load_tokenizer, save_hf
from ..loader import quant_method
from ..models import read_config, resolve
from ..nn import GPTQLinear
from ..util import atomic_write_text, partial_dir, staged_output
from .recipe import Recipe, stage_dict
from .stages import Context, QuantReport, handler_for


def compress(
    model: nn.Module,
    recipe: Recipe,
    calib: torch.Tensor | None = None,
    tokenizer=None,
    batch_size: int | None = None,
) -> tuple[nn.Module, list[QuantReport]]:
    """Run every stage of ``recipe`` on ``model``; returns the compressed model (the same object
    unless a stage builds a new one, as bitsandbytes does) and each stage's report.

    Calibration tokens come from ``calib`` or, given the ``tokenizer``, from ``recipe.calibration``.
    """
    if calib is None and recipe.calibrated:
        if tokenizer is None:
            raise UserError("this recipe needs calibration data: pass calib= (token ids) or tokenizer=")
        calib = recipe_tokens(recipe.calibration, tokenizer, model.config)
    reports = []
    for config in recipe.stages:
        model, report = handler_for(config).run(model, config, Context(calib, batch_size=batch_size))
        reports.append(report)
    return model, reports


def recipe_tokens(calib: CalibConfig, tokenizer, hf_config) -> torch.Tensor:
    ctx = getattr(hf_config, "max_position_embeddings", None)
    return calibration_tokens(calib.dataset, tokenizer, calib.nsamples, calib.seqlen, calib.seed,
                              calib.text_field, max_len=ctx)


def compress_to_folder(
    source: str,
    recipe: Recipe,
    out: str | Path,
    force: bool = False,
    resume: bool = False,
    batch_size: int | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Load ``source``, run ``recipe``, write the checkpoint to ``out`` atomically. Returns the summary
    that is also written to ``quant_log.json``."""
    from ..util import check_output

    out = Path(out)
    t0 = time.perf_counter()
    check_output(out, force, resume)
    if recipe.calibrated:  # a bad dataset fails before minutes of loading
        load_documents(recipe.calibration.dataset, "calib", recipe.calibration.text_field)
    folder = resolve(source)
    hf_config = read_config(folder)
    if quant_method(hf_config) not in (None, "gguf"):
        raise UserError(f"{source} is already quantized; compress the original float model")
    tokenizer = load_tokenizer(folder)
    first = handler_for(recipe.stages[0])
    model = None if first.loads_source else load_hf(folder, torch.float32, allow_pickle)
    calib = recipe_tokens(recipe.calibration, tokenizer, hf_config) if recipe.calibrated else None
    resume = resume and partial_dir(out).exists()
    reports: list[QuantReport] = []
    with staged_output(out, force, resume) as tmp:
        for i, config in enumerate(recipe.stages):
            handler = handler_for(config)
            ctx = Context(calib, tmp / "_state" / f"stage_{i}", resume, batch_size,
                          source=folder if model is None else None, allow_pickle=allow_pickle)
            try:
                model, report = handler.run(model, config, ctx)
            except UserError:
                if not any(p.is_file() for p in (tmp / "_state").rglob("*")):
                    shutil.rmtree(tmp)  # a mistake, not a crash: nothing to resume, nothing left behind
                raise
            reports.append(report)
        for f in tmp.glob("*.safetensors"):
            f.unlink()
        save_model(model, tokenizer, tmp, recipe, reports)
        summary = _summary(source, folder, recipe, reports, tmp, time.perf_counter() - t0)
        atomic_write_text(tmp / "quant_log.json", json.dumps(summary, indent=1))
        atomic_write_text(tmp / "recipe.yaml", recipe.to_yaml())
        shutil.rmtree(tmp / "_state", ignore_errors=True)
    return summary


def quantize_to_folder(
    source: str,
    out: str | Path,
    config,
    calib: CalibConfig | None = None,
    force: bool = False,
    resume: bool = False,
    batch_size: int | None = None,
    allow_pickle: bool = False,
) -> dict:
    """The one-stage recipe: what ``llmslim quantize`` runs."""
    recipe = Recipe((config,), calib or CalibConfig())
    return compress_to_folder(source, recipe, out, force, resume, batch_size, allow_pickle)


def save_model(model: nn.Module, tokenizer, out: Path, recipe: Recipe, reports: list[QuantReport]) -> None:
    """Write the model in the format its last stage made."""
    kind = handler_for(recipe.stages[-1]).makes
    if kind == "bnb":
        save_bnb(model, tokenizer, out)
    elif kind == "gptq":
        config = recipe.stages[-1]
        _warn_vllm_group_size(model, config)
        save_gptq(model, tokenizer, out, config, reports[-1].skipped)
    else:
        save_hf(model, tokenizer, out)


def _warn_vllm_group_size(model: nn.Module, config: IntConfig) -> None:
    bad = divisibility_problems(model, config.group_size)
    if bad:
        sizes = sorted({s for _, s in bad})
        g = largest_dividing_group([m.in_features for m in model.modules() if isinstance(m, GPTQLinear)],
                                   config.group_size)
        tqdm.write(f"warning: group size {config.group_size} does not divide the input size of {len(bad)} "
                   f"layers (sizes {sizes}, e.g. {bad[0][0]}): transformers/GPTQModel load this checkpoint, "
                   f"vLLM refuses it; --group-size {g} works everywhere")


def _summary(source: str, folder: str, recipe: Recipe, reports: list[QuantReport], tmp: Path,
             seconds: float) -> dict:
    """quant_log.json: the last stage's facts at the top (what one-stage tools read), every stage below."""
    last, report = recipe.stages[-1], reports[-1]
    return {
        "source": source,
        "method": last.stage,
        "config": stage_dict(last),
        "calibration": dataclasses.asdict(recipe.calibration) if recipe.calibrated else None,
        **report.extra,
        "seconds": round(seconds, 1),
        "quantize_seconds": round(sum(r.seconds for r in reports), 1),
        "bytes_before": folder_bytes(folder) if Path(folder).is_dir() else None,
        "bytes_after": folder_bytes(tmp),
        "skipped": report.skipped,
        "layers": report.layers,
        "stages": [{"stage": c.stage, "seconds": round(r.seconds, 1), "skipped": r.skipped, "layers": r.layers,
                    **r.extra} for c, r in zip(recipe.stages, reports, strict=True)],
    }
