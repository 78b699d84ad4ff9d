"""Batch-1 CPU inference, side by side (issue 6): decode and prefill tokens/s, peak RSS.

    python eval/bench_inference.py                      # every row, 5 repeats, greedy-match check
    python eval/bench_inference.py --rows hf-fp32 llmslim-4bit --repeats 3 --no-match

Every row runs in its own worker process (so its peak RSS is its own) that loads the model
once and then waits; the parent asks the workers for one measurement each in turn, round
after round, so that load from other jobs on the machine falls on every row alike, and
reports medians. One measurement = prefill of a fixed ``--prompt-tokens`` prompt of real
text, then ``--tokens`` greedy tokens (EOS ignored), with ``--threads`` threads everywhere.

Rows (``--rows``):
  hf-fp32, hf-bf16       transformers, ``model.generate``, the float reference model
  bnb-nf4                bitsandbytes NF4 through transformers (compute bf16), ``model.generate``
  bnb-fp4, bnb-nf4-dq, bnb-int8   (opt-in) the other bitsandbytes variants the same way
  llmslim-bf16           the float model through ``accelerate`` (bf16) and llmslim's decode loop
  llmslim-4bit           GPTQ 4-bit g128 checkpoint, ``accelerate`` (int4 kernel; its default head:
                         8-bit blocks of 32 where llmslim's kernels are built, runtime/head.py), llmslim loop
  llmslim-4bit-bf16head  the same with the float lm_head kept in bf16 (``head="keep"``)
  llmslim-4bit-fp32      accelerate(dtype=float32): the kernels still take bf16 inputs, everything
                         else (residual stream, norms, attention) stays fp32; 8-bit head
  llmslim-8bit           GPTQ 8-bit per-channel checkpoint, ``accelerate`` (int8 kernel)
  llamacpp-q4_0          llama.cpp Q4_0 through llama-cpp-python (skipped if unavailable)

llama-cpp-python builds from source (~15 min on 2 cores). The script builds it once into
``~/.cache/llmslim-wheels`` and installs it into its own venv (``--llama-venv``) unless
``--no-build``; without it the row is skipped with a message.

The greedy-match check (``--match-prompts`` x ``--match-tokens``) compares the fast 4-bit path
with the dequantized reference (``GPTQLinear`` in fp32) on held-out wiki prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the llama.cpp worker runs in a venv without llmslim installed

from llmslim.util import rss_bytes  # noqa: E402  (stdlib only: every worker venv can import it)

ROWS = ["hf-fp32", "hf-bf16", "bnb-nf4", "llmslim-bf16", "llmslim-4bit", "llmslim-4bit-bf16head",
        "llmslim-4bit-fp32", "llmslim-8bit", "llamacpp-q4_0"]
BNB_ROWS = {"bnb-nf4": ("nf4", False), "bnb-fp4": ("fp4", False), "bnb-nf4-dq": ("nf4", True),
            "bnb-int8": ("int8", False)}
LABELS = {
    "hf-fp32": "transformers fp32",
    "hf-bf16": "transformers bf16",
    "bnb-nf4": "bitsandbytes NF4 (transformers)",
    "bnb-fp4": "bitsandbytes FP4 (transformers)",
    "bnb-nf4-dq": "bitsandbytes NF4 + double quant (transformers)",
    "bnb-int8": "bitsandbytes LLM.int8 (transformers)",
    "llmslim-bf16": "llmslim bf16 (lean loop)",
    "llmslim-4bit": "llmslim 4-bit GPTQ g128",
    "llmslim-4bit-bf16head": "llmslim 4-bit GPTQ g128, bf16 head",
    "llmslim-4bit-fp32": "llmslim 4-bit GPTQ g128, fp32 residual + 8-bit head",
    "llmslim-8bit": "llmslim 8-bit per-channel",
    "llamacpp-q4_0": "llama.cpp Q4_0",
}
LLAMA_CPP = "llama-cpp-python==0.3.36"
WHEELS = Path.home() / ".cache" / "llmslim-wheels"
MODEL = "smollm2-135m"


# ---------------------------------------------------------------------------------------------
# Workers: one per row, load once, measure on request
# ---------------------------------------------------------------------------------------------


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    current, peak = rss_bytes()
    return current / 2**20, peak / 2**20


def _reply(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _serve(load, run) -> None:
    """Load, warm up, then answer "run" lines with one measurement each until "quit"."""
    base, _ = _rss_mb()  # the runtime alone (interpreter, torch/transformers or llama_cpp imported)
    t0 = time.perf_counter()
    state = load()
    load_s = time.perf_counter() - t0
    run(state)  # warm-up: first-call repacks, allocator growth, lazy init
    current, peak = _rss_mb()
    _reply({"ready": True, "load_s": load_s, "rss_mb": current, "peak_rss_mb": peak, "base_rss_mb": base})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            result = run(state)
            result["rss_mb"], result["peak_rss_mb"] = _rss_mb()
            _reply(result)
        elif cmd == "quit":
            break


def _prompt_ids(tokenizer, n: int) -> list[int]:
    """``n`` tokens of held-out real text (the same for every row: the tokenizers are the same)."""
    from llmslim.data import load_documents

    text = "\n\n".join(str(d) for d in load_documents("wiki", "eval")[:20])
    return tokenizer(text)["input_ids"][:n]


class _FirstToken:
    """A transformers streamer that only records when each generated token arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def torch_worker(args) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the baseline RSS is taken, like llmslim)

    import llmslim.loader  # noqa: F401
    import llmslim.runtime.generate  # noqa: F401

    torch.set_num_threads(args.threads)
    row = args.worker

    def load():
        from llmslim.loader import load as load_model

        if row == "hf-fp32":
            model, tok = load_model(MODEL, dtype=torch.float32)
        elif row == "hf-bf16":
            model, tok = load_model(MODEL, dtype=torch.bfloat16)
        elif row in BNB_ROWS:
            model, tok = _load_bnb(args, torch, *BNB_ROWS[row])
        else:
            from llmslim.runtime.fast import accelerate

            source = {"llmslim-bf16": MODEL, "llmslim-8bit": args.ckpt_8bit}.get(row, args.ckpt_4bit)
            dtype = torch.float32 if row.endswith("fp32") else torch.bfloat16
            model, tok = load_model(source, dtype=dtype)
            head = {"llmslim-4bit-bf16head": "keep", "llmslim-4bit-fp32": "int8"}.get(row, "auto")
            accelerate(model, dtype, head=head)
        model.eval()
        return model, tok, _prompt_ids(tok, args.prompt_tokens)

    def run(state):
        model, tok, ids = state
        if row.startswith("llmslim"):
            from llmslim.runtime.generate import generate

            r = generate(model, tok, ids, max_new_tokens=args.tokens, ignore_eos=True)
            return {"prefill_s": r.timings["prefill_s"], "decode_s": r.timings["decode_s"],
                    "decode_tokens": len(r.tokens) - 1, "tokens": r.tokens[:16]}
        streamer = _FirstToken()
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, do_sample=False, streamer=streamer,
                                 pad_token_id=tok.eos_token_id)
        t_end = time.perf_counter()
        # put() #0 is the prompt, #1 the first generated token (after the prefill)
        first = streamer.times[1]
        return {"prefill_s": first - t0, "decode_s": t_end - first, "decode_tokens": args.tokens - 1,
                "tokens": out[0, len(ids):len(ids) + 16].tolist()}

    _serve(load, run)


def _load_bnb(args, torch, method: str = "nf4", double_quant: bool = False):
    """bf16 compute: llmslim's bitsandbytes checkpoint of the reference model (made once)."""
    from llmslim.loader import load as load_model

    folder = Path(args.work) / ("bnb-" + method + ("-dq" if double_quant else ""))
    from llmslim.config import BnbConfig
    from llmslim.pipeline.run import quantize_to_folder

    if not (folder / "config.json").exists():
        quantize_to_folder(MODEL, folder, BnbConfig(method, double_quant=double_quant, compute_dtype="bf16"), force=True)
    return load_model(str(folder), dtype=torch.bfloat16)


def llamacpp_worker(args) -> None:
    """Runs in the llama-cpp-python venv: imports nothing from llmslim or torch."""
    from llama_cpp import Llama

    ids = json.loads(Path(args.prompt_file).read_text())

    def load():
        return Llama(model_path=args.gguf, n_ctx=args.prompt_tokens + args.tokens + 64, n_threads=args.threads,
                     n_threads_batch=args.threads, n_batch=512, verbose=False)

    def run(llm):
        llm.reset()
        gen = llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True)
        t0 = time.perf_counter()
        tokens = [next(gen)]
        first = time.perf_counter()
        for _ in range(args.tokens - 1):
            tokens.append(next(gen))
        t_end = time.perf_counter()
        gen.close()
        return {"prefill_s": first - t0, "decode_s": t_end - first, "decode_tokens": args.tokens - 1,
                "tokens": tokens[:16]}

    _serve(load, run)


def match_worker(args) -> None:
    """Greedy continuations of the fast 4-bit path vs the dequantized reference, and logit error."""
    import copy

    import torch

    from llmslim.data import load_documents
    from llmslim.loader import load as load_model
    from llmslim.nn import decoded_weights
    from llmslim.runtime.fast import HEADS, accelerate
    from llmslim.runtime.generate import generate

    torch.set_num_threads(args.threads)
    ref, tok = load_model(args.ckpt_4bit, dtype=torch.float32)
    docs = [str(d) for d in load_documents("wiki", "eval")]
    prompts = [tok(d)["input_ids"][:args.match_prompt_tokens] for d in docs[: args.match_prompts]]
    window = torch.tensor([_prompt_ids(tok, 256)])
    report = {"prompts": len(prompts), "tokens": args.match_tokens}
    # The bf16 noise floor: the same reference modules, only computing in bf16.
    variants = [("reference-bf16", lambda: copy.deepcopy(ref).to(torch.bfloat16))]
    variants += [(f"{name}, head {head}", lambda dtype=dtype, head=head: accelerate(copy.deepcopy(ref), dtype, head=head))
                 for name, dtype in (("bf16", torch.bfloat16), ("fp32 residual", torch.float32)) for head in HEADS[1:]]  # keep, int8 ("auto" is one of them)
    # The reference continuations once, with each weight decoded once (same numbers as decoding per call).
    with decoded_weights(ref), torch.inference_mode():
        wanted = [generate(ref, tok, p, max_new_tokens=args.match_tokens, ignore_eos=True).tokens for p in prompts]
        want = ref(window).logits.float()
    for head, make in variants:
        fast = make()
        same, prefix = 0, []
        for p, a in zip(prompts, wanted, strict=True):
            b = generate(fast, tok, p, max_new_tokens=args.match_tokens, ignore_eos=True).tokens
            same += a == b
            prefix.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
        with torch.inference_mode():
            got = fast(window).logits.float()
        report[head] = {
            "identical": same,
            "fraction": same / len(prompts),
            "mean_common_prefix": statistics.mean(prefix),
            "logit_max_abs_err": float((got - want).abs().max()),
            "logit_rel_err": float((got - want).abs().max() / want.abs().max()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
        }
        del fast
    _reply(report)


# ---------------------------------------------------------------------------------------------
# Parent: prepare checkpoints, start workers, interleave, report
# ---------------------------------------------------------------------------------------------


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def prepare_checkpoints(args) -> None:
    llmslim = [sys.executable, "-m", "llmslim.cli"]
    for path, extra in [(args.ckpt_4bit, ["--method", "gptq", "--bits", "4", "--group-size", "128",
                                          "--nsamples", "32", "--seqlen", "512"]),
                        (args.ckpt_8bit, ["--method", "rtn", "--bits", "8", "--group-size", "-1"])]:
        if not (Path(path) / "config.json").exists():
            _run([*llmslim, "quantize", MODEL, *extra, "--out", str(path), "--force"], cwd=ROOT)


def llama_python(args) -> str | None:
    """The llama-cpp-python venv's interpreter, building the wheel once if asked; None if unavailable."""
    venv = Path(args.llama_venv)
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return str(py)
    if args.no_build:
        print(f"llama.cpp row skipped: no llama_cpp in {venv} (and --no-build)")
        return None
    try:
        if not py.exists():
            _run([sys.executable, "-m", "venv", str(venv)])
        WHEELS.mkdir(parents=True, exist_ok=True)
        if not list(WHEELS.glob("llama_cpp_python-*.whl")):
            print("building llama-cpp-python once (~15 min on 2 cores); the wheel is kept in", WHEELS)
            env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
            _run([str(py), "-m", "pip", "wheel", LLAMA_CPP, "-w", str(WHEELS)], env=env)
        _run([str(py), "-m", "pip", "install", "--find-links", str(WHEELS), LLAMA_CPP])
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"llama.cpp row skipped: llama-cpp-python could not be built or installed ({e})")
        return None
    return str(py)


def q4_0_gguf(py: str, work: Path) -> str:
    """Q4_0 GGUF of the reference model, made by llama.cpp's own quantizer from the packaged Q4_1 file."""
    from llmslim.models import alias_file

    out = work / "smollm2-135m-q4_0.gguf"
    if not out.exists():
        src = alias_file(MODEL)
        code = (
            "import llama_cpp, sys\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0\n"
            "p.allow_requantize = True\n"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
        )
        _run([py, "-c", code, str(src), str(out)])
    return str(out)


class Worker:
    def __init__(self, row: str, cmd: list[str]):
        self.row = row
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.ready = self._read()
        self.results: list[dict] = []

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.row} exited (code {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def measure(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        r = self._read()
        self.results.append(r)
        return r

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def summarize(w: Worker) -> dict:
    decode = [r["decode_tokens"] / r["decode_s"] for r in w.results]
    prefill = [r["prefill_tokens"] / r["prefill_s"] for r in w.results]
    return {
        "row": w.row,
        "label": LABELS[w.row],
        "decode_tok_s": statistics.median(decode),
        "decode_all": decode,
        "prefill_tok_s": statistics.median(prefill),
        "prefill_all": prefill,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in w.results),
        "rss_mb": w.results[-1]["rss_mb"],
        "load_s": w.ready["load_s"],
        "base_rss_mb": w.ready.get("base_rss_mb", float("nan")),
        "first_tokens": w.results[-1]["tokens"],
    }


def table(rows: list[dict]) -> str:
    by = {r["row"]: r for r in rows}
    fp32 = by.get("hf-fp32")
    llama = by.get("llamacpp-q4_0")
    head = ("| row | decode tok/s | x fp32 | x llama.cpp | prefill tok/s | x fp32 | peak RSS MiB | x fp32 "
            "| model MiB | x fp32 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}" if b else "-"

    for r in rows:
        r["model_mb"] = r["peak_rss_mb"] - r["base_rss_mb"]  # what loading and running the model added
        lines.append(
            f"| {r['label']} | {r['decode_tok_s']:.1f} | {ratio(r, fp32, 'decode_tok_s')} | "
            f"{ratio(r, llama, 'decode_tok_s')} | {r['prefill_tok_s']:.0f} | {ratio(r, fp32, 'prefill_tok_s')} | "
            f"{r['peak_rss_mb']:.0f} | {ratio(r, fp32, 'peak_rss_mb')} | {r['model_mb']:.0f} | "
            f"{ratio(r, fp32, 'model_mb')} |"
        )
    return "\n".join(lines)


def round_ratios(rows: list[dict]) -> dict[str, dict]:
    """Each row's decode speed over llama.cpp's in the same round: on a machine whose speed drifts
    during a run, the median of these is steadier than the ratio of the two medians."""
    llama = next((r for r in rows if r["row"] == "llamacpp-q4_0"), None)
    if llama is None:
        return {}
    out = {}
    for r in rows:
        if r is llama:
            continue
        per = [a / b for a, b in zip(r["decode_all"], llama["decode_all"], strict=True)]
        out[r["row"]] = {"median": statistics.median(per), "min": min(per), "max": max(per), "all": per}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS + [r for r in BNB_ROWS if r not in ROWS])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128, help="decoded tokens per measurement")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (the prefill)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "llmslim" / "bench-inference"),
                   help="checkpoints and GGUF files made for the benchmark (kept between runs)")
    p.add_argument("--llama-venv", default=str(Path.home() / ".cache" / "llmslim-llama-venv"))
    p.add_argument("--no-build", action="store_true", help="skip llama.cpp rather than build llama-cpp-python")
    p.add_argument("--no-match", action="store_true", help="skip the greedy-match check")
    p.add_argument("--match-prompts", type=int, default=20)
    p.add_argument("--match-tokens", type=int, default=32)
    p.add_argument("--match-prompt-tokens", type=int, default=64)
    p.add_argument("--json", default=str(HERE / "results" / "inference.json"))
    # internal
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt-4bit", help=argparse.SUPPRESS)
    p.add_argument("--ckpt-8bit", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    p.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work)
    args.ckpt_4bit = args.ckpt_4bit or str(work / "gptq-4bit-g128")
    args.ckpt_8bit = args.ckpt_8bit or str(work / "rtn-8bit-perchannel")

    if args.worker == "llamacpp-q4_0":
        return llamacpp_worker(args)
    if args.worker == "match":
        return match_worker(args)
    if args.worker:
        return torch_worker(args)

    work.mkdir(parents=True, exist_ok=True)
    if any(r.startswith("llmslim-4bit") for r in args.rows) or "llmslim-8bit" in args.rows or not args.no_match:
        prepare_checkpoints(args)
    common = ["--threads", str(args.threads), "--tokens", str(args.tokens), "--prompt-tokens",
              str(args.prompt_tokens), "--work", str(work), "--ckpt-4bit", args.ckpt_4bit,
              "--ckpt-8bit", args.ckpt_8bit]
    me = str(Path(__file__).resolve())
    rows = list(args.rows)
    llama_cmd = None
    if "llamacpp-q4_0" in rows:
        py = llama_python(args)
        if py is None:
            rows.remove("llamacpp-q4_0")
        else:
            from llmslim.formats.hf import load_tokenizer
            from llmslim.models import resolve

            tok = load_tokenizer(resolve(MODEL))
            prompt_file = work / "prompt_ids.json"
            prompt_file.write_text(json.dumps(_prompt_ids(tok, args.prompt_tokens)))
            llama_cmd = [py, me, "--worker", "llamacpp-q4_0", *common, "--gguf", q4_0_gguf(py, work),
                         "--prompt-file", str(prompt_file)]

    workers: list[Worker] = []
    try:
        for row in rows:
            cmd = llama_cmd if row == "llamacpp-q4_0" else [sys.executable, me, "--worker", row, *common]
            print(f"starting {row} ...", flush=True)
            workers.append(Worker(row, cmd))
        for rep in range(args.repeats):
            for w in workers:
                r = w.measure()
                r["prefill_tokens"] = args.prompt_tokens
                print(f"  round {rep + 1} {w.row:24s} decode {r['decode_tokens'] / r['decode_s']:7.1f} tok/s  "
                      f"prefill {args.prompt_tokens / r['prefill_s']:7.0f} tok/s", flush=True)
    finally:
        for w in workers:
            w.close()
    results = [summarize(w) for w in workers]
    match = None
    if not args.no_match:
        print("greedy-match check ...", flush=True)
        out = _run([sys.executable, me, "--worker", "match", *common, "--match-prompts", str(args.match_prompts),
                    "--match-tokens", str(args.match_tokens), "--match-prompt-tokens",
                    str(args.match_prompt_tokens)], capture_output=True, text=True, cwd=ROOT)
        match = json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])
    md = table(results)
    print()
    print(f"batch 1, {args.threads} threads, prompt {args.prompt_tokens} tokens, {args.tokens} decoded tokens, "
          f"median of {args.repeats} interleaved rounds")
    print(md)
    ratios = round_ratios(results)
    for row, q in ratios.items():
        print(f"{LABELS[row]}: decode / llama.cpp's in the same round, median {q['median']:.2f} "
              f"(min {q['min']:.2f}, max {q['max']:.2f})")
    if match:
        for head in [h for h in match if isinstance(match[h], dict)]:
            m = match[head]
            what = "dequantized reference in bf16" if head == "reference-bf16" else f"fast path, {head}"
            print(f"greedy match ({what}): {m['identical']}/{match['prompts']} prompts identical over "
                  f"{match['tokens']} tokens (mean common prefix {m['mean_common_prefix']:.1f}); "
                  f"logits max rel err {m['logit_rel_err']:.4f}, top-1 agreement {m['top1_agreement']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "worker"},
                                           "rows": results, "match": match, "table": md,
                                           "round_ratios": ratios}, indent=1))
    print("wrote", args.json)


if __name__ == "__main__":
    main()
