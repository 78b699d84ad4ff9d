"""Peak memory of the block-by-block path does not grow with the model (slow: synthetic models of
hundreds of MB, written by eval/scale.py in several shards, quantized in processes of their own).

The figures are ratios to the model's size, not absolute numbers: the same test on a bigger
machine or another torch build must pass too.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.longest]

ROOT = Path(__file__).resolve().parents[2]


def scale_module():
    spec = importlib.util.spec_from_file_location("llmslim_eval_scale", ROOT / "eval" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same blocks, 10 and 40 of them: ~0.3 GB and ~1 GB of fp16 in shards of 200 MB."""
    scale = scale_module()
    root = tmp_path_factory.mktemp("scale")
    shape = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=16000)
    made = {}
    for layers in (10, 40):
        folder = root / f"llama-{layers}"
        info = scale.make(folder, layers=layers, shard_size="200MB", **shape)
        assert info["shards"] >= 2
        made[layers] = folder
    return scale, made


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_peak_rss_does_not_follow_model_size(models, method, tmp_path):
    scale, made = models
    extra = ["--nsamples", "8", "--seqlen", "256"] if method == "gptq" else []
    small, big = (scale.measure(made[n], method, extra, tmp_path) for n in (10, 40))
    (tmp_path / "results.json").write_text(json.dumps([small, big], indent=1))
    grown = big["model_bytes"] - small["model_bytes"]
    # Four times the blocks: the peak grows by a small fraction of the extra weights ...
    assert big["peak_rss"] - small["peak_rss"] < 0.15 * grown, (small, big)
    # ... and stays below what the in-memory path needs for the weights alone (the model whole in
    # float32: twice the fp16 bytes). What is left is the process's own floor (torch, transformers,
    # the tokenized calibration text, one block's Hessians): ~1 GB here whatever the model's size.
    assert big["peak_rss"] < 2.0 * big["model_bytes"], big
    assert big["out_bytes"] < big["model_bytes"] / 2.5
