"""The ``export`` subcommand: a float model or a GPTQ checkpoint -> one GGUF file."""

from __future__ import annotations

import argparse

from ..config import GGUF_TYPES


def register(subparsers) -> None:
    add_export(subparsers)


def add_export(sub) -> None:
    types = ", ".join(GGUF_TYPES)
    p = sub.add_parser(
        "export",
        help="write a model or GPTQ checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio)",
        description="Export to GGUF. A GPTQ checkpoint on the type's grid (4-bit symmetric, groups that are whole "
        "blocks of 32 -> q4_0; 8-bit -> q8_0) is written bit for bit; other checkpoints are refused (re-fit them "
        "with `llmslim quantize --target gguf-q4_0`); a float model is rounded to nearest exactly as llama.cpp "
        "does, with llama-quantize's choice of type per tensor for the K-quant mixes (q4_k_m, ...). Metadata and tokenizer come from llama.cpp's own conversion code (or, for a model that was a "
        "GGUF file, from that file).",
        epilog="examples:\n  llmslim export out/gptq-q4_0 --type q4_0 --out smol-gptq.Q4_0.gguf\n"
        "  llmslim export smollm2-135m --type q4_k_m --out smol.Q4_K_M.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="GPTQ checkpoint folder, float HF folder, .gguf file, hub id, or alias")
    p.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    p.add_argument("--format", default="gguf", help="output format (gguf)")
    p.add_argument("--type", default="q4_0", help=f"tensor type: {types} (default q4_0)")
    p.add_argument("--token-embedding-type", default="auto",
                   help="type of token_embd (default auto: as llama-quantize chooses)")
    p.add_argument("--output-tensor-type", default="auto",
                   help="type of the output matrix (default auto: as llama-quantize chooses -- Q6_K, or Q8_0 when "
                   "its width is not whole blocks of the file's type)")
    p.add_argument("--imatrix", action="store_true",
                   help="round a float model with llama.cpp's importance-weighted quantizers; the importance matrix "
                   "is each linear's mean squared input on the calibration text (as llama-imatrix collects it)")
    p.add_argument("--calib", default="wiki", help="calibration text for --imatrix (built-in name, file or dataset)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows for --imatrix (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512, as "
                   "llama-imatrix's -c)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin (pickle) weights you trust")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from collections import Counter

    from ..config import CalibConfig, ExportConfig
    from ..errors import UserError
    from .run import export_to_file

    config = ExportConfig(args.format, args.type, args.token_embedding_type, args.output_tensor_type, args.imatrix)
    if not str(args.out).endswith(".gguf"):
        raise UserError(f"--out must name a .gguf file, got {args.out}")
    calib = CalibConfig(args.calib, args.nsamples, args.seqlen) if args.imatrix else None
    s = export_to_file(args.model, config, args.out, force=args.force, allow_pickle=args.allow_pickle, calib=calib)
    for what, n in sorted(Counter(t["how"] for t in s["plan"]).items()):
        print(f"{n:4d} x {what}")
    types = Counter(t for _, t in s["tensors"])
    print("tensor types:", ", ".join(f"{k} {v}" for k, v in sorted(types.items())))
    before = f"{s['bytes_before'] / 2**20:.1f} MiB" if s["bytes_before"] else "n/a"
    print(f"size on disk: {before} -> {s['bytes_after'] / 2**20:.1f} MiB   written to {args.out} ({s['seconds']:.0f} s)")
    return 0
