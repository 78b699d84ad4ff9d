"""What the fusion constraint costs a tuned model: predicted KL at equal size under three rules.

    python eval/tune_fusion_options.py [--sizes 101141896 105082344 114620744 118768312]

Reads the reference model's cached sensitivities (the default space's, from an earlier `llmslim tune`
or eval/bench_tune.py run: nothing is measured) and plans a size budget three ways:

- today's rule (``pipeline.tune.fusable``): fused siblings (q/k/v, gate/up) share one grid, or one
  group size at 2-4 bits each -- one int4 kernel call per unit;
- nested groups: siblings at 2-4 bits whose group sizes divide one another (32 | 64 | 128 | per
  channel) -- still one call, if the coarser grids were re-expressed on the finest one's groups;
- no constraint: every layer its own grid (8-bit siblings beside 4-bit ones cost extra calls).

Predicted KL only (calibrated, as `llmslim tune` reports it); writes eval/results/tune_fusion_options.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from llmslim.config import Budget, GPTQConfig  # noqa: E402
from llmslim.models import cache_root  # noqa: E402
from llmslim.pipeline import tune  # noqa: E402
from llmslim.quant.sensitivity import Sensitivities  # noqa: E402

DEFAULT_SPACE = {f"{b}:{g}" for b in (2, 3, 4, 8) for g in (32, 64, 128)}


def nested(choice: tuple[str, ...]) -> bool:
    grids = [tune._grid(c) for c in choice]
    if len(set(grids)) == 1:
        return True
    if any(b > 4 for b, _ in grids):
        return False
    sizes = sorted({g if g != -1 else 1 << 30 for _, g in grids})
    return all(b % a == 0 for a, b in zip(sizes, sizes[1:], strict=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[101141896, 105082344, 114620744, 118768312],
                   help="size budgets in bytes (default: uniform 3:64, 3:32, 4:64, 4:32's checkpoints)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "tune_fusion_options.json")
    args = p.parse_args()
    s = None
    for path in sorted((cache_root() / "tune").glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("anchors") is not None and {c for x in data["layers"] for c in x["candidates"]} == DEFAULT_SPACE:
            s, source = Sensitivities.from_dict(data), path
            break
    if s is None:
        raise SystemExit("no cached default-space sensitivities: run `llmslim tune smollm2-135m --budget kl=0.1 ...` first")
    from llmslim.loader import load

    model, _ = load("smollm2-135m")
    fixed = tune.float_bytes(model, set(s.shapes))
    rules = {"today (one grid, or one group at 2-4 bits each)": tune.fusable, "nested groups": nested,
             "no constraint": lambda choice: True}
    rows = []
    for size in args.sizes:
        row = {"size_bytes": size}
        for name, rule in rules.items():
            tune.fusable = rule  # units() asks this module-level rule which combinations to offer
            row[name] = tune.plan(s, Budget("size", size), GPTQConfig(bits=4, group_size=64), fixed).predicted_kl
        rows.append(row)
        print(json.dumps(row))
    args.out.write_text(json.dumps({"sensitivities": str(source), "fixed_bytes": fixed, "rows": rows}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
