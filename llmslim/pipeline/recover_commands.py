"""The ``recover`` subcommand: argument checks and printing over ``pipeline.recover``."""

from __future__ import annotations

import argparse

from ..errors import UserError

BLOCK_TOKENS = 128 * 512  # block mode's default calibration when the student's own is unknown


def register(subparsers) -> None:
    add_recover(subparsers)


def add_recover(sub) -> None:
    p = sub.add_parser(
        "recover",
        help="win back what compression lost: learn from the original model, block by block or end to end",
        description="Recover a compressed model (GPTQ/RTN checkpoint, or a pruned float model) by distillation "
        "from the original. --mode block (quantized or sparse students): per decoder block, learn the grid "
        "(AutoRound's rounding offsets and per-group scale/zero adjustments) or the remaining weights against the "
        "original block's outputs, keeping a block's input weights unless the learned ones are better. --mode e2e: "
        "logit distillation KL(teacher || student) -- scales/zeros of a quantized student, all weights or LoRA of "
        "a float one (e.g. structure-pruned). The output has the student's format. Docs: eval/recover.md.",
        epilog="examples:\n  llmslim recover out/gptq3 --teacher smollm2-135m --out out/gptq3-rec --max-time 1800\n"
        "  llmslim recover out/depth24 --teacher smollm2-135m --mode e2e --tokens 2000000 --max-time 1800 "
        "--out out/depth24-rec",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("student", help="the compressed model: GPTQ checkpoint or pruned float folder")
    p.add_argument("--teacher", required=True, metavar="ORIGINAL",
                   help="the model before compression (hub id, folder, .gguf file or alias)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--mode", choices=("block", "e2e"), default="block", help="block (default) or e2e")
    d = p.add_argument_group("training text")
    d.add_argument("--data", default=None, metavar="SOURCE",
                   help="built-in corpus (its calibration part only: held-out text is never trained on), hub "
                   "dataset, or a local file; block default: the student's own calibration, else wiki")
    d.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json/.parquet")
    d.add_argument("--tokens", type=int, default=None, metavar="N",
                   help=f"training tokens (block: calibration tokens, default the student's own or {BLOCK_TOKENS:,}; "
                   "e2e: default 262,144)")
    d.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 512)")
    d.add_argument("--seed", type=int, default=None, help="data and order seed (default 0)")
    t = p.add_argument_group("training")
    t.add_argument("--iters", type=int, default=200, help="block: signed-gradient steps per block (default 200)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: block 5e-3, AutoRound's, or 1e-5 for sparse float weights; e2e 1e-3 scales, "
                   "1e-4 LoRA and all weights)")
    t.add_argument("--max-time", type=float, default=0.0, metavar="SECONDS",
                   help="stop cleanly after this long with the best student so far (default: no limit)")
    t.add_argument("--temperature", type=float, default=1.0, help="e2e: distillation temperature (default 1)")
    t.add_argument("--lora-rank", type=int, default=0, help="e2e, float students: LoRA rank (0 = all weights)")
    t.add_argument("--checkpoint-every", type=int, default=20, metavar="STEPS",
                   help="e2e: steps between checkpoints (default 20)")
    t.add_argument("--follow", action="store_true",
                   help="block, quantized students: round the original weights anew on the learned scale "
                   "(AutoRound's min/max tuning) instead of rescaling the input codes")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for training (default: only where the CPU has native bf16, AMX or "
                   "AVX512-BF16; emulated bf16 is several times slower than float32)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin (pickle) weights you trust")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=cmd_recover)


def build_config(args):
    """(RecoverConfig, calibration or None) from the flags."""
    from ..config import CalibConfig, RecoverConfig

    for flag, value in (("--tokens", args.tokens), ("--seqlen", args.seqlen)):
        if value is not None and value < (2 if flag == "--seqlen" else 1):
            raise UserError(f"{flag} must be {'at least 2' if flag == '--seqlen' else 'positive'}, got {value}")
    common = dict(mode=args.mode, iters=args.iters, batch_size=args.batch_size, lr=args.lr, max_time=args.max_time,
                  seed=args.seed or 0, temperature=args.temperature, lora_rank=args.lora_rank,
                  checkpoint_every=args.checkpoint_every, amp=args.amp, follow=args.follow)
    if args.mode == "e2e":
        extra = {k: v for k, v in (("data", args.data), ("tokens", args.tokens), ("seqlen", args.seqlen)) if v is not None}
        return RecoverConfig(**common, text_field=args.text_field, **extra), None
    config = RecoverConfig(**common)
    given = any(v is not None for v in (args.data, args.tokens, args.seqlen, args.seed)) or args.text_field != "text"
    if not given:
        return config, None  # the student's own calibration (recipe.yaml), else the default
    seqlen = args.seqlen or 512
    nsamples = max(1, -(-(args.tokens or BLOCK_TOKENS) // seqlen))
    return config, CalibConfig(args.data or "wiki", nsamples, seqlen, args.seed or 0, args.text_field)


def cmd_recover(args) -> int:
    from .recover import recover_to_folder

    config, calibration = build_config(args)
    s = recover_to_folder(args.student, args.teacher, config, args.out, calibration, force=args.force,
                          resume=args.resume, allow_pickle=args.allow_pickle)
    print()
    print(f"{describe_recover(config)}: {recover_outcome(s)}")
    print(f"size on disk: {s['bytes_before'] / 2**20:.1f} MiB -> {s['bytes_after'] / 2**20:.1f} MiB   "
          f"written to {args.out}")
    return 0


def describe_recover(config) -> str:
    """e.g. ``recover block 200 iters`` or ``recover e2e lora r8``."""
    if config.mode == "block":
        return f"recover block {config.iters} iters"
    return f"recover e2e {f'lora r{config.lora_rank}' if config.lora_rank else ''}".rstrip()


def recover_outcome(stage: dict) -> str:
    """What a recover stage did, from its entry in quant_log.json."""
    r = stage.get("recover") or {}
    seconds = stage.get("quantize_seconds", stage.get("seconds", 0))
    if r.get("mode") == "block":
        return (f"{r['blocks_recovered']} of {r['blocks']} blocks improved, calibration loss {r['loss_before']:.4g} "
                f"-> {r['loss_after']:.4g}, {seconds:.0f} s")
    stop = ", stopped by --max-time" if r.get("stopped") == "max-time" else ""
    return (f"{r.get('trained')} trained {r.get('steps')} steps on {r.get('tokens', 0):,} tokens, validation KL "
            f"{r.get('val_before', 0):.4g} -> {r.get('val_after', 0):.4g}{stop}, {seconds:.0f} s")
