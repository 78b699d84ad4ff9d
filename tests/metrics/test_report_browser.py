"""The HTML report in a real browser (slow suite): Playwright driving Chromium.

Real inputs, made small: a tiny random model, three checkpoints made by the pipeline (GPTQ, RTN,
Wanda pruning then GPTQ), each measured by ``llmslim eval`` against the original, then
``llmslim report``. The page is opened from disk with the network unused; screenshots are left
in out/browser-tests/<test>/.
"""

from __future__ import annotations

import json
import math

import pytest

from llmslim.metrics.html import lookup
from llmslim.metrics.report import size_mb
from tests.browser import Console, browser, output_dir

pytestmark = pytest.mark.slow

RECIPES = {
    "gptq4": {"calibration": {"dataset": "wiki", "nsamples": 4, "seqlen": 64},
              "stages": [{"gptq": {"bits": 4, "group_size": 32}}]},
    "rtn3": {"stages": [{"rtn": {"bits": 3, "group_size": 32}}]},
    "wanda50-gptq4": {"calibration": {"dataset": "wiki", "nsamples": 4, "seqlen": 64},
                      "stages": [{"prune": {"method": "wanda", "sparsity": 0.5}},
                                 {"gptq": {"bits": 4, "group_size": 32}}]},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(report path, [result paths]) for the original and three compressed models."""
    import torch

    from llmslim.cli import main
    from llmslim.pipeline.recipe import parse_recipe
    from llmslim.pipeline.run import compress_to_folder
    from tests.conftest import make_tiny_model, make_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("report")
    base = tmp / "base"
    make_tiny_model("llama").save_pretrained(base)
    make_tiny_tokenizer().save_pretrained(base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folders = {"base": base}
        for name, recipe in RECIPES.items():
            compress_to_folder(str(base), parse_recipe(recipe), tmp / name)
            folders[name] = tmp / name
        paths = []
        for name, folder in folders.items():
            paths.append(tmp / f"{name}.json")
            assert main(["eval", str(folder), "--baseline", str(base), "--ppl", "wiki", "--seqlen", "32",
                         "--ppl-tokens", "512", "--tasks", "general_knowledge,winowhy", "--limit", "8", "--speed",
                         "--name", name, "--no-progress", "--output", str(paths[-1])]) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp / "report.html"
    assert main(["report", *map(str, paths), "--html", str(out), "--title", "tiny models"]) == 0
    return out, paths


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


def test_report_renders_offline_with_the_results_numbers(report, chromium, request):
    out_dir = output_dir(request)
    path, result_paths = report
    results = [json.loads(p.read_text()) for p in result_paths]
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, offline=True)
    page = context.new_page()
    console = Console(page)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=out_dir / "report.png", full_page=True)
    page.locator("#tradeoffs").screenshot(path=out_dir / "tradeoffs.png")
    page.locator("#tasks").screenshot(path=out_dir / "tasks.png")
    page.locator("#models article").nth(3).screenshot(path=out_dir / "per-layer.png")

    assert requests == [path.as_uri()]  # the file itself, nothing else
    assert console.unexpected() == []

    # Every plot, and every mark in it, is drawn with a size.
    plots = page.locator("svg.plot")
    expected = {"size-perplexity", "size-kl", "size-top1", "size-acc", "speed-perplexity", "speed-kl", "speed-top1",
                "speed-acc", "task-general_knowledge", "task-winowhy", "layers-loss", "layers-sparsity"}
    assert set(page.eval_on_selector_all("figure[data-plot]", "fs => fs.map(f => f.dataset.plot)")) == expected
    assert plots.count() == 8 + 2 + 2 + 1  # losses of the two GPTQ checkpoints (RTN logs none), the pruned one's sparsity
    boxes = page.eval_on_selector_all(
        "svg.plot, svg.plot circle.point, svg.plot rect.cell, svg.plot line.errorbar, svg.plot polyline.front, "
        "svg.plot rect.colorbar",
        "els => els.map(e => { const r = e.getBoundingClientRect();"
        " return [e.tagName + '.' + (e.getAttribute('class') || ''), r.width, r.height]; })")
    kinds = {k for k, _, _ in boxes}
    assert {"svg.plot scatter", "circle.point", "rect.cell", "line.errorbar", "polyline.front"} <= kinds
    for kind, w, h in boxes:
        if kind == "line.errorbar":  # horizontal: its length is its width
            assert w > 0, kind
        elif kind == "polyline.front":
            assert w > 0 or h > 0, kind
        else:
            assert w > 0 and h > 0, (kind, w, h)

    # The numbers on the page are the result files' numbers.
    nums = page.eval_on_selector_all(
        "span.num", "els => els.map(e => ({...e.dataset, text: e.textContent}))")
    assert len(nums) >= 4 * 10
    for n in nums:
        value = lookup(results[int(n["result"])], n["path"])
        assert float(n["value"]) == value, n
        scaled, digits = value * float(n["scale"]), int(n["digits"])
        assert n["text"] == (f"{scaled:,.{digits}f}" if "thousands" in n else f"{scaled:.{digits}f}"), n
    shown = {n["path"] for n in nums}
    assert {"perplexity.perplexity", "perplexity.divergence.kl_mean", "perplexity.divergence.top1_agreement",
            "tasks.0.acc", "tasks.1.acc_stderr", "speed.decode_tokens_per_s", "size.checkpoint_bytes"} <= shown
    # ... and so are the plotted points.
    points = page.eval_on_selector_all(
        "figure[data-plot='size-perplexity'] circle.point, figure[data-plot='speed-kl'] circle.point",
        "els => els.map(e => ({plot: e.closest('figure').dataset.plot, ...e.dataset}))")
    assert len(points) == 2 * 4
    for p in points:
        r = results[int(p["result"])]
        x = size_mb(r) if p["plot"].startswith("size") else r["speed"]["decode_tokens_per_s"]
        y = r["perplexity"]["perplexity"] if p["plot"].endswith("perplexity") else r["perplexity"]["divergence"]["kl_mean"]
        assert math.isclose(float(p["x"]), x, rel_tol=1e-12) and math.isclose(float(p["y"]), y, rel_tol=1e-12)
    task_dots = page.eval_on_selector_all("figure[data-plot^='task-'] circle.point",
                                          "els => els.map(e => ({...e.dataset}))")
    assert len(task_dots) == 2 * 4
    for d in task_dots:
        assert float(d["value"]) == lookup(results[int(d["result"])], d["path"])
    # The embedded data is the files' content.
    embedded = json.loads(page.eval_on_selector("#llmslim-data", "e => e.textContent"))
    assert embedded["results"] == results
    # How each model was made: the recipe, and the commands.
    text = page.inner_text("#models")
    for name in RECIPES:
        assert f"--recipe {path.parent / name}/recipe.yaml" in text
    assert "- prune:" in text and "method: wanda" in text
    assert text.count("llmslim eval ") == 4
    context.close()
