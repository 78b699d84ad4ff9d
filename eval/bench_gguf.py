"""GGUF on the reference model: llama.cpp's own Q4_0 (plain and with an importance matrix) against
llmslim GPTQ on the Q4_0 grid, the same for the Q4_K_M mix, Q8_0 as the sanity row -- same file
size, same kernels, so the same speed; the perplexity of each file measured by llama.cpp itself and
by transformers' reading of the same file, side by side.

Protocol (eval/bench_gptq.py's): calibration = 128 x 512-token windows of the built-in wiki corpus
(first 80% of the articles, seed 0); perplexity on the first 44 non-overlapping 1024-token windows of
the held-out 20%, no BOS. Each file is scored twice on the very same token windows: run by llama.cpp
through llama-cpp-python (``--llama-python``: a venv with llama-cpp-python==0.3.36 built from source,
``make llama``) and read back by transformers' GGUF loader (``llmslim eval FILE.gguf``); the two must
agree (llama.cpp's matmuls quantize the activations to 8 bits, so to about a percent, not bit for bit).

Rows (the issue's benchmark, eval/gguf.md):
  f32                 the float model through llama.cpp's conversion (``llmslim export --type f32``):
                      the baseline every loss is measured from
  llama-q4_0          llama.cpp's quantizer (llama_model_quantize) on the fp16 model (``llmslim export
                      --type f16``: llama.cpp's conversion, as ``convert_hf_to_gguf.py --outtype f16``)
  llama-q4_0-imatrix  the same with llama-imatrix's importance matrix of the fp16 model on the same
                      calibration text: the text of llmslim's 128 calibration windows (llama-imatrix
                      re-tokenizes it into 512-token chunks; --llama-bin)
  llmslim-gptq-q4_0   ``llmslim quantize --method gptq --target gguf-q4_0 --out FILE.gguf``
  llmslim-gptq-q4_0-actorder   the same with ``--desc-act --static-groups``
  llmslim-gptq-q4_0-recover    ``llmslim compress --recipe calibration/recipes/gguf-q4_0-recover.yaml``:
                      that GPTQ, then block-wise recovery on the Q4_0 grid (AutoRound's signed gradient
                      on the rounding and the fp16 scales, 200 steps a block), then the file
  llama-q4_k_m, llama-q4_k_m-imatrix, llmslim-gptq-q4_k_m
                      the same for llama.cpp's Q4_K_M mix (GPTQ: each layer on the type the mix gives
                      it; on SmolLM2 most rows are 576 wide, not whole super-blocks of 256: llama.cpp
                      writes them Q5_0, Q8_0 for the "more bits" attn_v; only ffn_down is Q4_K/Q6_K)
  llama-q8_0, llmslim-gptq-q8_0   the sanity rows
Not in the default set (``--rows``): f16, llmslim-rtn-{q4_0,q8_0,q4_k_m} (``llmslim export`` of the
float model: llama.cpp's rounding of the fp32 weights, byte-identical to llama_model_quantize of the
f32 file -- tests/formats/test_gguf_kmix.py checks that, ``--llama-source f32`` shows it here).

Columns: file size; perplexity by llama.cpp and by transformers; the loss over f32 (ppl - ppl_f32,
llama.cpp's figures) and its ratio to llama-q4_0's / llama-q4_k_m's (the goal: GPTQ <= 0.5x the plain
row and below the imatrix row); KL to f32 (transformers); decode speed in llama.cpp (tokens/s,
greedy, batch 1, ``--threads``; the best of 3 runs of 128 tokens after a 32-token prompt).

    make llama                                  # llama.cpp + llama-cpp-python in .llama-venv (the defaults)
    python eval/bench_gguf.py                   # every row (hours on 2 cores: GPTQ, 44 windows x 2 readers)
    python eval/bench_gguf.py --smoke           # proves it runs: 4 rows x 2 windows, 4 samples, own folder
    python eval/bench_gguf.py --report

Prints a table; raw JSON per row in eval/results/gguf_<row>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

ROWS = ["f32", "llama-q4_0", "llama-q4_0-imatrix", "llmslim-gptq-q4_0", "llmslim-gptq-q4_0-actorder",
        "llmslim-gptq-q4_0-recover", "llama-q4_k_m", "llama-q4_k_m-imatrix", "llmslim-gptq-q4_k_m", "llama-q8_0",
        "llmslim-gptq-q8_0"]
EXTRA_ROWS = ["f16", "llmslim-rtn-q4_0", "llmslim-rtn-q8_0", "llmslim-rtn-q4_k_m"]
SMOKE_ROWS = ["f32", "llama-q4_0", "llama-q4_0-imatrix", "llmslim-gptq-q4_0"]
LLAMA_VENV = HERE.parent / ".llama-venv"  # `make llama`
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15}
QUANTIZE_NAMES = {"q4_0": "Q4_0", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
RESULTS = HERE / "results"
MODEL = "smollm2-135m"

# Run inside the llama-cpp-python venv: quantize, score windows, or time decoding.
LLAMA_SCRIPT = r'''
import json, math, sys, time
import numpy as np
import llama_cpp
cmd = sys.argv[1]
if cmd == "quantize":
    src, dst, ftype = sys.argv[2], sys.argv[3], int(sys.argv[4])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    raise SystemExit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))
if cmd == "ppl":
    path, windows, threads = sys.argv[2], json.load(open(sys.argv[3])), int(sys.argv[4])
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(len(w) for w in windows), logits_all=True, n_threads=threads,
                          n_batch=1024, verbose=False)
    nll, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
        n += len(w) - 1
    print(json.dumps({"ppl": math.exp(nll / n), "tokens": n}))
if cmd == "speed":  # greedy decoding at batch 1: seconds per token after the prompt, best of `reps`
    path, prompt, n_gen, reps, threads = sys.argv[2], json.loads(sys.argv[3]), *map(int, sys.argv[4:7])
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + n_gen + 8, n_threads=threads, n_batch=512,
                          verbose=False)
    best = None
    for _ in range(reps):
        stamps = []
        for _tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n_gen + 1:
                break
        rate = n_gen / (stamps[-1] - stamps[0])  # the first token closes the prompt's prefill
        best = rate if best is None else max(best, rate)
    print(json.dumps({"decode_tokens_per_s": best, "threads": threads, "prompt": len(prompt), "tokens": n_gen,
                      "reps": reps}))
'''


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def llmslim(*args) -> list:
    return [sys.executable, "-m", "llmslim.cli", *args]


def tokenizer():
    from llmslim.formats.hf import load_tokenizer
    from llmslim.models import resolve

    return load_tokenizer(resolve(MODEL))


def windows(n: int, seqlen: int = 1024) -> list[list[int]]:
    """The held-out windows ``llmslim eval --ppl wiki --seqlen 1024`` scores, as token ids."""
    from llmslim.data import load_documents
    from llmslim.metrics.windows import gptq_windows

    text = "\n\n".join(getattr(d, "text", d) for d in load_documents("wiki", "eval"))
    ids = tokenizer()(text, add_special_tokens=False).input_ids
    return [w.ids for w in gptq_windows(ids, seqlen)[:n]]


def calibration_text(nsamples: int) -> str:
    """The text of llmslim's calibration windows (``--calib wiki --nsamples N --seqlen 512``), for
    llama-imatrix: the same text llmslim's GPTQ sees, which llama.cpp re-tokenizes into its chunks."""
    from llmslim.data import calibration_tokens

    tok = tokenizer()
    return "".join(tok.decode(w) for w in calibration_tokens("wiki", tok, nsamples, 512, seed=0).tolist())


def float_file(kind: str, work: Path) -> Path:
    """llama.cpp's conversion of the float model (run by llmslim export with llama.cpp's gguf-py)."""
    path = work / f"{kind}.gguf"
    if not path.exists():
        sh(llmslim("export", MODEL, "--type", kind, "--out", path, "--force"))
    return path


def make_file(row: str, work: Path, args) -> Path | None:
    out = work / f"{row}.gguf"
    calib = ["--calib", "wiki", "--nsamples", str(args.nsamples), "--seqlen", "512"]
    if row in ("f32", "f16"):
        return float_file(row, work)
    if row.startswith("llama-"):
        source = float_file(args.llama_source, work)
        kind = row.removeprefix("llama-").removesuffix("-imatrix")
        if row.endswith("-imatrix"):
            if not args.llama_bin:
                return None
            bins = Path(args.llama_bin)
            imatrix = work / f"imatrix-{args.llama_source}-{args.nsamples}.gguf"
            if not imatrix.exists():
                text = work / f"calib-{args.nsamples}.txt"
                text.write_text(calibration_text(args.nsamples))
                sh([bins / "llama-imatrix", "-m", source, "-f", text, "-o", imatrix, "-c", "512",
                    "--chunks", args.nsamples, "-t", args.threads])
            sh([bins / "llama-quantize", "--imatrix", imatrix, source, out, QUANTIZE_NAMES[kind], args.threads])
        else:
            if not args.llama_python:
                return None
            sh([args.llama_python, "-c", LLAMA_SCRIPT, "quantize", source, out, FTYPES[kind]])
    elif row.startswith("llmslim-rtn-"):
        sh(llmslim("export", MODEL, "--type", row.removeprefix("llmslim-rtn-"), "--out", out, "--force"))
    elif row.endswith("-recover"):  # the example recipe: GPTQ (act-order), block recovery, export
        import yaml

        recipe = yaml.safe_load((HERE.parent / "calibration" / "recipes" / "gguf-q4_0-recover.yaml").read_text())
        recipe["calibration"]["nsamples"] = args.nsamples  # (--smoke)
        path = work / f"{row}.recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        sh(llmslim("compress", MODEL, "--recipe", path, "--out", out, "--force"))
    elif row.startswith("llmslim-gptq-"):
        kind, _, variant = row.removeprefix("llmslim-gptq-").partition("-")
        flags = ["--desc-act", "--static-groups"] if variant == "actorder" else []
        sh(llmslim("quantize", MODEL, "--method", "gptq", "--target", f"gguf-{kind}", *calib, *flags, "--out", out,
                   "--force"))
    return out


def llama(args, *cmd) -> dict:
    p = sh([args.llama_python, "-c", LLAMA_SCRIPT, *cmd], capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_row(row: str, args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reused = args.reuse and (work / f"{row}.gguf").exists()  # made before, here or by hand (say how)
    path = work / f"{row}.gguf" if reused else make_file(row, work, args)
    if path is None:
        return {"row": row, "skipped": "needs --llama-bin" if "imatrix" in row else "needs --llama-python"}
    res = {"row": row, "file": str(path), "bytes": path.stat().st_size,
           "make_seconds": None if reused else round(time.perf_counter() - t0, 1),
           "llama_source": args.llama_source if row.startswith("llama-") else None,
           "nsamples": args.nsamples, "windows": args.windows}
    out_json = work / f"{row}.eval.json"
    sh(llmslim("eval", path, "--baseline", MODEL, "--ppl", "wiki", "--seqlen", "1024",
               "--ppl-tokens", str(args.windows * 1024 + 1), "--output", out_json, "--no-progress"))
    res["transformers"] = json.loads(out_json.read_text())
    if args.llama_python:
        wfile = work / f"windows-{args.windows}.json"
        if not wfile.exists():
            wfile.write_text(json.dumps(windows(args.windows)))
        res["llama_cpp"] = llama(args, "ppl", path, wfile, args.threads)
        prompt = windows(1)[0][:32]
        res["llama_cpp_speed"] = llama(args, "speed", path, json.dumps(prompt), args.decode_tokens, args.speed_reps,
                                       args.threads)
    return res


def ppl_of(ev: dict) -> float | None:
    """``llmslim eval --output``'s perplexity (its JSON: ``perplexity.perplexity``)."""
    p = ev.get("perplexity")
    return p.get("perplexity") if isinstance(p, dict) else p


def kl_of(ev: dict) -> float | None:
    """Mean KL to the float baseline on the same windows (``perplexity.divergence.kl_mean``)."""
    p = ev.get("perplexity")
    return ((p.get("divergence") or {}).get("kl_mean")) if isinstance(p, dict) else None


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def report(results: Path = RESULTS) -> None:
    rows = {r["row"]: r for r in (json.loads(p.read_text()) for p in sorted(results.glob("gguf_*.json")))}
    order = [r for r in [*ROWS, *EXTRA_ROWS] if r in rows]
    lc = {name: (r.get("llama_cpp") or {}).get("ppl") for name, r in rows.items()}
    base = lc.get("f32")
    loss = {name: (p - base if p is not None and base is not None else None) for name, p in lc.items()}
    print("| row | file MB | ppl (llama.cpp) | ppl (transformers reads the GGUF) | loss over f32 | vs llama.cpp's "
          "plain row | KL to f32 | decode tok/s (llama.cpp) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in order:
        r = rows[name]
        if "skipped" in r:
            print(f"| {name} | skipped: {r['skipped']} | | | | | | |")
            continue
        kind = next((k for k in ("q4_k_m", "q4_0", "q8_0") if name.endswith(k) or f"-{k}-" in name), None)
        plain = loss.get(f"llama-{kind}") if kind else None
        ratio = loss[name] / plain if loss.get(name) is not None and plain else None
        speed = (r.get("llama_cpp_speed") or {}).get("decode_tokens_per_s")
        print(f"| {name} | {r['bytes'] / 1e6:.1f} | {fmt(lc[name], '.3f')} | {fmt(ppl_of(r['transformers']), '.3f')} | "
              f"{fmt(loss.get(name), '.3f')} | {fmt(ratio, '.2f')} | {fmt(kl_of(r['transformers']), '.4f')} | "
              f"{fmt(speed, '.1f')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS + EXTRA_ROWS)
    built = (LLAMA_VENV / ".installed").is_file()
    ap.add_argument("--llama-python", default=str(LLAMA_VENV / "bin" / "python") if built else None,
                    help="python of a venv with llama-cpp-python==0.3.36 (default: .llama-venv, from `make llama`)")
    ap.add_argument("--llama-bin", default=str(LLAMA_VENV / "build" / "bin") if built else None,
                    help="folder with llama.cpp's llama-imatrix and llama-quantize (default: .llama-venv/build/bin)")
    ap.add_argument("--llama-source", choices=("f16", "f32"), default="f16",
                    help="the file llama.cpp's rows quantize (default f16, llama.cpp's usual route)")
    ap.add_argument("--smoke", action="store_true", help="prove the script works: 4 rows, 2 windows, 4 samples, "
                    "16 decoded tokens once, one llama.cpp thread, results in the work folder, not eval/results")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=44)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (scoring, imatrix, decoding)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--speed-reps", type=int, default=3)
    ap.add_argument("--work", default=str(HERE.parent / "out" / "bench_gguf"))
    ap.add_argument("--reuse", action="store_true", help="score a row's file already in --work instead of making "
                    "it again (its make_seconds is then not measured)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        report()
        return
    results = RESULTS
    if args.smoke:
        if args.rows == ROWS:  # --rows picks among them (e.g. to finish an interrupted smoke run)
            args.rows = SMOKE_ROWS
        args.nsamples, args.windows, args.decode_tokens, args.speed_reps = 4, 2, 16, 1
        args.threads = 1  # a smoke run shares the machine: its speed column is no measurement
        args.work = str(Path(args.work).with_name("bench_gguf_smoke"))
        results = Path(args.work)
    results.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        res = run_row(row, args)
        (results / f"gguf_{row}.json").write_text(json.dumps(res, indent=1))
    report(results)


if __name__ == "__main__":
    main()
