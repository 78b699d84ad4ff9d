"""Running a recipe: in memory (``compress``) or from a model source to a checkpoint folder.

The folder is built in ``.OUT.partial`` and renamed into place only when complete; each stage
that can resume checkpoints into ``_state/stage_N`` there, so ``resume`` continues a killed run.
The checkpoint's format follows from the last stage (GPTQ v1, bitsandbytes, or plain float), and
it carries the recipe that made it (``recipe.yaml``) and a log of every stage (``quant_log.json``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import GGUF_MIX_TARGETS, CalibConfig, ExportConfig, IntConfig
from ..data import calibration_tokens, load_documents
from ..errors import UserError, WriteFailure, is_write_error
from ..formats.bnb import save_bnb
from ..formats.gguf import check_architecture, checkpoint_grid_problem, llama_cpp_dir, save_gguf
from ..formats.gptq import divisibility_problems, largest_dividing_group, save_gptq
from ..formats.hf import folder_bytes, load_hf, load_tokenizer, save_hf
from ..grid import GGUF_GRIDS
from ..loader import load, quant_method, quantization_config
from ..models import read_config, resolve
from ..nn import GPTQLinear
from ..util import atomic_write_text, map_large_allocations, partial_dir, staged_output
from .recipe import Recipe, stage_dict
from .stages import SAME, Context, QuantReport, handler_for


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
    # A recover stage learns from the model as it was before the first stage.
    teacher = copy.deepcopy(model) if any(handler_for(c).needs_teacher for c in recipe.stages) else None
    reports = []
    for i, config in enumerate(recipe.stages):
        ctx = Context(calib, batch_size=batch_size, teacher=None if teacher is None else lambda: teacher,
                      tokenizer=tokenizer, earlier=recipe.stages[:i])
        model, report = handler_for(config).run(model, config, ctx)
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
    max_memory: float | None = None,
    device: str = "cpu",
    stream: bool | None = None,
) -> dict:
    """Load ``source``, run ``recipe``, write the checkpoint to ``out`` atomically. Returns the summary
    that is also written to ``quant_log.json``.

    A recipe of one GPTQ or RTN stage on a local safetensors model is streamed (``pipeline.stream``:
    one decoder block in memory at a time, the same bytes) unless ``stream`` is False; ``max_memory``
    (bytes) bounds the block driver, ``device`` (auto, cpu, cuda) is where it computes.
    """
    from ..quant.sequential import resolve_device
    from ..util import check_output

    out = Path(out)
    t0 = time.perf_counter()
    check_output(out, force, resume)
    device = resolve_device(device)
    # Tensors of MBs are made and freed thousands of times here (a block's weights, the solvers'
    # temporaries). From glibc's heap, where a freed hole fits, how many holes stay resident depends
    # on what the heap held before: the same streamed RTN of 40 blocks peaked at 553-627 MB, and 40
    # blocks over 10 grew 140 MB in one CI run. Pages of their own, from before anything loads, make
    # every run peak at 490 MB (eval/scale.md, session 14).
    map_large_allocations()
    if recipe.calibrated:  # a bad dataset fails before minutes of loading
        load_documents(recipe.calibration.dataset, "calib", recipe.calibration.text_field)
    folder = resolve(source)
    hf_config = read_config(folder)
    if quant_method(hf_config) not in (None, "gguf"):
        raise UserError(f"{source} is already quantized; compress the original float model")
    tokenizer = load_tokenizer(folder)
    first = handler_for(recipe.stages[0])
    streamed = _streamed(recipe, folder, hf_config, stream)  # opens every shard's header: bad files fail now
    model = None if first.loads_source or streamed else load_hf(folder, torch.float32, allow_pickle)
    calib = recipe_tokens(recipe.calibration, tokenizer, hf_config) if recipe.calibrated else None
    resume = resume and partial_dir(out).exists()
    # The teacher of a recover stage: the source model, loaded when that stage starts.
    teacher = functools.cache(lambda: load_hf(folder, torch.float32, allow_pickle).eval())
    if handler_for(recipe.stages[-1]).makes == "gguf":
        base = Context(calib, None, resume, batch_size, source=folder, allow_pickle=allow_pickle, teacher=teacher,
                       tokenizer=tokenizer)
        return _compress_to_gguf(source, folder, model, tokenizer, recipe, base, out, t0)
    try:
        with staged_output(out, force, resume) as tmp:
            base = Context(calib, None, resume, batch_size, source=folder, allow_pickle=allow_pickle, teacher=teacher,
                           tokenizer=tokenizer, device=device, max_memory=max_memory)
            for f in [*tmp.glob("*.safetensors"), *tmp.glob("model.safetensors.index.json")]:
                f.unlink()  # weights of an interrupted run: rewritten whole
            if streamed:
                model, reports = _run_streamed(streamed, recipe, base, tmp)
            else:
                model, reports = _run_stages(model, recipe, base, tmp)
            save_model(model, tokenizer, tmp, recipe, reports, weights_written=streamed is not None)
            summary = _summary(source, folder, recipe, reports, tmp, time.perf_counter() - t0)
            atomic_write_text(tmp / "quant_log.json", json.dumps(summary, indent=1))
            atomic_write_text(tmp / "recipe.yaml", recipe.to_yaml())
            shutil.rmtree(tmp / "_state", ignore_errors=True)
    except Exception as e:
        if is_write_error(e):
            raise WriteFailure(f"cannot write {out}: {getattr(e, 'strerror', None) or e}; the work done so far is "
                               f"kept in {partial_dir(out)}: rerun with --resume once that is fixed") from None
        raise
    return summary


def _streamed(recipe: Recipe, folder: str, hf_config, stream: bool | None):
    from .stream import prepare

    if stream is False:
        return None
    streamed = prepare(recipe, folder, hf_config)
    if isinstance(streamed, str):
        if stream:
            raise UserError(f"cannot compress {folder} block by block: {streamed}")
        return None
    return streamed


def _run_streamed(streamed, recipe: Recipe, base: Context, tmp: Path):
    ctx = dataclasses.replace(base, state_dir=tmp / "_state" / "stage_0", source=None)
    try:
        model, report = streamed.run(recipe.stages[0], ctx, tmp)
    except UserError:
        if not any(p.is_file() for p in (tmp / "_state").rglob("*")):
            shutil.rmtree(tmp)  # a mistake, not a crash: nothing to resume, nothing left behind
        raise
    return model, [report]


def _run_stages(model: nn.Module | None, recipe: Recipe, base: Context, tmp: Path):
    """Each stage with its own state folder; ``Context.source`` only while no stage has run."""
    reports: list[QuantReport] = []
    for i, config in enumerate(recipe.stages):
        ctx = dataclasses.replace(base, state_dir=tmp / "_state" / f"stage_{i}",
                                  source=base.source if model is None else None, earlier=recipe.stages[:i])
        try:
            model, report = handler_for(config).run(model, config, ctx)
        except UserError:
            if not any(p.is_file() for p in (tmp / "_state").rglob("*")):
                shutil.rmtree(tmp)  # a mistake, not a crash: nothing to resume, nothing left behind
            raise
        reports.append(report)
    return model, reports


def _compress_to_gguf(source: str, folder: str, model, tokenizer, recipe: Recipe, base: Context, out: Path,
                      t0: float) -> dict:
    """A recipe ending in ``export`` makes one file: the stages keep their resumable state in
    ``.OUT.partial`` as usual, and the file appears in one rename once it is complete (it carries
    the recipe as ``llmslim.recipe``)."""
    from ..util import atomic_path

    check_architecture((getattr(model.config, "architectures", None) or [type(model).__name__])[0]
                       if model is not None else (read_config(folder).architectures or [None])[0])
    llama_cpp_dir()  # missing conversion code fails now, not after the stages' work
    part = partial_dir(out)
    if part.exists() and not base.resume:
        shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    model, reports = _run_stages(model, recipe, base, part)
    try:
        with atomic_path(out) as tmp:
            written = save_gguf(model, tokenizer, tmp, recipe.stages[-1], source=source, recipe_yaml=recipe.to_yaml(),
                                tokenizer_dirs=(folder,))
    except OSError as e:
        raise WriteFailure(f"cannot write {out}: {e.strerror or e}; the stages' work is kept in {part}: rerun with "
                           "--resume once that is fixed") from None
    summary = _summary(source, folder, recipe, reports, part, time.perf_counter() - t0)
    summary["bytes_after"] = out.stat().st_size
    summary["gguf"] = written
    shutil.rmtree(part, ignore_errors=True)
    return summary


def export_to_file(source: str, config: ExportConfig, out: str | Path, force: bool = False,
                   allow_pickle: bool = False, calib: CalibConfig | None = None) -> dict:
    """``llmslim export``: a float model or a GPTQ checkpoint -> one GGUF file, written atomically."""
    from ..util import atomic_path, check_output

    out = Path(out)
    check_output(out, force)
    folder = resolve(source)
    method = quant_method(read_config(folder))
    if method == "bitsandbytes":
        raise UserError(f"{source} is a bitsandbytes checkpoint: NF4/FP4/LLM.int8 have no GGUF equivalent; export the "
                        f"float model, or a GPTQ checkpoint made with --target gguf-{config.type}")
    if method not in (None, "gguf", "gptq"):
        raise UserError(f"{source}: quantization method {method!r} cannot be exported (gptq or float)")
    if method == "gptq":  # the checkpoint's grid, from config.json: refused before the model is loaded
        problem = checkpoint_grid_problem(quantization_config(read_config(folder)), config.type)
        if problem:
            raise UserError(f"{source}'s quantized layers cannot be written as {config.type.upper()} without "
                            f"rounding them again: {problem}; {_refit_hint(config.type)}")
    check_architecture((read_config(folder).architectures or [None])[0])
    llama_cpp_dir()
    t0 = time.perf_counter()
    model, tokenizer = load(source, torch.float32, allow_pickle)
    calib = (calib or CalibConfig()) if config.imatrix else None  # --imatrix: its calibration text
    tokens = recipe_tokens(calib, tokenizer, model.config) if calib else None
    model, report = handler_for(config).run(model, config, Context(tokens, source=folder))
    # Provenance: the recipe that made a checkpoint, plus this export; its source (a GGUF model's
    # tokenizer metadata is carried over unchanged).
    origin, recipe_yaml = source, Recipe((config,), calib or CalibConfig()).to_yaml()
    log, made_by = Path(folder) / "quant_log.json", Path(folder) / "recipe.yaml"
    if log.is_file():
        origin = json.loads(log.read_text()).get("source") or source
    if made_by.is_file():
        from .recipe import read_recipe

        try:
            made = read_recipe(made_by)
            recipe_yaml = Recipe((*made.stages, config), made.calibration).to_yaml()
        except UserError:
            pass  # an unreadable recipe.yaml only costs the provenance
    # The tokenizer's original files: from the model the checkpoint was made from, when it is local.
    dirs = [folder]
    if origin != source and Path(str(origin)).expanduser().is_dir():
        dirs.insert(0, str(Path(str(origin)).expanduser()))
    with atomic_path(out) as tmp:
        written = save_gguf(model, tokenizer, tmp, config, source=origin, recipe_yaml=recipe_yaml,
                            tokenizer_dirs=tuple(dirs))
    return {"source": source, "out": str(out), "type": config.type, "bytes_before": folder_bytes(folder),
            "bytes_after": out.stat().st_size, "seconds": round(time.perf_counter() - t0, 1),
            "plan": report.layers, **written}


def _refit_hint(kind: str) -> str:
    """What makes a GPTQ-quality file of type ``kind`` from the original model."""
    if kind in ("f16", "f32"):
        return "use --type f32 (exact) or the checkpoint's own grid (q4_0/q8_0)"
    if kind in GGUF_GRIDS or kind in GGUF_MIX_TARGETS:
        return (f"re-fit on it: llmslim quantize ORIGINAL_MODEL --method gptq --target gguf-{kind} "
                "--out model.gguf")
    return f"export the original float model as {kind} (llama.cpp's rounding), or this checkpoint as q4_0/q8_0"


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


def save_model(model: nn.Module, tokenizer, out: Path, recipe: Recipe, reports: list[QuantReport],
               weights_written: bool = False) -> None:
    """Write the model in the format its last stage made (stages that keep the kind, such as recover, make none).
    ``weights_written``: a streamed run has written the GPTQ shards already; the rest is written here."""
    made = [i for i, c in enumerate(recipe.stages) if handler_for(c).makes != SAME]
    kind = handler_for(recipe.stages[made[-1]]).makes if made else "float"
    if kind == "bnb":
        save_bnb(model, tokenizer, out)
    elif kind == "gptq":
        config = recipe.stages[made[-1]]
        _warn_vllm_group_size(model, config)
        save_gptq(model, tokenizer, out, config, reports[made[-1]].skipped, weights_written=weights_written)
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
