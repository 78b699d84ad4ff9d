"""Peak resident memory of loading a GPTQ checkpoint the way ``llmslim serve`` does (issue 16: the load
set the 4-bit server's peak).

    python eval/load_memory.py --json eval/results/load_memory.json        # out/quality/gptq4-g128
    python eval/load_memory.py --checkpoint DIR --repeats 1                 # any checkpoint
    git archive COMMIT llmslim | tar -x -C /tmp/old && python eval/load_memory.py --tree /tmp/old   # older code

Each repeat is a fresh process (one torch thread) that imports what serving imports (torch,
transformers, llmslim's loader and fast path), then runs the serving loader:
``llmslim.loader.load(CKPT, dtype=bf16)`` (what ``server.build`` calls on the fast path), then
``accelerate`` (the int4 kernels). The imports a first load pays for once (config classes, the
model's modeling module) are warmed by building the model on ``meta`` first. ``/proc/self/status`` is
read before the load, once the model is loaded (before the tokenizer), after the load and after
``accelerate``: VmRSS (what is held then), VmHWM (the peak so far: "model load: peak" is the VmHWM
once the model is loaded), RssAnon/RssFile. ``tensors`` is the bytes of the loaded model's parameters
and buffers (each counted once), before ``accelerate``: what the load must hold at the least. Resident
memory does not depend on the machine's load. No assertions: tests/formats/test_checkpoint.py checks
that the loaded tensors are right.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = str(ROOT / "out" / "quality" / "gptq4-g128")

CHILD = r"""
import json, sys
if sys.argv[2]:  # --tree: that llmslim package instead of the installed (editable) one
    sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                     and "editable" not in getattr(f, "__name__", "")]
    sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)

def status():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out

from transformers import AutoModelForCausalLM  # noqa: F401
from llmslim.loader import load
from llmslim.runtime.fast import accelerate
from llmslim.formats.stream import empty_model
from llmslim.models import read_config, resolve
import llmslim
# Warm the imports a first load pays for once (the config classes, the model's modeling module) by
# building the model on `meta` and dropping it: "imported" is then the process before any weight.
empty_model(read_config(resolve(sys.argv[1])))
res = {"llmslim": llmslim.__file__, "imported": status()}
import llmslim.loader as loader
read_tokenizer = loader.load_tokenizer
def load_tokenizer(folder):  # the model is loaded, the tokenizer comes next
    res["model_loaded"] = status()
    return read_tokenizer(folder)
loader.load_tokenizer = load_tokenizer
model, tok = load(sys.argv[1], dtype=torch.bfloat16)
res["loaded"] = status()
seen = {}
for t in [*model.parameters(), *model.buffers()]:
    seen[t.data_ptr()] = t.numel() * t.element_size()
res["tensors"] = sum(seen.values())
model = accelerate(model)
res["accelerated"] = status()
print(json.dumps(res))
"""


def measure(checkpoint: str, tree: str = "") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, checkpoint, tree], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(x: int) -> str:
    return f"{x / 2**20:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=CHECKPOINT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="", help="a name for these runs in the JSON (e.g. before/after)")
    ap.add_argument("--tree", default="", help="measure the llmslim package in this folder instead of the installed "
                    "one, e.g. an older commit's: git archive COMMIT llmslim | tar -x -C DIR")
    ap.add_argument("--json", help="write the runs here (appended to the file's 'runs' when it exists)")
    args = ap.parse_args()
    runs = [measure(args.checkpoint, args.tree) for _ in range(args.repeats)]
    print("| run | RSS before load | model load: peak | above before | tensors | load() with tokenizer: peak | "
          "RSS after load | peak after accelerate | RSS after accelerate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(runs):
        base, model_peak = r["imported"]["VmRSS"], r["model_loaded"]["VmHWM"]
        print(f"| {i} | {mib(base)} | {mib(model_peak)} | {mib(model_peak - base)} | {mib(r['tensors'])} | "
              f"{mib(r['loaded']['VmHWM'])} | {mib(r['loaded']['VmRSS'])} | {mib(r['accelerated']['VmHWM'])} | "
              f"{mib(r['accelerated']['VmRSS'])} |")
    if args.json:
        path = Path(args.json)
        doc = json.loads(path.read_text()) if path.exists() else {"command": "python eval/load_memory.py",
                                                                   "checkpoint": args.checkpoint, "runs": []}
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        doc["runs"].append({"label": args.label, "commit": commit, "tree": args.tree or None, "python": platform.python_version(),
                            "argv": sys.argv[1:], "results": runs})
        path.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
