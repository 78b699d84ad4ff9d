"""Efficiency numbers, result files, the comparison table and its PNG, and the eval/compare CLI."""

from __future__ import annotations

import argparse
import importlib
import json
import os

import pytest
import torch

from llmslim.errors import UserError
from llmslim.metrics import checkpoint_bytes, compare_markdown, parameter_bytes, speed
from llmslim.metrics.commands import register
from llmslim.metrics.report import FORMAT, plot_quality_vs_size, read_result, write_json
from llmslim.util import peak_rss_bytes


def result(name, size, ppl=None, acc=None, setup=("gptq", 2048)):
    r = {"format": FORMAT, "name": name, "model": name, "size": {"checkpoint_bytes": size, "parameter_bytes": size}}
    if ppl is not None:
        r["perplexity"] = {"method": setup[0], "source": "wiki", "seqlen": setup[1], "stride": setup[1],
                           "add_bos": False, "perplexity": ppl, "tokens_scored": 100, "windows": 1, "seconds": 1,
                           "divergence": {"kl_mean": 0.01, "top1_agreement": 0.9, "baseline_perplexity": 10.0}}
    if acc is not None:
        r["tasks"] = [{"task": "winowhy", "n": 10, "acc": acc, "acc_stderr": 0.1, "acc_norm": acc, "chance": 0.5}]
    return r


def test_checkpoint_bytes_counts_weight_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "extra.safetensors").write_bytes(b"x" * 24)
    (tmp_path / "config.json").write_text("{}" * 100)
    assert checkpoint_bytes("not/a/path", tmp_path) == 1024
    assert checkpoint_bytes(tmp_path / "model.safetensors") == 1000
    assert checkpoint_bytes("org/hub-model", None) is None


def test_parameter_bytes_counts_tied_weights_once(model):
    expected = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())
    assert parameter_bytes(model) == expected


def test_peak_rss_is_plausible():
    assert 10_000_000 < peak_rss_bytes() < 1_000_000_000_000


def test_speed_reports_median_tokens_per_second(model):
    s = speed(model, prompt_tokens=8, new_tokens=4, repeats=2)
    assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0 and s["batch_size"] == 1
    with pytest.raises(UserError, match="context"):
        speed(model, prompt_tokens=60, new_tokens=10)


def test_write_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, result("a", 10, ppl=5.0))
    assert read_result(path)["perplexity"]["perplexity"] == 5.0
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # permissions like any new file, not mkstemp's 0600


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "not a readable JSON"),
    ('{"model": "x"}', "not an llmslim eval result"),
    ("[1, 2]", "not an llmslim eval result"),
])
def test_bad_result_files(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_result(path)


def test_compare_renders_one_table():
    table = compare_markdown([result("fp32", 540e6, 19.7, 0.55), result("gptq4", 120e6, 21.0, 0.52)])
    lines = table.splitlines()
    assert lines[0].startswith("| model | size (MB) | perplexity | KL | top-1 agree | winowhy acc")
    assert lines[2].startswith("| fp32 | 540.0 | 19.700 | 0.0100 | 0.9000 | 0.5500 ± 0.1000")
    assert lines[3].startswith("| gptq4 | 120.0 | 21.000 |")
    assert "Perplexity: gptq wiki seqlen=2048 stride=2048 no-BOS." in table


def test_compare_warns_when_perplexities_are_not_comparable():
    table = compare_markdown([result("a", 1e6, 10.0), result("b", 1e6, 11.0, setup=("sliding", 1024))])
    assert "not comparable" in table and "| perplexity setup |" in table
    assert "| sliding wiki seqlen=1024 stride=1024 no-BOS |" in table


def test_plot_is_a_png_written_by_matplotlib(tmp_path):
    path = plot_quality_vs_size([result("fp32", 540e6, 19.7, 0.55), result("gptq4", 120e6, 21.0, 0.52)],
                                tmp_path / "q.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"matplotlib" in data.lower() and len(data) > 5000


def test_plot_needs_a_quality_measure(tmp_path):
    with pytest.raises(UserError, match="nothing|neither"):
        plot_quality_vs_size([result("a", 1e6)], tmp_path / "q.png")


# ---- CLI glue ------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(prog="llmslim")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def fake_load(monkeypatch, model, tiny_tokenizer):
    calls = []

    def load(source, **kw):
        calls.append(source)
        return model, tiny_tokenizer

    monkeypatch.setattr(importlib.import_module("llmslim.loader"), "load", load)
    return calls


def test_eval_command_writes_json_and_prints_a_table(tmp_path, fake_load, capsys, text):
    corpus = tmp_path / "text.txt"
    corpus.write_text(text)
    out = tmp_path / "r.json"
    args = parse(["eval", "tiny", "--baseline", "tiny", "--ppl", str(corpus), "--seqlen", "16",
                  "--tasks", "general_knowledge", "--limit", "2", "--speed", "--output", str(out), "--no-progress"])
    assert args.func(args) == 0
    r = json.loads(out.read_text())
    assert fake_load == ["tiny", "tiny"]
    assert r["perplexity"]["source"] == str(corpus) and r["perplexity"]["divergence"]["top1_agreement"] == 1.0
    assert r["tasks"][0]["task"] == "general_knowledge" and r["speed"]["decode_tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "perplexity [gptq" in printed and "top-1 agreement" in printed and "task general_knowledge" in printed

    compare = parse(["compare", str(out), str(out), "--output", str(tmp_path / "report.md"),
                     "--plot", str(tmp_path / "plot.png")])
    assert compare.func(compare) == 0
    assert (tmp_path / "report.md").read_text().startswith("| model |")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["--ppl", "wiki", "--stride", "8"], "only to --ppl-method sliding"),
    (["--baseline", "x"], "--baseline needs --ppl"),
    (["--tasks", "winowhy", "--limit", "0"], "--limit must be at least 1"),
    (["--limit", "5"], "--limit applies to --tasks"),
    (["--tasks", "winowhy,bogus"], "unknown task 'bogus'"),
    (["--ppl", "wiki", "--seqlen", "1"], "--seqlen must be at least 2"),
    (["--ppl", "wiki", "--batch-tokens", "0"], "--batch-tokens"),
])
def test_eval_flag_mistakes_fail_before_loading(argv, message, fake_load):
    args = parse(["eval", "tiny", *argv])
    with pytest.raises(UserError, match=message):
        args.func(args)
    assert fake_load == []


def test_eval_output_cannot_be_a_folder(tmp_path, fake_load):
    args = parse(["eval", "tiny", "--speed", "--output", str(tmp_path)])
    with pytest.raises(UserError, match="is a folder"):
        args.func(args)


def test_compare_missing_file(tmp_path):
    args = parse(["compare", str(tmp_path / "missing.json")])
    with pytest.raises(UserError, match="does not exist"):
        args.func(args)


def test_unreachable_hub_task_fails_before_loading(monkeypatch, fake_load):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    args = parse(["eval", "tiny", "--tasks", "hellaswag", "--limit", "3"])
    with pytest.raises(UserError, match="needs the hub"):
        args.func(args)
    assert fake_load == []


@pytest.mark.parametrize("path", ["serve", "as-loaded"])
def test_speed_times_the_serving_fast_path_by_default(path):
    """`eval --speed` times what `llmslim serve` runs (GPTQ layers on the int4/int8 kernels), not the
    loaded GPTQLinear that dequantizes on every call, unless asked to."""
    from llmslim.config import GPTQConfig
    from llmslim.metrics.suite import evaluate
    from llmslim.nn import GPTQLinear
    from llmslim.pipeline.stages import quantize
    from llmslim.server import fast_path_available
    from tests.conftest import make_tiny_model, make_tiny_tokenizer

    model = make_tiny_model("llama").float()
    quantize(model, GPTQConfig(bits=4, group_size=32), torch.randint(0, 320, (4, 16)))
    assert any(isinstance(m, GPTQLinear) for m in model.modules())
    r = evaluate(model, make_tiny_tokenizer(), "tiny", measure_speed=True, speed_path=path, progress=False)
    assert r["speed"]["decode_tokens_per_s"] > 0
    fast = path == "serve" and fast_path_available()
    assert r["speed"]["path"].startswith("llmslim serve's fast path") == fast
    assert any(isinstance(m, GPTQLinear) for m in model.modules()) != fast  # converted in place
