"""The ``eval`` and ``compare`` subcommands: argument checks, loading, and printing only."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..errors import UserError
from .windows import METHODS

PPL_HELP = ("held-out text: built-in wiki|web|stories|technical|code, hub wikitext2|c4|ptb, "
            "or a local text file (evaluated whole)")


def register(subparsers) -> None:
    add_eval(subparsers)
    add_compare(subparsers)
    add_report(subparsers)


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, KL vs the original, task accuracy, size and speed of a model",
        description="Evaluate a model or checkpoint. Without --ppl, --tasks or --speed it measures "
        "perplexity on the built-in held-out wiki text.",
        epilog="examples:\n  llmslim eval smollm2-135m --ppl wiki --output base.json\n"
        "  llmslim eval out/gptq4 --baseline smollm2-135m --ppl wiki --tasks goal_step_wikihow_goal_inference "
        "--limit 200 --speed --output gptq4.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub id, local HF folder, .gguf file, llmslim/bitsandbytes checkpoint, or alias")
    p.add_argument("--baseline", metavar="ORIGINAL",
                   help="the unquantized model: adds KL divergence and top-1 agreement over the --ppl text")
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl", metavar="SOURCE", help=PPL_HELP)
    g.add_argument("--ppl-method", choices=METHODS, default="gptq",
                   help="gptq: non-overlapping windows (default); sliding: strided windows (transformers docs); "
                   "rolling: lm-eval's rolling loglikelihood with word/byte perplexity and bits per byte")
    g.add_argument("--seqlen", type=int, help="window length in tokens (default min(2048, model context))")
    g.add_argument("--stride", type=int, help="sliding only: tokens between window starts (default seqlen/2)")
    g.add_argument("--bos", action="store_true", help="start every window with BOS (gptq, sliding)")
    g.add_argument("--ppl-tokens", type=int, metavar="N", help="score only the first N tokens of the text")
    g.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.json/.parquet files")
    t = p.add_argument_group("tasks")
    t.add_argument("--tasks", metavar="A,B", help="comma-separated tasks (BIG-bench file names, or hub "
                   "hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada)")
    t.add_argument("--limit", type=int, metavar="N", help="first N examples of each task")
    p.add_argument("--speed", action="store_true", help="measure batch-1 prefill and decode tokens/s")
    p.add_argument("--speed-path", choices=("serve", "as-loaded"), default="serve",
                   help="what --speed times: serve = llmslim serve's fast path (int4/int8 kernels, bf16; the "
                   "default), as-loaded = the model as loaded (quantized layers dequantize on every call)")
    p.add_argument("--batch-tokens", type=int, default=4096, metavar="N",
                   help="tokens per forward pass; bounds memory for logits (default 4096)")
    p.add_argument("--name", help="label for this model in tables and plots (default: last part of MODEL)")
    p.add_argument("--output", metavar="FILE.json", help="write the result as JSON (atomically)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_eval)


def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="side-by-side table and quality-vs-size plot of eval results",
        description="Compare results written by 'llmslim eval --output'.",
        epilog="example:\n  llmslim compare base.json rtn4.json gptq4.json --output report.md --plot quality_vs_size.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", metavar="RESULT.json")
    p.add_argument("--output", metavar="REPORT.md", help="also write the markdown table here")
    p.add_argument("--plot", metavar="PNG", help="write a quality-vs-size plot (PNG, needs matplotlib)")
    p.add_argument("--html", metavar="REPORT.html", help="also write the self-contained HTML report (as llmslim report)")
    p.set_defaults(func=cmd_compare)


def add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page: trade-off plots, per-layer logs, tasks, and how each model was made",
        description="Build an HTML report from results written by 'llmslim eval --output': quality vs size and "
        "vs speed with the Pareto front, task accuracy with error bars, per-layer loss / sparsity / bits from "
        "each checkpoint's quant_log.json, and the commands and recipes that made each model. One file, plots "
        "as inline SVG, data embedded: it opens offline. Checkpoints are found where eval recorded them, or "
        "at the result's 'model' path (from here or from the result file's folder).",
        epilog="example:\n  llmslim report base.json rtn4.json gptq4.json --html report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", metavar="RESULT.json")
    p.add_argument("--html", metavar="REPORT.html", required=True, help="where to write the report")
    p.add_argument("--title", default="llmslim report", help="the page's title")
    p.set_defaults(func=cmd_report)


def check_eval_args(args) -> list[str]:
    """Every flag mistake, found before minutes are spent loading models. Returns the task list."""
    from .tasks import parse_tasks

    for flag, value, low in (("--seqlen", args.seqlen, 2), ("--stride", args.stride, 1),
                             ("--limit", args.limit, 1), ("--ppl-tokens", args.ppl_tokens, 2),
                             ("--batch-tokens", args.batch_tokens, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.stride is not None and args.ppl_method != "sliding":
        raise UserError(f"--stride applies only to --ppl-method sliding, not {args.ppl_method}")
    if args.baseline and args.ppl is None:
        raise UserError("--baseline needs --ppl: KL divergence is measured over the perplexity text")
    if args.limit is not None and not args.tasks:
        raise UserError("--limit applies to --tasks; give --tasks too")
    if args.output and Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; give a file name such as result.json")
    return parse_tasks(args.tasks) if args.tasks else []


def cmd_eval(args) -> int:
    tasks = check_eval_args(args)
    if args.ppl is None and not tasks and not args.speed:
        args.ppl = "wiki"
    text = None
    if args.ppl is not None:
        from ..data import eval_text

        text = eval_text(args.ppl, text_field=args.text_field)  # before loading: a bad source fails fast
        if not text.strip():
            raise UserError(f"--ppl {args.ppl} has no text")
    from .tasks import get_task

    # Fetch task data (hub tasks may be unreachable) before minutes go into loading models.
    task_docs = {name: get_task(name).load(args.limit) for name in tasks}
    from ..loader import load
    from ..util import peak_rss_bytes
    from .report import format_result, write_json
    from .suite import evaluate

    model, tokenizer = load(args.model)
    peak = peak_rss_bytes()  # before the baseline and any evaluation allocate more
    baseline = load(args.baseline) if args.baseline else None
    result = evaluate(
        model, tokenizer, args.model, ppl_text=text, ppl_source=args.ppl, ppl_method=args.ppl_method,
        seqlen=args.seqlen, stride=args.stride, add_bos=args.bos, ppl_tokens=args.ppl_tokens,
        baseline=baseline, baseline_source=args.baseline, tasks=tasks, limit=args.limit, task_docs=task_docs,
        measure_speed=args.speed, speed_path=args.speed_path, peak_rss=peak, token_budget=args.batch_tokens, name=args.name,
        progress=not args.no_progress,
    )
    result["command"] = command_line(args)
    if Path(args.model).expanduser().exists():
        result["model_path"] = str(Path(args.model).expanduser().resolve())
    print(format_result(result))
    if args.output:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0


def cmd_compare(args) -> int:
    from .report import compare_markdown, plot_quality_vs_size, read_result

    results = [read_result(p) for p in args.results]
    table = compare_markdown(results)
    print(table, end="")
    if args.output:
        from .report import write_text

        write_text(args.output, table)
        print(f"wrote {args.output}")
    if args.plot:
        print(f"wrote {plot_quality_vs_size(results, args.plot)}")
    if args.html:
        write_html(args.results, results, args.html)
    return 0


def cmd_report(args) -> int:
    from .report import read_result

    write_html(args.results, [read_result(p) for p in args.results], args.html, args.title)
    return 0


def write_html(paths: list[str], results: list[dict], out: str, title: str = "llmslim report") -> None:
    from .html import build_report
    from .report import write_text

    if Path(out).is_dir():
        raise UserError(f"--html {out} is a folder; give a file name such as report.html")
    write_text(out, build_report(results, [Path(p) for p in paths], title))
    print(f"wrote {out}")


def command_line(args) -> str | None:
    """The command as typed (``llmslim eval ...``), recorded in the result for the report."""
    argv = getattr(args, "argv", None)
    return shlex.join(["llmslim", *argv]) if argv is not None else None
