"""``--forward-dtype fp32`` vs ``bf16`` (issues 12, 14, 19: compression time): where one block's CPU time
goes, and the reference-model rows made by ``llmslim quantize/prune --forward-dtype`` (eval/scale.md).

    python eval/forward_dtype.py profile [--blocks 3 10 20] [--json FILE]
    python eval/forward_dtype.py profile --smoke          # a tiny random Llama: proves the script runs
    python eval/forward_dtype.py collect out/fd --json eval/results/forward_dtype.json

``profile``: on SmolLM2-135M blocks, one calibration batch as the block driver splits the reference
protocol (5 x 512 wiki tokens), the process CPU seconds (``time.process_time``: the machine is shared,
wall time would mostly measure the other jobs) of the block's forward in float32 and under the
driver's bf16 autocast, and of accumulating each true-sequential group's Hessian from those inputs
(``gptq.accumulate_hessian``: float32 inputs, or bf16 inputs multiplied in bf16 and summed in float32),
with H's relative error against float64 -- and what summing bf16 GEMM outputs instead would cost.
Best of ``--repeats``. ``collect``: each row's ``/usr/bin/time -v`` log (user + sys CPU seconds, wall,
peak RSS) and ``llmslim eval --output`` JSON (perplexity, KL, top-1) into one JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm: oneDNN builds its kernels on the first call of a shape
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def _relative(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


def _profile_block(block, h32, args: tuple, kwargs: dict, repeats: int) -> tuple[dict, object]:
    """One block: its forward in float32 and under bf16 autocast, and each group's Hessian from the
    inputs of either; returns the row and the float32 output (the next block's input)."""
    import torch

    from llmslim.quant.gptq import accumulate_hessian
    from llmslim.quant.walk import find_linears, run_block, sequential_groups

    def fp32():
        return run_block(block, h32, args, kwargs)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):  # as the block driver runs it
            return run_block(block, h32.bfloat16(), args, kwargs)

    seen: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        sets = sequential_groups(block, list(find_linears(block)), fp32)
        hooks = [block.get_submodule(s[0]).register_forward_pre_hook(
            lambda m, a, n=s[0]: seen.__setitem__(n, a[0])) for s in sets]
        t32, out32 = _cpu(fp32, repeats)
        x32 = dict(seen)
        t16, out16 = _cpu(bf16, repeats)
        x16 = {n: x.bfloat16() for n, x in seen.items()}  # what each linear computed with
        for hook in hooks:
            hook.remove()
    groups = []
    for n, x in x32.items():
        d = x.shape[-1]

        def hessian(x, d=d):
            return accumulate_hessian(torch.zeros(d, d), 0, x)[0]

        s32, H32 = _cpu(lambda x=x: hessian(x), repeats)
        s16, H16 = _cpu(lambda n=n: hessian(x16[n]), repeats)
        X16, X32 = x16[n].reshape(-1, d), x.reshape(-1, d)
        exact16 = 2 * X16.double().T @ X16.double() / X16.shape[0]
        exact32 = 2 * X32.double().T @ X32.double() / X32.shape[0]
        groups.append({"group": n, "columns": d, "cpu_s_fp32": s32, "cpu_s_bf16": s16,
                       "H_rel_error_fp32": _relative(H32, exact32), "H_rel_error_bf16": _relative(H16, exact16),
                       "H_rel_error_bf16_gemm_output": _relative(2 * (X16.T @ X16) / X16.shape[0], exact16)})
    row = {"tokens": int(h32.shape[0] * h32.shape[1]), "forward_cpu_s_fp32": t32, "forward_cpu_s_bf16": t16,
           "output_rel_diff": float((out16.float() - out32).norm() / out32.norm()), "hessians": groups}
    return row, out32


def profile(blocks: list[int], repeats: int, smoke: bool) -> dict:
    import torch

    from llmslim.quant.walk import capture_block_inputs, find_blocks, run_block

    if smoke:
        from tests.conftest import make_tiny_model

        model, ids, blocks = make_tiny_model("llama"), torch.randint(0, 320, (2, 32)), [0, 1]
    else:
        import llmslim
        from llmslim.data import calibration_tokens

        model, tok = llmslim.load("smollm2-135m")
        ids = calibration_tokens("wiki", tok, nsamples=128, seqlen=512)[:5]  # the driver's first batch
    _, stack = find_blocks(model)
    inputs = capture_block_inputs(model, stack, [ids])
    h, args, kwargs = inputs.hidden[0], inputs.args[0], inputs.kwargs[0]
    rows = []
    for i, block in enumerate(stack[:max(blocks) + 1]):
        if i in blocks:
            row, h = _profile_block(block, h, args, kwargs, repeats)
            rows.append({"block": i, **row})
        else:
            with torch.inference_mode():
                h = run_block(block, h, args, kwargs)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats, "blocks": rows}


def _time_v(text: str) -> dict:
    def field(name):
        m = re.search(rf"{re.escape(name)}: (.+)", text)
        return m.group(1).strip() if m else None

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(p) for p in wall.split(":")] if wall else []
    seconds = sum(p * 60 ** k for k, p in enumerate(reversed(parts))) if parts else None
    user, system = float(field("User time (seconds)")), float(field("System time (seconds)"))
    return {"cpu_s": round(user + system, 1), "user_s": user, "sys_s": system, "wall_s": seconds,
            "peak_rss_mib": round(int(field("Maximum resident set size (kbytes)")) / 1024, 1),
            "exit_status": int(field("Exit status"))}


def collect(folder: Path) -> dict:
    """Rows from ``folder/log/NAME.err`` (/usr/bin/time -v), ``folder/log/steps.txt`` (load average at
    start and end) and ``folder/eval-NAME.json``."""
    logs = folder / "log"
    loads: dict[str, list[str]] = {}
    for line in (logs / "steps.txt").read_text().splitlines():
        m = re.match(r"(\S+) (start|end) (\S+) .*loadavg (\S+ \S+ \S+)", line)
        if m:
            loads.setdefault(m.group(3), []).append(f"{m.group(2)} {m.group(1)}: {m.group(4)}")
    rows = {}
    for err in sorted(logs.glob("*.err")):
        name = err.stem
        if name.startswith("eval-") or "Exit status" not in err.read_text():  # an eval, or still running
            continue
        row = {"run": _time_v(err.read_text()), "load_average": loads.get(name)}
        command = re.search(r'Command being timed: "(.+)"', err.read_text())
        row["command"] = command.group(1) if command else None
        result = folder / f"eval-{name}.json"
        if result.exists():
            ppl = json.loads(result.read_text())["perplexity"]
            div = ppl.get("divergence", {})
            row["eval"] = {"perplexity": ppl["perplexity"], "windows": ppl["windows"],
                           "tokens_scored": ppl["tokens_scored"], "kl_mean": div.get("kl_mean"),
                           "top1_agreement": div.get("top1_agreement"),
                           "baseline_perplexity": div.get("baseline_perplexity")}
            ev = logs / f"eval-{name}.err"
            if ev.exists():
                row["eval"]["eval_cpu_s"] = _time_v(ev.read_text())["cpu_s"]
        rows[name] = row
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("profile", help="one block's forward and Hessian products, fp32 vs bf16, CPU seconds")
    pr.add_argument("--blocks", type=int, nargs="+", default=[3, 15, 27])
    pr.add_argument("--repeats", type=int, default=3)
    pr.add_argument("--smoke", action="store_true", help="a tiny random Llama instead of the reference model")
    pr.add_argument("--json", type=Path)
    c = sub.add_parser("collect", help="the reference-model rows from their logs and eval results")
    c.add_argument("folder", type=Path)
    c.add_argument("--json", type=Path)
    a = p.parse_args()
    out = profile(a.blocks, a.repeats, a.smoke) if a.cmd == "profile" else collect(a.folder)
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
