"""Per-call time of the int4 kernel Int4Linear runs (the trial's, or torch's with LLMSLIM_NATIVE=0).

    T=1 python bench_call.py; T=1 LLMSLIM_NATIVE=0 python bench_call.py   # the same with T=2
"""

import os
import time

import torch

from llmslim.nn import GPTQLinear
from llmslim.runtime import native
from llmslim.runtime.kernels import Int4Linear, int4_op

torch.set_num_threads(int(os.environ.get("T", "1")))
torch.manual_seed(0)


def best_us(f, n: int = 200) -> float:
    for _ in range(20):
        f()
    best = float("inf")
    for _ in range(15):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


for K, N, gs in [(576, 960, 64), (576, 576, 64), (576, 3072, 64), (1536, 576, 64)]:
    Q = torch.randint(0, 16, (N, K))
    s = (torch.rand(K // gs, N) / 50 + 1e-3).half()
    z = torch.randint(0, 16, (K // gs, N))
    f = Int4Linear.from_gptq(GPTQLinear.from_codes(Q, s, z, torch.arange(K) // gs, gs, 4, None))
    x = torch.randn(1, K).to(torch.bfloat16)
    op, w, kg, sz = int4_op(), f.weight_packed, f.kg, f.scale_zeros
    kind = "native" if native.available() else "torch"
    direct = best_us(lambda op=op, x=x, w=w, kg=kg, sz=sz: op(x, w, kg, sz))
    module = best_us(lambda f=f, x=x: f(x))
    print(K, N, kind, f"direct {direct:.1f} us", f"module {module:.1f} us")
