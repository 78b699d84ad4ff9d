"""llmslim's int4 / bf16 products (runtime/csrc/int4_matmul.cpp) against torch's, by rows (issue 16).

    python eval/bench_matmul.py --json eval/results/matmul_session22.json

On SmolLM2-135M's fused layer shapes (q/k/v, o, gate/up, down: what the lean forward multiplies
at decode) and its 49152 x 576 bf16 head, for M = 1, 4, 8, 16, 64 rows of bf16 activations (one
decode step of M running requests): torch's ``_weight_int4pack_mm_for_cpu`` and llmslim's
``int4_matmul`` on the same random 4-bit codes, group 64; ``F.linear`` and llmslim's
``bf16_matmul`` on the head, and the head in 8-bit blocks of 32 (``q8_matmul``, runtime/head.py:
what the fast path runs by default since session 23). Microseconds, medians of ``--repeats`` runs of ``--calls`` calls, in
the process's torch threads (``--threads``). Run alone on an idle machine; the load average is
recorded. Needs a CPU with AVX512-BF16 (else llmslim's kernels are not built and it says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cpu_bf16 import median_us  # noqa: E402  (this folder is on sys.path when run as a script)

from llmslim.runtime import ext  # noqa: E402
from llmslim.runtime.head import Q8Linear  # noqa: E402
from llmslim.runtime.kernels import pack_int4  # noqa: E402

SHAPES = {"q/k/v": (576, 960), "o": (576, 576), "gate/up": (576, 3072), "down": (1536, 576)}
HEAD = (576, 49152)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    mm = ext.matmuls()
    if mm is None:
        raise SystemExit(f"llmslim's int4/bf16 kernels are not built here ({ext.why_not or 'no AVX512-BF16'})")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, (K, N) in SHAPES.items():
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
        sz = torch.stack([torch.rand(K // 64, N, generator=g) * 0.02, torch.randn(K // 64, N, generator=g) * 0.01],
                         -1).bfloat16().contiguous()
        weights[name] = (K, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), pack_int4(q), sz)
    head = torch.randn(HEAD[1], HEAD[0], generator=g).bfloat16()
    q8 = Q8Linear(head).product()
    results = {"load_before": os.getloadavg()[0], "threads": args.threads, "rows": []}
    print(f"load average {results['load_before']:.2f}, {args.threads} threads; microseconds (x = torch / llmslim)")
    print(f"{'M':>3} {'product':8} {'torch':>9} {'llmslim':>9} {'x':>6}")
    for M in args.rows:
        x = {K: torch.randn(M, K, generator=g).bfloat16() for K in {576, 1536}}
        layer_t = layer_o = 0.0
        for name, (K, wt, wo, sz) in weights.items():
            a = x[K]
            t = median_us(lambda a=a, wt=wt, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(a, wt, 64, sz),
                          args.repeats, args.calls)
            o = median_us(lambda a=a, wo=wo, sz=sz: mm.int4_matmul(a, wo, sz, 64), args.repeats, args.calls)
            layer_t, layer_o = layer_t + t, layer_o + o
            results["rows"].append({"M": M, "product": name, "torch_us": t, "llmslim_us": o})
            print(f"{M:>3} {name:8} {t:9.1f} {o:9.1f} {t / o:6.2f}")
        print(f"{M:>3} {'layer':8} {layer_t:9.1f} {layer_o:9.1f} {layer_t / layer_o:6.2f}")
        calls = max(5, args.calls // 10)
        a = x[576]
        t = median_us(lambda a=a: F.linear(a, head), args.repeats, calls)
        o = median_us(lambda a=a: mm.bf16_matmul(a, head), args.repeats, calls)
        results["rows"].append({"M": M, "product": "head bf16", "torch_us": t, "llmslim_us": o})
        print(f"{M:>3} {'head':8} {t:9.1f} {o:9.1f} {t / o:6.2f}")
        o8 = median_us(lambda a=a: q8(a), args.repeats, calls)
        results["rows"].append({"M": M, "product": "head 8-bit", "torch_us": t, "llmslim_us": o8})
        print(f"{M:>3} {'head q8':8} {t:9.1f} {o8:9.1f} {t / o8:6.2f}")
    results["load_after"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
