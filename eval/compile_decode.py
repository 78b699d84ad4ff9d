"""Does torch.compile make llmslim's batch-1 decode step faster? (issue 16: the per-op cost)

    python eval/compile_decode.py CKPT --variants eager static compile compile-cpp --json OUT

One process per variant (inductor's settings are global), each: load ``CKPT`` on the fast path
(``accelerate``, bf16), prefill a 128-token held-out prompt with the eager lean forward, then
decode 128 greedy tokens with the variant's step, ``--repeats`` times; the median decode tok/s is
reported with the first 32 greedy tokens and the largest logit difference against the eager step.

- ``eager``: ``LeanDecoder`` as ``runtime.generate`` runs it (growing views of the cache).
- ``static``: the same blocks over the whole preallocated cache behind a mask, every shape fixed
  (what a compiled graph needs; measured eager to separate the mask's cost from compile's gain).
- ``compile``: ``static`` through ``torch.compile`` (inductor, default settings).
- ``compile-cpp``: the same with ``cpp_wrapper`` (the graph called from C++, not Python).
- ``compile-autotune``: ``max_autotune`` + ``freezing`` (inductor's own int4 GEMM template).
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

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["eager", "static", "compile", "compile-cpp", "compile-autotune"]


def _prompt(tok, n: int) -> list[int]:
    from llmslim.data import load_documents

    text = "\n\n".join(str(d) for d in load_documents("wiki", "eval")[:20])
    return list(tok(text)["input_ids"][:n])


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from llmslim.loader import load
    from llmslim.runtime.fast import accelerate
    from llmslim.runtime.generate import Stepper

    torch.set_num_threads(args.threads)
    model, tok = load(args.ckpt, dtype=torch.bfloat16)
    accelerate(model, torch.bfloat16, head=args.head)
    model.eval()
    ids = _prompt(tok, args.prompt_tokens)
    stepper = Stepper(model, len(ids) + args.tokens + 1)
    lean = stepper.lean
    assert lean is not None, "the lean forward does not cover this model"
    nh, nkv, d = lean.n_heads, lean.n_kv, lean.head_dim
    S = stepper.cache.layers[0].max_len
    cols = torch.arange(S)

    def plain(proj, h):
        return proj.fn(h)

    with torch.inference_mode():
        tables = lean._rope(torch.zeros(1, dtype=torch.bfloat16), cols)

    def static_step(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = lean.embed(token)
        rope = {key: (c[pos], s[pos]) for key, (c, s) in tables.items()}
        mask = cols <= pos

        def attend(i, b, q, k, v):
            layer = stepper.cache.layers[i]
            K, V = layer._k, layer._v
            K[0].index_copy_(1, pos, k.transpose(0, 1))
            V[0].index_copy_(1, pos, v.transpose(0, 1))
            m = mask if b.window is None else mask & (cols > pos - b.window)
            a = F.scaled_dot_product_attention(q.reshape(1, nkv, nh // nkv, d), K, V, attn_mask=m,
                                               scale=lean.scaling)
            return a.reshape(1, nh * d)

        return lean._logits(lean._blocks(x, rope, attend, plain), plain)[0]

    step = static_step
    if args.variant.startswith("compile"):
        import torch._inductor.config as ic

        if args.variant == "compile-cpp":
            ic.cpp_wrapper = True
        if args.variant == "compile-autotune":
            ic.max_autotune = True
            ic.freezing = True
        step = torch.compile(static_step, dynamic=False)

    def run() -> tuple[float, float, list[int], list[torch.Tensor]]:
        stepper.cache.reset() if hasattr(stepper.cache, "reset") else None
        stepper.pos = 0
        logits = stepper(ids)
        out, seen = [], []
        t0 = time.perf_counter()
        t_first = None
        for _ in range(args.tokens):
            token = int(logits.argmax())
            out.append(token)
            if args.variant == "eager":
                logits = stepper([token])
            else:
                pos = torch.tensor([stepper.pos])
                logits = step(torch.tensor([token]), pos)
                stepper.pos += 1
            if len(seen) < 32:
                seen.append(logits.float().clone())
            if t_first is None:
                t_first = time.perf_counter()
        t1 = time.perf_counter()
        return (args.tokens - 1) / (t1 - t_first), t_first - t0, out, seen

    with torch.inference_mode():
        t = time.perf_counter()
        _, first_s, tokens, seen = run()  # warm-up: compiles
        warm_s = time.perf_counter() - t
        rates = [run()[0] for _ in range(args.repeats)]
    return {"variant": args.variant, "head": args.head, "decode_tok_s": rates, "median": statistics.median(rates),
            "first_call_s": first_s, "warmup_run_s": warm_s, "tokens": tokens[:32],
            "logits": [s.tolist() for s in seen] if args.variant == "eager" else None,
            "_seen": seen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--head", default="keep", choices=["keep", "int8"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--ref", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        import torch

        r = worker(args)
        seen = r.pop("_seen")
        if args.ref and args.ref.exists():
            ref = torch.load(args.ref)
            r["max_abs_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(ref, seen, strict=False))
        elif args.ref:
            torch.save(seen, args.ref)
        r.pop("logits")
        print(json.dumps(r))
        return
    ref = Path(f"/tmp/compile_decode_ref_{os.getpid()}.pt")
    results = []
    for v in args.variants:
        cmd = [sys.executable, __file__, args.ckpt, "--variant", v, "--head", args.head, "--repeats",
               str(args.repeats), "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens),
               "--threads", str(args.threads), "--ref", str(ref)]
        load = os.getloadavg()[0]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            print(f"{v}: failed\n{r.stderr[-3000:]}")
            results.append({"variant": v, "error": r.stderr[-3000:]})
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["load_before"] = load
        results.append(row)
        print(f"{v:18s} {row['median']:7.1f} tok/s  first call {row['first_call_s']:.2f} s  "
              f"max |dlogit| {row.get('max_abs_logit_diff', 0):.4f}  tokens equal to eager: "
              f"{row['tokens'] == results[0].get('tokens')}  load {load:.2f}", flush=True)
    ref.unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
