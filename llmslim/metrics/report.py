"""Result files and their presentation: atomic JSON, a readable table, a comparison and its plot."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, missing_extra
from ..util import atomic_write_text

FORMAT = "llmslim-eval/1"


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write so that readers see the old file or the new one, never a half-written one."""
    atomic_write_text(path, text)


def read_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"result file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an llmslim eval result (write one with: llmslim eval MODEL --output FILE)")
    data.setdefault("name", path.stem)
    return data


def ppl_setup(ppl: dict) -> str:
    """The words that make two perplexities comparable, e.g. ``gptq wiki seqlen=2048 stride=2048 no-BOS``."""
    bos = "BOS" if ppl.get("add_bos") else "no-BOS"
    return f"{ppl['method']} {ppl.get('source', '?')} seqlen={ppl['seqlen']} stride={ppl['stride']} {bos}"


def format_result(result: dict) -> str:
    """The human-readable table ``llmslim eval`` prints."""
    rows = [("model", result["model"])]
    size = result.get("size", {})
    if size.get("checkpoint_bytes"):
        rows.append(("checkpoint size", _mb(size["checkpoint_bytes"])))
    rows.append(("weights in memory", _mb(size.get("parameter_bytes"))))
    if size.get("peak_rss_bytes"):
        rows.append(("peak RSS after load", _mb(size["peak_rss_bytes"])))
    if size.get("parameters"):
        rows.append(("parameters", f"{size['parameters']:,}"))
    sp = result.get("sparsity") or {}
    if sp.get("sparsity"):
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in sp["by_type"].items())
        label = "sparsity (block linears)" if sp.get("pruned", True) else "zero weights (not pruned)"
        rows.append((label, f"{sp['sparsity']:.1%}{' ' + sp['nm'] if sp.get('nm') else ''}  ({kinds})"))
    ppl = result.get("perplexity")
    if ppl:
        rows.append((f"perplexity [{ppl_setup(ppl)}]", f"{ppl['perplexity']:.4f}  "
                     f"({ppl['tokens_scored']} tokens, {ppl['windows']} windows, {ppl['seconds']} s)"))
        for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            if key in ppl:
                rows.append((f"  {key}", f"{ppl[key]:.4f}"))
        div = ppl.get("divergence")
        if div:
            rows.append(("  baseline perplexity", f"{div['baseline_perplexity']:.4f}"))
            rows.append(("  KL(baseline || model)", f"{div['kl_mean']:.5f} nats/token"))
            rows.append(("  top-1 agreement", f"{div['top1_agreement']:.4f}"))
    for t in result.get("tasks", []):
        rows.append((f"task {t['task']} (n={t['n']})", _task_cell(t)))
    sp = result.get("speed")
    if sp:
        rows.append(("prefill (batch 1)", f"{sp['prefill_tokens_per_s']:.1f} tok/s ({sp['prompt_tokens']} tokens)"))
        rows.append(("decode (batch 1)", f"{sp['decode_tokens_per_s']:.1f} tok/s ({sp['new_tokens']} tokens)"))
        if sp.get("path"):
            rows.append(("  timed on", sp["path"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def compare_markdown(results: list[dict]) -> str:
    """One markdown table, a row per result; notes flag perplexities that are not comparable."""
    if not results:
        raise UserError("compare needs at least one result file")
    setups = sorted({ppl_setup(r["perplexity"]) for r in results if r.get("perplexity")})
    task_names = []
    for r in results:
        task_names += [t["task"] for t in r.get("tasks", []) if t["task"] not in task_names]
    has_kl = any((r.get("perplexity") or {}).get("divergence") for r in results)
    has_speed = any(r.get("speed") for r in results)
    mixed = len(setups) > 1
    head = ["model", "size (MB)"] + (["perplexity"] if setups else []) + (["perplexity setup"] if mixed else [])
    head += ["KL", "top-1 agree"] if has_kl else []
    head += [f"{n} acc" for n in task_names]
    head += ["prefill tok/s", "decode tok/s"] if has_speed else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ppl = r.get("perplexity") or {}
        div = ppl.get("divergence") or {}
        tasks = {t["task"]: t for t in r.get("tasks", [])}
        cells = [r["name"], _num(size_mb(r), 1)]
        cells += [_num(ppl.get("perplexity"), 3)] if setups else []
        cells += [ppl_setup(ppl) if ppl else "-"] if mixed else []
        cells += [_num(div.get("kl_mean"), 4), _num(div.get("top1_agreement"), 4)] if has_kl else []
        cells += [_task_cell(tasks[n]) if n in tasks else "-" for n in task_names]
        sp = r.get("speed") or {}
        cells += [_num(sp.get("prefill_tokens_per_s"), 1), _num(sp.get("decode_tokens_per_s"), 1)] if has_speed else []
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if len(setups) == 1:
        notes.append(f"Perplexity: {setups[0]}.")
    elif len(setups) > 1:
        notes.append("Warning: these perplexities were measured differently and are not comparable: "
                     + "; ".join(setups) + ".")
    if has_kl:
        notes.append("KL: mean KL(baseline || model) per token, nats; top-1: share of tokens where both argmaxes agree.")
    if task_names:
        notes.append("Task cells: acc ± standard error (chance level in brackets).")
    notes.append("Size: checkpoint on disk, else weights in memory.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot_quality_vs_size(results: list[dict], path: str | Path) -> Path:
    """A PNG with one panel per quality measure (perplexity, mean task accuracy) against size."""
    try:
        import matplotlib
    except ImportError:
        raise missing_extra("matplotlib", "eval") from None

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    panels = []
    setups = {ppl_setup(r["perplexity"]) for r in results if r.get("perplexity")}
    if setups:
        what = setups.pop() if len(setups) == 1 else "MIXED SETUPS, not comparable"
        panels.append((f"perplexity (lower is better)\n{what}", lambda r: (r.get("perplexity") or {}).get("perplexity")))
    common = _common_tasks(results)
    if common:
        label = ", ".join(common) if len(common) <= 2 else f"{len(common)} tasks"
        panels.append((f"mean accuracy (higher is better)\n{label}", lambda r: _mean_acc(r, common)))
    if not panels:
        raise UserError("the results have neither perplexity nor a task they all share to plot")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--plot {path} is a folder; give a file name such as quality_vs_size.png")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (label, get) in zip(axes[0], panels, strict=True):
        points = [(size_mb(r), get(r), r["name"]) for r in results if get(r) is not None and size_mb(r)]
        ax.scatter([p[0] for p in points], [p[1] for p in points])
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlim(left=0)  # sizes relative to zero show the real saving
        ax.set_xlabel("size (MB)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle("quality vs size")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return path


def size_mb(result: dict) -> float | None:
    size = result.get("size", {})
    b = size.get("checkpoint_bytes") or size.get("parameter_bytes")
    return b / 1e6 if b else None


def _common_tasks(results: list[dict]) -> list[str]:
    """Tasks every result with tasks has: a mean over different task sets compares nothing."""
    sets = [[t["task"] for t in r["tasks"]] for r in results if r.get("tasks")]
    return [n for n in sets[0] if all(n in s for s in sets[1:])] if sets else []


def _mean_acc(result: dict, tasks: list[str]) -> float | None:
    accs = [t["acc"] for t in result.get("tasks", []) if t["task"] in tasks]
    return sum(accs) / len(accs) if len(accs) == len(tasks) else None


def _task_cell(t: dict) -> str:
    text = f"{t['acc']:.4f}"
    if t.get("acc_stderr") is not None:
        text += f" ± {t['acc_stderr']:.4f}"
    if "acc_norm" in t:
        text += f", norm {t['acc_norm']:.4f}"
    if "perplexity" in t:
        text += f", ppl {t['perplexity']:.3f}"
    if t.get("chance") is not None:
        text += f" [{t['chance']:.3f}]"
    return text


def _mb(b: int | None) -> str:
    return "-" if not b else f"{b / 1e6:.1f} MB"


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
