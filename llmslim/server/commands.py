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
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--max-kv-memory", type=_size, default=None, metavar="SIZE",
                    help="KV cache the running batch may take, e.g. 2GiB: requests that would pass it wait "
                    "(default: no bound beyond --max-batch x context)")
    kv.add_argument("--max-kv-tokens", type=_positive, default=None, metavar="N",
                    help="the same bound in KV cache positions (rows x padded length)")
    p.add_argument("--prefill-chunk", type=_positive, default=None, metavar="N",
                   help="prompt tokens prefilled per engine step: a long prompt is prefilled N tokens at a time "
                   "between decode steps, so running streams keep getting tokens (default 512)")
    p.add_argument("--request-timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="a request still unfinished this long after it arrived is aborted (504; default: none)")
    p.add_argument("--limit-concurrency", type=_positive, default=None, metavar="N",
                   help="connections and requests in progress before uvicorn answers 503 "
                   "(default: 2 x (max batch + max queue) + 64)")
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
    v.add_argument("--tensor-parallel-size", "-tp", type=_positive, default=None, metavar="T",
                   help="GPUs to split each layer across (vLLM's flag; checked first: heads, group sizes and "
                   "packed words must split T ways, and the error names the sizes that work)")
    v.add_argument("--pipeline-parallel-size", "-pp", type=_positive, default=None, metavar="P",
                   help="stages to split the decoder blocks into (vLLM's flag, e.g. across machines)")
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def _size(text: str) -> int:
    """Bytes from ``2GiB``, ``1.5G`` (binary), ``500MB`` (decimal) or a plain number."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"must be a size such as 2GiB, 512MiB or 1.5G, got {text!r}") from None
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return int(value)


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
    if (args.tensor_parallel_size or 1) > 1 or (args.pipeline_parallel_size or 1) > 1:
        raise UserError("--tensor-parallel-size/--pipeline-parallel-size need --engine vllm (the embedded engine "
                        "runs on one machine's CPU)")
    if extra:
        raise UserError(f"unknown arguments {' '.join(extra)} (only --engine vllm passes extra flags on)")
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs fastapi and uvicorn; run: pip install 'llmslim[serve]'") from None
    import torch

    from . import build
    from .startup import Loading

    if args.threads:
        torch.set_num_threads(args.threads)
    key = args.api_key or os.environ.get("LLMSLIM_API_KEY") or None
    if key is None and not _loopback(args.host):
        print(f"warning: listening on {args.host} without an API key; anyone who can reach it can use it",
              file=sys.stderr)
    exit_code = 0

    def load():
        return build(args.checkpoint, args.served_model_name, key, args.max_batch or 16, args.max_queue,
                     args.max_model_len, args.max_tokens_cap, fast=args.fast, batched=args.batched,
                     request_timeout=args.request_timeout, max_kv_tokens=args.max_kv_tokens,
                     max_kv_memory=args.max_kv_memory, on_down=down, prefill_chunk=args.prefill_chunk)

    def ready(app, engine) -> None:
        kv = f", KV budget {engine.max_kv_tokens} positions" if engine.max_kv_tokens else ""
        print(f"serving {args.checkpoint} as {app.state.llmslim.name!r} on http://{args.host}:{args.port} "
              f"(max batch {engine.max_batch}, context {engine.max_model_len}{kv})", file=sys.stderr, flush=True)

    def down(reason: str) -> None:  # the engine failed too often: exit, so that a supervisor restarts us
        nonlocal exit_code
        exit_code = 1
        print(f"error: the engine is down ({reason}); exiting", file=sys.stderr, flush=True)
        server.should_exit = True

    # Bind first, load in the background: until the model is ready every route answers 503 "loading".
    loading = Loading(load)
    server = uvicorn.Server(uvicorn_config(args, loading))
    loading.start(on_ready=ready, on_error=lambda e: setattr(server, "should_exit", True))
    print(f"loading {args.checkpoint}; http://{args.host}:{args.port} answers 503 until it is ready",
          file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        if loading.engine is not None:
            loading.engine.stop()
    if loading.error is not None:
        if isinstance(loading.error, ValueError):  # e.g. --max-model-len beyond the model's context
            raise UserError(str(loading.error)) from None
        raise loading.error
    return exit_code


def uvicorn_config(args, app):
    """uvicorn's configuration for ``llmslim serve``: bounded concurrency (answered in OpenAI's
    error shape), no access log spam."""
    import uvicorn

    from .startup import ConcurrencyLimit

    limit = args.limit_concurrency or 2 * ((args.max_batch or 16) + args.max_queue) + 64
    return uvicorn.Config(ConcurrencyLimit(app, limit), host=args.host, port=args.port, log_level=args.log_level)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
