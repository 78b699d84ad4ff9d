"""How the block driver's forwards allocate, measured: Wanda 50% on the reference model (32 x 512
wiki calibration tokens, seed 0), each run in a fresh process (what glibc's heap holds when the driver
starts differs between processes, and that was the point). Per run: ``compress`` seconds, peak RSS,
the 1-minute load average, and a SHA-1 of the pruned state dict (the bytes must not depend on how
memory was allocated).

    python eval/forward_allocations.py --runs 5 --json eval/results/forward_allocations.json --label after

Session 14's figures (eval/pruning.md) came from this at 4b516ea ("after") and at its parent ("before").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one(nsamples: int) -> dict:
    from llmslim.config import PruneConfig
    from llmslim.data import calibration_tokens
    from llmslim.loader import load
    from llmslim.pipeline.recipe import Recipe
    from llmslim.pipeline.run import compress
    from llmslim.util import rss_bytes

    model, tok = load("smollm2-135m")
    calib = calibration_tokens("wiki", tok, nsamples, 512, seed=0)
    t0 = time.perf_counter()
    model, _ = compress(model, Recipe((PruneConfig("wanda", 0.5),)), calib)
    seconds = time.perf_counter() - t0
    h = hashlib.sha1()
    for v in model.state_dict().values():
        h.update(v.detach().float().numpy().tobytes())
    return {"seconds": round(seconds, 1), "peak_rss_mb": rss_bytes()[1] // 2**20, "load": os.getloadavg()[0],
            "sha1": h.hexdigest()[:12]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--label", default="run")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.nsamples)))
        return
    rows = []
    for i in range(args.runs):
        res = subprocess.run([sys.executable, __file__, "--one", "--nsamples", str(args.nsamples)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(i, rows[-1], flush=True)
    if args.json:
        from llmslim.util import update_json

        update_json(args.json, args.label, rows)


if __name__ == "__main__":
    main()
