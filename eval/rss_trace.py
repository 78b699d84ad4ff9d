"""Resident memory of one command over time: where its peak comes from.

    python eval/rss_trace.py --json FILE [--every 0.2] -- llmslim quantize MODEL --method gptq ...

Runs the command in a process of its own and samples ``/proc/PID/status`` every ``--every`` seconds:
VmRSS split into anonymous memory (tensors, heap) and file-backed pages (mapped shards, libraries).
The command's stderr is read as it comes; each progress line (tqdm's ``\\r`` updates included) is
stamped, so a sample can be matched to the block being worked on. The JSON holds every sample, the
progress lines, and per progress step the floor and the top of VmRSS (a floor that climbs step
after step is memory kept from one block to the next; a flat floor with one high top is one
step's own working set).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from serve_memory import status_bytes  # this folder's reader of /proc/PID/status


def status_mb(pid: int) -> dict[str, float] | None:
    """VmRSS, VmHWM, RssAnon and RssFile of ``pid`` in MiB; None once the process is gone."""
    try:
        return {k: round(v / 2**20, 1) for k, v in status_bytes(pid).items()} or None
    except OSError:
        return None


def trace(cmd: list[str], every: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    samples: list[dict] = []
    lines: list[tuple[float, str]] = []

    def read_progress() -> None:
        buf = b""
        while chunk := proc.stderr.read1(4096):
            buf += chunk
            *done, buf = re.split(rb"[\r\n]", buf)
            now = round(time.perf_counter() - t0, 2)
            lines.extend((now, d.decode(errors="replace").strip()) for d in done if d.strip())

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    while proc.poll() is None:
        s = status_mb(proc.pid)
        if s:
            samples.append({"t": round(time.perf_counter() - t0, 2), **s})
        time.sleep(every)
    reader.join()
    return {"command": cmd, "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": max((s.get("VmHWM", 0) for s in samples), default=0),
            "by_step": by_step(samples, lines), "progress": lines, "samples": samples,
            "load_avg_end": os.getloadavg()[0]}


def by_step(samples: list[dict], lines: list[tuple[float, str]]) -> list[dict]:
    """Floor and top of VmRSS (and the anonymous part at the top) between consecutive progress lines
    whose text changes its leading count (``3/32`` ...)."""
    marks = []
    for t, text in lines:
        m = re.search(r"(\d+)/(\d+)", text)
        key = (text.split(":")[0], m.group(1)) if m else None
        if key and (not marks or marks[-1][1] != key):
            marks.append((t, key))
    steps = []
    for (t, key), nxt in zip(marks, [*marks[1:], (float("inf"), None)], strict=True):
        inside = [s for s in samples if t <= s["t"] < nxt[0]]
        if inside:
            top = max(inside, key=lambda s: s["VmRSS"])
            steps.append({"step": f"{key[0]} {key[1]}", "from_s": t, "floor_mb": min(s["VmRSS"] for s in inside),
                          "top_mb": top["VmRSS"], "anon_at_top_mb": top.get("RssAnon"),
                          "file_at_top_mb": top.get("RssFile")})
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    result = trace(cmd, args.every)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for s in result["by_step"]:
        print(f"{s['step']:<40} floor {s['floor_mb']:>7.0f}  top {s['top_mb']:>7.0f}  "
              f"(anon {s['anon_at_top_mb']}, file {s['file_at_top_mb']})")
    print(f"peak {result['peak_rss_mb']:.0f} MB, {result['seconds']} s, rc {result['rc']}")
    sys.exit(result["rc"])


if __name__ == "__main__":
    main()
