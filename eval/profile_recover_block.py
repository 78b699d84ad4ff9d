"""Where one block of block-mode recovery spends its time, on the reference model.

Times the whole-set forwards a block runs (the original block for the target, the GPTQ block before
training, the learned grid) in float32 and under bf16 autocast, one training step (bf16 autocast,
batch 8), and prints torch's profile of three steps. Needs a GPTQ checkpoint of the reference model
and the calibration tensor it was made with, e.g. those ``eval/bench_recover.py`` leaves (``OUT.cache/
gptq-3-g128`` and ``OUT.calib.pt``):

    HF_HUB_OFFLINE=1 python eval/profile_recover_block.py CHECKPOINT CALIB.pt --block 3 > FILE.txt

Timings are the fastest of a few runs; the machine should be otherwise idle (the load is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmslim.loader import load  # noqa: E402
from llmslim.nn import GPTQLinear  # noqa: E402
from llmslim.quant.learn import LearnedGrid, sign_sgd_  # noqa: E402
from llmslim.quant.walk import (  # noqa: E402
    capture_block_inputs,
    find_blocks,
    find_linears,
    linear_weight,
    plain_copy,
    run_block,
    set_module,
)


def whole_set(block, inputs, amp: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        return torch.cat([run_block(block, h, a, kw).float()
                          for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True)])


def timed(name: str, fn, runs: int = 2):
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    print(f"{name}: {min(seconds):.2f} s (runs: {', '.join(f'{s:.2f}' for s in seconds)})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("calib")
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    calib = torch.load(args.calib)
    teacher, _ = load("smollm2-135m")
    student, _ = load(args.checkpoint)
    for p in [*student.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)
    batches = list(calib.split(args.batch_size))
    _, s_blocks = find_blocks(student)
    _, t_blocks = find_blocks(teacher)
    print(f"calibration {tuple(calib.shape)}, block {args.block}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    s_in = timed("capture the student's block inputs", lambda: capture_block_inputs(student, s_blocks, batches), 1)
    t_in = capture_block_inputs(teacher, t_blocks, batches)
    # The inputs of block --block: the first blocks' outputs (student: its own GPTQ blocks).
    for i in range(args.block):
        for inputs, blocks in ((s_in, s_blocks), (t_in, t_blocks)):
            out = whole_set(blocks[i], inputs, amp=False)
            inputs.hidden[:] = list(out.split([len(h) for h in inputs.hidden]))
    s_block, t_block = s_blocks[args.block], t_blocks[args.block]
    target = timed("original block, whole set, float32", lambda: whole_set(t_block, t_in, False))
    target16 = timed("original block, whole set, bf16 autocast", lambda: whole_set(t_block, t_in, True))
    before = timed("GPTQ block, whole set, float32", lambda: whole_set(s_block, s_in, False))
    before16 = timed("GPTQ block, whole set, bf16 autocast", lambda: whole_set(s_block, s_in, True))
    print(f"target's relative squared error in bf16: {float((target16 - target).square().mean() / target.square().mean()):.3g}")
    print(f"block loss: float32 {float(F.mse_loss(before, target)):.5g}, bf16 {float(F.mse_loss(before16, target16)):.5g}")

    t_linears = find_linears(t_block)
    learned = {n: LearnedGrid(m, linear_weight(t_linears[n]).detach())
               for n, m in find_linears(s_block, quantized=True).items() if isinstance(m, GPTQLinear)}
    for n, m in learned.items():
        set_module(s_block, n, m)
    params = [p for m in learned.values() for p in m.parameters()]
    timed("learned grid, whole set, bf16 autocast", lambda: whole_set(s_block, s_in, True), 1)
    X = plain_copy(torch.cat(s_in.hidden))
    args0 = plain_copy(s_in.args[0])
    kwargs0 = {k: plain_copy(v) for k, v in s_in.kwargs[0].items()}
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randperm(X.shape[0], generator=gen)[:args.batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run_block(s_block, X[idx], args0, kwargs0)
        F.mse_loss(out.float(), target[idx]).backward()
        sign_sgd_(params, 1e-3)
        for m in learned.values():
            m.clamp_()

    timed(f"one training step (batch {args.batch_size}, bf16 autocast)", step, 5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
