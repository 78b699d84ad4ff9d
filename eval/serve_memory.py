"""Whole-process resident memory of ``llmslim serve``: a 4-bit checkpoint against the float model in
float32 (issue 16's memory goal: 4-bit served <= 0.5x float32 served).

    python eval/serve_memory.py --json eval/results/serve_memory.json        # both rows, the ratio
    python eval/serve_memory.py --smoke                                        # 2 short requests each

Each row is the real ``llmslim serve`` command in its own process (one torch thread), measured
from ``/proc/PID/status``: after the model is loaded (``/health`` 200) and after a few requests
(``--requests`` greedy completions of ``--max-tokens`` tokens over held-out wiki prompts, sent
``--clients`` at a time, so the batched decode path and its KV cache run). VmRSS is what the
process holds then, VmHWM its peak; ``max_rss_during_requests`` is VmRSS sampled every 50 ms while
the requests run. Rows:

- ``float32``: the float reference model (``smollm2-135m``) as ``--no-fast`` serves it: fp32,
  transformers' forward (what serving the model without llmslim's compression costs);
- ``4-bit``: the GPTQ checkpoint (``--checkpoint``) on the default fast path (int4 kernels, bf16);
- ``float bf16`` (``--all``): the float model on the default fast path, for reference.

Resident memory does not depend on the machine's load, so a busy machine measures it as well as an
idle one. No assertions here: tests/server/test_memory.py checks the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llmslim.util import free_port  # noqa: E402

FLOAT = "smollm2-135m"
QUANTIZED = str(ROOT / "out" / "quality" / "gptq4-g128")



def status_bytes(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and the resident split (anonymous / file-backed) of process ``pid``, in bytes."""
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in keys:
                out[key] = int(line.split()[1]) * 1024
    return out


def _prompts(n: int) -> list[str]:
    from llmslim.data import load_documents

    docs = [str(d) for d in load_documents("wiki", "eval")[:n]]
    return [" ".join(d.split()[:80]) for d in docs]


def _measure(proc: subprocess.Popen, url: str, prompts: list[str], max_tokens: int, clients: int,
             timeout: float) -> tuple[dict, dict, int, int]:
    """(status after load, status after the requests, the most VmRSS seen while they ran, tokens)."""
    with httpx.Client(base_url=url, timeout=timeout) as http:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("llmslim serve exited")
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("llmslim serve did not come up")
            time.sleep(0.5)
        loaded = status_bytes(proc.pid)

        def one(prompt: str) -> int:
            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                   "ignore_eos": True})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        most, done = [0], threading.Event()

        def watch() -> None:  # resident memory while the batch runs: KV cache and temporaries included
            while not done.wait(0.05):
                most[0] = max(most[0], status_bytes(proc.pid)["VmRSS"])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(one, prompts))
        finally:
            done.set()
            watcher.join()
        return loaded, status_bytes(proc.pid), most[0], tokens


def serve_row(label: str, args_: list[str], prompts: list[str], max_tokens: int, clients: int,
              threads: int = 1, timeout: float = 900) -> dict:
    """Start ``llmslim serve *args_``, measure it after load and after the requests, stop it."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "llmslim.cli", "serve", *args_, "--port", str(port), "--threads", str(threads),
           "--served-model-name", "m", "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log, \
            subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) as proc:
        try:
            loaded, served, during, tokens = _measure(proc, url, prompts, max_tokens, clients, timeout)
        except RuntimeError as e:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)}: {e}\n{log.read()[-2000:]}") from None
        finally:
            proc.terminate()  # leaving the block waits for it to exit
    return {"row": label, "command": "llmslim serve " + " ".join(args_) + f" --threads {threads}",
            "after_load": loaded, "after_requests": served, "max_rss_during_requests": during,
            "requests": len(prompts), "tokens": tokens}


# What an ``llmslim serve`` process that loads through transformers (the float32 row) holds before its first
# weight: the server's imports (torch, transformers and the model's classes, FastAPI), the tokenizer. Built
# on the meta device: no weights. The 4-bit row loads through runtime.bare, without the model classes, so its
# own base is smaller (eval/import_memory.py): for that row "model_part" subtracts a larger base than its own,
# so it understates what the model adds there.
BASE = """
import sys, torch
import llmslim.cli, llmslim.server.app
from transformers import AutoModelForCausalLM
from llmslim.formats.hf import load_tokenizer
from llmslim.models import read_config, resolve
from llmslim.util import release_free_memory
folder = resolve(sys.argv[1])
tokenizer = load_tokenizer(folder)
with torch.device("meta"):
    AutoModelForCausalLM.from_config(read_config(folder))
release_free_memory()
sys.stdout.write(open("/proc/self/status").read())
"""


def base_row(float_model: str = FLOAT) -> dict:
    """Resident memory of a process holding the server's imports and the tokenizer, but no model."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", BASE, float_model], env=env, capture_output=True, text=True,
                         check=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def measure(quantized: str = QUANTIZED, float_model: str = FLOAT, requests: int = 8, clients: int = 8,
            max_tokens: int = 64, all_rows: bool = False) -> dict:
    """The rows, the process without a model (``base_rss``) and the ratios 4-bit / float32."""
    prompts = _prompts(requests)
    rows = [serve_row("float32", [float_model, "--no-fast"], prompts, max_tokens, clients),
            serve_row("4-bit", [quantized], prompts, max_tokens, clients)]
    if all_rows:
        rows.append(serve_row("float bf16", [float_model], prompts, max_tokens, clients))
    f32, q4 = rows[0], rows[1]
    base = base_row(float_model)["VmRSS"]
    ratios = {
        "rss_after_load": q4["after_load"]["VmRSS"] / f32["after_load"]["VmRSS"],
        "rss_after_requests": q4["after_requests"]["VmRSS"] / f32["after_requests"]["VmRSS"],
        "rss_during_requests": q4["max_rss_during_requests"] / f32["max_rss_during_requests"],
        "peak": q4["after_requests"]["VmHWM"] / f32["after_requests"]["VmHWM"],
        # what serving the model adds to a process that holds no model yet (after the requests)
        "model_part_after_requests": (q4["after_requests"]["VmRSS"] - base) / (f32["after_requests"]["VmRSS"] - base),
    }
    return {"rows": rows, "base_rss": base, "ratio_4bit_over_float32": ratios,
            "settings": {"requests": requests, "clients": clients, "max_tokens": max_tokens}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=QUANTIZED, help="the 4-bit checkpoint (default: %(default)s)")
    ap.add_argument("--float-model", default=FLOAT)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--all", action="store_true", help="also the float model on the fast path (bf16)")
    ap.add_argument("--smoke", action="store_true", help="2 requests of 4 tokens: proves the script runs")
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.clients, args.max_tokens = 2, 2, 4
    result = measure(args.checkpoint, args.float_model, args.requests, args.clients, args.max_tokens, args.all)
    print(f"{'row':<12} {'after load':>11} {'during':>8} {'after':>8} {'peak':>8} {'anon':>8} {'file':>8}  MiB")
    for r in result["rows"]:
        a, b = r["after_load"], r["after_requests"]
        print(f"{r['row']:<12} {_mib(a['VmRSS']):>11} {_mib(r['max_rss_during_requests']):>8} {_mib(b['VmRSS']):>8} "
              f"{_mib(b['VmHWM']):>8} {_mib(b['RssAnon']):>8} {_mib(b['RssFile']):>8}")
    print(f"no model yet (imports + tokenizer): {_mib(result['base_rss'])}")
    print("4-bit / float32:", json.dumps({k: round(v, 3) for k, v in result["ratio_4bit_over_float32"].items()}))
    if args.json:
        from llmslim.util import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
