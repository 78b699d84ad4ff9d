"""The ``tune`` subcommand: argument checks and printing over ``tune.run``."""

from __future__ import annotations

import argparse

from ..config import FORWARD_DTYPE_HELP
from ..errors import UserError

SPACE_KEYS = ("bits", "group_sizes", "candidates", "divisible")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune",
        help="compress to a budget: per-layer bits/group sizes chosen from measured sensitivities, verified on "
        "held-out text",
        description="Find the smallest GPTQ model within a quality budget (kl=0.1: KL to the original, nats per "
        "token; ppl=+5%%: perplexity increase), or the best one within a size budget (size=90MB: the weights; "
        "bpw=3.5: bits per weight of the quantized layers). Every candidate grid is priced on every layer, the "
        "allocation is solved exactly, GPTQ runs with each layer's grid, and the result is measured on held-out "
        "text; a missed budget is re-solved tighter (--max-steps). Output: the checkpoint (GPTQModel 'dynamic' "
        "per-module overrides) plus tune.json, tune.md and tune.png. Docs: eval/tune.md.",
        epilog="examples:\n  llmslim tune smollm2-135m --budget kl=0.1 --out out/smol-kl0.1\n"
        "  llmslim tune smollm2-135m --budget size=90MB --space space.yaml --out out/smol-90mb",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub id (org/name), local HF folder, .gguf file, or alias smollm2-135m")
    p.add_argument("--budget", required=True, help="kl=0.1 | ppl=+5%% | size=90MB | bpw=3.5")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--space", metavar="SPACE.yaml",
                   help="candidates: {bits: [2,3,4,8], group_sizes: [32,64,128], divisible: true} (the default), or "
                   "{candidates: ['4:64', '8:-1']}")
    c = p.add_argument_group("calibration (sensitivities and GPTQ)")
    c.add_argument("--calib", default="wiki", help="built-in corpus (its calibration part), hub dataset or file")
    c.add_argument("--text-field", default="text")
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--fisher-samples", type=int, default=16, help="sequences for the Fisher pass (default 16); the first eighth of the calibration, at most this many, "
                   "also measures the calibration's reference model and is kept out of the sensitivity pass")
    c.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default: auto)")
    c.add_argument("--forward-dtype", default="auto", metavar="auto|fp32|bf16", help=FORWARD_DTYPE_HELP)
    v = p.add_argument_group("verification")
    v.add_argument("--eval-text", default="wiki",
                   help="held-out text: a built-in corpus's evaluation part (default wiki), hub dataset, or a file "
                   "never used for calibration")
    v.add_argument("--eval-windows", type=int, default=44, help="windows of held-out text (default 44)")
    v.add_argument("--eval-seqlen", type=int, default=1024, help="tokens per window (default 1024)")
    v.add_argument("--max-steps", type=int, default=2, help="re-solves after a missed budget (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where the block driver computes")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=cmd_tune)


def read_space(path: str | None) -> dict:
    """TuneConfig's candidates/divisible from a space file (None: the default space)."""
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(open(path, encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"--space {path} does not exist") from None
    except yaml.YAMLError as e:
        raise UserError(f"--space {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or any(k not in SPACE_KEYS for k in data):
        raise UserError(f"--space {path}: expected a mapping with keys {', '.join(SPACE_KEYS)}")
    from ..config import TUNE_BITS, TUNE_GROUPS

    if "candidates" in data:
        if "bits" in data or "group_sizes" in data:
            raise UserError(f"--space {path}: give candidates, or bits and group_sizes, not both")
        candidates = [str(x) for x in data["candidates"] or []]
    else:
        bits, groups = data.get("bits", list(TUNE_BITS)), data.get("group_sizes", list(TUNE_GROUPS))
        if not isinstance(bits, list) or not isinstance(groups, list):
            raise UserError(f"--space {path}: bits and group_sizes must be lists")
        candidates = [f"{b}:{g}" for b in bits for g in groups]
    if not candidates:
        raise UserError(f"--space {path} is empty: give at least one bits:group_size candidate")
    return {"candidates": tuple(candidates), "divisible": bool(data.get("divisible", True))}


def cmd_tune(args) -> int:
    from ..config import CalibConfig, TuneConfig
    from ..quant.sequential import resolve_device
    from .run import tune_to_folder

    for flag, v in (("--eval-windows", args.eval_windows), ("--eval-seqlen", args.eval_seqlen)):
        if v < 1:
            raise UserError(f"{flag} must be positive, got {v}")
    config = TuneConfig(budget=args.budget, fisher_samples=args.fisher_samples, forward_dtype=args.forward_dtype,
                        **read_space(args.space))
    calib = CalibConfig(args.calib, args.nsamples, args.seqlen, args.seed, args.text_field)
    r = tune_to_folder(args.model, config, args.out, calib, args.eval_text, args.eval_windows, args.eval_seqlen,
                       args.max_steps, args.force, args.batch_size, resolve_device(args.device))
    a = r.attempts[-1]
    print()
    print(f"budget {r.budget}: {'met' if r.met else 'MISSED'} after {len(r.attempts)} attempt(s); predicted KL "
          f"{a.predicted_kl:.4f}, measured {a.measured_kl:.4f}; {a.measured_bytes / 1e6:.1f} MB, {a.bpw:.2f} bits/weight")
    print(f"written to {args.out} (tune.md, tune.png: the grid per layer and the Pareto front)")
    return 0
