"""Where batch-1 time goes (issue 20; serve/README.md "Batch-1 overhead"): CPU time per generated
token of each thread of ``llmslim serve`` (one client, ``--threads 1``) or of direct ``generate``,
and optionally a py-spy record of the same run (``pip install py-spy``; raw format, per thread).

    python serve/profile_batch1.py CKPT stream|whole|direct N TOKENS SPY_OUT|-

Run it pinned (``taskset -c 1 env OMP_NUM_THREADS=1``); it prints one JSON line. A profiling aid,
not a benchmark (serve/bench_batch1.py measures speeds): per-thread CPU comes from
``/proc/PID/task/*/schedstat``, and py-spy's samples say what each thread was doing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
from bench_batch1 import (  # (this folder is on sys.path when run as a script)
    free_port,
    step_seconds,
    wait_healthy,
)

IDS = list(range(1000, 1128))  # a 128-token prompt, as token ids
SPY = os.environ.get("PY_SPY") or shutil.which("py-spy") or "py-spy"

DIRECT = """
import json, sys, time, torch
torch.set_num_threads(1)
from llmslim.loader import load
from llmslim.runtime.generate import generate
from llmslim.server import accelerate
model, tok = load({ckpt!r})
model = accelerate(model)
generate(model, tok, {ids!r}, max_new_tokens=16, ignore_eos=True)
print("ready", flush=True)
sys.stdin.readline()
c0, t0, rates = time.thread_time(), time.perf_counter(), []
for _ in range({n}):
    rates.append(generate(model, tok, {ids!r}, max_new_tokens={tokens}, ignore_eos=True).timings["decode_tok_s"])
print(json.dumps({{"cpu_us_per_token": (time.thread_time() - c0) / ({tokens} * {n}) * 1e6,
                  "wall_us_per_token": (time.perf_counter() - t0) / ({tokens} * {n}) * 1e6,
                  "decode_tok_s": sorted(rates)[len(rates) // 2]}}), flush=True)
"""


def spy(pid: int, out: str):
    if out == "-":
        return None
    p = subprocess.Popen([SPY, "record", "-r", "200", "--nonblocking", "--format", "raw", "-t", "-p", str(pid),
                          "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # attached
    return p


def unspy(p) -> None:
    if p is not None:
        p.send_signal(2)
        p.wait(120)


def cpu_ns(pid: int) -> dict[int, int]:
    """CPU time (ns) of each thread of ``pid`` so far."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return out


def direct(ckpt: str, n: int, tokens: int, spy_out: str) -> dict:
    code = DIRECT.format(ckpt=ckpt, ids=IDS, n=n, tokens=tokens)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    s = spy(p.pid, spy_out)
    p.stdin.write("go\n")
    p.stdin.flush()
    result = json.loads(p.stdout.readline())
    unspy(s)
    p.wait()
    return {"mode": "direct", **result}


def served(ckpt: str, stream: bool, n: int, tokens: int, spy_out: str) -> dict:
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "llmslim.cli", "serve", ckpt, "--port", str(port), "--threads", "1",
                            "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            wait_healthy(http, srv)
            body = {"prompt": IDS, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
            for _ in range(2):  # warm-up
                http.post("/v1/completions", json=body | {"stream": False, "max_tokens": 16})
            s = spy(srv.pid, spy_out)
            a, steps0, t0, c0 = cpu_ns(srv.pid), step_seconds(http), time.perf_counter(), time.thread_time()
            for _ in range(n):
                if stream:
                    with http.stream("POST", "/v1/completions", json=body) as r:
                        for _line in r.iter_lines():
                            pass
                else:
                    http.post("/v1/completions", json=body)
            wall, client = time.perf_counter() - t0, time.thread_time() - c0
            b, steps1 = cpu_ns(srv.pid), step_seconds(http)
            unspy(s)
    finally:
        srv.terminate()
        srv.wait(60)
    total = n * tokens
    per = {tid: (b[tid] - a.get(tid, 0)) / total / 1e3 for tid in b}
    loop = per.pop(srv.pid)  # the main thread runs the event loop
    engine = per.pop(max(per, key=per.get))  # the busiest other thread: the engine
    return {"mode": "stream" if stream else "whole",
            "cpu_us_per_token": {"engine_thread": round(engine, 1), "event_loop_thread": round(loop, 1),
                                 "other_threads": round(sum(per.values()), 1), "client": round(client / total * 1e6, 1)},
            "engine_step_wall_us": round((steps1[0] - steps0[0]) / (steps1[1] - steps0[1]) * 1e6, 1),
            "wall_us_per_token": round(wall / total * 1e6, 1), "tok_s": round(total / wall, 1)}


def main() -> None:
    ckpt, mode, n, tokens, spy_out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    if mode == "direct":
        result = direct(ckpt, n, tokens, spy_out)
    else:
        result = served(ckpt, mode == "stream", n, tokens, spy_out)
    print(json.dumps(result | {"load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
