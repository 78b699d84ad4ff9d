"""Tune to a budget, verify on held-out text, step up when missed: what ``llmslim tune`` runs."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import Budget, CalibConfig, TuneConfig
from ..data import eval_text, load_documents
from ..errors import UserError
from ..formats.hf import load_hf, load_tokenizer
from ..loader import load, quant_method
from ..metrics.ppl import perplexity
from ..models import read_config, resolve
from ..nn import decoded_weights
from ..pipeline.recipe import Recipe
from ..pipeline.run import compress_to_folder, recipe_tokens
from ..pipeline.tune import cache_key, cache_path, float_bytes, front, plan, sensitivities, uniform_points
from ..util import atomic_write_text, check_output, staged_output
from .report import write_report

SAFETY = 0.9  # a retry aims this far inside the budget, scaled by how far off the prediction was


@dataclass
class Attempt:
    internal: float  # the allocation's target (quality budgets: a calibrated KL)
    predicted_kl: float  # calibrated (``Calibration``): what the held-out KL is expected to be
    predicted_sum: float  # the layers' predicted KL increases, summed
    predicted_bytes: int
    bpw: float
    measured_kl: float
    perplexity: float
    baseline_perplexity: float
    measured_bytes: int
    met: bool
    seconds: float


@dataclass
class TuneResult:
    budget: str
    met: bool
    attempts: list[Attempt] = field(default_factory=list)
    choice: dict[str, str] = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)


def measured_value(budget: Budget, a: Attempt) -> float:
    """The measured quantity the budget bounds."""
    return {"kl": a.measured_kl, "ppl": a.perplexity / a.baseline_perplexity - 1, "size": a.measured_bytes,
            "bpw": a.bpw}[budget.kind]


def next_target(budget: Budget, a: Attempt) -> float:
    """A tighter allocation target after a miss. Quality: the prediction was off by the factor
    measured / predicted, so aim at budget x predicted / measured (in the KL's units: ppl=+x% is
    ln(1 + x) against ln(ppl ratio)), with a margin and at least that much below the last target.
    Size: the last target less the overshoot."""
    if budget.kind == "size":
        return a.internal - (a.measured_bytes - budget.value) - 0.001 * budget.value
    if budget.kind == "bpw":
        return a.internal * budget.value / a.bpw * SAFETY
    allowed, measured = ((math.log1p(budget.value), math.log(a.perplexity / a.baseline_perplexity))
                         if budget.kind == "ppl" else (budget.value, a.measured_kl))
    calibrated = allowed * a.predicted_kl / max(measured, 1e-300)
    return SAFETY * min(calibrated, a.internal)


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def tune_to_folder(
    source: str,
    config: TuneConfig,
    out: str | Path,
    calib: CalibConfig,
    eval_source: str = "wiki",
    eval_windows: int = 44,
    eval_seqlen: int = 1024,
    max_steps: int = 2,
    force: bool = False,
    batch_size: int | None = None,
    device: str = "cpu",
    log=print,
) -> TuneResult:
    """Tune ``source`` to ``config.budget`` into ``out`` (the checkpoint plus tune.json, tune.md,
    tune.png). The held-out text is ``eval_source``'s evaluation part; each miss triggers at most
    ``max_steps`` re-solves with a tighter target."""
    out = Path(out)
    budget = config.target_budget
    check_output(out, force)
    if max_steps < 0:
        raise UserError(f"--max-steps must be >= 0, got {max_steps}")
    load_documents(calib.dataset, "calib", calib.text_field)
    if Path(eval_source).expanduser().exists() and Path(eval_source).resolve() == Path(calib.dataset).resolve():
        raise UserError(f"--eval-text {eval_source} is the calibration text: verification needs held-out text "
                        "(a built-in corpus keeps its last 20% apart, e.g. --eval-text wiki)")
    folder = resolve(source)
    hf_config = read_config(folder)
    if quant_method(hf_config) not in (None, "gguf"):
        raise UserError(f"{source} is already quantized; tune the original float model")
    text = eval_text(eval_source, calib.text_field)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(folder)
    model = load_hf(folder, torch.float32).eval()
    tokens = recipe_tokens(calib, tokenizer, hf_config)
    key = cache_key(folder, config, calib)
    s, cached = sensitivities(model, config, tokens, key, batch_size, device)
    log(f"sensitivities: {len(s.layers)} layers x {len(config.space)} candidates "
        + (f"(cached: {cache_path(key)})" if cached else f"measured in {sum(s.seconds.values()):.0f} s"))
    cal = s.calibration
    log("calibration: " + "; ".join(f"{p['setting']} predicted sum {p['predicted']:.4g}, measured KL "
                                     f"{p['measured']:.4g}" for p in cal.points)
        + f" on {cal.tokens} calibration tokens" + (" kept out of the pass" if cal.unseen else "")
        + f" -> KL = {cal.a:.3g} x sum^{cal.b:.3g}")
    fixed = float_bytes(model, set(s.shapes))
    result = TuneResult(str(budget), False, sensitivity={"cached": cached, "seconds": s.seconds, "cache": str(
        cache_path(key)), "fisher_tokens": s.fisher_tokens, "calibration": asdict(s.calibration)})
    work = out.parent / f".{out.name}.tune"
    shutil.rmtree(work, ignore_errors=True)
    internal = None
    final = None
    for step in range(max_steps + 1):
        p = plan(s, budget, config, fixed, internal)
        t1 = time.perf_counter()
        attempt_dir = work / f"attempt-{step}"
        compress_to_folder(source, Recipe((p.config,), calib), attempt_dir, force=True, batch_size=batch_size,
                           device=device)
        qmodel, _ = load(str(attempt_dir))
        with decoded_weights(qmodel):
            r = perplexity(qmodel, tokenizer, text, seqlen=eval_seqlen, max_tokens=eval_windows * eval_seqlen,
                           baseline=(model, tokenizer))
        del qmodel
        a = Attempt(p.internal, p.predicted_kl, p.predicted_sum, p.predicted_bytes, p.bpw, r["divergence"]["kl_mean"],
                    r["perplexity"], r["divergence"]["baseline_perplexity"], weights_bytes(attempt_dir), False,
                    round(time.perf_counter() - t1, 1))
        a.met = measured_value(budget, a) <= budget.value
        result.attempts.append(a)
        final, result.choice = attempt_dir, p.choice
        log(f"attempt {step + 1}: predicted KL {a.predicted_kl:.4f}, measured KL {a.measured_kl:.4f} on "
            f"{r['tokens_scored']} held-out tokens; perplexity {a.perplexity:.3f} (original {a.baseline_perplexity:.3f}); "
            f"{a.measured_bytes / 1e6:.1f} MB (predicted {a.predicted_bytes / 1e6:.1f}), {a.bpw:.2f} bits/weight: "
            + ("budget met" if a.met else f"budget {budget} MISSED"))
        if a.met:
            break
        if step < max_steps:
            internal = next_target(budget, a)
            log(f"stepping up ({step + 1} of at most {max_steps}): re-solving for a target of {internal:.4g}")
    result.met = result.attempts[-1].met
    if not result.met:
        log(f"the budget {budget} was missed after {len(result.attempts)} attempts; the last attempt is written")
    del model
    with staged_output(out, force) as tmp:
        for f in final.iterdir():
            shutil.move(str(f), tmp / f.name)
        atomic_write_text(tmp / "tune.json", json.dumps(
            {**asdict(result), "seconds": round(time.perf_counter() - t0, 1), "budget_kind": budget.kind,
             "budget_value": budget.value, "eval": {"text": eval_source, "windows": eval_windows, "seqlen": eval_seqlen},
             "fixed_bytes": fixed, "uniform_predicted": uniform_points(s, fixed), "front_predicted": front(s, fixed),
             "layers": [asdict(x) for x in s.layers], "anchors": s.anchors}, indent=1))
        write_report(tmp)
    shutil.rmtree(work, ignore_errors=True)
    return result
