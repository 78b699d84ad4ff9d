"""RTN vs GPTQ on the reference model: perplexity on held-out text, quantization time, peak RSS.

Every row runs in its own process (so peak RSS is that row's), on the very same calibration
tokens, and is scored on the very same evaluation windows as the fp32 baseline measured in the
same run. Prints a markdown table and writes JSON next to it.

    python eval/bench_gptq.py                                # the whole table (long: ~1-2 h on 2 cores)
    python eval/bench_gptq.py --rows rtn-4-g128-sym gptq-4-g128-sym gptq-4-g128-sym-descact

Row names: METHOD-BITS-gGROUP-SYM[-descact|-nogar|-mse|-static|-dampPCT].
Defaults follow issue 3: calibration 128 x 512-token windows from the first 80% of the built-in
wiki corpus (seed 0); evaluation = first 44 non-overlapping 1024-token windows of the last 20%, no BOS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from llmslim.util import peak_rss_bytes  # noqa: E402

SETTINGS = [(4, 128, "sym"), (4, 128, "asym"), (3, 128, "sym"), (2, 64, "sym")]
# RTN, then GPTQ as llmslim runs it by default (MSE clipping, group-aware reordering), with act-order
# on top; the flags without -mse are the plain-grid GPTQ of the paper.
DEFAULT_ROWS = [f"{m}-{b}-g{g}-{s}{v}" for b, g, s in SETTINGS
                for m, v in [("rtn", ""), ("gptq", "-mse"), ("gptq", "-mse-descact")]]


def parse_row(row: str) -> tuple[str, dict]:
    method, bits, group, sym, *flags = row.split("-")
    opts = dict(bits=int(bits), group_size=int(group[1:]), sym=(sym == "sym"))
    if method == "gptq":
        opts |= dict(desc_act="descact" in flags, act_group_aware="nogar" not in flags,
                     static_groups="static" in flags)
        for f in flags:
            if f.startswith("damp"):  # damp5 = damp_percent 0.05
                opts["damp_percent"] = float(f[4:]) / 100
    opts["mse"] = "mse" in flags
    return method, opts


def run_one(row: str, calib_file: Path, windows: int, seqlen: int) -> dict:
    """In a fresh process: load, quantize (timed), then score perplexity."""
    import torch

    from llmslim.config import GPTQConfig, RTNConfig
    from llmslim.data import eval_text
    from llmslim.loader import load
    from llmslim.metrics.ppl import perplexity
    from llmslim.nn import decoded_weights
    from llmslim.pipeline.stages import quantize

    model, tok = load("smollm2-135m")
    seconds = 0.0
    if row != "fp32":
        method, opts = parse_row(row)
        config = GPTQConfig(**opts) if method == "gptq" else RTNConfig(**opts)
        calib = torch.load(calib_file)
        t0 = time.perf_counter()
        quantize(model, config, calib if method == "gptq" else None)
        seconds = time.perf_counter() - t0
    rss = peak_rss_bytes()  # before decoding weights for the evaluation below
    with decoded_weights(model):
        r = perplexity(model, tok, eval_text("wiki"), method="gptq", seqlen=seqlen, max_tokens=windows * seqlen,
                       progress=False)
    return {"row": row, "ppl": r["perplexity"], "tokens": r.get("tokens_scored"), "seconds": seconds,
            "peak_rss": rss, "load": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=44)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--out", type=Path, default=HERE / "results" / "gptq_table.json")
    p.add_argument("--report", action="store_true",
                   help="run nothing: print the table of every row in --out and write it next to it as .md")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--calib-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, args.calib_file, args.windows, args.seqlen)))
        return

    if args.report:
        results = json.loads(args.out.read_text())
        md = table(results, sorted(results, key=_order))
        args.out.with_suffix(".md").write_text(md + "\n")
        print(md)
        return

    import torch

    from llmslim.data import calibration_tokens
    from llmslim.formats.hf import load_tokenizer
    from llmslim.models import resolve

    args.out.parent.mkdir(parents=True, exist_ok=True)
    calib_file = args.out.with_suffix(".calib.pt")
    tok = load_tokenizer(resolve("smollm2-135m"))
    torch.save(calibration_tokens("wiki", tok, args.nsamples, args.calib_seqlen, seed=0), calib_file)

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for row in ["fp32", *args.rows]:
        if row in results:
            print(f"{row}: cached in {args.out}", file=sys.stderr)
            continue
        print(f"running {row} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--one", row, "--calib-file", str(calib_file),
               "--windows", str(args.windows), "--seqlen", str(args.seqlen)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[row] = json.loads(out.strip().splitlines()[-1])
        args.out.write_text(json.dumps(results, indent=1))  # keep what is done if interrupted
    print(table(results, [r for r in ["fp32", *args.rows] if r in results]))


def _order(row: str) -> tuple:
    """fp32 first, then by setting (4-bit sym, 4-bit asym, 3-bit, 2-bit), RTN before GPTQ."""
    if row == "fp32":
        return (0,)
    method, bits, group, sym, *flags = row.split("-")
    return (1, -int(bits), sym != "sym", method != "rtn", len(flags), flags)


def table(results: dict, rows: list[str]) -> str:
    base = results["fp32"]["ppl"]
    lines = ["| setting | ppl | Δ vs fp32 | quantize s | peak RSS MB | load avg |", "|---|---|---|---|---|---|"]
    for row in rows:
        r = results[row]
        lines.append(f"| {row} | {r['ppl']:.2f} | {r['ppl'] - base:+.2f} | {r['seconds']:.0f} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {r['load']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
