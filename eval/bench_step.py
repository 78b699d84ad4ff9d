"""A batch-1 decode step through the lean forward's Python loop and through ``DecodeStep`` (issue 16).

    python eval/bench_step.py --json eval/results/step_session23.json

The 4-bit g128 checkpoint ``eval/bench_inference.py`` makes (``--model``), ``accelerate``'s
default path (bf16, the 8-bit head), prefilled to ``--position`` tokens; then decode steps
(``Stepper``, one token each: embedding, every layer, final norm and head), alternating between
the Python loop (``lean.step`` set aside) and the one C++ call, ``--repeats`` x ``--steps`` steps
each, milliseconds per step. Both give the same logits (tests/runtime/test_decode_step.py); this
is only their time. Run alone on an idle machine; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from llmslim.loader import load
from llmslim.runtime.fast import accelerate
from llmslim.runtime.generate import Stepper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path.home() / ".cache/llmslim/bench-inference/gptq-4bit-g128"))
    p.add_argument("--position", type=int, default=300)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load(args.model, dtype=torch.bfloat16)
    accelerate(model, torch.bfloat16)
    total = args.position + 2 * args.repeats * args.steps + 8
    step = Stepper(model, total)
    report = {"model": args.model, "threads": args.threads, "position": args.position, "load_before": os.getloadavg()[0],
              "ms": {"python loop": [], "one call": []}}
    with torch.inference_mode():
        step(list(range(100, 100 + args.position)))
        lean = step.lean
        if lean is None or lean.step is None:
            raise SystemExit("this model/CPU does not run DecodeStep (see runtime/step.py)")
        one_call, token = lean.step, 1000
        for _ in range(args.repeats):
            for name in ("python loop", "one call"):
                lean.step = one_call if name == "one call" else None
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step([token])
                    token += 1
                report["ms"][name].append((time.perf_counter() - t0) / args.steps * 1e3)
        lean.step = one_call
    report["load_after"] = os.getloadavg()[0]
    report["median_ms"] = {k: statistics.median(v) for k, v in report["ms"].items()}
    print(f"load average {report['load_before']:.2f} -> {report['load_after']:.2f}, {args.threads} threads, "
          f"position {args.position}+")
    for k, v in report["ms"].items():
        print(f"{k:12s} median {statistics.median(v):.2f} ms/token  ({', '.join(f'{x:.2f}' for x in v)})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
