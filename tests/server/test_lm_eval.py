"""lm-evaluation-harness ``local-completions`` through the server agrees with lm-eval's in-process
``hf`` model on a small local multiple-choice task.

lm-eval 0.4.13 lives in a venv of its own (eval/lm_eval_crosscheck.py makes one at
/tmp/lmeval-venv; or point LMEVAL_PYTHON at any python with lm-eval). API models need lm-eval's
``[api]`` extra (tenacity); LMEVAL_PYTHONPATH may add a folder holding it
(``pip install --target DIR --no-deps tenacity``). Slow (two lm-eval runs, about a minute):
``pytest -m slow tests/server/test_lm_eval.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.server.conftest import start, stop

pytestmark = pytest.mark.slow

LMEVAL_PYTHON = os.environ.get("LMEVAL_PYTHON", "/tmp/lmeval-venv/bin/python")
LMEVAL_PYTHONPATH = os.environ.get("LMEVAL_PYTHONPATH", "")
TASK = "llmslim_serve_mc"

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# Runs in the lm-eval venv: the same task through the server and in process.
DRIVER = r"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

folder, task_dir, base_url, task, out = sys.argv[1:6]

def run(model, args, batch):
    res = lm_eval.simple_evaluate(model=model, model_args=args, tasks=[task], batch_size=batch, device="cpu",
                                  task_manager=TaskManager(include_path=task_dir), log_samples=True,
                                  bootstrap_iters=0)
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return {"acc": res["results"][task]["acc,none"],
            "ll": [[float(r[0]) for r in s["filtered_resps"]] for s in samples]}

served = run("local-completions", {"model": "tiny", "base_url": base_url + "/v1/completions",
             "tokenizer_backend": "remote", "tokenized_requests": True, "num_concurrent": 4,
             "max_retries": 1, "max_length": 256}, 2)
local = run("hf", {"pretrained": folder, "dtype": "float32", "max_length": 256}, 4)
json.dump({"served": served, "local": local}, open(out, "w"))
"""

DOCS = [
    ("Once upon a time there was a little girl named", ["Lily", "the dog", "park"], 0),
    ("The quick brown fox jumps over the", ["lazy dog", "year 2007", "girl"], 0),
    ("She liked to play in the", ["park", "article", "fox"], 0),
    ("def main():\n    return", [" 0", " girl", " time"], 0),
    ("The article was written in the year", [" 2007", " park", " Lily"], 0),
    ("There was a little", [" girl", " fox", " dog named Lily"], 0),
]


def lm_eval_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    if LMEVAL_PYTHONPATH:
        env["PYTHONPATH"] = LMEVAL_PYTHONPATH
    return env


def lm_eval_usable() -> bool:
    if not Path(LMEVAL_PYTHON).exists():
        return False
    probe = subprocess.run([LMEVAL_PYTHON, "-c", "import lm_eval, tenacity, aiohttp"], env=lm_eval_env(),
                           capture_output=True)
    return probe.returncode == 0


def test_local_completions_agrees_with_in_process(tiny_folder, tmp_path):
    if not lm_eval_usable():  # checked here, not at collection: the probe takes seconds
        pytest.skip(f"no lm-eval with its [api] extra at {LMEVAL_PYTHON}")
    folder = tiny_folder("llama")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"query": q, "choices": c, "gold": g}) + "\n" for q, c, g in DOCS))
    (tmp_path / f"{TASK}.yaml").write_text(TASK_YAML.format(name=TASK, jsonl=jsonl))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out.json"

    running = start(api_key=None, checkpoint=str(folder), max_batch=8)
    try:
        proc = subprocess.run([LMEVAL_PYTHON, str(driver), str(folder), str(tmp_path), running.url, TASK, str(out)],
                              env=lm_eval_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert running.engine.stats.requests >= sum(len(c) for _, c, _ in DOCS)
    finally:
        stop(running)
    result = json.loads(out.read_text())
    served, local = result["served"], result["local"]
    assert len(served["ll"]) == len(DOCS)
    for s, ref in zip(served["ll"], local["ll"], strict=True):
        assert s == pytest.approx(ref, abs=1e-3)
    assert served["acc"] == local["acc"]
