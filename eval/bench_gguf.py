"""GGUF on the reference model: llama.cpp's own Q4_0 (plain and with an importance matrix) against
llmslim GPTQ on the Q4_0 grid, same file size, same kernels; Q8_0 as the sanity row.

Protocol (eval/bench_gptq.py's): calibration = 128 x 512-token windows of the built-in wiki corpus
(first 80% of the articles, seed 0); perplexity on the first 44 non-overlapping 1024-token windows of
the held-out 20%, no BOS. Each file is scored twice on the very same token windows: read back by
transformers' GGUF loader (``llmslim eval FILE.gguf``) and run by llama.cpp itself through
llama-cpp-python (``--llama-python``: a venv with llama-cpp-python==0.3.36 built from source, recipe in
../shared/README.md); the two must agree.

Rows:
  f32            the float model through llama.cpp's conversion (``llmslim export --type f32``; the baseline)
  llama-q4_0     llama.cpp's quantizer (llama_model_quantize, Q4_0) on that f32 file
  llama-q4_0-imatrix  the same with an importance matrix computed on the calibration text
                 (needs llama.cpp's llama-imatrix binary: --llama-bin DIR)
  llmslim-rtn-q4_0    llmslim export of the float model (llama.cpp's rounding: should be byte-identical
                 to llama-q4_0)
  llmslim-gptq-q4_0   llmslim quantize --method gptq --target gguf-q4_0 --out FILE.gguf
  llama-q8_0, llmslim-gptq-q8_0  the sanity rows
  llama-q4_k_m, llama-q4_k_m-imatrix, llmslim-rtn-q4_k_m, llmslim-gptq-q4_k_m
                 the same for llama.cpp's Q4_K_M mix (GPTQ: --target gguf-q4_k_m; on
                 SmolLM2 most rows are 576 wide, not whole super-blocks of 256: llama.cpp writes them
                 Q5_0, Q8_0 for the "more bits" attn_v; only ffn_down is Q4_K/Q6_K)

    make llama                                  # llama.cpp + llama-cpp-python in .llama-venv (the defaults)
    python eval/bench_gguf.py                   # every row
    python eval/bench_gguf.py --smoke           # tiny: 3 rows x 2 windows, 4 calibration samples, own folder
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

ROWS = ["f32", "llama-q4_0", "llama-q4_0-imatrix", "llmslim-rtn-q4_0", "llmslim-gptq-q4_0", "llama-q8_0",
        "llmslim-gptq-q8_0", "llama-q4_k_m", "llama-q4_k_m-imatrix", "llmslim-rtn-q4_k_m", "llmslim-gptq-q4_k_m"]
SMOKE_ROWS = ["llmslim-rtn-q4_k_m", "llama-q4_k_m", "llmslim-gptq-q4_k_m"]
LLAMA_VENV = HERE.parent / ".llama-venv"  # `make llama`
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15}
QUANTIZE_NAMES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}
RESULTS = HERE / "results"
MODEL = "smollm2-135m"

# Run inside the llama-cpp-python venv: quantize (optionally with an imatrix file) or score windows.
LLAMA_SCRIPT = r'''
import json, math, sys
import numpy as np
import llama_cpp
cmd = sys.argv[1]
if cmd == "quantize":
    src, dst, ftype = sys.argv[2], sys.argv[3], int(sys.argv[4])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if len(sys.argv) > 5:
        raise SystemExit("imatrix quantization goes through the llama-quantize binary (--llama-bin)")
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    raise SystemExit(rc)
path, windows = sys.argv[2], json.load(open(sys.argv[3]))
llm = llama_cpp.Llama(model_path=path, n_ctx=max(len(w) for w in windows), logits_all=True, n_threads=2,
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
'''


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def llmslim(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmslim.cli", *args]


def windows(n: int, seqlen: int = 1024) -> list[list[int]]:
    from llmslim.data import load_documents
    from llmslim.formats.hf import load_tokenizer
    from llmslim.metrics.windows import gptq_windows
    from llmslim.models import resolve

    tok = load_tokenizer(resolve(MODEL))
    text = "\n\n".join(getattr(d, "text", d) for d in load_documents("wiki", "eval"))
    ids = tok(text, add_special_tokens=False).input_ids
    return [w.ids for w in gptq_windows(ids, seqlen)[:n]]


def make_file(row: str, work: Path, args) -> Path | None:
    out = work / f"{row}.gguf"
    f32 = work / "f32.gguf"
    calib = ["--calib", "wiki", "--nsamples", str(args.nsamples), "--seqlen", "512"]
    if row == "f32" or row.startswith("llama-"):
        if not f32.exists():  # llama.cpp's conversion (run by llmslim export, with its own gguf-py), floats as they are
            sh(llmslim("export", MODEL, "--type", "f32", "--out", f32, "--force"))
        if row == "f32":
            return f32
    if row in ("llama-q4_0", "llama-q8_0", "llama-q4_k_m"):
        if not args.llama_python:
            return None
        sh([args.llama_python, "-c", LLAMA_SCRIPT, "quantize", f32, out, FTYPES[row.removeprefix("llama-")]])
    elif row.endswith("-imatrix"):
        if not args.llama_bin:
            return None
        bins = Path(args.llama_bin)
        calib_txt = work / "calib.txt"
        from llmslim.data import load_documents

        calib_txt.write_text("\n\n".join(getattr(d, "text", d) for d in load_documents("wiki", "calib")))
        if not (work / "imatrix.gguf").exists():
            sh([bins / "llama-imatrix", "-m", f32, "-f", calib_txt, "-o", work / "imatrix.gguf", "-c", "512",
                "--chunks", str(args.nsamples), "-t", "2"])
        kind = row.removeprefix("llama-").removesuffix("-imatrix")
        sh([bins / "llama-quantize", "--imatrix", work / "imatrix.gguf", f32, out, QUANTIZE_NAMES[kind], "2"])
    elif row.startswith("llmslim-rtn-"):
        sh(llmslim("export", MODEL, "--type", row.removeprefix("llmslim-rtn-"), "--out", out, "--force"))
    elif row.startswith("llmslim-gptq-"):
        kind = row.rsplit("-", 1)[1]
        sh(llmslim("quantize", MODEL, "--method", "gptq", "--target", f"gguf-{kind}", *calib, "--out", out,
                   "--force"))
    return out


def run_row(row: str, args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = make_file(row, work, args)
    if path is None:
        return {"row": row, "skipped": "needs --llama-python" if "imatrix" not in row else "needs --llama-bin"}
    made = time.perf_counter() - t0
    res = {"row": row, "file": str(path), "bytes": path.stat().st_size, "make_seconds": round(made, 1)}
    out_json = work / f"{row}.eval.json"
    sh(llmslim("eval", path, "--baseline", MODEL, "--ppl", "wiki", "--seqlen", "1024",
               "--ppl-tokens", str(args.windows * 1024 + 1), "--output", out_json, "--no-progress"))
    ev = json.loads(out_json.read_text())
    res["transformers"] = ev
    if args.llama_python:
        wfile = work / "windows.json"
        if not wfile.exists():
            wfile.write_text(json.dumps(windows(args.windows)))
        p = sh([args.llama_python, "-c", LLAMA_SCRIPT, "ppl", path, wfile], capture_output=True, text=True)
        res["llama_cpp"] = json.loads(p.stdout.strip().splitlines()[-1])
    return res


def ppl_of(ev: dict) -> float | None:
    """``llmslim eval --output``'s perplexity (its JSON: ``perplexity.perplexity``)."""
    p = ev.get("perplexity")
    return p.get("perplexity") if isinstance(p, dict) else p


def kl_of(ev: dict) -> float | None:
    """Mean KL to the float baseline on the same windows (``perplexity.divergence.kl_mean``)."""
    p = ev.get("perplexity")
    return ((p.get("divergence") or {}).get("kl_mean")) if isinstance(p, dict) else None


def report(results: Path = RESULTS) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("gguf_*.json"))]
    print("| row | file MB | ppl (transformers reads the GGUF) | ppl (llama.cpp) | KL to fp32 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['row']} | skipped: {r['skipped']} | | | |")
            continue
        ev = r.get("transformers", {})
        lc = r.get("llama_cpp", {}).get("ppl")
        kl = kl_of(ev)
        print(f"| {r['row']} | {r['bytes'] / 1e6:.1f} | {ppl_of(ev)} | {lc if lc is not None else 'n/a'} | {kl} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    built = (LLAMA_VENV / ".installed").is_file()
    ap.add_argument("--llama-python", default=str(LLAMA_VENV / "bin" / "python") if built else None,
                    help="python of a venv with llama-cpp-python==0.3.36 (default: .llama-venv, from `make llama`)")
    ap.add_argument("--llama-bin", default=str(LLAMA_VENV / "build" / "bin") if built else None,
                    help="folder with llama.cpp's llama-imatrix and llama-quantize (default: .llama-venv/build/bin)")
    ap.add_argument("--smoke", action="store_true", help="prove the script works: 3 rows, 2 windows, 4 samples, "
                    "results in the work folder, not eval/results")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=44)
    ap.add_argument("--work", default=str(HERE.parent / "out" / "bench_gguf"))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        report()
        return
    results = RESULTS
    if args.smoke:
        args.rows, args.nsamples, args.windows = SMOKE_ROWS, 4, 2
        args.work = str(Path(args.work).with_name("bench_gguf_smoke"))
        results = Path(args.work)
    results.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        res = run_row(row, args)
        (results / f"gguf_{row}.json").write_text(json.dumps(res, indent=1))
    report(results)



if __name__ == "__main__":
    main()
