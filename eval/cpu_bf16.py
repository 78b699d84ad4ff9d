"""How this CPU multiplies in bf16 against float32: the fact behind llmslim's `auto` choices.

llmslim computes in bf16 only where the CPU has native bf16 (AMX or AVX512-BF16, `util.native_bf16`);
elsewhere oneDNN emulates it. This times, on the reference model's shapes, a dense matmul in float32
and bf16 and torch's int4/int8 weight-only kernels with bf16 and float32 activations, and writes
the medians (microseconds) with the CPU's flags:

    python eval/cpu_bf16.py --json eval/results/cpu_bf16.json --label amd-epyc-avx2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from llmslim.util import native_bf16, update_json


def median_us(fn, repeats: int = 7, inner: int = 20) -> float:
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t) / inner * 1e6)
    return statistics.median(runs)


def cpu_flags() -> list[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    return sorted({f for f in text.split() if f in wanted})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--label", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    n, k, group = 1536, 576, 64  # SmolLM2's MLP up projection
    rows = {}
    w = torch.randn(n, k)
    for m in (1, 16, 4096):
        x = torch.randn(m, k)
        for dt in (torch.float32, torch.bfloat16):
            a, b = x.to(dt), w.to(dt)
            rows[f"dense {str(dt)[6:]} M={m}"] = median_us(lambda a=a, b=b: torch.nn.functional.linear(a, b),
                                                           inner=2 if m == 4096 else 20)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    w8 = torch.randint(-127, 127, (n, k), dtype=torch.int8)
    scale = torch.rand(n)
    for m in (1, 16):
        for dt in (torch.bfloat16, torch.float32):
            x = torch.randn(m, k, dtype=dt)
            sz = torch.randn(k // group, n, 2, dtype=dt)
            s8 = scale.to(dt)
            rows[f"int4 g{group} {str(dt)[6:]} M={m}"] = median_us(
                lambda x=x, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz))
            rows[f"int8 {str(dt)[6:]} M={m}"] = median_us(
                lambda x=x, s8=s8: torch.ops.aten._weight_int8pack_mm(x, w8, s8))
    result = {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(), "native_bf16": native_bf16(),
              "threads": torch.get_num_threads(), "load": os.getloadavg()[0], "torch": torch.__version__,
              "shape": [n, k], "median_us": rows}
    for name, us in rows.items():
        print(f"{name:28s} {us:10.1f} us")
    update_json(args.json, args.label, result)


if __name__ == "__main__":
    main()
