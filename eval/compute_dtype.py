"""The fast path's compute dtype on this CPU: bf16 against float32, batch 1 and 16 rows (issue 16).

The int4 kernel takes bf16 inputs whatever the model's dtype; what the choice decides is the rest
of the forward (embedding, norms, attention, the float head) and the residual stream. On a CPU
with native bf16 (AMX, AVX512-BF16) bf16 halves the bytes read; without it oneDNN emulates bf16
and a batched matmul costs several times float32's (eval/cpu_bf16.py). This loads one GPTQ
checkpoint twice, ``accelerate(model, dtype)`` for each dtype, builds the embedded serving engine
on each and alternates rounds between them (load falls on both alike):

- batch 1: one greedy request, ``--tokens`` tokens after a ``--prompt-tokens`` prompt;
- 16 rows: 16 such requests submitted at once (one batched decode).

Decode tok/s = generated tokens / time from the first to the last token (prefill excluded).
Prints medians; ``--json`` keeps every round with the load average:

    python eval/compute_dtype.py out/quality/gptq4-g128 --json eval/results/compute_dtype.json --label NAME
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from llmslim.data import load_documents
from llmslim.loader import load
from llmslim.runtime.fast import accelerate
from llmslim.runtime.sampling import SamplingParams
from llmslim.server.engine import Done, Engine, Failed, Output
from llmslim.util import native_bf16, update_json

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run_requests(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    """Submit ``prompts`` at once; decode tok/s over all of them (first token to last)."""
    done = threading.Event()
    first: list[float] = []
    last: list[float] = []
    count = [0]
    lock = threading.Lock()
    left = [len(prompts)]

    def sink(event) -> None:
        with lock:
            if isinstance(event, Output) and event.token_ids:
                now = time.perf_counter()
                if not first:
                    first.append(now)
                last[:] = [now]
                count[0] += len(event.token_ids)
            elif isinstance(event, Done | Failed):
                if isinstance(event, Failed):
                    raise RuntimeError(event.message)
                left[0] -= 1
                if not left[0]:
                    done.set()

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for p in prompts:
        engine.submit(p, params, sink)
    done.wait()
    return (count[0] - len(prompts)) / (last[0] - first[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", required=True)
    p.add_argument("--label", required=True)
    args = p.parse_args()
    engines = {}
    tok = None
    for name, dtype in DTYPES.items():
        model, tok = load(args.checkpoint, dtype=dtype)
        engines[name] = Engine(accelerate(model, dtype), tok, max_batch=args.rows)
        engines[name].start()
    # held-out wiki text, a different stretch of it per row
    text = "\n\n".join(str(d) for d in load_documents("wiki", "eval")[:200])
    ids = tok(text)["input_ids"]
    prompts = [ids[i * args.prompt_tokens:(i + 1) * args.prompt_tokens] for i in range(args.rows)]
    rounds: list[dict] = []
    for r in range(args.repeats + 1):  # round 0 warms up and is dropped
        for name, engine in engines.items():
            for label, batch in (("batch 1", prompts[:1]), (f"{args.rows} rows", prompts)):
                load_avg = os.getloadavg()[0]
                tok_s = run_requests(engine, batch, args.tokens)
                print(f"round {r} {name} {label}: {tok_s:.1f} tok/s (load {load_avg:.2f})", flush=True)
                if r:
                    rounds.append({"dtype": name, "case": label, "decode_tok_s": tok_s, "load": load_avg})
    for e in engines.values():
        e.stop()
    medians = {}
    for name in DTYPES:
        for case in ("batch 1", f"{args.rows} rows"):
            med = statistics.median(x["decode_tok_s"] for x in rounds if x["dtype"] == name and x["case"] == case)
            medians[f"{name} {case}"] = med
            print(f"{name:5s} {case:8s} {med:8.1f} tok/s")
    update_json(args.json, args.label, {"checkpoint": args.checkpoint, "native_bf16": native_bf16(),
                                        "threads": torch.get_num_threads(), "tokens": args.tokens,
                                        "prompt_tokens": args.prompt_tokens, "medians": medians,
                                        "rounds": rounds})


if __name__ == "__main__":
    main()
