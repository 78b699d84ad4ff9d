"""Batch-1 decode: the same checkpoint direct (``llmslim.runtime.generate``) and through the server
(one client, non-streaming and streaming), side by side in one run (issue 20).

    python serve/bench_batch1.py CKPT [--tokens 128] [--prompt-tokens 128] [--repeats 5] [--threads 2]
    python serve/bench_batch1.py CKPT --smoke     # proves it runs (8 tokens, 1 round, 1 thread): no figures

Two worker processes hold the model: a direct one (loaded as ``llmslim serve`` loads it: the
loader, then ``accelerate``) and the real ``llmslim serve`` command on 127.0.0.1. Each round
measures, one after the other, so that load from other jobs falls on every row alike:

- direct: ``generate(..., ignore_eos=True)``; decode tok/s = its own ``timings`` (tokens after
  the first / time after the prefill), as in eval/bench_inference.py;
- served, streaming: ``/v1/completions`` with ``stream: true``; decode tok/s = (tokens - 1) /
  (last token's arrival - first token's arrival), as a streaming client sees it;
- served, non-streaming: decode tok/s = (tokens - 1) / (time of a ``max_tokens: T`` request -
  time of a ``max_tokens: 1`` request): what the extra T - 1 tokens cost end to end.

Every request is greedy with ``ignore_eos`` over the same prompt (``--prompt-tokens`` tokens of
held-out wiki text, sent as token ids). Prints medians, the served/direct ratios and the load
average before and after; ``--json`` keeps the raw rounds. No assertions: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmslim.util import free_port


def wait_healthy(http: httpx.Client, server: subprocess.Popen, timeout: float = 600) -> None:
    """Until ``llmslim serve`` answers /health with 200 (it binds first and loads after)."""
    deadline = time.time() + timeout
    while True:
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.time() > deadline:
            sys.exit("llmslim serve did not come up")
        time.sleep(0.5)


def prompt_ids(tok, n: int) -> list[int]:
    from llmslim.data import load_documents

    text = "\n\n".join(str(d) for d in load_documents("wiki", "eval")[:20])
    return tok(text)["input_ids"][:n]


def worker(args) -> None:
    """The direct row: load like ``llmslim serve``, then run ``generate`` on request (stdin lines)."""
    import torch

    from llmslim.loader import load
    from llmslim.runtime.generate import generate
    from llmslim.server import accelerate

    torch.set_num_threads(args.threads)
    model, tok = load(args.checkpoint)
    model = accelerate(model) if args.fast else model
    ids = prompt_ids(tok, args.prompt_tokens)
    print(json.dumps({"ready": True, "ids": ids}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        r = generate(model, tok, ids, max_new_tokens=args.tokens, ignore_eos=True)
        print(json.dumps({"decode_tok_s": r.timings["decode_tok_s"], "tokens": len(r.tokens),
                          "first": r.tokens[:8]}), flush=True)



def step_seconds(http: httpx.Client) -> tuple[float, float]:
    """The engine's decode-step histogram (sum of seconds, count of steps) from /metrics."""
    total = count = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("llmslim_decode_step_seconds_sum "):
            total = float(line.split()[1])
        elif line.startswith("llmslim_decode_step_seconds_count "):
            count = float(line.split()[1])
    return total, count


def served_stream(http: httpx.Client, ids: list[int], tokens: int) -> dict:
    body = {"prompt": ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    arrivals, usage = [], None
    with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if line.startswith('data: {"id"') and '"usage":{' in line:
                usage = json.loads(line[6:])["usage"]
                continue
            arrivals.append(time.perf_counter())
    n = usage["completion_tokens"]
    return {"decode_tok_s": (n - 1) / (arrivals[-1] - arrivals[0]), "tokens": n, "chunks": len(arrivals)}


def served_whole(http: httpx.Client, ids: list[int], tokens: int) -> dict:
    def timed(max_tokens: int) -> tuple[float, dict]:
        body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        r = http.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()

    one, _ = timed(1)
    full, out = timed(tokens)
    n = out["usage"]["completion_tokens"]
    return {"decode_tok_s": (n - 1) / (full - one), "tokens": n}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="e.g. ~/.cache/llmslim/bench-inference/gptq-4bit-g128")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fast", dest="fast", action="store_false", help="the float reference path on both sides")
    p.add_argument("--json", default=None, help="write the rounds and the summary here")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run that proves the script works (8 tokens, 16-token prompt, 1 round, 1 thread)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.prompt_tokens, args.repeats, args.threads = 8, 16, 1, 1
    if args.worker:
        return worker(args)

    load_before = os.getloadavg()
    me = str(Path(__file__).resolve())
    common = ["--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens), "--threads",
              str(args.threads)] + ([] if args.fast else ["--no-fast"])
    direct = subprocess.Popen([sys.executable, me, args.checkpoint, "--worker", *common], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    server = subprocess.Popen([sys.executable, "-m", "llmslim.cli", "serve", args.checkpoint, "--port", str(port),
                               "--threads", str(args.threads), "--max-batch", "16", "--log-level", "warning"]
                              + ([] if args.fast else ["--no-fast"]), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds = []
    try:
        ready = json.loads(direct.stdout.readline())
        ids = ready["ids"]
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=600) as http:
            wait_healthy(http, server)
            served_stream(http, ids, 8)  # warm-up of both paths (first calls allocate)
            served_whole(http, ids, 8)
            direct.stdin.write("run\n")
            direct.stdin.flush()
            json.loads(direct.stdout.readline())
            for rep in range(args.repeats):
                direct.stdin.write("run\n")
                direct.stdin.flush()
                d = json.loads(direct.stdout.readline())
                a = step_seconds(http)
                s = served_stream(http, ids, args.tokens)
                w = served_whole(http, ids, args.tokens)
                b = step_seconds(http)
                # the engine's own decode steps (forward + its per-token bookkeeping), per step
                step_ms = 1e3 * (b[0] - a[0]) / max(b[1] - a[1], 1)
                rounds.append({"direct": d["decode_tok_s"], "stream": s["decode_tok_s"], "whole": w["decode_tok_s"],
                               "engine_step_ms": step_ms})
                print(f"round {rep + 1}: direct {d['decode_tok_s']:.1f}  served stream {s['decode_tok_s']:.1f}  "
                      f"served non-stream {w['decode_tok_s']:.1f} tok/s  (engine step {step_ms:.2f} ms)", flush=True)
    finally:
        if direct.poll() is None:
            direct.stdin.close()
            direct.wait(timeout=60)
        server.terminate()
        server.wait(timeout=60)
    load_after = os.getloadavg()
    med = {k: statistics.median(r[k] for r in rounds) for k in ("direct", "stream", "whole", "engine_step_ms")}
    # ratios within each round (the rows of one round saw the same load), then their median
    ratio = {k: statistics.median(r[k] / r["direct"] for r in rounds) for k in ("stream", "whole")}
    print(f"\n{Path(args.checkpoint).name}, batch 1, {args.tokens} greedy tokens after a {args.prompt_tokens}-token "
          f"prompt, {args.threads} threads, median of {args.repeats} rounds "
          f"(load average {load_before[0]:.2f} before, {load_after[0]:.2f} after):")
    print("| path | decode tok/s | / direct |\n|---|---:|---:|")
    print(f"| direct `generate` | {med['direct']:.1f} | 1.00 |")
    print(f"| served, streaming | {med['stream']:.1f} | {ratio['stream']:.2f} |")
    print(f"| served, non-streaming | {med['whole']:.1f} | {ratio['whole']:.2f} |")
    ms = {k: 1e3 / med[k] for k in ("direct", "stream", "whole")}
    print(f"\nper token: direct {ms['direct']:.2f} ms; served {ms['stream']:.2f} ms streaming, {ms['whole']:.2f} ms "
          f"non-streaming, of which the engine's decode step (forward + its bookkeeping) "
          f"{med['engine_step_ms']:.2f} ms; the rest is outside the step (hand-off, event loop, HTTP)")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "tokens": args.tokens,
                                               "prompt_tokens": args.prompt_tokens, "threads": args.threads,
                                               "load_average": [load_before, load_after], "rounds": rounds,
                                               "median": med, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
