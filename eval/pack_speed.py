"""Speed of ``llmslim.pack.pack`` on one MLP-sized layer's codes (2816 x 1024, the synthetic 1024-wide
Llama of eval/scale.py), with large allocations mapped as a compress sets them
(``util.map_large_allocations``): median of 7 calls per bit width.

    python eval/pack_speed.py --json eval/results/pack_speed.json --label after
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    p.add_argument("--label", default="run")
    args = p.parse_args()
    import torch

    from llmslim.pack import pack
    from llmslim.util import map_large_allocations

    map_large_allocations()
    g = torch.Generator().manual_seed(0)
    row = {"load": os.getloadavg()[0]}
    for bits in (2, 3, 4, 8):
        Q = torch.randint(0, 2**bits, (2816, 1024), dtype=torch.int32, generator=g)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            pack(Q, bits, 0)
            times.append(time.perf_counter() - t0)
        row[f"{bits}bit_ms"] = round(1000 * statistics.median(times), 2)
    print(args.label, row)
    if args.json:
        from llmslim.util import update_json

        update_json(args.json, args.label, row)


if __name__ == "__main__":
    main()
