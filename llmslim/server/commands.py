"""``llmslim serve``: the OpenAI-compatible server (embedded engine or vLLM)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model or checkpoint over an OpenAI-compatible HTTP API",
        description="Serve CHECKPOINT with the OpenAI API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /tokenize, /detokenize, /health, /metrics). --engine embedded batches requests "
        "continuously in this process; --engine vllm starts vLLM's server on the same checkpoint "
        "(flags this command does not know are passed on to vLLM; put them after CHECKPOINT).",
        epilog="examples:\n  llmslim serve out/smol-g64 --port 8000\n"
        "  llmslim serve out/smol-g64 --engine vllm --vllm-python ~/vllm-venv/bin/python --dtype bfloat16\n"
        "  llmslim serve out/big-g128 --engine vllm --tensor-parallel-size 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="llmslim/GPTQ checkpoint, HF folder, .gguf, hub id or alias")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and tokenize routes (or set LLMSLIM_API_KEY)")
    p.add_argument("--engine", choices=("embedded", "vllm"), default="embedded")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder name)")
    p.add_argument("--max-batch", type=_positive, default=None,
                   help="sequences decoded together (default 16; for vLLM: --max-num-seqs, default vLLM's)")
    p.add_argument("--max-model-len", type=_positive, default=None, help="context cap (default: the model's)")
    p.add_argument("--max-queue", type=_positive, default=64, help="waiting requests before 503 (default 64)")
    p.add_argument("--max-tokens", type=_positive, default=None, dest="max_tokens_cap",
                   help="refuse requests asking for more output tokens than this (default: the context)")
    fast = p.add_mutually_exclusive_group()
    fast.add_argument("--fast", dest="fast", action="store_true", default=True,
                      help="int4/int8 CPU kernels and bf16 compute (default)")
    fast.add_argument("--no-fast", dest="fast", action="store_false",
                      help="reference float32 path (slower; bit-for-bit what llmslim eval computes)")
    p.add_argument("--no-batching", dest="batched", action="store_false",
                   help="decode each request alone (for comparison; slower under load)")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    v = p.add_argument_group("vLLM engine")
    v.add_argument("--vllm-python", default=None,
                   help="python of the venv that has vLLM (default: this one)")
    v.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    p.set_defaults(func=cmd_serve)
    _keep_unknown(p)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _keep_unknown(parser: argparse.ArgumentParser) -> None:
    """Collect flags this parser does not know into ``args.extra`` instead of failing.

    The top-level parser calls ``parse_args``, which rejects unknown flags; argparse asks
    each subparser for ``parse_known_args``, so answering "nothing unknown" here while
    keeping the list lets ``--engine vllm`` pass vLLM's own flags through.
    """
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extra = original(args, namespace)
        namespace.extra = list(getattr(namespace, "extra", [])) + extra
        return namespace, []

    parser.parse_known_args = parse_known_args


def cmd_serve(args) -> int:
    extra = list(getattr(args, "extra", []) or [])
    if args.engine == "vllm":
        from .vllm import launch

        return launch(args, extra)
    if extra:
        raise UserError(f"unknown arguments {' '.join(extra)} (only --engine vllm passes extra flags on)")
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs fastapi and uvicorn; run: pip install 'llmslim[serve]'") from None
    import torch

    from . import build

    if args.threads:
        torch.set_num_threads(args.threads)
    key = args.api_key or os.environ.get("LLMSLIM_API_KEY") or None
    if key is None and not _loopback(args.host):
        print(f"warning: listening on {args.host} without an API key; anyone who can reach it can use it",
              file=sys.stderr)
    try:
        app, engine = build(args.checkpoint, args.served_model_name, key, args.max_batch or 16, args.max_queue,
                            args.max_model_len, args.max_tokens_cap, fast=args.fast, batched=args.batched)
    except ValueError as e:  # e.g. --max-model-len beyond the model's context
        raise UserError(str(e)) from None
    print(f"serving {args.checkpoint} as {app.state.llmslim.name!r} on http://{args.host}:{args.port} "
          f"(max batch {engine.max_batch}, context {engine.max_model_len})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
