"""The HTML report and its SVG plots, without a browser (tests/metrics/test_report_browser.py opens it in one)."""

from __future__ import annotations

import importlib
import json
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from llmslim.errors import UserError
from llmslim.metrics import svg
from llmslim.metrics.html import build_report, layer_rows, lookup, pareto_front, provenance
from llmslim.metrics.report import FORMAT, write_json

SVG_NS = "{http://www.w3.org/2000/svg}"


def result(name, size, ppl=None, kl=None, acc=None, decode=None, model=None, setup=("gptq", 2048), **extra):
    r = {"format": FORMAT, "name": name, "model": model or name, "baseline": "orig" if kl is not None else None,
         "size": {"checkpoint_bytes": size, "parameter_bytes": size, "peak_rss_bytes": 400e6, "parameters": 1234567}}
    if ppl is not None:
        r["perplexity"] = {"method": setup[0], "source": "wiki", "seqlen": setup[1], "stride": setup[1],
                           "add_bos": False, "perplexity": ppl, "tokens_scored": 100, "windows": 1, "seconds": 1}
        if kl is not None:
            r["perplexity"]["divergence"] = {"kl_mean": kl, "top1_agreement": 1 - kl, "baseline_perplexity": 9.0}
    if acc is not None:
        r["tasks"] = [{"task": "winowhy", "n": 100, "acc": acc, "acc_stderr": 0.05, "acc_norm": acc, "chance": 0.5}]
    if decode is not None:
        r["speed"] = {"prefill_tokens_per_s": 900.0, "decode_tokens_per_s": decode, "prompt_tokens": 128,
                      "new_tokens": 32, "batch_size": 1}
    return r | extra


RESULTS = [result("fp32", 538e6, 9.5927, None, 0.39, 25.0),
           result("gptq4", 112.7e6, 11.38, 0.198, 0.36, 119.8),
           result("rtn4", 114.6e6, 14.19, 0.488, 0.33, 123.3),
           result("nf4", 116.5e6, 11.47, 0.224, 0.37, 50.7)]


# ---- Pareto front and ticks ------------------------------------------------------------------------


def test_pareto_front_smaller_and_lower():
    points = [(538, 9.59), (112.7, 11.38), (114.6, 14.19), (116.5, 11.47)]
    assert pareto_front(points, x_lower=True, y_lower=True) == [True, True, False, False]


def test_pareto_front_faster_and_higher():
    points = [(25, 0.39), (119.8, 0.36), (123.3, 0.33), (50.7, 0.37)]
    assert pareto_front(points, x_lower=False, y_lower=False) == [True, True, True, True]
    assert pareto_front([(1, 1), (2, 2)], x_lower=False, y_lower=False) == [False, True]


def test_pareto_front_ties_and_single():
    assert pareto_front([(1.0, 2.0)], True, True) == [True]
    assert pareto_front([(1.0, 2.0), (1.0, 2.0)], True, True) == [True, True]  # equal: neither is better
    assert pareto_front([(1.0, 2.0), (1.0, 3.0)], True, True) == [True, False]  # same size, worse


@pytest.mark.parametrize("lo, hi", [(0, 538), (9.2, 14.6), (0.0003, 0.0048), (-2, 3), (5, 5), (1e6, 3e6)])
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi):
    ticks = svg.nice_ticks(lo, hi)
    assert ticks[0] <= lo + 1e-12 and ticks[-1] >= hi - 1e-12 and 2 <= len(ticks) <= 12
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len({round(s / min(steps), 6) for s in steps}) == 1  # evenly spaced
    mantissa = min(steps) / 10 ** math.floor(math.log10(min(steps)))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))


def test_log_ticks():
    assert svg.log_ticks(1.2e-6, 0.011) == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


# ---- SVG ------------------------------------------------------------------------------------------


def parse_svg(text: str) -> ET.Element:
    root = ET.fromstring(text)  # well-formed XML, or this raises
    assert root.tag == f"{SVG_NS}svg" and root.get("viewBox")
    return root


def test_scatter_marks_every_point_and_joins_the_front():
    points = [svg.Point(538.0, 9.59, "fp32", 0, True), svg.Point(112.7, 11.38, "gptq4", 1, True),
              svg.Point(114.6, 14.19, "rtn<4>", 2, False)]
    root = parse_svg(svg.scatter(points, "perplexity vs size", "size (MB)", "perplexity", x_from_zero=True))
    circles = root.findall(f".//{SVG_NS}circle")
    assert [float(c.get("data-x")) for c in circles] == [538.0, 112.7, 114.6]
    assert [c.get("data-front") for c in circles] == ["true", "true", "false"]
    assert circles[2].get("fill") == "white" and circles[0].get("fill") == svg.color(0)
    assert "rtn<4>" in [t.text for t in root.iter(f"{SVG_NS}text")]  # escaped in the source, text in the DOM
    front = root.find(f".//{SVG_NS}polyline")
    xs = [float(p.split(",")[0]) for p in front.get("points").split()]
    assert xs == sorted(xs) and len(xs) == 2
    # every point inside the plot frame
    frame = root.find(f".//{SVG_NS}rect")
    x0, y0 = float(frame.get("x")), float(frame.get("y"))
    x1, y1 = x0 + float(frame.get("width")), y0 + float(frame.get("height"))
    for c in circles:
        assert x0 <= float(c.get("cx")) <= x1 and y0 <= float(c.get("cy")) <= y1


def test_scatter_stays_within_the_bounds_of_a_share():
    points = [svg.Point(1.0, 1.0, "a", 0, True), svg.Point(2.0, 0.97, "b", 1, False)]
    root = parse_svg(svg.scatter(points, "t", "x", "y", y_bounds=(0.0, 1.0)))
    labels = [float(t.text) for t in root.iter(f"{SVG_NS}text") if t.get("text-anchor") == "end"
              and re.fullmatch(r"[\d.]+", t.text or "")]
    assert labels and max(labels) <= 1.0


def test_errorbars_span_value_plus_minus_error():
    rows = [svg.Bar("a", 0.4, 0.05, 0), svg.Bar("b", 0.3, None, 1)]
    root = parse_svg(svg.dot_errorbars(rows, "task", "accuracy", 0.0, 1.0, reference=0.25, reference_label="chance"))
    dots = root.findall(f".//{SVG_NS}circle")
    bar = root.find(f".//{SVG_NS}line[@class='errorbar']")
    assert len(dots) == 2 and dots[0].get("data-err") == "0.05" and dots[1].get("data-err") is None
    cx, a, b = float(dots[0].get("cx")), float(bar.get("x1")), float(bar.get("x2"))
    assert math.isclose(cx - a, b - cx, abs_tol=0.2) and b > a
    assert root.find(f".//{SVG_NS}line[@class='reference']") is not None


def test_heatmap_cells_and_colours():
    cells = {("q", "0"): 1e-6, ("q", "1"): 1e-2, ("down", "0"): 1e-4}
    root = parse_svg(svg.heatmap(["q", "down"], ["0", "1"], cells, "loss", "loss", log=True))
    rects = root.findall(f".//{SVG_NS}rect[@class='cell']")
    assert len(rects) == 3  # the missing cell stays blank
    colour = {(r.get("data-row"), r.get("data-col")): r.get("fill") for r in rects}
    assert colour[("q", "0")] == svg.ramp(0.0) and colour[("q", "1")] == svg.ramp(1.0)
    assert colour[("down", "0")] == svg.ramp(0.5)


# ---- per-layer data from a checkpoint -----------------------------------------------------------


def write_checkpoint(folder: Path, dynamic: dict | None = None) -> Path:
    """A checkpoint folder as the pipeline writes it (prune then GPTQ), weights left out."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"model.layers.{b}.{k}" for b in range(3) for k in ("self_attn.q_proj", "mlp.down_proj")]
    log = {"source": "org/original model", "method": "gptq", "config": {"bits": 4, "group_size": 64},
           "calibration": {"dataset": "wiki", "nsamples": 8}, "seconds": 12.5, "bytes_before": 4_000_000,
           "bytes_after": 1_000_000,
           "stages": [
               {"stage": "prune", "seconds": 1.0, "skipped": [],
                "layers": [{"name": n, "rows": 8, "columns": 8, "sparsity": 0.5, "layer_loss": 9.0, "loss": 9.0}
                           for n in names]},
               {"stage": "gptq", "seconds": 2.0, "skipped": [],
                "layers": [{"name": n, "rows": 8, "columns": 8, "gptq_loss": 0.1 * (i + 1),
                            "layer_loss": 0.01 * (i + 1), "fallback": None} for i, n in enumerate(names)]}]}
    (folder / "quant_log.json").write_text(json.dumps(log))
    (folder / "recipe.yaml").write_text("calibration: {dataset: wiki, nsamples: 8}\nstages:\n"
                                        "  - prune: {method: wanda, sparsity: 0.5}\n"
                                        "  - gptq: {bits: 4, group_size: 64}\n")
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64} | ({"dynamic": dynamic} if dynamic else {})
    (folder / "config.json").write_text(json.dumps({"quantization_config": qc, "pruning": [{"method": "wanda"}]}))
    return folder


def test_layer_rows_merge_stages_and_overrides(tmp_path):
    folder = write_checkpoint(tmp_path / "ck", dynamic={r"+:.*\.layers\.2\..*": {"bits": 8, "group_size": 128},
                                                        r"-:.*\.layers\.0\.mlp\..*": {}})
    rows = {r["name"]: r for r in layer_rows(provenance({"model": str(folder)}))}
    assert len(rows) == 6
    q0 = rows["model.layers.0.self_attn.q_proj"]
    assert q0["loss"] == 0.01 and q0["loss_kind"] == "layer_loss"  # the last stage's own estimate
    assert q0["sparsity"] == 0.5 and q0["bits"] == 4 and q0["group_size"] == 64
    assert rows["model.layers.2.mlp.down_proj"]["bits"] == 8 and rows["model.layers.2.mlp.down_proj"]["group_size"] == 128
    assert rows["model.layers.0.mlp.down_proj"]["bits"] is None  # excluded by a "-:" rule: left in float


def test_provenance_finds_the_checkpoint_next_to_the_result(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "runs" / "ck")
    monkeypatch.chdir(tmp_path)  # the result names the folder relative to its own file
    prov = provenance({"model": "ck", "command": "llmslim eval ck"}, tmp_path / "runs" / "r.json")
    assert prov["folder"] == str((tmp_path / "runs" / "ck").resolve())
    assert prov["made_by"] == (f"llmslim compress 'org/original model' --recipe {prov['folder']}/recipe.yaml "
                               f"--out {prov['folder']}")
    assert [s for s, _ in prov["stages"]] == ["prune", "gptq"] and prov["eval_command"] == "llmslim eval ck"
    assert provenance({"model": "org/hub-id"})["folder"] is None


def test_layer_rows_of_a_real_gptq_checkpoint(tiny_folder, tmp_path):
    """What the pipeline really writes: losses for every quantized layer, bits from the recipe."""
    from llmslim.pipeline.recipe import parse_recipe
    from llmslim.pipeline.run import compress_to_folder

    recipe = parse_recipe({"calibration": {"dataset": "wiki", "nsamples": 4, "seqlen": 32},
                           "stages": [{"gptq": {"bits": 3, "group_size": 32}}]})
    out = tmp_path / "gptq3"
    compress_to_folder(str(tiny_folder("llama")), recipe, out)
    rows = layer_rows(provenance({"model": str(out)}))
    assert len(rows) == 14 and all(r["bits"] == 3 and r["group_size"] == 32 for r in rows)
    assert all(r["loss"] > 0 and r["loss_kind"] == "layer_loss" for r in rows)
    html = build_report([result("gptq3", 1e5, 20.0, model=str(out))])
    assert 'data-plot="layers-loss"' in html and "Bits: 3-bit g32: 14 layers." in html


# ---- the page -------------------------------------------------------------------------------------


class Collect(HTMLParser):
    """Numbers, plots, references to other resources, and the embedded data of a report."""

    def __init__(self):
        super().__init__()
        self.nums, self.refs, self.tags, self.data, self._in_data = [], [], [], "", False
        self._num: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href", "action", "srcset", "poster") and v]
        if tag == "span" and a.get("class") == "num":
            self._num = a | {"text": ""}
        if tag == "script" and a.get("id") == "llmslim-data":
            self._in_data = True

    def handle_endtag(self, tag):
        if tag == "span" and self._num is not None:
            self.nums.append(self._num)
            self._num = None
        if tag == "script":
            self._in_data = False

    def handle_data(self, data):
        if self._num is not None:
            self._num["text"] += data
        if self._in_data:
            self.data += data


def check_numbers(nums: list[dict], results: list[dict]) -> int:
    """Each number's text is its result's value at data-path, formatted as it says; returns how many."""
    for n in nums:
        value = lookup(results[int(n["data-result"])], n["data-path"])
        assert float(n["data-value"]) == value, n
        scaled, digits = value * float(n["data-scale"]), int(n["data-digits"])
        expected = f"{scaled:,.{digits}f}" if "data-thousands" in n else f"{scaled:.{digits}f}"
        assert n["text"] == expected, n
    return len(nums)


def test_report_is_self_contained_and_its_numbers_are_the_results(tmp_path):
    write_checkpoint(tmp_path / "gptq4")
    results = [dict(r) for r in RESULTS]
    results[1]["model"] = str(tmp_path / "gptq4")
    results[1]["command"] = "llmslim eval out/gptq4 --baseline orig --ppl wiki --output gptq4.json"
    html = build_report(results, title="Smol <report>")
    page = Collect()
    page.feed(html)
    assert page.refs == []  # nothing to fetch: no src, no href, no stylesheet link
    assert not re.search(r"url\(|@import|<link|<img|<iframe", html)
    assert "<title>Smol &lt;report&gt;</title>" in html
    # every number shown is the JSON's, rounded as labelled
    assert check_numbers(page.nums, results) >= 4 * 8
    paths = {n["data-path"] for n in page.nums}
    assert {"perplexity.perplexity", "perplexity.divergence.kl_mean", "tasks.0.acc", "tasks.0.acc_stderr",
            "speed.decode_tokens_per_s", "size.checkpoint_bytes", "size.parameters"} <= paths
    # the embedded data is the results, exactly
    data = json.loads(page.data)
    assert data["results"] == results and data["checkpoints"][1]["made_by"].startswith("llmslim compress")
    # the plots: 2 axes x 4 quality measures, one task, and the per-layer grids of the one checkpoint
    plots = re.findall(r'data-plot="([^"]+)"', html)
    assert plots == ["size-perplexity", "size-kl", "size-top1", "size-acc", "speed-perplexity", "speed-kl",
                     "speed-top1", "speed-acc", "task-winowhy", "layers-loss", "layers-sparsity"]
    for s in re.findall(r"<svg.*?</svg>", html, flags=re.S):
        parse_svg(s)
    assert "llmslim eval out/gptq4 --baseline orig" in html and "- prune: {method: wanda, sparsity: 0.5}" in html
    assert "No checkpoint folder found for <code>fp32</code>" in html


def test_front_column_and_plot_agree():
    html = build_report(RESULTS)
    size_ppl = re.search(r'data-plot="size-perplexity">(.*?)</svg>', html, flags=re.S).group(1)
    fronts = [c == "true" for c in re.findall(r'data-front="(\w+)"', size_ppl)]
    assert fronts == [True, True, False, False]  # fp32 and gptq4; rtn4 and nf4 are beaten by gptq4
    cells = [dict(part.split(": ") for part in c.split("; ")) if c != "–" else {}
             for c in re.findall(r'<td class="front"[^>]*>(.*?)</td>', html)]
    on_size_ppl = ["perplexity" in c.get("size", "").split(", ") for c in cells]
    assert on_size_ppl == fronts


def test_mixed_perplexity_setups_are_not_plotted():
    html = build_report([result("a", 1e6, 10.0), result("b", 2e6, 11.0, setup=("sliding", 1024))])
    assert "not comparable" in html and 'data-plot="size-perplexity"' not in html


def test_hostile_names_and_nan_cannot_break_the_page():
    r = result("</script><script>alert(1)</script>", 1e6, float("nan"), 0.1)
    html = build_report([r, result("b", 2e6, 11.0, 0.2)])
    assert "<script>alert(1)" not in html
    page = Collect()
    page.feed(html)
    data = json.loads(page.data)  # parses: NaN became null, "</" cannot end the script element
    assert data["results"][0]["name"] == r["name"] and data["results"][0]["perplexity"]["perplexity"] is None


def test_a_single_result_without_quality_still_makes_a_page():
    html = build_report([result("only", 1e6)])
    assert "No quality measure that these results share" in html and "<table>" in html


# ---- commands ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_load(monkeypatch, model, tiny_tokenizer):
    monkeypatch.setattr(importlib.import_module("llmslim.loader"), "load", lambda source, **kw: (model, tiny_tokenizer))


def test_report_and_compare_write_html(tmp_path, capsys):
    from llmslim.cli import main

    paths = []
    for r in RESULTS:
        paths.append(str(tmp_path / f"{r['name']}.json"))
        write_json(paths[-1], r)
    assert main(["report", *paths, "--html", str(tmp_path / "r.html"), "--title", "My models"]) == 0
    assert "<title>My models</title>" in (tmp_path / "r.html").read_text()
    assert main(["compare", *paths, "--html", str(tmp_path / "c.html")]) == 0
    assert (tmp_path / "c.html").read_text().count('data-plot="') == 9
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'r.html'}" in out and out.count("| gptq4 |") == 1
    with pytest.raises(UserError, match="is a folder"):
        from llmslim.metrics.commands import write_html

        write_html(paths, RESULTS, str(tmp_path))
    assert main(["report", str(tmp_path / "missing.json"), "--html", str(tmp_path / "x.html")]) == 2
    assert not (tmp_path / "x.html").exists()


def test_eval_records_its_command_and_model_path(tmp_path, fake_load, tiny_folder):
    from llmslim.cli import main

    folder = tiny_folder()
    out = tmp_path / "r.json"
    argv = ["eval", str(folder), "--speed", "--name", "my model", "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["command"] == f"llmslim eval {folder} --speed --name 'my model' --output {out} --no-progress"
    assert r["model_path"] == str(Path(folder).resolve())
