"""Recovery on the reference model: GPTQ vs GPTQ + block recovery vs AutoRound, and structure-pruned
students before and after end-to-end distillation. Perplexity on held-out text, wall time, peak RSS.

Every row runs in its own process (peak RSS is that row's), on the very same calibration tokens
(GPTQ's benchmark protocol: 128 x 512-token windows of the first 80% of the built-in wiki corpus,
seed 0), scored on the very same windows (the first 44 non-overlapping 1024-token windows of the
last 20%, no BOS) as the fp32 baseline of the same run. Prints a markdown table, writes JSON (and,
for e2e rows, a plot of perplexity against tokens trained) next to --out.

    python eval/bench_recover.py --rows gptq-3-g128 gptq-3-g128+block@200 autoround-3-g128@200 \\
        --autoround-python .venvs/autoround/bin/python
    python eval/bench_recover.py --rows depth6 depth6+e2e width75 width75+e2e --e2e-max-time 1800
    python eval/bench_recover.py --smoke --out /tmp/recover-smoke.json     # minutes: checks the plumbing only

A ``+block`` row after its GPTQ row (same run, same --out) recovers that row's checkpoint, as loaded
from disk, and adds that row's GPTQ time to its own; its ``input_ppl`` is the checkpoint's perplexity.

Row names: ``gptq-BITS-gGROUP`` (llmslim's GPTQ defaults: sym, MSE clipping, group-aware reordering),
``-descact`` (with act-order), ``-full`` (the full-range symmetric grid, ``IntConfig.full_range``),
``rtn-BITS-gGROUP`` (round-to-nearest, plain min/max: AutoRound's start), ``+block@N`` (then block recovery, N signed-gradient steps per block, batch 8), ``autoround-BITS-gGROUP@N``
(AutoRound 0.16 in its own venv, --autoround-python; N iterations, batch 8, amp off), ``depthK``
(prune K decoder blocks, ShortGPT block influence), ``widthP`` (keep P% of the MLP channels),
``+e2e`` (then end-to-end distillation for --e2e-max-time seconds), ``fp32``.

AutoRound's venv (see ../shared/README.md): python3 -m venv .venvs/autoround &&
.venvs/autoround/bin/pip install torch==2.13.0 && .venvs/autoround/bin/pip install torch==2.13.0 auto-round==0.16.1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from llmslim.util import peak_rss_bytes  # noqa: E402

DEFAULT_ROWS = [
    "gptq-4-g128", "gptq-4-g128+block@200",
    "gptq-3-g128", "gptq-3-g128+block@200", "autoround-3-g128@200", "gptq-3-g128+block@20", "autoround-3-g128@20",
    "gptq-2-g64", "gptq-2-g64+block@200", "autoround-2-g64@200",
    "depth6", "depth6+e2e", "width75", "width75+e2e",
]
ROW = re.compile(r"^(?:(?P<method>gptq|rtn|autoround)-(?P<bits>\d)-g(?P<group>\d+)(?P<descact>-descact)?(?P<full>-full)?|depth(?P<depth>\d+)|width(?P<width>\d+)|"
                 r"(?P<fp32>fp32))(?P<recover>\+block|\+e2e)?(?:@(?P<iters>\d+))?$")

# The AutoRound run, in AutoRound's own interpreter: the recipe of ../shared/README.md (amp off: with
# amp on its "fake" export silently keeps the original weights on CPU).
AUTOROUND = r"""
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from auto_round import AutoRound
folder, calib_file, out, bits, group, iters = sys.argv[1:7]
calib = torch.load(calib_file)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(folder)
t0 = time.perf_counter()
ar = AutoRound(model, tok, bits=int(bits), group_size=int(group), sym=True, iters=int(iters),
               nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=min(8, calib.shape[0]),
               dataset=[row[None] for row in calib], device_map="cpu", enable_torch_compile=False, amp=False)
ar.quantize_and_save(out, format="fake")
seconds = time.perf_counter() - t0
import auto_round
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "version": auto_round.__version__}))
"""


def parse_row(row: str) -> dict:
    m = ROW.match(row)
    if not m:
        raise SystemExit(f"unknown row {row!r}; see --help for row names")
    return m.groupdict()


def run_one(row: str, args) -> dict:
    """In a fresh process: build the row's model (timed), then score perplexity."""
    import copy

    import torch

    from llmslim.config import GPTQConfig, PruneConfig, RecoverConfig, RTNConfig
    from llmslim.data import eval_text
    from llmslim.formats.hf import load_hf
    from llmslim.loader import load
    from llmslim.metrics.ppl import perplexity
    from llmslim.nn import decoded_weights
    from llmslim.pipeline.stages import Context, handler_for, quantize, recover_tokens
    from llmslim.quant.distill import distill
    from llmslim.quant.reconstruct import recover_blocks

    spec = parse_row(row)
    calib = torch.load(args.calib_file)
    text = eval_text("wiki")
    model, tok = load("smollm2-135m")
    teacher = copy.deepcopy(model) if spec["recover"] else None
    result: dict = {"row": row, "seconds": 0.0, "stages": {}}

    def ppl(m, windows: int) -> float:
        with decoded_weights(m):
            return perplexity(m, tok, text, method="gptq", seqlen=args.seqlen, max_tokens=windows * args.seqlen,
                              progress=False)["perplexity"]

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        result["stages"][name] = time.perf_counter() - t0
        result["seconds"] += result["stages"][name]
        return out

    if spec["method"] == "autoround":
        if spec["descact"] or spec["recover"]:
            raise SystemExit(f"{row}: AutoRound rows take no -descact or +recovery")
        return run_autoround(row, spec, args, tok, ppl, load_hf)
    if spec["method"] in ("gptq", "rtn"):
        grid = dict(bits=int(spec["bits"]), group_size=int(spec["group"]), full_range=bool(spec["full"]))
        config = (GPTQConfig(**grid, desc_act=bool(spec["descact"])) if spec["method"] == "gptq" else RTNConfig(**grid))
        cached = args.cache_dir / _base(row) if args.cache_dir else None
        if spec["recover"] and cached and (cached / "gptq.json").exists():
            # The GPTQ row's own checkpoint (as a user would recover it): its GPTQ time counts here too.
            model, _ = load(str(cached))
            seconds = json.loads((cached / "gptq.json").read_text())["seconds"]
            result["stages"][spec["method"]] = seconds
            result["seconds"] += seconds
            result["input_ppl"] = ppl(model, args.windows)
        else:
            timed(spec["method"], lambda: quantize(model, config, calib))
            if cached and not spec["recover"]:
                from llmslim.formats.gptq import save_gptq

                save_gptq(model, tok, cached, config)
                (cached / "gptq.json").write_text(json.dumps({"seconds": result["stages"][spec["method"]]}))
    elif spec["depth"] or spec["width"]:
        prune = (PruneConfig(method="depth", drop_blocks=int(spec["depth"])) if spec["depth"]
                 else PruneConfig(method="width", mlp_keep=int(spec["width"]) / 100))
        model = timed("prune", lambda: handler_for(prune).run(model, prune, Context(calib))[0])
    if spec["recover"] == "+block":
        iters = int(spec["iters"] or args.iters)
        config = RecoverConfig(iters=iters, batch_size=min(8, calib.shape[0]), max_time=args.block_max_time,
                               lr=args.block_lr, follow=args.block_follow, seed=args.block_seed)
        logs = timed("recover", lambda: recover_blocks(model, teacher, calib, config, progress=not args.quiet))
        result["blocks_recovered"] = sum(x.kept == "recovered" for x in logs)
        result["block_iters"] = [x.iters for x in logs]  # fewer than @N where --block-max-time binds
        result["block_last_chosen"] = sum(x.chosen == "last" for x in logs)  # over the best mini-batch's
        result["block_loss"] = [sum(x.loss_before for x in logs if x.trained),
                                sum(min(x.loss_before, x.loss_after) for x in logs if x.trained)]
    elif spec["recover"] == "+e2e":
        config = RecoverConfig(mode="e2e", tokens=args.e2e_tokens, seqlen=args.e2e_seqlen, max_time=args.e2e_max_time,
                               lr=args.e2e_lr, lora_rank=args.e2e_lora_rank, checkpoint_every=args.e2e_every,
                               batch_size=8)
        train, val = recover_tokens(config, tok, model.config.max_position_embeddings)
        curve, probing = [], [0.0]

        def probe(step: int, tokens: int, student) -> None:  # not counted against --e2e-max-time, nor below
            t0 = time.perf_counter()
            curve.append({"step": step, "tokens": tokens, "ppl": ppl(student, args.probe_windows)})
            probing[0] += time.perf_counter() - t0
            print(f"  e2e step {step}: {tokens} tokens, ppl[{args.probe_windows} windows] {curve[-1]['ppl']:.2f}",
                  file=sys.stderr, flush=True)

        report = timed("recover", lambda: distill(model, teacher, train, val, config, on_checkpoint=probe,
                                                  progress=not args.quiet))
        result["e2e"] = {"curve": curve, "tokens": report.tokens, "steps": report.steps, "stopped": report.stopped,
                         "val_before": report.val_before, "val_after": report.val_after, "lr": report.lr,
                         "trained": report.trained, "probe_windows": args.probe_windows, "probe_seconds": probing[0]}
        result["stages"]["recover"] -= probing[0]
        result["seconds"] -= probing[0]
    result["peak_rss"] = peak_rss_bytes()  # before decoding weights for the evaluation below
    result["ppl"] = ppl(model, args.windows)
    result["load"] = os.getloadavg()[0]
    return result


def run_autoround(row, spec, args, tok, ppl, load_hf) -> dict:
    if not args.autoround_python:
        raise SystemExit(f"{row}: pass --autoround-python (AutoRound's own venv; see the docstring)")
    from llmslim.models import resolve

    iters = int(spec["iters"] or 200)
    with tempfile.TemporaryDirectory(prefix="autoround-") as tmp:
        out = Path(tmp) / "fake"
        r = subprocess.run([args.autoround_python, "-c", AUTOROUND, resolve("smollm2-135m"), str(args.calib_file),
                            str(out), spec["bits"], spec["group"], str(iters)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{row}: AutoRound failed:\n{r.stderr[-3000:]}")
        facts = json.loads(r.stdout.strip().splitlines()[-1])
        # AutoRound 0.16 saves under a folder of its own naming inside the one given (model name + scheme)
        saved = sorted(p.parent for p in out.rglob("config.json"))
        if not saved:
            raise SystemExit(f"{row}: AutoRound wrote no model folder under {out}")
        model = load_hf(str(saved[0]), __import__("torch").float32).eval()
        value = ppl(model, args.windows)
    return {"row": row, "ppl": value, "seconds": facts["seconds"], "peak_rss": facts["peak_rss"],
            "autoround": facts["version"], "load": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=44)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--iters", type=int, default=200, help="block rows without @N")
    p.add_argument("--block-max-time", type=float, default=0.0, help="block rows: --max-time (default none)")
    p.add_argument("--block-lr", type=float, default=None, help="block rows: --lr (default: recover's own)")
    p.add_argument("--block-follow", action="store_true",
                   help="block rows: codes re-rounded on the learned scale (AutoRound's min/max tuning)")
    p.add_argument("--block-seed", type=int, default=0, help="block rows: the mini-batch draws' seed")
    p.add_argument("--e2e-max-time", type=float, default=1800.0, help="e2e rows: training budget in seconds")
    p.add_argument("--e2e-tokens", type=int, default=50_000_000, help="e2e rows: token budget (default: time binds)")
    p.add_argument("--e2e-seqlen", type=int, default=512)
    p.add_argument("--e2e-lr", type=float, default=None)
    p.add_argument("--e2e-lora-rank", type=int, default=0)
    p.add_argument("--e2e-every", type=int, default=5, help="e2e rows: steps between checkpoints (curve points)")
    p.add_argument("--probe-windows", type=int, default=8, help="e2e curve: held-out windows per point")
    p.add_argument("--autoround-python", help="python of a venv with auto-round==0.16.1")
    p.add_argument("--smoke", action="store_true",
                   help="tiny settings that only check the plumbing (calib 8x128, 2 eval windows of 256, 2 iters, "
                   "60 s of e2e); the numbers mean nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars in the row processes (TQDM_DISABLE)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "recover.json")
    p.add_argument("--report", action="store_true", help="run nothing: print the table of --out, write .md and plot")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--calib-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.nsamples, args.calib_seqlen, args.windows, args.seqlen = 8, 128, 2, 256
        args.iters, args.e2e_max_time, args.e2e_seqlen, args.e2e_every, args.probe_windows = 2, 60.0, 128, 2, 1
        if args.rows == DEFAULT_ROWS:
            args.rows = ["gptq-3-g128", "gptq-3-g128+block@2", "depth6", "depth6+e2e"]
            if args.autoround_python:
                args.rows.append("autoround-3-g128@1")
    for row in args.rows:
        parse_row(row)

    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    if args.report:
        report(json.loads(args.out.read_text()), args.out)
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
    # GPTQ rows leave their checkpoint here; "+block" rows after them recover that very checkpoint.
    cache = args.out.with_suffix(".cache")
    passthrough = []
    passthrough += ["--block-follow"] if args.block_follow else []
    for flag in ("windows", "seqlen", "iters", "block_max_time", "block_lr", "block_seed", "e2e_max_time", "e2e_tokens", "e2e_seqlen", "e2e_lr",
                 "e2e_lora_rank", "e2e_every", "probe_windows", "autoround_python"):
        value = getattr(args, flag)
        if value is not None:
            passthrough += [f"--{flag.replace('_', '-')}", str(value)]
    for row in ["fp32", *args.rows]:
        if row in results:
            print(f"{row}: cached in {args.out}", file=sys.stderr)
            continue
        print(f"running {row} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--one", row, "--calib-file", str(calib_file), "--cache-dir", str(cache), *passthrough,
               *(["--quiet"] if args.quiet else [])]
        # --quiet: every bar of the row's process (GPTQ's, transformers' loading, AutoRound's) off, not only ours
        quiet = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"} if args.quiet else {}
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **quiet})
        if r.returncode:
            raise SystemExit(f"{row} failed (exit {r.returncode})")
        results[row] = json.loads(r.stdout.strip().splitlines()[-1])
        results[row]["settings"] = {"calib": [args.nsamples, args.calib_seqlen], "eval": [args.windows, args.seqlen]}
        args.out.write_text(json.dumps(results, indent=1))  # keep what is done if interrupted
    report(results, args.out)


def _base(row: str) -> str:
    """The row a recovered row is compared with: its GPTQ (or pruned) input."""
    return re.sub(r"(\+block|\+e2e)(@\d+)?$", "", re.sub(r"^autoround", "gptq", row)).split("@")[0]


def report(results: dict, out: Path) -> None:
    base = results.get("fp32", {}).get("ppl")
    lines = ["| row | ppl | vs its input | Δ vs fp32 | wall s | peak RSS MB | load avg |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row, r in results.items():
        ref = results.get(_base(row), {}).get("ppl") if _base(row) != row else None
        ratio = f"{r['ppl'] / ref:.3f}x" if ref else ""
        delta = f"{r['ppl'] - base:+.2f}" if base else ""
        lines.append(f"| {row} | {r['ppl']:.2f} | {ratio} | {delta} | {r['seconds']:.0f} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {r.get('load', 0):.1f} |")
    md = "\n".join(lines)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    curves = {row: r["e2e"]["curve"] for row, r in results.items() if r.get("e2e", {}).get("curve")}
    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for row, curve in curves.items():
            ax.plot([c["tokens"] for c in curve], [c["ppl"] for c in curve], marker="o", label=row)
        if base:
            ax.axhline(base, color="gray", linestyle="--", label="fp32")
        windows = next(iter(results[r]["e2e"]["probe_windows"] for r in curves))
        ax.set_xlabel("tokens trained")
        ax.set_ylabel(f"held-out perplexity ({windows} windows)")
        ax.set_title("end-to-end distillation of structure-pruned SmolLM2-135M")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        print(f"plot: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
