"""Evaluation: perplexity by named methods, divergence from a baseline, task accuracy, efficiency.

    from llmslim.metrics import perplexity, evaluate_task
    ppl = perplexity(model, tok, text, method="gptq", seqlen=2048, baseline=(base, base_tok))
    acc = evaluate_task(model, tok, "goal_step_wikihow_goal_inference", limit=200)

Every function takes a loaded ``(model, tokenizer)``: how the model was quantized never matters.
Names load on first use, so that ``llmslim --help`` does not import torch.
"""

_LAZY = {
    "perplexity": "ppl",
    "evaluate_task": "mc", "evaluate_docs": "mc", "loglikelihoods": "mc", "encode_pair": "mc",
    "available_tasks": "tasks", "Doc": "tasks",
    "checkpoint_bytes": "efficiency", "parameter_bytes": "efficiency",
    "speed": "efficiency",
    "compare_markdown": "report", "format_result": "report", "plot_quality_vs_size": "report",
    "read_result": "report", "write_json": "report",
    "evaluate": "suite",
    "METHODS": "windows", "Window": "windows", "gptq_windows": "windows", "sliding_windows": "windows",
    "rolling_windows": "windows",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
