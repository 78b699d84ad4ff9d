"""The ``llmslim`` command: thin subcommands over typed library calls.

User mistakes (``UserError``) print one line and exit 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# MKL (inside torch) keeps the work buffers of large float32 GEMMs cached for the life of the process:
# +84 MB at the peak of GPTQ on a 2048-wide model, at the same speed (eval/scale.md). MKL reads this
# when torch loads, so it is set here, before any command imports torch; a value the user set wins.
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

from .errors import UserError, WriteFailure  # noqa: E402

QUANT_METHODS = ("gptq", "rtn", "nf4", "fp4", "int8")


def _positive_int_or_minus_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be -1 or a positive integer, got {text!r}") from None
    return value


def add_memory_options(p) -> None:
    """--max-memory and --device: how much memory the block driver may use, and where it computes."""
    m = p.add_argument_group("memory and device (models bigger than memory: eval/scale.md)")
    m.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory for the block-by-block driver, e.g. 1.5GB (default: half of what is available); "
                   "bounds the samples per forward, calibration activations beyond a quarter of it go to disk")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="where block forwards and solvers run: cpu (default), cuda, or auto (cuda when torch sees "
                   "a GPU); the model itself is streamed from disk either way")


def add_quantize(sub) -> None:
    from .config import FORWARD_DTYPE_HELP, IMPORTANCE_HELP, IMPORTANCES

    p = sub.add_parser(
        "quantize",
        help="quantize a model: GPTQ/RTN (GPTQ v1 checkpoint) or bitsandbytes nf4/fp4/int8",
        description="Quantize a Hugging Face causal LM. gptq/rtn write a standard GPTQ v1 checkpoint "
        "(loads in vLLM, transformers+gptqmodel, AutoGPTQ, and llmslim); nf4/fp4/int8 write a serialized "
        "bitsandbytes checkpoint (loads in transformers and llmslim; needs pip install 'llmslim[bnb]').",
        epilog="examples:\n  llmslim quantize smollm2-135m --method gptq --bits 4 --group-size 64 --out out/smol-g64\n"
        "  llmslim quantize ./my-model --method rtn --bits 8 --group-size -1 --out out/rtn8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub id (org/name), local HF folder, .gguf file, or alias smollm2-135m")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--method", choices=QUANT_METHODS, default="gptq", help="quantization method (default gptq)")
    b = p.add_argument_group("bitsandbytes (--method nf4|fp4|int8)")
    b.add_argument("--double-quant", action="store_true", help="nf4/fp4: quantize the absmax constants too")
    b.add_argument("--compute-dtype", choices=("bf16", "fp32", "fp16"), default="bf16",
                   help="nf4/fp4 compute dtype (default bf16: the fast path on CPU)")
    b.add_argument("--int8-threshold", type=float, default=6.0, help="int8: LLM.int8 outlier threshold (default 6.0)")
    g = p.add_argument_group("grid")
    g.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    g.add_argument("--group-size", type=_positive_int_or_minus_one, default=128,
                   help="columns per scale/zero group; -1 = per output channel (default 128)")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (zero point per group)")
    g.add_argument("--full-range", action="store_true",
                   help="symmetric grid over all 2^bits levels with a signed scale per group (llama.cpp's Q4_0 rule, "
                   "AutoRound's default): a finer step than GPTQ's symmetric grid")
    mse = g.add_mutually_exclusive_group()
    mse.add_argument("--mse", dest="mse", action="store_true", default=None,
                     help="search the MSE-optimal clipping range per group (default for gptq, not for rtn)")
    mse.add_argument("--no-mse", dest="mse", action="store_false", help="plain min/max ranges")
    g.add_argument("--target", choices=("gguf-q4_0", "gguf-q8_0", "gguf-q4_k_m", "gguf-q4_k_s", "gguf-q5_k_m",
                                        "gguf-q5_k_s", "gguf-q6_k"), default="",
                   help="solve on a GGUF type's own grid (blocks of 32, llama.cpp's scales): the checkpoint exports "
                   "to it bit for bit; with --out FILE.gguf the GGUF file is written directly. The K-quant mixes "
                   "(gptq only, --out FILE.gguf only) put each layer on the type llama-quantize gives it")
    q = p.add_argument_group("GPTQ")
    q.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by descending Hessian diagonal")
    gar = q.add_mutually_exclusive_group()
    gar.add_argument("--act-group-aware", dest="act_group_aware", action="store_true", default=None,
                     help="group-aware reordering: act-order within groups, no inference cost (default)")
    gar.add_argument("--no-act-group-aware", dest="act_group_aware", action="store_false")
    q.add_argument("--static-groups", action="store_true", help="fix group grids before act-order reordering")
    ts = q.add_mutually_exclusive_group()
    ts.add_argument("--true-sequential", dest="true_sequential", action="store_true", default=True,
                    help="quantize q/k/v, o, gate/up, down in order, each on inputs after the previous (default)")
    ts.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    q.add_argument("--damp-percent", type=float, default=0.01, help="Hessian damping, fraction of mean diagonal")
    q.add_argument("--block-size", type=int, default=128, help="lazy-update block size (default 128)")
    sp = q  # --sparsity with --nm is refused by GPTQConfig, in one line
    sp.add_argument("--sparsity", type=float, default=0.0, metavar="S",
                    help="also prune to this fraction of zeros in the same sweep (SparseGPT's joint mode)")
    sp.add_argument("--nm", default="", metavar="N:M",
                    help="also prune to N:M (e.g. 2:4: at most 2 nonzeros in every 4 inputs) in the same sweep")
    sp.add_argument("--refit-iters", type=int, default=None, metavar="N",
                    help="with --sparsity/--nm: SparseGPT's mask, the kept weights refit exactly by N conjugate-"
                    "gradient iterations, then GPTQ with the mask fixed (default 20; 0 = the paper's single sweep)")
    q.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default: auto)")
    q.add_argument("--forward-dtype", default="auto", metavar="auto|fp32|bf16", help=FORWARD_DTYPE_HELP)
    q.add_argument("--importance", default="auto", metavar="|".join(IMPORTANCES), help=IMPORTANCE_HELP)
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default="wiki",
                   help="built-in wiki|web|stories|technical|code, hub wikitext2|c4|ptb, or a .txt/.jsonl/.json/.parquet file")
    c.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json/.parquet")
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence, capped at the model context (default 2048)")
    c.add_argument("--seed", type=int, default=0)
    f = p.add_argument_group("layers")
    f.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only quantize linears whose full name matches (repeatable), e.g. '*.mlp.*'")
    f.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="never quantize these (repeatable)")
    f.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (off by default)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin (pickle) weights; only for files you trust (safetensors are always preferred)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_memory_options(p)
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from .config import BnbConfig, CalibConfig, GPTQConfig, LayerFilter, RTNConfig
    from .pipeline.recipe import Recipe

    layers = LayerFilter(tuple(args.include), tuple(args.exclude), args.quantize_lm_head)
    _refuse_foreign_options(args)
    if args.method in ("nf4", "fp4", "int8"):
        config = BnbConfig(args.method, args.double_quant, args.compute_dtype, args.int8_threshold, layers)
    else:
        common = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, full_range=args.full_range,
                      layers=layers, target=args.target)
        if args.mse is not None:  # else each method's own default
            common["mse"] = args.mse
        if args.method == "gptq":
            config = GPTQConfig(**common, desc_act=args.desc_act, static_groups=args.static_groups,
                                true_sequential=args.true_sequential, damp_percent=args.damp_percent,
                                block_size=args.block_size, act_group_aware=args.act_group_aware is not False,
                                sparsity=args.sparsity, nm=args.nm, forward_dtype=args.forward_dtype,
                                importance=args.importance, refit_iters=args.refit_iters)
        else:
            config = RTNConfig(**common)
    calib = CalibConfig(args.calib, args.nsamples, args.seqlen, args.seed, args.text_field)
    stages = (config,)
    if str(args.out).endswith(".gguf"):
        from .config import ExportConfig

        if not args.target:
            raise UserError("--out FILE.gguf needs --target gguf-q4_0 or gguf-q8_0 (quantize on that grid), or "
                            "write a checkpoint folder and convert it with llmslim export")
        stages = (config, ExportConfig(type=config.gguf_grid))
    elif args.target not in ("", "gguf-q4_0", "gguf-q8_0"):
        raise UserError(f"--target {args.target} has no checkpoint format (its block scales are quantized): "
                        "write the GGUF file directly, --out model.gguf")
    return _run_recipe(args, Recipe(stages, calib))


def _run_recipe(args, recipe) -> int:
    from .pipeline.run import compress_to_folder
    from .util import parse_size

    max_memory = getattr(args, "max_memory", None)
    s = compress_to_folder(args.model, recipe, args.out, force=args.force, resume=args.resume,
                           batch_size=args.batch_size, allow_pickle=args.allow_pickle,
                           max_memory=parse_size(max_memory) if max_memory else None,
                           device=getattr(args, "device", "cpu"))
    print()
    for config, stage in zip(recipe.stages, s["stages"], strict=True):
        if config.stage == "export":
            print(f"{describe(config)}: {len(stage['layers'])} tensors written by llmslim, the rest by llama.cpp's "
                  "conversion")
            continue
        if config.stage == "prune":
            print(f"{describe(config)}: {prune_outcome(stage)}, {stage['seconds']:.0f} s")
            continue
        if config.stage == "recover":
            from .pipeline.recover_commands import describe_recover, recover_outcome

            print(f"{describe_recover(config)}: {recover_outcome(stage)}")
            continue
        print(f"{describe(config)}: {len(stage['layers'])} layers quantized, {len(stage['skipped'])} kept in float, "
              f"{stage['seconds']:.0f} s")
    before = f"{s['bytes_before'] / 2**20:.1f} MiB" if s["bytes_before"] else "n/a"
    print(f"size on disk: {before} -> {s['bytes_after'] / 2**20:.1f} MiB   written to {args.out}")
    return 0


def describe(config) -> str:
    """One line naming a stage and its grid, e.g. ``gptq 4-bit g128 sym``."""
    from .config import BnbConfig

    if isinstance(config, BnbConfig):
        return f"bitsandbytes {config.quant_type}{' +double-quant' if config.double_quant else ''}"
    if config.stage == "export":
        return f"export {config.format} {config.type}"
    if config.stage == "prune":
        return describe_prune(config)
    if getattr(config, "target", ""):
        return f"{config.stage} on the {config.target} grid"
    joint = ""
    if getattr(config, "sparsity", 0) or getattr(config, "nm", ""):
        joint = f" + {config.nm} sparse" if config.nm else f" + {config.sparsity:.0%} sparse"
    grid = "sym full-range" if getattr(config, "full_range", False) else "sym" if config.sym else "asym"
    return f"{config.stage} {config.bits}-bit g{config.group_size} {grid}{joint}"


def describe_prune(config) -> str:
    """e.g. ``prune sparsegpt 2:4``, ``prune depth -6 blocks (bi)``, ``prune width mlp 75% heads 50%``."""
    if config.method == "depth":
        return f"prune depth -{config.drop_blocks} blocks ({config.importance})"
    if config.method == "width":
        return f"prune width mlp {config.mlp_keep:.0%} heads {config.heads_keep:.0%}"
    return f"prune {config.method} {config.nm or f'{config.sparsity:.0%}'}"


def prune_outcome(stage: dict) -> str:
    """What a prune stage did, from its log entry in quant_log.json."""
    rec = stage.get("pruning") or {}
    before, after = rec.get("parameters", [0, 0])
    sp = rec.get("sparsity_measured")
    what = f"{len(stage['layers'])} layers pruned" if stage["layers"] else "reshaped"
    sparsity = f", sparsity {sp:.1%}" if sp else ""
    return f"{what}{sparsity}, parameters {before:,} -> {after:,}"


def add_compress(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="run a recipe (an ordered list of stages) on a model and write the checkpoint",
        description="Run a compression recipe (YAML or JSON): calibration + stages, e.g.\n"
        "  calibration: {dataset: wiki, nsamples: 128, seqlen: 512, seed: 0}\n"
        "  stages:\n    - gptq: {bits: 4, group_size: 128, sym: true}\n"
        "Every checkpoint carries the recipe that made it (recipe.yaml): pass that file to reproduce it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub id (org/name), local HF folder, .gguf file, or alias smollm2-135m")
    p.add_argument("--recipe", required=True, help="recipe file (.yaml/.yml/.json), e.g. CKPT/recipe.yaml")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default: auto)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin (pickle) weights you trust")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_memory_options(p)
    p.set_defaults(func=cmd_compress)


def cmd_compress(args) -> int:
    from .pipeline.recipe import read_recipe

    return _run_recipe(args, read_recipe(args.recipe))


# Options that only one family of methods reads, with their defaults: given to another method
# they would be silently ignored, so they are refused instead.
_GRID_OPTIONS = {"bits": 4, "group_size": 128, "sym": True, "full_range": False, "mse": None, "target": ""}
_GPTQ_OPTIONS = {"desc_act": False, "static_groups": False, "act_group_aware": None, "true_sequential": True,
                 "damp_percent": 0.01, "block_size": 128, "sparsity": 0.0, "nm": "", "forward_dtype": "auto",
                 "importance": "auto", "refit_iters": None}
_CALIB_OPTIONS = {"batch_size": None, "resume": False, "calib": "wiki", "nsamples": 128, "seqlen": 2048,
                  "seed": 0, "text_field": "text", "device": "cpu"}
_BNB_OPTIONS = {"double_quant": False, "compute_dtype": "bf16", "int8_threshold": 6.0}


def _refuse_foreign_options(args) -> None:
    if args.method in ("nf4", "fp4", "int8"):  # transformers loads and quantizes: no block driver
        foreign = _GRID_OPTIONS | _GPTQ_OPTIONS | _CALIB_OPTIONS | {"max_memory": None}
    elif args.method == "rtn":  # RTN reads no calibration data and does not resume
        foreign = _BNB_OPTIONS | _GPTQ_OPTIONS | _CALIB_OPTIONS
    else:
        foreign = _BNB_OPTIONS
    given = [k for k, default in foreign.items() if getattr(args, k) != default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UserError(f"--method {args.method} does not use {flags}")
    if args.method == "gptq" and args.desc_act and args.act_group_aware:
        raise UserError("--act-group-aware has no effect with --desc-act (act-order reorders every column); "
                        "drop one of them")


def add_prune(sub) -> None:
    from .config import FORWARD_DTYPE_HELP, PRUNE_METHODS

    p = sub.add_parser(
        "prune",
        help="prune a model: SparseGPT/Wanda/magnitude zeros (unstructured or N:M), or drop blocks/channels/heads",
        description="Prune a Hugging Face causal LM. sparsegpt/wanda/magnitude set weights to zero (the checkpoint "
        "stays dense float, sparsity recorded in config.json); depth/width remove decoder blocks, MLP channels "
        "and attention heads, so the model really gets smaller and loads in plain transformers. Any output can "
        "be quantized next (llmslim quantize, or a recipe). Docs: eval/pruning.md.",
        epilog="examples:\n  llmslim prune smollm2-135m --method sparsegpt --nm 2:4 --out out/smol-2of4\n"
        "  llmslim prune smollm2-135m --method wanda --sparsity 0.5 --out out/smol-wanda50\n"
        "  llmslim prune smollm2-135m --method depth --drop-blocks 6 --importance bi --out out/smol-24blocks\n"
        "  llmslim prune smollm2-135m --method width --mlp-keep 0.75 --heads-keep 0.67 --out out/smol-narrow",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub id (org/name), local HF folder, .gguf file, or alias smollm2-135m")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--method", choices=PRUNE_METHODS, default="sparsegpt", help="pruning method (default sparsegpt)")
    u = p.add_argument_group("sparsegpt | wanda | magnitude (zeros)")
    u.add_argument("--sparsity", type=float, default=0.0, metavar="S", help="fraction of zeros per pruned linear, in (0, 1)")
    u.add_argument("--nm", default="", metavar="N:M", help="semi-structured: at most N nonzeros in every M inputs (2:4, 4:8)")
    u.add_argument("--damp-percent", type=float, default=0.01, help="sparsegpt: Hessian damping (default 0.01)")
    u.add_argument("--block-size", type=int, default=128, help="sparsegpt: lazy-update block size (default 128)")
    u.add_argument("--true-sequential", action="store_true",
                   help="sparsegpt/wanda: each group of a block (q/k/v, o, gate/up, down) sees the groups before it "
                   "pruned (default: every layer's input from one forward of the unpruned block, as the reference "
                   "code and llm-compressor read it)")
    u.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="sparsegpt --nm: sweep the columns left to right (default: runs of M columns in decreasing "
                   "order of their largest Hessian diagonal entry, GPTQ's act-order)")
    u.add_argument("--forward-dtype", default="auto", metavar="auto|fp32|bf16",
                   help="sparsegpt/wanda, depth/width importance: " + FORWARD_DTYPE_HELP)
    u.add_argument("--refit-iters", type=int, default=None, metavar="N",
                   help="sparsegpt/wanda: once the mask is chosen, refit the kept weights to the exact least-squares "
                   "solution of the layer objective by N conjugate-gradient iterations (default: 20 for sparsegpt, 0 "
                   "for wanda; 0 = the reference algorithm: SparseGPT's sweep alone, Wanda with no weight update)")
    u.add_argument("--include", action="append", default=[], metavar="GLOB", help="only prune these linears (repeatable)")
    u.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="never prune these (repeatable)")
    d = p.add_argument_group("depth (drop decoder blocks)")
    d.add_argument("--drop-blocks", type=int, default=0, metavar="N", help="decoder blocks to remove")
    d.add_argument("--importance", choices=("bi", "kl"), default="bi",
                   help="bi: ShortGPT block influence 1-cos(in, out) (one pass); kl: KL increase when the block is "
                   "skipped (about n/2 passes for n blocks)")
    w = p.add_argument_group("width (MLP channels, attention heads)")
    w.add_argument("--mlp-keep", type=float, default=1.0, metavar="R", help="fraction of MLP channels kept, in (0, 1]")
    w.add_argument("--heads-keep", type=float, default=1.0, metavar="R",
                   help="fraction of attention heads kept (whole KV groups under GQA), in (0, 1]")
    c = p.add_argument_group("calibration (all but magnitude)")
    c.add_argument("--calib", default="wiki", help="as for quantize: built-in corpus, hub dataset or local file")
    c.add_argument("--text-field", default="text")
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence (default 2048, capped at the context)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default: auto)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin (pickle) weights you trust")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sparsegpt/wanda run into the same --out")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_memory_options(p)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from .config import CalibConfig, LayerFilter, PruneConfig
    from .pipeline.recipe import Recipe

    config = PruneConfig(args.method, args.sparsity, args.nm, args.drop_blocks, args.importance, args.mlp_keep,
                         args.heads_keep, args.damp_percent, args.block_size,
                         LayerFilter(tuple(args.include), tuple(args.exclude)), args.true_sequential, args.act_order,
                         args.forward_dtype, args.refit_iters)
    if not config.calibrated:
        given = [k for k, v in _CALIB_OPTIONS.items() if getattr(args, k) != v]
        if given:
            raise UserError(f"--method {args.method} reads no calibration data: drop "
                            + ", ".join("--" + k.replace("_", "-") for k in given))
    if config.method not in ("sparsegpt", "wanda"):  # only these go through the block driver
        given = [f for f, v in (("--device", args.device != "cpu"), ("--max-memory", args.max_memory)) if v]
        if given:
            raise UserError(f"--method {args.method} does not use {', '.join(given)} (sparsegpt and wanda do)")
    calib = CalibConfig(args.calib, args.nsamples, args.seqlen, args.seed, args.text_field)
    return _run_recipe(args, Recipe((config,), calib))


def add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a model or checkpoint: architecture, blocks, linears, quantization")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .formats.hf import folder_bytes
    from .loader import load
    from .models import resolve
    from .nn import GPTQLinear
    from .quant.sparsity import sparsity_report
    from .quant.walk import find_blocks, find_linears
    from .runtime.families import describe

    model, _ = load(args.model)
    blocks_name, blocks = find_blocks(model)
    linears = find_linears(blocks[0], quantized=True)
    quantized = [n for n, m in model.named_modules() if isinstance(m, GPTQLinear)]
    qc = getattr(model.config, "quantization_config", None)
    sparsity = sparsity_report(model)
    info = {
        "model": args.model,
        "architecture": type(model).__name__,
        "parameters": sparsity["parameters"],
        "blocks": f"{blocks_name} x {len(blocks)}",
        "linears_per_block": {n: type(m).__name__ for n, m in linears.items()},
        "quantized_linears": len(quantized),
        "quantization_config": qc if isinstance(qc, dict) or qc is None else qc.to_dict(),
        "bytes_on_disk": folder_bytes(resolve(args.model)),
        "sparsity": {k: sparsity[k] for k in ("sparsity", "nm", "by_type")},
        "pruning": getattr(model.config, "pruning", None),
        "fast_path": describe(model),  # what `llmslim serve` decodes it with (runtime/families.py)
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>20}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="llmslim", description="Make LLMs small and fast, honestly measured.")
    parser.add_argument("--version", action="version", version=f"llmslim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_quantize(sub)
    add_compress(sub)
    add_prune(sub)
    add_info(sub)
    for module in ("llmslim.pipeline.commands", "llmslim.pipeline.recover_commands", "llmslim.metrics.commands",
                   "llmslim.server.commands", "llmslim.tune.commands"):
        try:
            import importlib

            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed, for results that record it
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
