"""What glibc's allocation mode costs GPTQ's solver: one layer solved with its temporaries mapped
afresh (``util.map_large_allocations``, the block driver's mode for its forwards) vs served from the
heap (``util.heap_allocations``, the mode the driver solves in), for each scale search.

    taskset -c 0 python eval/solver_allocations.py --out eval/results/solver_allocations.json

One torch thread; a [1536, 576] layer (SmolLM2-135M's MLP shape) with a Hessian of correlated
inputs; ``--repeats`` solves per cell, user/system CPU and minor page faults from getrusage. Each
cell runs in a fresh process, so one mode's heap state never leaks into the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CELL = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from llmslim.quant.gptq import gptq_quantize
from llmslim.util import heap_allocations, map_large_allocations
mode, importance, target, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
map_large_allocations()
torch.manual_seed(0)
X = torch.randn(4096, 576) * torch.rand(576) * 3
H, W = X.T @ X / 4096 * 2, torch.randn(1536, 576) * 0.05
kw = dict(bits=4, group_size=32, grid="q4_0") if target == "q4_0" else dict(bits=4, group_size=128)
def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt
u0, s0, f0 = usage()
t0 = time.perf_counter()
for _ in range(repeats):
    if mode == "heap":
        with heap_allocations():
            gptq_quantize(W, H, sym=True, mse=True, act_group_aware=True,
                          importance=None if importance == "none" else importance, **kw)
    else:
        gptq_quantize(W, H, sym=True, mse=True, act_group_aware=True,
                      importance=None if importance == "none" else importance, **kw)
u1, s1, f1 = usage()
print(json.dumps({"wall_s": (time.perf_counter() - t0) / repeats, "user_s": (u1 - u0) / repeats,
                  "sys_s": (s1 - s0) / repeats, "minor_faults": (f1 - f0) // repeats}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for target in ("q4_0", "int4-g128"):
        for importance in ("none", "hessian", "imatrix"):
            for mode in ("mapped", "heap"):
                out = subprocess.run([sys.executable, "-c", CELL, mode, importance, target, str(args.repeats)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                rows.append({"target": target, "importance": importance, "mode": mode,
                             **json.loads(out.strip().splitlines()[-1])})
                r = rows[-1]
                print(f"{target:10s} {importance:8s} {mode:7s} wall {r['wall_s']:6.2f} s  user {r['user_s']:6.2f}"
                      f"  sys {r['sys_s']:6.2f}  faults {r['minor_faults']:>9d}", flush=True)
    print("\n| target | search | mapped: wall / sys s | heap: wall / sys s | speedup |\n|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        m, h = rows[i], rows[i + 1]
        print(f"| {m['target']} | {m['importance']} | {m['wall_s']:.2f} / {m['sys_s']:.2f} | "
              f"{h['wall_s']:.2f} / {h['sys_s']:.2f} | {m['wall_s'] / h['wall_s']:.2f}x |")
    if args.out:
        load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "load_average_after": load, "rows": rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
