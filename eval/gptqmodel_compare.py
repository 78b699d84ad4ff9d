"""llmslim vs GPTQModel 7.7.0 on the reference model: same calibration tokens, same evaluation.

Issue 3, item 2. Two virtual environments: this script runs in llmslim's venv and starts
GPTQModel's steps with ``--gptqmodel-python`` (GPTQModel's own venv; recipe in
../shared/README.md: ``pip install torch==2.13.0``, ``pip install --no-deps gptqmodel==7.7.0``,
then its requirements minus torch, plus ``optimum``). Every step is a separate process, so
each tool's peak RSS (``VmHWM``) is its own.

    python eval/gptqmodel_compare.py --gptqmodel-python /work/gptqmodel-venv/bin/python \
        --work /tmp/peers/compare --settings 4:128:sym,3:128:sym --md eval/results/gptqmodel_compare.md

Steps (each also runnable alone: ``calib``, ``quantize-gptqmodel``, ``quantize-llmslim``, ``ppl``,
``table``; results are JSON files under ``--work``; a step whose result exists is skipped):
1. calibration: ``llmslim.data.calibration_tokens("wiki", tok, 128, 512, seed=0)`` -> calib.pt
   (128 x 512-token windows from the first 80% of the built-in wiki articles).
2. GPTQModel: ``GPTQModel.load(fp32 folder, QuantizeConfig(bits, group_size, sym), dtype=float32)``,
   ``quantize([{"input_ids", "attention_mask"}...])`` on exactly those tokens (its defaults
   otherwise: batch_size 1, act_group_aware, damp 0.05), ``save``.
3. llmslim: ``llmslim.pipeline.stages.quantize(model, GPTQConfig(bits, group_size, sym), tokens)`` on
   ``llmslim.loader.load("smollm2-135m")[0]``, then ``save_gptq`` (tool ``llmslim``: the model
   whole in memory, as before issue 19); tool ``llmslim-stream``: what ``llmslim quantize`` runs
   now, block by block from the checkpoint (``llmslim.pipeline.stream``), on the same tokens,
   with ``--max-memory`` as given (default: half of the available memory), MKL's fast memory manager
   off as the CLI sets it; tool ``llmslim-stream-bf16``: the same with ``--forward-dtype bf16``.
   Both: quantize() wall time, process CPU time, VmHWM, and the 1-minute load average sampled
   every 5 s during the call (this machine is shared: timings mean little without it).
4. perplexity of fp32 and every checkpoint, all loaded with ``llmslim.loader.load``: the last 20% of
   the wiki articles (``eval_text("wiki")``), no special tokens, first 44 non-overlapping
   1024-token windows, no BOS (``perplexity(..., method="gptq", seqlen=1024, max_tokens=44*1024)``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the GPTQModel venv has no llmslim

from llmslim.util import peak_rss_bytes  # noqa: E402  (stdlib only: every venv can import it)

MODEL = "smollm2-135m"
NSAMPLES, SEQLEN, SEED = 128, 512, 0
PPL_SEQLEN, PPL_WINDOWS = 1024, 44
# llmslim-stream-bf16: llmslim-stream with --forward-dtype bf16 (the calibration forwards in bf16)
TOOLS = ("gptqmodel", "llmslim", "llmslim-stream", "llmslim-stream-bf16")


# --- measurement helpers (both venvs) ---------------------------------------------------------


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class Meter:
    """Wall time, CPU time (all threads) and the load average sampled while the block runs."""

    def __enter__(self):
        self.samples = [loadavg()]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.wait(5):
            self.samples.append(loadavg())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_seconds = (cpu1.ru_utime - self.cpu0.ru_utime) + (cpu1.ru_stime - self.cpu0.ru_stime)
        self._stop.set()
        self._thread.join()
        self.samples.append(loadavg())
        return False

    def result(self) -> dict:
        return {
            "quantize_seconds": round(self.seconds, 1),
            "cpu_seconds": round(self.cpu_seconds, 1),
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 0),
            "load_start": self.samples[0],
            "load_mean": round(sum(self.samples) / len(self.samples), 2),
            "load_end": self.samples[-1],
        }


def parse_setting(s: str) -> dict:
    bits, group, kind = s.split(":")
    return {"bits": int(bits), "group_size": int(group), "sym": kind == "sym", "desc_act": False,
            "name": f"{bits}bit_g{group}_{kind}"}


# --- steps --------------------------------------------------------------------------------------


def step_calib(work: Path) -> None:
    import torch

    from llmslim.data import calibration_tokens
    from llmslim.formats.hf import load_tokenizer
    from llmslim.models import resolve

    folder = resolve(MODEL)
    tok = load_tokenizer(folder)
    tokens = calibration_tokens("wiki", tok, NSAMPLES, SEQLEN, seed=SEED)
    torch.save({"tokens": tokens, "model_dir": str(folder)}, work / "calib.pt")
    print(f"calibration: {tuple(tokens.shape)} tokens from {folder} -> {work / 'calib.pt'}")


def step_quantize_gptqmodel(work: Path, setting: dict) -> None:
    """Runs in GPTQModel's venv (no llmslim import)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    calib = torch.load(work / "calib.pt")
    tokens = calib["tokens"]
    data = [{"input_ids": t.clone(), "attention_mask": torch.ones_like(t)} for t in tokens]
    qcfg = QuantizeConfig(bits=setting["bits"], group_size=setting["group_size"], sym=setting["sym"],
                          desc_act=setting["desc_act"])
    model = GPTQModel.load(calib["model_dir"], qcfg, dtype=torch.float32)
    with Meter() as m:
        model.quantize(data)
    res = m.result() | {"tool": "gptqmodel 7.7.0", "setting": setting["name"], "torch_threads": torch.get_num_threads(),
                        "quantize_config": {k: str(v) for k, v in model.quantize_config.to_dict().items()}}
    out = work / f"gptqmodel_{setting['name']}"
    model.save(str(out))
    (work / f"gptqmodel_{setting['name']}.json").write_text(json.dumps(res | {"dir": str(out)}, indent=1))
    print(json.dumps(res))


def step_quantize_llmslim(work: Path, setting: dict) -> None:
    import torch

    from llmslim.config import GPTQConfig
    from llmslim.formats.gptq import save_gptq
    from llmslim.loader import load
    from llmslim.pipeline.stages import quantize

    tokens = torch.load(work / "calib.pt")["tokens"]
    model, tok = load(MODEL)
    config = GPTQConfig(bits=setting["bits"], group_size=setting["group_size"], sym=setting["sym"],
                        desc_act=setting["desc_act"])
    with Meter() as m:
        report = quantize(model, config, tokens)
    res = m.result() | {"tool": "llmslim", "setting": setting["name"], "torch_threads": torch.get_num_threads(),
                        "report_seconds": round(report.seconds, 1)}
    out = work / f"llmslim_{setting['name']}"
    save_gptq(model, tok, out, config, report.skipped)
    (work / f"llmslim_{setting['name']}.json").write_text(json.dumps(res | {"dir": str(out)}, indent=1))
    print(json.dumps(res))


def step_quantize_llmslim_stream(work: Path, setting: dict, max_memory: str | None, forward_dtype: str = "fp32") -> None:
    """The block-by-block path (``llmslim quantize``'s), on the calibration tensor both tools use; tool
    ``llmslim-stream-bf16`` with ``--forward-dtype bf16``."""
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")  # as llmslim's CLI runs it (llmslim/cli.py)
    import torch

    from llmslim.config import CalibConfig, GPTQConfig
    from llmslim.formats.gptq import save_gptq
    from llmslim.formats.hf import load_tokenizer
    from llmslim.models import read_config, resolve
    from llmslim.pipeline.recipe import Recipe
    from llmslim.pipeline.stages import Context
    from llmslim.pipeline.stream import prepare
    from llmslim.util import parse_size

    tokens = torch.load(work / "calib.pt")["tokens"]
    config = GPTQConfig(bits=setting["bits"], group_size=setting["group_size"], sym=setting["sym"],
                        desc_act=setting["desc_act"], forward_dtype=forward_dtype)
    folder = resolve(MODEL)
    tok = load_tokenizer(folder)
    tool = "llmslim-stream" if forward_dtype == "fp32" else f"llmslim-stream-{forward_dtype}"
    out = work / f"{tool}_{setting['name']}"
    out.mkdir(parents=True, exist_ok=True)
    with Meter() as m:  # the model's loading is inside (block by block), unlike the in-memory tools' load
        run = prepare(Recipe((config,), CalibConfig("wiki", NSAMPLES, SEQLEN, SEED)), folder, read_config(folder))
        model, report = run.run(config, Context(tokens, max_memory=parse_size(max_memory) if max_memory else None),
                                out)
    save_gptq(model, tok, out, config, report.skipped, weights_written=True)
    res = m.result() | {"tool": tool, "setting": setting["name"], "max_memory": max_memory,
                        "forward_dtype": forward_dtype, "torch_threads": torch.get_num_threads(),
                        "report_seconds": round(report.seconds, 1)}
    (work / f"{tool}_{setting['name']}.json").write_text(json.dumps(res | {"dir": str(out)}, indent=1))
    print(json.dumps(res))


def step_ppl(work: Path, name: str) -> None:
    """Perplexity of ``fp32`` or of the checkpoint folder ``work/name``, loaded with llmslim."""
    from llmslim.data import eval_text
    from llmslim.loader import load
    from llmslim.metrics.ppl import perplexity

    model, tok = load(MODEL if name == "fp32" else str(work / name))
    with Meter() as m:
        r = perplexity(model, tok, eval_text("wiki"), method="gptq", seqlen=PPL_SEQLEN,
                       max_tokens=PPL_WINDOWS * PPL_SEQLEN, progress=False)
    r = {k: r[k] for k in ("perplexity", "windows", "tokens_scored", "seqlen", "add_bos")}
    r |= {"eval_seconds": round(m.seconds, 1), "eval_load_mean": m.result()["load_mean"]}
    (work / f"ppl_{name}.json").write_text(json.dumps(r, indent=1))
    print(name, json.dumps(r))


def table(work: Path, settings: list[dict]) -> str:
    def read(p):
        p = work / p
        return json.loads(p.read_text()) if p.exists() else {}

    rows = ["| setting | tool | ppl | quantize s | CPU s | peak RSS MB | load avg (mean; start→end) |",
            "|---|---|---|---|---|---|---|"]
    fp = read("ppl_fp32.json")
    rows.append(f"| fp32 | — | {fp.get('perplexity', float('nan')):.2f} | — | — | — | — |")
    for s in settings:
        for tool in TOOLS:
            q, p = read(f"{tool}_{s['name']}.json"), read(f"ppl_{tool}_{s['name']}.json")
            if not q:
                continue
            ppl = f"{p['perplexity']:.2f}" if p else "…"
            label = q["tool"] + (f" (--max-memory {q['max_memory']})" if q.get("max_memory") else "")
            rows.append(f"| {s['name']} | {label} | {ppl} | {q['quantize_seconds']:.0f} | {q['cpu_seconds']:.0f} "
                        f"| {q['peak_rss_mb']:.0f} | {q['load_mean']} ({q['load_start']}→{q['load_end']}) |")
    n = fp.get("windows", PPL_WINDOWS)
    rows.append("")
    rows.append(f"ppl: held-out last 20% of the built-in wiki articles, first {n} non-overlapping {PPL_SEQLEN}-token "
                f"windows, no BOS, fp32, every checkpoint loaded with llmslim.load. Calibration: {NSAMPLES} x "
                f"{SEQLEN} tokens (seed {SEED}), the same tensor for both tools. Peak RSS = VmHWM of the "
                "quantizing process (model load included). CPU s = user+sys of the process over quantize().")
    return "\n".join(rows)


# --- driver -------------------------------------------------------------------------------------


def run(cmd: list[str], log: Path) -> None:
    print("+", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        print(f"step failed (exit {rc}); see {log}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", nargs="?", default="all",
                    choices=["all", "calib", *(f"quantize-{t}" for t in TOOLS), "ppl", "table"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/peers/compare"))
    ap.add_argument("--gptqmodel-python", default="/work/gptqmodel-venv/bin/python")
    ap.add_argument("--settings", default="4:128:sym,3:128:sym", help="bits:group:sym|asym, comma-separated")
    ap.add_argument("--tools", default="gptqmodel,llmslim,llmslim-stream", help=f"comma-separated, of {', '.join(TOOLS)}")
    ap.add_argument("--max-memory", default=None, help="llmslim-stream's --max-memory (default: llmslim's default)")
    ap.add_argument("--setting", default=None, help="one setting, for the single-step commands")
    ap.add_argument("--name", default=None, help="ppl: fp32 or a checkpoint folder name under --work")
    ap.add_argument("--md", type=Path, default=None, help="write the table here too")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = [parse_setting(s) for s in args.settings.split(",")]

    if args.step == "calib":
        return step_calib(args.work)
    if args.step == "quantize-gptqmodel":
        return step_quantize_gptqmodel(args.work, parse_setting(args.setting))
    if args.step == "quantize-llmslim":
        return step_quantize_llmslim(args.work, parse_setting(args.setting))
    if args.step.startswith("quantize-llmslim-stream"):
        dtype = "bf16" if args.step.endswith("-bf16") else "fp32"
        return step_quantize_llmslim_stream(args.work, parse_setting(args.setting), args.max_memory, dtype)
    if args.step == "ppl":
        return step_ppl(args.work, args.name)
    if args.step == "all":
        me, w = str(Path(__file__).resolve()), ["--work", str(args.work)]
        log = args.work / "steps.log"
        if not (args.work / "calib.pt").exists():
            run([sys.executable, me, "calib", *w], log)
        for i, s in enumerate(settings):
            spec = f"{s['bits']}:{s['group_size']}:{'sym' if s['sym'] else 'asym'}"
            for tool in args.tools.split(","):
                py = args.gptqmodel_python if tool == "gptqmodel" else sys.executable
                if not (args.work / f"{tool}_{s['name']}.json").exists():
                    extra = ["--max-memory", args.max_memory] if tool.startswith("llmslim-stream") and args.max_memory \
                        else []
                    run([py, me, f"quantize-{tool}", "--setting", spec, *w, *extra], log)
                if (args.work / f"{tool}_{s['name']}.json").exists() and \
                        not (args.work / f"ppl_{tool}_{s['name']}.json").exists():
                    run([sys.executable, me, "ppl", "--name", f"{tool}_{s['name']}", *w], log)
            if i == 0 and not (args.work / "ppl_fp32.json").exists():  # after the first (longest-waited) results
                run([sys.executable, me, "ppl", "--name", "fp32", *w], log)
            print(table(args.work, settings), flush=True)
    md = table(args.work, settings)
    print(md)
    if args.md:
        args.md.write_text(md + "\n")


if __name__ == "__main__":
    main()
