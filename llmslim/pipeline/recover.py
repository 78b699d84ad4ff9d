"""``llmslim recover``: a compressed checkpoint and its original -> the recovered checkpoint.

The one-stage counterpart of a recipe's ``recover`` stage, for a student that was written before:
both models are loaded with ``loader.load``, the stage runs, and the student is written back in its
own format -- a GPTQ checkpoint keeps its ``quantization_config`` (so it loads wherever the input
did), a pruned float model its ``pruning`` record. The folder is built in ``.OUT.partial`` and
renamed into place when complete; ``resume`` continues a killed run from its checkpoints there.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from ..config import CalibConfig, RecoverConfig, RTNConfig
from ..data import calibration_tokens, load_documents
from ..errors import UserError, WriteFailure, is_write_error
from ..formats.gptq import save_gptq
from ..formats.hf import folder_bytes, load_tokenizer, save_hf
from ..loader import load, quant_method
from ..models import read_config, resolve
from ..nn import GPTQLinear
from ..util import atomic_write_text, check_output, partial_dir, staged_output
from .recipe import Recipe, read_recipe, stage_dict
from .stages import Context, handler_for

BLOCK_CALIBRATION = CalibConfig(nsamples=128, seqlen=512)  # when the student's own is unknown


def student_calibration(student: str) -> CalibConfig | None:
    """The calibration the student was made with (its ``recipe.yaml``), if it says."""
    path = Path(resolve(student)) / "recipe.yaml"
    if not path.is_file():
        return None
    try:
        made = read_recipe(path)
    except UserError:
        return None
    return made.calibration if made.calibrated else None


def recover_to_folder(
    student: str,
    teacher: str,
    config: RecoverConfig,
    out: str | Path,
    calibration: CalibConfig | None = None,
    force: bool = False,
    resume: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Recover ``student`` from ``teacher`` into ``out``. Block mode calibrates on ``calibration``
    (default: the student's own, else wiki 128 x 512). Returns what ``quant_log.json`` holds."""
    out = Path(out)
    t0 = time.perf_counter()
    check_output(out, force, resume)
    s_folder, t_folder = resolve(student), resolve(teacher)
    s_config, t_config = read_config(s_folder), read_config(t_folder)
    method = quant_method(s_config)
    if method == "bitsandbytes":
        raise UserError(f"{student} is a bitsandbytes checkpoint: its NF4/FP4/int8 weights cannot be trained here; "
                        "recover a GPTQ or pruned float model")
    if method not in (None, "gguf", "gptq"):
        raise UserError(f"{student}: quantization method {method!r} is not supported (gptq, or a float model)")
    if quant_method(t_config) not in (None, "gguf"):
        raise UserError(f"the teacher {teacher} is quantized: give the original float model as --teacher")
    s_tok, t_tok = load_tokenizer(s_folder), load_tokenizer(t_folder)
    if s_tok.get_vocab() != t_tok.get_vocab():
        raise UserError(f"{student} and {teacher} have different tokenizers: distillation needs the same vocabulary")
    if config.mode == "block":
        _check_same_structure(s_config, t_config)
        calibration = calibration or student_calibration(student) or BLOCK_CALIBRATION
        load_documents(calibration.dataset, "calib", calibration.text_field)  # a bad source fails before loading
    else:
        calibration = None
        load_documents(config.data, "calib", config.text_field)
    calib = None
    if calibration is not None:
        calib = calibration_tokens(calibration.dataset, s_tok, calibration.nsamples, calibration.seqlen,
                                   calibration.seed, calibration.text_field,
                                   max_len=getattr(s_config, "max_position_embeddings", None))
    model, _ = load(student, torch.float32, allow_pickle)
    original, _ = load(teacher, torch.float32, allow_pickle)
    qc = getattr(model.config, "quantization_config", None)
    resume = resume and partial_dir(out).exists()
    try:
        with staged_output(out, force, resume) as tmp:
            ctx = Context(calib, tmp / "_state" / "recover", resume, teacher=lambda: original, tokenizer=s_tok)
            try:
                model, report = handler_for(config).run(model, config, ctx)
            except UserError:
                if not any(p.is_file() for p in (tmp / "_state").rglob("*")):
                    shutil.rmtree(tmp)  # a mistake, not a crash: nothing to resume, nothing left behind
                raise
            for f in tmp.glob("*.safetensors"):
                f.unlink()
            _save(model, s_tok, tmp, qc, config)
            summary = {
                "source": _origin(s_folder) or teacher, "student": student, "teacher": teacher,
                "method": config.stage, "config": stage_dict(config),
                "calibration": None if calibration is None else dataclasses.asdict(calibration),
                **report.extra, "seconds": round(time.perf_counter() - t0, 1),
                "quantize_seconds": round(report.seconds, 1),
                "bytes_before": folder_bytes(s_folder), "bytes_after": folder_bytes(tmp),
                "skipped": [], "layers": report.layers,
            }
            recipe = _combined_recipe(s_folder, config, calibration)
            if recipe is not None:
                atomic_write_text(tmp / "recipe.yaml", recipe.to_yaml())
            atomic_write_text(tmp / "quant_log.json", json.dumps(summary, indent=1))
            shutil.rmtree(tmp / "_state", ignore_errors=True)
    except Exception as e:
        if is_write_error(e):
            raise WriteFailure(f"cannot write {out}: {getattr(e, 'strerror', None) or e}; the work done so far is "
                               f"kept in {partial_dir(out)}: rerun with --resume once that is fixed") from None
        raise
    return summary


def _check_same_structure(s_config, t_config) -> None:
    """What block mode needs and the configs already tell: the same architecture and depth."""
    s_type, t_type = getattr(s_config, "model_type", None), getattr(t_config, "model_type", None)
    if s_type != t_type:
        raise UserError(f"block mode needs a compressed version of the teacher, but the student is a {s_type} model "
                        f"and the teacher a {t_type} one: use --mode e2e (or the right --teacher)")
    for key in ("num_hidden_layers", "n_layer"):
        s, t = getattr(s_config, key, None), getattr(t_config, key, None)
        if s is not None and s != t:
            raise UserError(f"block mode needs the teacher's structure, but the student has {s} decoder blocks and "
                            f"the teacher {t} (depth-pruned?): use --mode e2e")


def _save(model, tokenizer, out: Path, qc, config: RecoverConfig) -> None:
    """The student in its own format: GPTQ with the input's quantization_config, or a float folder."""
    if not any(isinstance(m, GPTQLinear) for m in model.modules()):
        save_hf(model, tokenizer, out)
        return
    qc = dict(qc if isinstance(qc, dict) else qc.to_dict())
    save_gptq(model, tokenizer, out, RTNConfig(bits=int(qc["bits"]), group_size=int(qc["group_size"])))
    # The input's own quantization_config (dynamic rules, desc_act, ... as it was), plus what was done.
    qc["meta"] = {**(qc.get("meta") or {}), "recover": config.mode}
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = qc
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "quantize_config.json", json.dumps(
        {k: v for k, v in qc.items() if k not in ("quant_method", "lm_head")} | {"model_file_base_name": None},
        indent=2))


def _origin(folder: str) -> str | None:
    log = Path(folder) / "quant_log.json"
    try:
        return json.loads(log.read_text()).get("source") if log.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _combined_recipe(folder: str, config: RecoverConfig, calibration: CalibConfig | None) -> Recipe | None:
    """The student's recipe with this stage appended: what ``compress ORIGINAL --recipe`` reproduces.
    None when the student has no readable recipe, or block mode calibrated on other tokens than it did."""
    path = Path(folder) / "recipe.yaml"
    if not path.is_file():
        return None
    try:
        made = read_recipe(path)
    except UserError:
        return None
    if calibration is not None and made.calibrated and made.calibration != calibration:
        return None
    try:
        return Recipe((*made.stages, config), calibration or made.calibration)
    except UserError:
        return None
