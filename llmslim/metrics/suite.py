"""Everything ``llmslim eval`` measures for one loaded model, as one JSON-ready dict."""

from __future__ import annotations

import datetime
import platform

import torch
from torch import nn

from ..runtime.model_info import model_context
from .efficiency import checkpoint_bytes, parameter_bytes, speed
from .mc import evaluate_task
from .ppl import perplexity
from .report import FORMAT
from .scoring import TOKEN_BUDGET, model_device
from .tasks import Doc


def evaluate(
    model: nn.Module,
    tokenizer,
    source: str,
    ppl_text: str | None = None,
    ppl_source: str | None = None,
    ppl_method: str = "gptq",
    seqlen: int | None = None,
    stride: int | None = None,
    add_bos: bool = False,
    ppl_tokens: int | None = None,
    baseline: tuple[nn.Module, object] | None = None,
    baseline_source: str | None = None,
    tasks: list[str] = (),
    limit: int | None = None,
    task_docs: dict[str, list[Doc]] | None = None,
    measure_speed: bool = False,
    speed_path: str = "serve",
    peak_rss: int | None = None,
    token_budget: int = TOKEN_BUDGET,
    name: str | None = None,
    progress: bool = True,
) -> dict:
    """Size always; perplexity (+ divergence from ``baseline``) if ``ppl_text``; each task; speed.

    ``source`` is what the model was loaded from (for its size on disk and the record);
    ``task_docs`` maps task names to examples already loaded with ``limit``. Speed is measured last;
    ``speed_path="serve"`` times what ``llmslim serve`` runs: the model is converted in place by
    ``accelerate`` (int4/int8 kernels for quantized layers, bf16), so it is not the model it was after
    the call; ``"as-loaded"`` times it as loaded (a GPTQ layer then dequantizes its weight on every call).
    """
    result = {
        "format": FORMAT,
        "name": name or source.rstrip("/").split("/")[-1],
        "model": source,
        "baseline": baseline_source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "dtype": str(_dtype(model))},
        "size": {
            "checkpoint_bytes": checkpoint_bytes(source, getattr(model, "name_or_path", None)),
            "parameter_bytes": parameter_bytes(model),
            "peak_rss_bytes": peak_rss,
        },
    }
    from ..quant.sparsity import sparsity_report

    sp = sparsity_report(model)
    result["size"]["parameters"] = sp.pop("parameters")
    result["sparsity"] = sp  # of the decoder blocks' linears, overall and per layer type; N:M if all follow one
    from ..nn import decoded_weights

    # Scoring decodes quantized weights once instead of on every forward: the same numbers,
    # several times faster. Size and RSS were taken above, speed is measured below, both on
    # the model as loaded.
    with decoded_weights(model, _dtype(model) or torch.float32):
        if ppl_text is not None:
            ppl = perplexity(model, tokenizer, ppl_text, ppl_method, seqlen, stride, add_bos, ppl_tokens,
                             baseline, token_budget, progress)
            result["perplexity"] = {"source": ppl_source, **ppl}
        task_docs = task_docs or {}
        result["tasks"] = [evaluate_task(model, tokenizer, t, limit, token_budget, progress, task_docs.get(t))
                           for t in tasks]
    if measure_speed:
        context = model_context(model)  # 128 + 32 tokens, or less for a model with a tiny context
        path = "as loaded"
        if speed_path == "serve" and model_device(model).type == "cpu":
            from ..server import fast_path_available

            if fast_path_available():
                from ..runtime.fast import accelerate

                model, path = accelerate(model), "llmslim serve's fast path (accelerate: int4/int8 kernels, bf16)"
        result["speed"] = speed(model, prompt_tokens=min(128, context // 2), new_tokens=min(32, context // 4))
        result["speed"]["path"] = path
    return result


def _dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None
