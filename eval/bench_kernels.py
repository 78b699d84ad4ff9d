"""Batch-1 time of each fast linear kernel on a model's own layer shapes: what a layer's grid costs at decode.

    python eval/bench_kernels.py                                   # SmolLM2-135M's shapes
    python eval/bench_kernels.py --model DIR --grids 4:64 8:-1 8:64 --out eval/results/kernels.json

For every fused shape of the model's first block (q/k/v together, o, gate/up together, down: what
``runtime.fast.accelerate`` multiplies at decode) and every ``bits:group_size`` in ``--grids``, the module
``accelerate`` would use (``Int4Linear`` for 2-4 bits, ``Int8Linear`` for 8 bits per channel,
``Int8x2Linear`` for 8 bits with groups) is built from random codes and timed on one bf16 token, against
a bf16 ``nn.Linear``. Times are medians of ``--repeats`` runs of ``--calls`` calls, microseconds. The
ratio column is against 4:64. Timing: run alone on an idle machine; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from llmslim.nn import GPTQLinear  # noqa: E402
from llmslim.runtime.kernels import Int4Linear, Int8Linear, Int8x2Linear  # noqa: E402


def shapes(model: str) -> dict[str, tuple[int, int]]:
    """(in, out) of the fused products of one decoder block, from the model's config."""
    from transformers import AutoConfig

    from llmslim.models import resolve

    c = AutoConfig.from_pretrained(resolve(model))
    h, heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return {"q/k/v": (h, (heads + 2 * kv) * head_dim), "o": (heads * head_dim, h),
            "gate/up": (h, 2 * c.intermediate_size), "down": (c.intermediate_size, h)}


def module(i: int, o: int, bits: int, group: int) -> torch.nn.Module:
    gs = i if group == -1 else group
    groups = -(-i // gs)
    g = torch.Generator().manual_seed(0)
    m = GPTQLinear.from_codes(torch.randint(0, 2**bits, (o, i), generator=g), torch.rand(groups, o, generator=g) / 100,
                              torch.full((groups, o), 2 ** (bits - 1)), torch.arange(i) // gs, gs, bits, None)
    if bits == 8:
        return Int8Linear.from_gptq(m) if group == -1 else Int8x2Linear.from_gptq(m)
    return Int4Linear.from_gptq(m)


def time_us(m: torch.nn.Module, x: torch.Tensor, calls: int, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(calls // 4):
            m(x)
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(calls):
                m(x)
            runs.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--grids", nargs="+", default=["4:32", "4:64", "4:128", "8:-1", "8:32", "8:64", "8:128"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE / "results" / "kernels.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    rows = []
    for name, (i, o) in shapes(args.model).items():
        x = torch.randn(1, i, dtype=torch.bfloat16)
        row = {"product": name, "in": i, "out": o,
               "bf16": time_us(torch.nn.Linear(i, o, bias=False).to(torch.bfloat16), x, args.calls, args.repeats)}
        for grid in args.grids:
            bits, group = (int(v) for v in grid.split(":"))
            if group != -1 and i % group:
                continue  # the tune's divisible spaces never offer it
            row[grid] = time_us(module(i, o, bits, group), x, args.calls, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    load.append(os.getloadavg()[0])
    cols = ["bf16", *args.grids]
    lines = ["| product (in → out) | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        ref = r.get("4:64")
        cells = [f"{r[c]:.1f}" + (f" ({r[c] / ref:.2f}×)" if ref else "") if c in r else "—" for c in cols]
        lines.append(f"| {r['product']} ({r['in']} → {r['out']}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\nbatch 1, bf16 activations, {args.threads} threads, µs per call (× 4:64), load average {load}")
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "threads": args.threads, "calls": args.calls,
                                    "repeats": args.repeats, "load_average": load, "torch": torch.__version__,
                                    "rows": rows, "table": table}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
