"""The entry points: ``quantize(model, config)`` in memory, ``quantize_to_folder`` end to end."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import CalibConfig, GPTQConfig, IntConfig, RTNConfig
from ..errors import UserError
from ..grid import quantize_rtn
from ..nn import GPTQLinear, can_pack
from ..util import atomic_write_text, partial_dir, staged_output
from .walk import find_blocks, find_linears, linear_weight, set_module


@dataclass
class QuantReport:
    method: str
    layers: list = field(default_factory=list)  # per-layer logs (dicts)
    skipped: list[str] = field(default_factory=list)  # layers left in float (shape or filter)
    seconds: float = 0.0


def target_layers(model: nn.Module, config: IntConfig) -> tuple[dict[str, nn.Module], list[str]]:
    """Linears to quantize (full names) and linears left in float because the format can't hold them."""
    blocks_name, blocks = find_blocks(model)
    targets, skipped = {}, []
    candidates = find_linears(blocks, prefix=f"{blocks_name}.")
    if config.layers.quantize_lm_head:
        head = model.get_output_embeddings()
        name = next(n for n, m in model.named_modules() if m is head)
        candidates[name] = head
    for name, layer in candidates.items():
        if not config.layers.accepts(name) and layer is not model.get_output_embeddings():
            continue
        out_f, in_f = linear_weight(layer).shape
        if can_pack(in_f, out_f, config.bits):
            targets[name] = layer
        else:
            skipped.append(name)
    return targets, skipped


def quantize(
    model: nn.Module,
    config: IntConfig,
    calib: torch.Tensor | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
    batch_size: int | None = None,
) -> QuantReport:
    """Quantize ``model`` in place: its linears become ``GPTQLinear`` (RTN or GPTQ codes)."""
    t0 = time.perf_counter()
    targets, skipped = target_layers(model, config)
    for name in skipped:
        tqdm.write(f"note: {name} kept in float: its shape does not pack at {config.bits} bits")
    report = QuantReport(method=config.method, skipped=skipped)
    if isinstance(config, GPTQConfig):
        if calib is None:
            raise UserError("GPTQ needs calibration data (--calib)")
        from .sequential import gptq_blocks

        logs = gptq_blocks(model, config, calib, state_dir=state_dir, resume=resume, batch_size=batch_size)
        report.layers = [asdict(x) for x in logs]
        head = model.get_output_embeddings()
        if config.layers.quantize_lm_head and not isinstance(head, GPTQLinear):
            report.layers.append(_gptq_lm_head(model, config, calib, batch_size))
    elif isinstance(config, RTNConfig):
        for name, layer in tqdm(targets.items(), desc="RTN layers", unit="layer"):
            W = linear_weight(layer).detach().float()
            Q, scales, zeros = quantize_rtn(W, config.bits, config.group_size, config.sym, config.mse)
            g = config.group_size if config.group_size != -1 else W.shape[1]
            g_idx = torch.arange(W.shape[1], dtype=torch.int32) // g
            set_module(model, name, GPTQLinear.from_codes(Q, scales, zeros, g_idx, config.group_size,
                                                          config.bits, getattr(layer, "bias", None)))
            report.layers.append({"name": name, "rows": W.shape[0], "columns": W.shape[1]})
    else:
        raise UserError(f"unsupported config {type(config).__name__}")
    report.seconds = time.perf_counter() - t0
    return report


def _gptq_lm_head(model: nn.Module, config: GPTQConfig, calib: torch.Tensor, batch_size: int | None) -> dict:
    """lm_head with GPTQ: its inputs are the final hidden states, so run the quantized model once."""
    from .gptq import accumulate_hessian, gptq_quantize, layer_loss
    from .walk import StopForward, feed_until

    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    H = torch.zeros(head.in_features, head.in_features)
    count = 0

    def hook(module, args):
        nonlocal H, count
        H, count = accumulate_hessian(H, count, args[0])
        raise StopForward

    feed_until(model, head, hook, tqdm(calib.split(batch_size or 8), desc="lm_head inputs"))
    W = head.weight.detach().float()
    from .sequential import solver_options

    r = gptq_quantize(W, H, **solver_options(config))
    set_module(model, name, GPTQLinear.from_codes(r.Q, r.scales, r.zeros, r.g_idx, config.group_size,
                                                  config.bits, getattr(head, "bias", None)))
    return {"name": name, "rows": W.shape[0], "columns": W.shape[1], "gptq_loss": r.loss,
            "layer_loss": layer_loss(W, r.dequantize(), H), "damp_percent": r.damp_percent, "fallback": r.fallback}


def folder_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


def quantize_to_folder(
    source: str,
    out: str | Path,
    config: IntConfig,
    calib: CalibConfig | None = None,
    force: bool = False,
    resume: bool = False,
    batch_size: int | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Load ``source``, quantize it, write a GPTQ checkpoint to ``out`` (atomically). Returns a summary."""
    from ..data import calibration_tokens
    from ..formats.gptq import divisibility_problems, largest_dividing_group, save_gptq
    from ..load import load
    from ..models import resolve

    out = Path(out)
    t0 = time.perf_counter()
    from ..util import check_output

    check_output(out, force, resume)
    if isinstance(config, GPTQConfig):
        from ..data import load_documents

        load_documents((calib or CalibConfig()).dataset, "calib", (calib or CalibConfig()).text_field)  # fail fast
    model, tokenizer = load(source, allow_pickle=allow_pickle)
    if getattr(model.config, "quantization_config", None):
        raise UserError(f"{source} is already quantized; quantize the original float model")
    tokens = None
    if isinstance(config, GPTQConfig):
        calib = calib or CalibConfig()
        ctx = getattr(model.config, "max_position_embeddings", None)
        tokens = calibration_tokens(calib.dataset, tokenizer, calib.nsamples, calib.seqlen, calib.seed,
                                    calib.text_field, max_len=ctx)
    resume = resume and partial_dir(out).exists()
    with staged_output(out, force, resume) as tmp:
        report = quantize(model, config, tokens, state_dir=tmp / "_state", resume=resume, batch_size=batch_size)
        bad = divisibility_problems(model, config.group_size)
        if bad:
            sizes = sorted({s for _, s in bad})
            g = largest_dividing_group([m.in_features for m in model.modules() if isinstance(m, GPTQLinear)],
                                       config.group_size)
            tqdm.write(f"warning: group size {config.group_size} does not divide the input size of {len(bad)} "
                       f"layers (sizes {sizes}, e.g. {bad[0][0]}): transformers/GPTQModel load this checkpoint, "
                       f"vLLM refuses it; --group-size {g} works everywhere")
        for f in tmp.glob("*.safetensors"):
            f.unlink()
        save_gptq(model, tokenizer, tmp, config, report.skipped)
        summary = {
            "source": source,
            "method": config.method,
            "config": _config_dict(config),
            "calibration": asdict(calib) if tokens is not None else None,
            "seconds": round(time.perf_counter() - t0, 1),
            "quantize_seconds": round(report.seconds, 1),
            "bytes_before": folder_bytes(resolve(source)) if Path(resolve(source)).is_dir() else None,
            "bytes_after": folder_bytes(tmp),
            "skipped": report.skipped,
            "layers": report.layers,
        }
        atomic_write_text(tmp / "quant_log.json", json.dumps(summary, indent=1))
        import shutil

        shutil.rmtree(tmp / "_state", ignore_errors=True)
    return summary


def _config_dict(config: IntConfig) -> dict:
    d = asdict(config)
    d["layers"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["layers"].items()}
    return d
