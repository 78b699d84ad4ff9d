"""Which row counts make torch's CPU linear kernels sum a row in another order (issue 16).

For the reference model's projection shapes (SmolLM2-135M: q/k/v 576->960, o 576->576, gate/up
576->3072, down 1536->576, head 576->49152) and each kernel the fast path uses -- bf16 and fp32
``F.linear``, the int4 and int8 weight-only kernels -- prints the row counts M at which one call
over M rows differs, bit for bit, from M one-row calls (``runtime.invariant.RowInvariant.agrees``,
with the fast path's probe rows: cancelling rows for the float kernels, random rows for the
weight-only ones, whose weights are not plain), and the chunks ``RowInvariant`` then runs them in. What it prints depends on the CPU, torch and the
thread count; eval/inference.md has this machine's.

    python eval/row_invariance.py [--threads 1] [--max-rows 64]
    python eval/row_invariance.py --compare-probes   # how often each kind of probe row shows a difference
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from llmslim.runtime.invariant import RowInvariant, cancelling_rows, one_row_calls, random_rows

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "head": (576, 49152)}


def kernels(K: int, N: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    wb = w.to(torch.bfloat16)
    out = {"bf16 F.linear": (lambda x: F.linear(x, wb), torch.bfloat16, cancelling_rows([wb])),
           "fp32 F.linear": (lambda x: F.linear(x, w), torch.float32, cancelling_rows([w]))}
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g), 1)
        sz = (torch.rand(K // 64, N, 2, generator=g) * 0.01).to(torch.bfloat16)
        out["int4 kernel (g64)"] = (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, sz),
                                    torch.bfloat16, None)
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s = torch.rand(N, generator=g).to(torch.bfloat16)
        out["int8 kernel"] = (lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, s), torch.bfloat16, None)
    return out


def compare_probes(batches: int) -> None:
    """Outputs that differ between one call over M rows and M one-row calls of a bf16 ``F.linear``,
    over ``batches`` probe batches of random rows and of cancelling rows (``invariant.cancelling_rows``)."""
    for K, N in [(64, 64), (1536, 576), (576, 576)]:
        w = (torch.randn(N, K, generator=torch.Generator().manual_seed(0)) / K**0.5).to(torch.bfloat16)
        for m in (2, 5, 16):
            counts = {}
            for name, make in (("random", random_rows(K)), ("cancelling", cancelling_rows([w]))):
                gen, differ = torch.Generator().manual_seed(1), 0
                for _ in range(batches):
                    x = make(gen, m).to(torch.bfloat16)
                    differ += int((F.linear(x, w) != one_row_calls(partial(F.linear, weight=w), x)).sum())
                counts[name] = differ
            print(f"bf16 {K:5d}->{N:<5d} M={m:<3d} outputs {batches * m * N:>8d}  differing: random rows "
                  f"{counts['random']:>5d}, cancelling rows {counts['cancelling']:>5d}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--compare-probes", type=int, nargs="?", const=100, default=None, metavar="BATCHES",
                   help="count differing outputs with random vs cancelling probe rows (default 100 batches)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_probes:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.compare_probes} probe batches")
        compare_probes(args.compare_probes)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, M = 2..{args.max_rows}")
    rows = RowInvariant()
    for name, (K, N) in SHAPES.items():
        for kind, (fn, dtype, probe) in kernels(K, N).items():
            key = (name, kind)
            differ = [m for m in range(2, args.max_rows + 1) if not rows.agrees(fn, key, m, K, dtype, probe)]
            plan = rows.plan(fn, key, args.max_rows, K, dtype, probe)
            chunks = " + ".join(f"{plan.count(c)} x {c}" for c in sorted(set(plan), reverse=True))
            note = f"differs at M = {compact(differ)}; M = {args.max_rows} runs as {chunks}" if differ \
                else "every M agrees"
            print(f"{name:8s} {K:5d}->{N:<6d} {kind:18s} {note}", flush=True)


def compact(ms: list[int]) -> str:
    """[2, 3, 4, 9] -> '2-4, 9'."""
    runs, start = [], ms[0]
    for a, b in zip(ms, [*ms[1:], None], strict=True):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(runs)


if __name__ == "__main__":
    main()
