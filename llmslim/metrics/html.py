"""The compression report as one self-contained HTML file: ``llmslim report --html`` and
``llmslim compare --html``.

Everything is inside the file: CSS inline, plots as inline SVG (``svg.py``), the results and the
checkpoint facts embedded as JSON. It opens offline, from disk or mail, and runs no script.

What it shows, per model (one eval result each, plus the checkpoint folder it names, when it can
be found next to the result): the summary table; quality against size and against decode speed
with the Pareto front (no other model is both smaller/faster and better); task accuracy with
+-1 standard error; the per-layer loss, sparsity and bits from the checkpoint's ``quant_log.json``,
``recipe.yaml`` and ``config.json`` (GPTQModel-style ``dynamic`` per-module overrides included);
and the exact commands and recipe that made it.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path

from . import svg
from .report import ppl_setup, size_mb

QUANT_STAGES = ("gptq", "rtn")  # stages whose per-layer entries carry a bit width


@dataclass(frozen=True)
class Measure:
    key: str
    label: str  # axis and column label
    path: str  # where in the result (dotted), for the page's data-path attributes
    lower_is_better: bool
    digits: int

    def get(self, result: dict) -> float | None:
        v = lookup(result, self.path)
        return v if isinstance(v, int | float) and math.isfinite(v) else None


PERPLEXITY = Measure("perplexity", "perplexity", "perplexity.perplexity", True, 4)
KL = Measure("kl", "KL to the original (nats/token)", "perplexity.divergence.kl_mean", True, 5)
TOP1 = Measure("top1", "top-1 agreement", "perplexity.divergence.top1_agreement", False, 4)
DECODE = Measure("decode", "decode tokens/s (batch 1)", "speed.decode_tokens_per_s", False, 1)
PREFILL = Measure("prefill", "prefill tokens/s (batch 1)", "speed.prefill_tokens_per_s", False, 1)


def lookup(obj, path: str):
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def size_path(result: dict) -> str:
    """The field ``size_mb`` reads: the checkpoint on disk, else the weights in memory."""
    return "size.checkpoint_bytes" if (result.get("size") or {}).get("checkpoint_bytes") else "size.parameter_bytes"


def pareto_front(points: list[tuple[float, float]], x_lower: bool, y_lower: bool) -> list[bool]:
    """For each point, whether no other point is at least as good on both axes and better on one."""
    def better_eq(a: float, b: float, lower: bool) -> bool:
        return a <= b if lower else a >= b

    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            better_eq(x2, x, x_lower) and better_eq(y2, y, y_lower) and (x2, y2) != (x, y)
            for j, (x2, y2) in enumerate(points) if j != i
        )
        front.append(not dominated)
    return front


# ---- what made each model ------------------------------------------------------------------------


def find_checkpoint(result: dict, result_path: Path | None) -> Path | None:
    """The checkpoint folder a result was measured on: where ``eval`` recorded it, the path as
    given (from here, then from the result file's folder)."""
    model = str(result.get("model") or "")
    candidates = [result.get("model_path"), model]
    if result_path is not None and model:
        candidates.append(str(Path(result_path).parent / model))
    for c in candidates:
        if c and Path(c).expanduser().is_dir():
            return Path(c).expanduser().resolve()
    return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def provenance(result: dict, result_path: Path | None = None) -> dict:
    """The checkpoint's recipe, log and quantization/pruning config, and the commands that made and
    measured it (what can be found; the rest is None)."""
    folder = find_checkpoint(result, result_path)
    prov = {"folder": str(folder) if folder else None, "eval_command": result.get("command"), "recipe": None,
            "stages": [], "quant_log": None, "quantization_config": None, "pruning": None, "made_by": None}
    if folder is None:
        return prov
    recipe = folder / "recipe.yaml"
    if recipe.is_file():
        prov["recipe"] = recipe.read_text(encoding="utf-8", errors="replace")
        prov["stages"] = _recipe_stages(prov["recipe"])
    prov["quant_log"] = _read_json(folder / "quant_log.json")
    config = _read_json(folder / "config.json") or {}
    prov["quantization_config"] = config.get("quantization_config")
    prov["pruning"] = config.get("pruning")
    if prov["recipe"] is not None:
        source = (prov["quant_log"] or {}).get("source") or "ORIGINAL_MODEL"
        prov["made_by"] = shlex.join(["llmslim", "compress", str(source), "--recipe", str(recipe), "--out",
                                      str(folder)])
    return prov


def _recipe_stages(text: str) -> list[tuple[str, dict]]:
    try:
        import yaml

        data = yaml.safe_load(text)
    except Exception:  # an unreadable recipe only costs the per-stage options
        return []
    stages = []
    listed = data.get("stages") if isinstance(data, dict) else None
    for s in listed if isinstance(listed, list) else []:
        if isinstance(s, dict) and len(s) == 1:
            (name, opts), = s.items()
            stages.append((str(name), opts if isinstance(opts, dict) else {}))
    return stages


def layer_rows(prov: dict) -> list[dict]:
    """One row per compressed layer: ``loss`` (the last stage's own error estimate), ``sparsity``,
    ``bits`` and ``group_size`` (a layer's own, a ``dynamic`` override, or its stage's setting)."""
    log = prov.get("quant_log")
    if not log:
        return []
    stages = log.get("stages") or [{"stage": log.get("method"), "layers": log.get("layers") or []}]
    recipe = prov.get("stages") or []
    rows: dict[str, dict] = {}
    for i, stage in enumerate(stages):
        name = stage.get("stage")
        opts = recipe[i][1] if i < len(recipe) and recipe[i][0] == name else {}
        if not opts and i == len(stages) - 1:
            opts = log.get("config") or {}
        for entry in stage.get("layers") or []:
            if not isinstance(entry, dict) or "name" not in entry:
                continue
            row = rows.setdefault(entry["name"], {"name": entry["name"]})
            for key in ("layer_loss", "gptq_loss", "loss"):
                if isinstance(entry.get(key), int | float) and math.isfinite(entry[key]):
                    row["loss"], row["loss_kind"] = entry[key], key
                    break
            if isinstance(entry.get("sparsity"), int | float):
                row["sparsity"] = entry["sparsity"]
            if name in QUANT_STAGES or "bits" in entry:
                bits = entry.get("bits", opts.get("bits"))
                if bits is not None:
                    row["bits"] = bits
                    row["group_size"] = entry.get("group_size", opts.get("group_size"))
            if entry.get("fallback"):
                row["fallback"] = entry["fallback"]
    dynamic = (prov.get("quantization_config") or {}).get("dynamic") or {}
    for row in rows.values():
        for key, override in dynamic.items():
            sign, pattern = (key[0], key[2:]) if key[:2] in ("+:", "-:") else ("+", key)
            try:
                hit = re.match(pattern, row["name"])
            except re.error:
                continue
            if not hit:
                continue
            if sign == "-":
                row["bits"], row["group_size"] = None, None  # excluded: left in float
            elif isinstance(override, dict):
                row["bits"] = override.get("bits", row.get("bits"))
                row["group_size"] = override.get("group_size", row.get("group_size"))
    return list(rows.values())


def _split_layer(name: str) -> tuple[str, str]:
    """``model.layers.12.self_attn.q_proj`` -> (``self_attn.q_proj``, ``12``)."""
    m = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
    return (m.group(3), m.group(2)) if m else (name, "-")


# ---- the page ------------------------------------------------------------------------------------


def _clean(obj):
    """JSON without NaN/Infinity (which JSON.parse refuses)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _embed(data) -> str:
    text = json.dumps(_clean(data), ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c")  # no "</script>" or "<!--" can end or confuse the script element


class Page:
    """Collects the sections; numbers go through ``num`` so each carries where it came from."""

    def __init__(self, results: list[dict]):
        self.results = results
        self.parts: list[str] = []

    def add(self, html: str) -> None:
        self.parts.append(html)

    @staticmethod
    def num(i: int, path: str, value, digits: int, scale: float = 1.0, thousands: bool = False,
            suffix: str = "") -> str:
        """A number as text, with ``data-result``/``data-path``/``data-value`` so anyone (and the browser
        test) can check the text against the result file."""
        if not isinstance(value, int | float) or not math.isfinite(value):
            return "–"
        text = f"{value * scale:,.{digits}f}" if thousands else f"{value * scale:.{digits}f}"
        return (f'<span class="num" data-result="{i}" data-path="{escape(path)}" data-value="{value!r}" '
                f'data-digits="{digits}" data-scale="{scale!r}"{" data-thousands" if thousands else ""}>'
                f"{text}</span>{escape(suffix)}")


def build_report(results: list[dict], paths: list[Path | None] | None = None, title: str = "llmslim report") -> str:
    """The whole HTML document for ``results`` (read by ``report.read_result``; ``paths`` are their
    files, used to find checkpoints named relative to them)."""
    paths = list(paths) if paths is not None else [None] * len(results)
    provs = [provenance(r, p) for r, p in zip(results, paths, strict=True)]
    layers = [layer_rows(p) for p in provs]
    page = Page(results)
    tasks = _task_names(results)
    measures = _quality_measures(results)
    fronts = _fronts(results, measures)

    page.add(_header(results, title))
    page.add(_summary(page, results, tasks, fronts))
    page.add(_tradeoffs(results, measures, fronts))
    if tasks:
        page.add(_tasks(results, tasks))
    page.add(_models(page, results, provs, layers))
    data = {"format": "llmslim-report/1", "results": results,
            "checkpoints": [{**p, "layers": rows} for p, rows in zip(provs, layers, strict=True)]}
    page.add('<section id="data"><h2>Data</h2><p>Every number above comes from the result files and checkpoint '
             'logs embedded here (<code>script#llmslim-data</code>, JSON): open this file in a text editor to '
             'read them.</p></section>')
    body = "\n".join(page.parts)
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="generator" content="llmslim">\n<title>{escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
            f'<script type="application/json" id="llmslim-data">{_embed(data)}</script>\n</body>\n</html>\n')


def _task_names(results: list[dict]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [t["task"] for t in r.get("tasks") or [] if t.get("task") not in names]
    return names


def _common_tasks(results: list[dict]) -> list[str]:
    sets = [[t["task"] for t in r["tasks"]] for r in results if r.get("tasks")]
    return [n for n in sets[0] if all(n in s for s in sets[1:])] if sets else []


def _mean_acc(result: dict, tasks: list[str]) -> float | None:
    accs = [t["acc"] for t in result.get("tasks") or [] if t["task"] in tasks]
    return sum(accs) / len(accs) if tasks and len(accs) == len(tasks) else None


@dataclass(frozen=True)
class Quality:
    key: str
    label: str  # axis label
    lower_is_better: bool
    get: Callable[[dict], float | None]
    note: str = ""  # what exactly was measured, under the plot
    bounds: tuple[float | None, float | None] = (None, None)  # the values it can take


def _quality_measures(results: list[dict]) -> list[Quality]:
    """The quality axes this set of results can be compared on."""
    out = []
    setups = {ppl_setup(r["perplexity"]) for r in results if r.get("perplexity")}
    if len(setups) == 1:  # mixed setups are not comparable: no plot (the table warns)
        out.append(Quality("perplexity", "perplexity", True, PERPLEXITY.get, setups.pop(), (1.0, None)))
    baselines = sorted({str(r["baseline"]) for r in results if r.get("baseline")})
    against = f"against {', '.join(baselines)}" if baselines else ""
    if any(KL.get(r) is not None for r in results):
        out.append(Quality("kl", "KL (nats/token)", True, KL.get, f"mean KL(original || model) per token {against}",
                           (0.0, None)))
    if any(TOP1.get(r) is not None for r in results):
        out.append(Quality("top1", "top-1 agreement", False, TOP1.get, f"share of tokens with the same argmax {against}",
                           (0.0, 1.0)))
    common = _common_tasks(results)
    if common:
        note = common[0] if len(common) == 1 else f"mean accuracy over {', '.join(common)}"
        out.append(Quality("acc", "accuracy", False, lambda r, c=tuple(common): _mean_acc(r, list(c)), note, (0.0, 1.0)))
    return out


@dataclass(frozen=True)
class Axis:
    key: str
    label: str
    lower_is_better: bool
    from_zero: bool
    get: Callable[[dict], float | None]


AXES = (Axis("size", "size (MB)", True, True, size_mb), Axis("speed", DECODE.label, False, True, DECODE.get))


def _fronts(results: list[dict], measures: list[Quality]) -> dict[tuple[str, str], dict[int, bool]]:
    """(axis, quality) -> {result index: on the front} for the results that have both numbers."""
    out = {}
    for axis in AXES:
        for q in measures:
            idx = [i for i, r in enumerate(results) if axis.get(r) is not None and q.get(r) is not None]
            if len(idx) < 2 and not (axis.key == "size" and idx):
                continue
            flags = pareto_front([(axis.get(results[i]), q.get(results[i])) for i in idx], axis.lower_is_better,
                                 q.lower_is_better)
            out[(axis.key, q.key)] = dict(zip(idx, flags, strict=True))
    return out


def _header(results: list[dict], title: str) -> str:
    from .. import __version__

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    notes = []
    setups = sorted({ppl_setup(r["perplexity"]) for r in results if r.get("perplexity")})
    if len(setups) == 1:
        notes.append(f"Perplexity: {escape(setups[0])}.")
    elif len(setups) > 1:
        notes.append('<strong class="warn">These perplexities were measured differently and are not '
                     "comparable</strong> (so they are not plotted): " + "; ".join(escape(s) for s in setups) + ".")
    baselines = sorted({r["baseline"] for r in results if r.get("baseline")})
    if baselines:
        notes.append("KL and top-1 agreement against " + ", ".join(f"<code>{escape(b)}</code>" for b in baselines)
                     + ", on the perplexity text.")
    notes.append("Size: checkpoint on disk, else weights in memory (MB = 10<sup>6</sup> bytes).")
    return (f"<header><h1>{escape(title)}</h1><p class=\"muted\">{len(results)} model"
            f"{'s' if len(results) != 1 else ''} · generated {now} by llmslim {__version__}</p>"
            + "".join(f"<p>{n}</p>" for n in notes) + "</header>")


def _summary(page: Page, results: list[dict], tasks: list[str], fronts: dict) -> str:
    has = {m.key: any(m.get(r) is not None for r in results) for m in (PERPLEXITY, KL, TOP1, DECODE, PREFILL)}
    head = ["model", "size (MB)", "parameters"]
    head += ["perplexity"] if has["perplexity"] else []
    head += ["KL"] if has["kl"] else []
    head += ["top-1"] if has["top1"] else []
    head += [f"{escape(t).replace('_', '_<wbr>')} acc ± s.e." for t in tasks]
    head += ["decode tok/s"] if has["decode"] else []
    head += ["prefill tok/s"] if has["prefill"] else []
    head += ["peak RSS (MB)", "Pareto front of"]
    rows = []
    for i, r in enumerate(results):
        sp = size_path(r)
        cells = [f'<th scope="row"><span class="swatch" style="background:{svg.color(i)}"></span>{escape(r["name"])}'
                 f"</th>",
                 f"<td>{page.num(i, sp, lookup(r, sp), 1, 1e-6)}</td>",
                 f"<td>{page.num(i, 'size.parameters', lookup(r, 'size.parameters'), 0, thousands=True)}</td>"]
        for m in (PERPLEXITY, KL, TOP1):
            if has[m.key]:
                cells.append(f"<td>{page.num(i, m.path, lookup(r, m.path), m.digits)}</td>")
        by_task = {t["task"]: (k, t) for k, t in enumerate(r.get("tasks") or [])}
        for name in tasks:
            if name not in by_task:
                cells.append("<td>–</td>")
                continue
            k, t = by_task[name]
            err = (f" ± {page.num(i, f'tasks.{k}.acc_stderr', t.get('acc_stderr'), 4)}"
                   if t.get("acc_stderr") is not None else "")
            cells.append(f"<td>{page.num(i, f'tasks.{k}.acc', t.get('acc'), 4)}{err}</td>")
        for m in (DECODE, PREFILL):
            if has[m.key]:
                cells.append(f"<td>{page.num(i, m.path, lookup(r, m.path), m.digits)}</td>")
        cells.append(f"<td>{page.num(i, 'size.peak_rss_bytes', lookup(r, 'size.peak_rss_bytes'), 1, 1e-6)}</td>")
        on = {}
        for (a, q), flags in fronts.items():
            if flags.get(i):
                on.setdefault(a, []).append(q)
        text = "; ".join(f"{a}: {', '.join(qs)}" for a, qs in on.items())
        cells.append(f'<td class="front" title="the plots where this model is on the Pareto front">'
                     f'{escape(text) or "–"}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ('<section id="summary"><h2>Summary</h2><div class="scroll"><table>'
            "<thead><tr>" + "".join(f'<th scope="col">{h}</th>' for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div></section>")


def _tradeoffs(results: list[dict], measures: list[Quality], fronts: dict) -> str:
    plots = []
    for axis in AXES:
        for q in measures:
            flags = fronts.get((axis.key, q.key))
            if not flags:
                continue
            points = [svg.Point(axis.get(results[i]), q.get(results[i]), results[i]["name"], i, front,
                                {"data-result": i}) for i, front in flags.items()]
            better = "↓ better" if q.lower_is_better else "↑ better"
            plots.append(f'<figure data-plot="{axis.key}-{q.key}">'
                         + svg.scatter(points, f"{q.label} vs {axis.key}", axis.label, f"{q.label} ({better})",
                                       x_from_zero=axis.from_zero, y_bounds=q.bounds)
                         + f"<figcaption>{escape(q.note)}</figcaption></figure>")
    if not plots:
        return ('<section id="tradeoffs"><h2>Quality vs size and speed</h2><p>No quality measure that these '
                "results share (perplexity with one setup, KL, or a task they all ran).</p></section>")
    return ('<section id="tradeoffs"><h2>Quality vs size and speed</h2><p class="muted">Filled points are on '
            "the Pareto front, joined by the dashed line: no other model is both at least as small (or fast) "
            "and at least as good, and better in one of the two. Hollow points are beaten on both.</p>"
            '<div class="plots">' + "".join(plots) + "</div></section>")


def _tasks(results: list[dict], tasks: list[str]) -> str:
    plots = []
    for name in tasks:
        rows, chance = [], None
        for i, r in enumerate(results):
            for k, t in enumerate(r.get("tasks") or []):
                if t.get("task") == name and isinstance(t.get("acc"), int | float):
                    rows.append(svg.Bar(r["name"], t["acc"], t.get("acc_stderr"), i,
                                        {"data-result": i, "data-path": f"tasks.{k}.acc"}))
                    chance = t.get("chance", chance)
        if rows:
            n = next((t.get("n") for r in results for t in r.get("tasks") or [] if t.get("task") == name), None)
            title = f"{name}" + (f" (n={n})" if n else "")
            lo, hi = _accuracy_range(rows, chance)
            plots.append(f'<figure data-plot="task-{escape(name)}">'
                         + svg.dot_errorbars(rows, title, "accuracy (± 1 standard error)", lo, hi, chance,
                                             "chance" if chance is not None else "")
                         + "</figure>")
    return ('<section id="tasks"><h2>Task accuracy</h2><div class="plots">' + "".join(plots)
            + "</div></section>")


def _accuracy_range(rows: list[svg.Bar], chance: float | None) -> tuple[float, float]:
    """The x range of a task plot: every error bar and the chance line, padded, within [0, 1]."""
    ends = [r.value - (r.err or 0) for r in rows] + [r.value + (r.err or 0) for r in rows]
    ends += [chance] if chance is not None else []
    lo, hi = min(ends), max(ends)
    pad = max((hi - lo) * 0.1, 0.02)
    return max(0.0, lo - pad), min(1.0, hi + pad)


def _models(page: Page, results: list[dict], provs: list[dict], layers: list[list[dict]]) -> str:
    parts = ['<section id="models"><h2>How each model was made and measured</h2>']
    for i, (r, prov, rows) in enumerate(zip(results, provs, layers, strict=True)):
        parts.append(f'<article class="model" data-result="{i}"><h3><span class="swatch" '
                     f'style="background:{svg.color(i)}"></span>{escape(r["name"])}</h3>')
        facts = [("model", f"<code>{escape(str(r.get('model')))}</code>")]
        if prov["folder"]:
            facts.append(("checkpoint folder", f"<code>{escape(prov['folder'])}</code>"))
        if r.get("baseline"):
            facts.append(("baseline", f"<code>{escape(str(r['baseline']))}</code>"))
        env = r.get("environment") or {}
        if env:
            facts.append(("measured with", escape(", ".join(f"{k} {v}" for k, v in env.items()))
                          + (f" · {escape(str(r['created']))}" if r.get("created") else "")))
        log = prov.get("quant_log") or {}
        if log:
            before, after = log.get("bytes_before"), log.get("bytes_after")
            made = [f"{escape(str(log.get('method')))} in {log.get('seconds', '?')} s"]
            if before and after:
                made.append(f"{before / 1e6:.1f} MB → {after / 1e6:.1f} MB")
            if log.get("calibration"):
                c = log["calibration"]
                made.append("calibration " + escape(", ".join(f"{k}={v}" for k, v in c.items())))
            facts.append(("compression", " · ".join(made)))
        parts.append("<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>")
        cmds = []
        if prov["made_by"]:
            cmds.append(("made by (reproduces the checkpoint from its recipe)", prov["made_by"]))
        if prov["eval_command"]:
            cmds.append(("measured by", prov["eval_command"]))
        for label, cmd in cmds:
            parts.append(f'<p class="cmd-label">{escape(label)}</p><pre class="cmd"><code>{escape(cmd)}</code></pre>')
        if not prov["eval_command"]:
            parts.append('<p class="muted">The eval command was not recorded in this result (results written by '
                         "llmslim eval record it).</p>")
        if prov["recipe"]:
            parts.append(f'<details open><summary>recipe.yaml</summary><pre class="recipe">{escape(prov["recipe"])}'
                         "</pre></details>")
        elif not prov["folder"]:
            parts.append(f'<p class="muted">No checkpoint folder found for <code>{escape(str(r.get("model")))}</code> '
                         "(an original model, a hub id, or a folder that moved): no recipe or per-layer log.</p>")
        parts.append(_layers(i, r["name"], rows))
        parts.append("</article>")
    parts.append("</section>")
    return "\n".join(parts)


def _layers(i: int, name: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    kinds: list[str] = []
    blocks: list[str] = []
    for row in rows:
        kind, block = _split_layer(row["name"])
        row["_cell"] = (kind, block)
        kinds += [kind] if kind not in kinds else []
        blocks += [block] if block not in blocks else []
    blocks.sort(key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0))
    out = [f'<h4>Per layer ({len(rows)} layers)</h4>']
    bits = [(row.get("bits"), row.get("group_size")) for row in rows]
    counts: dict = {}
    for b in bits:
        counts[b] = counts.get(b, 0) + 1
    desc = "; ".join(f"{'float (excluded)' if b is None else f'{b}-bit'}"
                     f"{'' if b is None or g is None else (' per-channel' if g == -1 else f' g{g}')}: {n} layers"
                     for (b, g), n in sorted(counts.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0)))
    if any(b is not None for b, _ in bits):
        out.append(f'<p class="bits-summary">Bits: {escape(desc)}.</p>')
    fallbacks = [row for row in rows if row.get("fallback")]
    if fallbacks:
        out.append(f'<p class="warn">{len(fallbacks)} layer(s) fell back: '
                   + escape("; ".join(f"{row['name']}: {row['fallback']}" for row in fallbacks[:5])) + "</p>")

    def grid(key: str, label: str, log: bool = False, lo=None, hi=None) -> str:
        cells = {row["_cell"]: row[key] for row in rows if isinstance(row.get(key), int | float)}
        tips = {row["_cell"]: f"{row['name']}: {label} {svg.fmt(row[key])}" for row in rows
                if isinstance(row.get(key), int | float)}
        return (f'<figure data-plot="layers-{key}" data-result="{i}">'
                + svg.heatmap(kinds, blocks, cells, f"{name}: {label} per layer (columns: blocks)", label, log,
                              lo, hi, tips) + "</figure>")

    losses = [row["loss"] for row in rows if isinstance(row.get("loss"), int | float)]
    if losses:
        kind = next(row["loss_kind"] for row in rows if "loss_kind" in row)
        what = {"layer_loss": "‖WX − ŴX‖² / n", "gptq_loss": "GPTQ loss", "loss": "loss"}[kind]
        positive = [x for x in losses if x > 0]
        out.append(grid("loss", what, log=bool(positive) and len(positive) == len(losses)))
        worst = sorted((row for row in rows if isinstance(row.get("loss"), int | float)), key=lambda row: -row["loss"])
        out.append('<p class="muted">Highest: ' + ", ".join(f"<code>{escape(row['name'])}</code> "
                                                             f"{svg.fmt(row['loss'])}" for row in worst[:5]) + "</p>")
    if any(isinstance(row.get("sparsity"), int | float) for row in rows):
        out.append(grid("sparsity", "sparsity", lo=0.0, hi=1.0))
    if len({b for b, _ in bits if b is not None}) > 1:
        out.append(grid("bits", "bits"))
    for row in rows:
        row.pop("_cell", None)
    return "\n".join(out)


CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fafaf8; color: #1d1d1f; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto,
  Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 24px 60px; }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 34px 0 10px; font-size: 20px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { margin: 26px 0 8px; font-size: 17px; }
h4 { margin: 16px 0 6px; font-size: 15px; }
.muted { color: #5f6368; }
.warn { color: #a3420b; }
code, pre { font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #f0f0ec; padding: 8px 10px; border-radius: 6px; overflow-x: auto; margin: 4px 0 10px; }
.cmd-label { margin: 10px 0 0; font-size: 13px; color: #5f6368; }
pre.cmd { white-space: pre-wrap; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 14px; background: white; }
th, td { border: 1px solid #ddd; padding: 5px 9px; text-align: right; white-space: nowrap; vertical-align: top; }
thead th { background: #f0f0ec; text-align: center; white-space: normal; max-width: 12em; overflow-wrap: break-word; }
tbody th { text-align: left; }
td.front { text-align: left; white-space: normal; min-width: 10em; max-width: 16em; font-size: 12px; }
figcaption { font-size: 12px; color: #5f6368; max-width: 350px; padding: 0 4px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 6px; }
.plots { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0 0 10px; width: fit-content; background: white; border: 1px solid #e2e2de; border-radius: 6px; padding: 6px; max-width: 100%;
  overflow-x: auto; }
svg.plot { display: block; max-width: 100%; height: auto; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0; font-size: 14px; }
dt { color: #5f6368; }
dd { margin: 0; overflow-wrap: anywhere; }
details summary { cursor: pointer; font-size: 14px; }
article.model { border-top: 1px dashed #ddd; }
@media print { figure { break-inside: avoid; } }
"""
