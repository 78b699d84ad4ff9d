"""Pruning on the reference model: magnitude / Wanda / SparseGPT at 50% and 2:4, joint 2:4 + 4-bit
GPTQ against prune-then-quantize, depth and width pruning, and llm-compressor 0.14 side by side.

The protocol of eval/bench_gptq.py: calibration 128 x 512-token windows of the built-in wiki
corpus (first 80% of the articles, seed 0), the very same tensor for every row and every tool;
perplexity on the first 44 non-overlapping 1024-token windows of the held-out 20%, no BOS, fp32.
Every row runs in its own process (peak RSS is that row's); llm-compressor rows run in its own
venv (``--llmcompressor-python``; recipe in ../shared/README.md) through eval/peers/llmcompressor_prune.py,
and its pruned model is scored by llmslim like every other row.

    python eval/bench_prune.py                       # every row (hours on 2 cores)
    python eval/bench_prune.py --rows sparsegpt-2of4 lc-sparsegpt-2of4 --nsamples 8 --windows 4   # a smoke run
    python eval/bench_prune.py --report              # the tables of everything measured so far

Rows: METHOD-PATTERN[-ts][-refitN] (magnitude|wanda|sparsegpt x 50|2of4; -ts: --true-sequential; -refitN:
--refit-iters N, e.g. sparsegpt-50-refit0 is the reference sweep alone), joint-2of4-gptq4g64 (one sweep),
sparsegpt-2of4+gptq4g64 (two stages), depth-bi|kl-N, width-mlpNN[-headsNN], lc-sparsegpt|wanda-50|2of4,
lc-sparsegpt-2of4+gptq4g64 (llm-compressor's two-modifier recipe). Structured rows also report
parameters, checkpoint size and batch-1 decode speed with plain transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from llmslim.util import peak_rss_bytes  # noqa: E402

UNSTRUCTURED = [f"{m}-{p}" for p in ("50", "2of4") for m in ("magnitude", "wanda", "sparsegpt")]
JOINT = ["joint-2of4-gptq4g64", "sparsegpt-2of4+gptq4g64"]
STRUCTURED = [f"depth-{c}-{n}" for c in ("bi", "kl") for n in (3, 6, 9)] + ["width-mlp75", "width-mlp50",
                                                                            "width-mlp75-heads67"]
PEER = ["lc-sparsegpt-50", "lc-sparsegpt-2of4", "lc-wanda-50", "lc-wanda-2of4", "lc-sparsegpt-2of4+gptq4g64"]
DEFAULT_ROWS = UNSTRUCTURED + JOINT + STRUCTURED + PEER


def stages(row: str) -> list:
    """The llmslim stage configs of a row."""
    from llmslim.config import GPTQConfig, PruneConfig

    parts = row.split("+")
    out = []
    for part in parts:
        kind, *rest = part.split("-")
        if kind in ("magnitude", "wanda", "sparsegpt"):  # METHOD-PATTERN[-ts][-refitN]
            pattern, kw = rest[0], {}
            for flag in rest[1:]:
                if flag == "ts":
                    kw["true_sequential"] = True
                elif flag.startswith("refit"):
                    kw["refit_iters"] = int(flag.removeprefix("refit"))
                else:
                    raise SystemExit(f"unknown row {row!r}")
            out.append(PruneConfig(kind, nm="2:4", **kw) if pattern == "2of4" else
                       PruneConfig(kind, int(pattern) / 100, **kw))
        elif kind == "joint":  # joint-2of4-gptq4g64
            out.append(GPTQConfig(bits=4, group_size=64, nm="2:4"))
        elif kind == "gptq4g64":
            out.append(GPTQConfig(bits=4, group_size=64))
        elif kind == "depth":
            out.append(PruneConfig("depth", drop_blocks=int(rest[1]), importance=rest[0]))
        elif kind == "width":
            mlp = int(rest[0].removeprefix("mlp")) / 100
            heads = int(rest[1].removeprefix("heads")) / 100 if len(rest) > 1 else 1.0
            out.append(PruneConfig("width", mlp_keep=mlp, heads_keep=heads))
        else:
            raise SystemExit(f"unknown row {row!r}")
    return out


def score(model, tok, windows: int, seqlen: int) -> dict:
    from llmslim.data import eval_text
    from llmslim.metrics.ppl import perplexity
    from llmslim.nn import decoded_weights
    from llmslim.quant.sparsity import sparsity_report

    sp = sparsity_report(model)
    with decoded_weights(model):
        r = perplexity(model, tok, eval_text("wiki"), method="gptq", seqlen=seqlen, max_tokens=windows * seqlen,
                       progress=False)
    return {"ppl": r["perplexity"], "tokens": r.get("tokens_scored"), "parameters": sp["parameters"],
            "sparsity": sp["sparsity"], "nm": sp["nm"]}


def run_one(row: str, calib_file: Path, windows: int, seqlen: int, speed: bool) -> dict:
    """In a fresh process: load, compress (timed), then score."""
    import torch

    from llmslim.loader import load
    from llmslim.pipeline.recipe import Recipe
    from llmslim.pipeline.run import compress

    model, tok = load("smollm2-135m")
    seconds = 0.0
    if row != "fp32":
        recipe = Recipe(tuple(stages(row)))
        calib = torch.load(calib_file)
        t0 = time.perf_counter()
        model, reports = compress(model, recipe, calib)
        seconds = time.perf_counter() - t0
        # what each prune stage did (dropped blocks and their scores, kept widths, measured sparsity)
        records = [r.extra["pruning"] for r in reports if "pruning" in r.extra]
    rss = peak_rss_bytes()  # before decoding weights for the evaluation
    result = {"row": row, "seconds": seconds, "peak_rss": rss, "load": os.getloadavg()[0]}
    if row != "fp32" and records:
        result["pruning"] = [{k: v for k, v in r.items() if k != "kept"} for r in records]
    result |= score(model, tok, windows, seqlen)
    if speed and (row == "fp32" or row.startswith(("depth", "width"))):
        result |= structured_costs(model, tok)
    return result


def structured_costs(model, tok) -> dict:
    """Checkpoint size (saved as an ordinary HF folder) and batch-1 decode speed, in plain transformers
    (fp32) and on llmslim's fast path (``accelerate``: bf16 lean forward, as ``llmslim serve`` runs it)."""
    import statistics

    import torch

    from llmslim.formats.hf import folder_bytes, save_hf
    from llmslim.metrics.efficiency import speed
    from llmslim.runtime.fast import accelerate
    from llmslim.runtime.generate import generate

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, tok, Path(d))
        size = folder_bytes(d)
    s = speed(model, prompt_tokens=128, new_tokens=128, repeats=3)
    accelerate(model, torch.bfloat16)
    ids = (torch.arange(128) * 7919 % model.config.vocab_size).tolist()  # the prompt speed() uses
    runs = [generate(model, tok, ids, max_new_tokens=128, ignore_eos=True).timings["decode_tok_s"] for _ in range(4)]
    return {"checkpoint_bytes": size, "decode_tok_s": s["decode_tokens_per_s"], "prefill_tok_s": s["prefill_tokens_per_s"],
            "fast_decode_tok_s": statistics.median(runs[1:])}  # the first run warms up


def run_peer(row: str, calib_file: Path, lc_python: str, windows: int, seqlen: int) -> dict:
    """llm-compressor in its own venv writes a dense folder; llmslim scores it in this process."""
    from llmslim.loader import load
    from llmslim.models import resolve

    with tempfile.TemporaryDirectory(prefix="lc-") as out:
        cmd = [lc_python, str(HERE / "peers" / "llmcompressor_prune.py"), "--model", resolve("smollm2-135m"),
               "--calib", str(calib_file), "--row", row.removeprefix("lc-"), "--out", out]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{row}: llm-compressor failed:\n{res.stderr[-3000:]}")
        peer = json.loads(res.stdout.strip().splitlines()[-1])
        model, tok = load(out)
        return {"row": row, **peer, "load": os.getloadavg()[0]} | score(model, tok, windows, seqlen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-seed", type=int, default=0,
                   help="which calibration windows (another seed: another draw of the same protocol, for every row)")
    p.add_argument("--windows", type=int, default=44)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--no-speed", action="store_true", help="skip decode speed and checkpoint size of structured rows")
    p.add_argument("--llmcompressor-python", default=str(HERE.parent / ".venvs" / "llmcompressor" / "bin" / "python"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "prune_table.json")
    p.add_argument("--report", action="store_true", help="run nothing: print the tables of --out (and write .md)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--calib-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        if args.one.startswith("lc-"):
            r = run_peer(args.one, args.calib_file, args.llmcompressor_python, args.windows, args.seqlen)
        else:
            r = run_one(args.one, args.calib_file, args.windows, args.seqlen, not args.no_speed)
        print(json.dumps(r))
        return
    if args.report:
        results = json.loads(args.out.read_text())
        md = tables(results)
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
    torch.save(calibration_tokens("wiki", tok, args.nsamples, args.calib_seqlen, seed=args.calib_seed),
               calib_file)
    # seed 0 stays unrecorded so result files written before --calib-seed existed still match
    setup = {"nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen, "windows": args.windows,
             "seqlen": args.seqlen} | ({"calib_seed": args.calib_seed} if args.calib_seed else {})
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if results.get("_setup", setup) != setup:
        raise SystemExit(f"{args.out} holds rows measured with {results['_setup']}; use another --out")
    results["_setup"] = setup
    for row in ["fp32", *args.rows]:
        if row in results:
            print(f"{row}: cached in {args.out}", file=sys.stderr)
            continue
        print(f"running {row} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--one", row, "--calib-file", str(calib_file), "--windows", str(args.windows),
               "--seqlen", str(args.seqlen), "--llmcompressor-python", args.llmcompressor_python,
               *(["--no-speed"] if args.no_speed else [])]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{row} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        results[row] = json.loads(res.stdout.strip().splitlines()[-1])
        args.out.write_text(json.dumps(results, indent=1))  # keep what is done if interrupted
    print(tables(results))


def tables(results: dict) -> str:
    base = results["fp32"]
    setup = results.get("_setup", {})
    rows = [r for r in results if r not in ("fp32", "_setup")]
    lines = [f"Calibration {setup.get('nsamples')} x {setup.get('calib_seqlen')} wiki tokens (seed "
             f"{setup.get('calib_seed', 0)}); perplexity on "
             f"{setup.get('windows')} x {setup.get('seqlen')} held-out windows; fp32 {base['ppl']:.3f}.", "",
             "| row | tool | ppl | Δ vs fp32 | sparsity | time s | peak RSS MB | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = results[row]
        if row.startswith(("depth", "width")):
            continue
        tool = "llm-compressor 0.14" if row.startswith("lc-") else "llmslim"
        sp = f"{r['sparsity']:.1%}" + (f" {r['nm']}" if r.get("nm") else "") if r.get("sparsity") else "—"
        lines.append(f"| {row} | {tool} | {r['ppl']:.2f} | {r['ppl'] - base['ppl']:+.2f} | {sp} | {r['seconds']:.0f} "
                     f"| {r['peak_rss'] / 2**20:.0f} | {r['load']:.1f} |")
    structured = [r for r in rows if r.startswith(("depth", "width"))]
    if structured:
        lines += ["", "| row | ppl | parameters | checkpoint MB | decode tok/s (HF fp32, batch 1) | × fp32 "
                  "| decode tok/s (llmslim fast, bf16) | × fp32 | time s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in ["fp32", *structured]:
            r = results[row] if row != "fp32" else base
            dec = r.get("decode_tok_s")
            ratio = f"{dec / base['decode_tok_s']:.2f}" if dec and base.get("decode_tok_s") else "—"
            size = f"{r['checkpoint_bytes'] / 2**20:.0f}" if r.get("checkpoint_bytes") else "—"
            fast, fast_base = r.get("fast_decode_tok_s"), base.get("fast_decode_tok_s")
            fast_ratio = f"{fast / fast_base:.2f}" if fast and fast_base else "—"
            lines.append(f"| {row} | {r['ppl']:.2f} | {r['parameters'] / 1e6:.1f}M | {size} | "
                         f"{f'{dec:.1f}' if dec else '—'} | {ratio} | {f'{fast:.1f}' if fast else '—'} | {fast_ratio} "
                         f"| {r.get('seconds', 0):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
