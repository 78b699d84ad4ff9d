"""Block-wise recovery: each decoder block of a compressed student learns to reproduce the original
block's outputs (AutoRound, Cheng et al., arXiv:2309.05516; the block-output objective of BRECQ,
arXiv:2102.05426).

For block i, the target is the teacher's block i on the teacher's own hidden states; the input is
the student's hidden states after its blocks 0..i-1 (already recovered), so each block also makes up
for the error that reaches it. What is learned:

- a quantized student (``GPTQLinear``): the grid of every quantized linear of the block, starting at
  its codes (GPTQ's result), by AutoRound's signed gradient descent on the rounding offsets and the
  per-group scale (and, on asymmetric grids, zero) adjustments (``learn.LearnedGrid``); the learning
  rate decays linearly to 0; the parameters of the lowest mini-batch loss (AutoRound's choice) and the
  last step's are scored on the whole calibration set, and the better is kept.
- a sparse float student (pruned): the remaining weights under the fixed mask, with AdamW.

Then the block's loss over the whole calibration set decides: the learned block stays only if it
is lower than the input block's, so recovery never makes a block's calibration loss worse. That loss
is computed as the training steps compute (bf16 autocast where the CPU multiplies bf16 natively, see
``RecoverConfig.amp``): the three whole-set forwards of a block (target, input block, learned block)
then take half their float32 time, and the judgement is exact for the numbers it compares.

Finished blocks are checkpointed; ``resume`` restores them and recomputes the hidden states, and
reaches the same student as an uninterrupted run. ``max_time`` splits the remaining time evenly
over the remaining blocks; blocks it leaves untouched keep their input weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import RecoverConfig
from ..errors import UserError
from ..nn import GPTQLinear
from ..util import atomic_path, atomic_write_text
from .gptq import torch_threads
from .learn import LearnedGrid, keep_zeros, sign_sgd_
from .walk import (
    capture_block_inputs,
    find_blocks,
    find_linears,
    linear_shape,
    linear_weight,
    plain_copy,
    run_block,
    set_module,
)

SPARSE = 0.1  # a float student whose block linears are at least this fraction zeros is sparse
# The signed-gradient step: AutoRound's 1/iters at its default 200 iterations, kept at fewer (as its
# "light" recipe does: 50 iterations at 5e-3). Larger steps flip many codes at once and, measured on
# the reference model's first block after 3-bit GPTQ, made the loss 45x worse at 1/20 and 1.5x at 1/100
# after one step, where 5e-3 lowered it steadily (-13% in 20 steps).
SIGN_LR = 5e-3
ADAMW_LR = 1e-5  # block mode, float weights
# Below this many activations per step (samples x tokens x width) a step is a few small ops that a
# thread pool only slows down (on a busy machine, many times over): train on one thread.
SMALL_STEP = 2**20


@dataclass
class BlockLog:
    block: int
    trained: str  # "grid" (quantized linears) | "weights" (sparse float linears) | "" (nothing: out of time)
    loss_before: float | None  # mean squared error vs the original block's output, whole calibration set
    loss_after: float | None  # (None: not reached before --max-time)
    kept: str  # "recovered" | "input"
    iters: int
    lr: float
    seconds: float
    # Which trained parameters were judged on the whole set: those of the lowest mini-batch loss
    # ("best batch") or the last step's ("last"); "" when nothing trained.
    chosen: str = ""


def student_kind(model: nn.Module) -> str:
    """``quantized`` (has GPTQ layers), ``sparse`` (float, at least ``SPARSE`` of its block weights
    exactly zero: pruned) or ``float``."""
    _, blocks = find_blocks(model)
    linears = find_linears(blocks, quantized=True)
    if any(isinstance(m, GPTQLinear) for m in linears.values()):
        return "quantized"
    weights = [linear_weight(m) for m in linears.values()]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return "sparse" if total and zeros / total >= SPARSE else "float"


def _shape(m: nn.Module) -> tuple[int, int]:
    return (m.in_features, m.out_features) if isinstance(m, GPTQLinear) else linear_shape(m)


def _dense(m: nn.Module) -> torch.Tensor:
    return m.dequantized_weight() if isinstance(m, GPTQLinear) else linear_weight(m).detach().float()


@torch.no_grad()
def check_compressed_version(student: nn.Module, teacher: nn.Module) -> None:
    """Block mode needs the student to be the teacher compressed in place: the same blocks, the same
    linears of the same shapes, and weights near the teacher's. One-line ``UserError`` otherwise."""
    if any(isinstance(m, GPTQLinear) for m in teacher.modules()):
        raise UserError("the teacher is quantized: give the original float model as --teacher")
    _, s_blocks = find_blocks(student)
    _, t_blocks = find_blocks(teacher)
    if len(s_blocks) != len(t_blocks):
        raise UserError(f"block mode needs the teacher's structure, but the student has {len(s_blocks)} decoder "
                        f"blocks and the teacher {len(t_blocks)} (structure-pruned?): use --mode e2e")
    s_lin = find_linears(s_blocks, quantized=True)
    t_lin = find_linears(t_blocks)
    if set(s_lin) != set(t_lin):
        raise UserError("block mode needs the teacher's structure, but the student's linear layers differ from the "
                        "teacher's (another architecture?): use --mode e2e")
    errors = []
    for name, m in s_lin.items():
        if _shape(m) != linear_shape(t_lin[name]):
            raise UserError(f"block mode needs the teacher's structure, but {name} is {_shape(m)} in the student "
                            f"and {linear_shape(t_lin[name])} in the teacher (width-pruned?): use --mode e2e")
        W = linear_weight(t_lin[name]).float()
        errors.append(float((_dense(m) - W).norm() / W.norm().clamp(min=1e-12)))
    median = sorted(errors)[len(errors) // 2]
    if median > 1.0:
        raise UserError(f"the student is not a compressed version of the teacher (median relative weight error "
                        f"{median:.2f}; compression leaves it well below 1): check --teacher")


class _State:
    """block_NNNN.safetensors per finished block, under a fingerprint of the run's settings."""

    def __init__(self, folder: Path, fingerprint: str):
        self.dir = folder
        self.fingerprint = fingerprint
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, resume: bool) -> int:
        meta = self.dir / "recover.json"
        if resume and meta.exists():
            if json.loads(meta.read_text())["fingerprint"] != self.fingerprint:
                raise UserError(f"cannot resume from {self.dir}: it was made with other settings, data or models; "
                                "rerun with --force to start over")
            done = 0
            while (self.dir / f"block_{done:04d}.safetensors").exists():
                done += 1
            return done
        for f in self.dir.glob("block_*.safetensors"):
            f.unlink()
        atomic_write_text(meta, json.dumps({"fingerprint": self.fingerprint}))
        return 0

    def save(self, i: int, block: nn.Module, log: BlockLog) -> None:
        with atomic_path(self.dir / f"block_{i:04d}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in block.state_dict().items()}, tmp,
                      metadata={"log": json.dumps(asdict(log))})

    def load(self, i: int, block: nn.Module) -> BlockLog:
        path = self.dir / f"block_{i:04d}.safetensors"
        with safe_open(path, "pt") as f:
            log = BlockLog(**json.loads(f.metadata()["log"]))
        block.load_state_dict(load_file(path))
        return log


def fingerprint(config: RecoverConfig, calib: torch.Tensor, student: nn.Module, teacher: nn.Module) -> str:
    h = hashlib.sha256(repr(replace(config, max_time=0.0)).encode())  # a new time budget may resume
    h.update(calib.numpy().tobytes())
    for model in (student, teacher):
        h.update(repr(model.config.to_dict() if hasattr(model, "config") else type(model)).encode())
        _, blocks = find_blocks(model)
        h.update(_dense(next(iter(find_linears(blocks[0], quantized=True).values())))[:4].numpy().tobytes())
    return h.hexdigest()


class _Inputs:
    """Hidden states of all calibration samples ``[n, seq, hidden]`` and the kwargs of each batch.
    With ``amp`` the whole-set forwards run under bf16 autocast, as the training steps do."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], amp: bool):
        self.amp = amp
        captured = capture_block_inputs(model, blocks, batches)
        # Captured under inference_mode: plain copies, which autograd may save for the backward pass.
        self.hidden = torch.cat([h.clone() for h in captured.hidden])
        self.args = [tuple(plain_copy(a) for a in args) for args in captured.args]
        self.kwargs = [{k: plain_copy(v) for k, v in kw.items()} for kw in captured.kwargs]
        self.sizes = [len(b) for b in batches]

    def rows(self, j: int) -> slice:
        start = sum(self.sizes[:j])
        return slice(start, start + self.sizes[j])

    @torch.no_grad()
    def forward(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The block on every sample, batch by batch as captured; float32 out. Under autocast only the
        linears and attention compute in bf16 (the residual stream stays float32): half the time of a
        float32 forward on the reference model where the CPU multiplies bf16 natively."""
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return torch.cat([run_block(block, hidden[self.rows(j)], self.args[j], self.kwargs[j]).float()
                              for j in range(len(self.sizes))])


def recover_blocks(
    student: nn.Module,
    teacher: nn.Module,
    calib: torch.Tensor,
    config: RecoverConfig,
    state_dir: Path | None = None,
    resume: bool = False,
    pruned: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> list[BlockLog]:
    """Recover every decoder block of ``student`` in place (see the module docstring).

    ``pruned``: the quantized student was pruned too (its zero weights are pruned ones, which stay
    zero); the caller knows it from the model's history, the weights cannot tell (a code at its
    group's zero point is an ordinary weight of a dense grid)."""
    t_start = time.perf_counter()
    check_compressed_version(student, teacher)
    kind = student_kind(student)
    if kind == "float" and pruned:
        kind = "sparse"
    if kind == "float":
        raise UserError("block mode recovers a quantized or sparse student, but this one is neither (a float model "
                        "without pruned weights); for a structure-pruned student use --mode e2e")
    _, s_blocks = find_blocks(student)
    _, t_blocks = find_blocks(teacher)
    batches = list(calib.split(config.batch_size))
    state = _State(Path(state_dir), fingerprint(config, calib, student, teacher)) if state_dir else None
    start = state.start(resume) if state else 0
    flags = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    try:
        amp = config.autocast()
        s_in, t_in = _Inputs(student, s_blocks, batches, amp), _Inputs(teacher, t_blocks, batches, amp)
        X, Y = s_in.hidden, t_in.hidden
        logs: list[BlockLog] = []
        if start:
            log(f"resuming: {start} of {len(s_blocks)} blocks already recovered")
            for i in range(start):
                logs.append(state.load(i, s_blocks[i]))
                X, Y = s_in.forward(s_blocks[i], X), t_in.forward(t_blocks[i], Y)
        deadline = t_start + config.max_time if config.max_time else None
        short = False  # said once that --max-time cannot cover the calibration forwards
        bar = tqdm(range(start, len(s_blocks)), desc="recover blocks", unit="block", initial=start,
                   total=len(s_blocks), disable=not progress)
        for i in bar:
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                logs += [BlockLog(k, "", None, None, "input", 0, 0.0, 0.0)
                         for k in range(i, len(s_blocks))]
                log(f"--max-time reached: blocks {i}..{len(s_blocks) - 1} keep their input weights")
                break
            block_deadline = None if deadline is None else now + (deadline - now) / (len(s_blocks) - i)
            entry, X, Y = _recover_block(i, s_blocks[i], t_blocks[i], X, Y, s_in, t_in, kind, pruned, config,
                                         block_deadline, progress)
            logs.append(entry)
            if block_deadline is not None and entry.iters == 0 and time.perf_counter() >= block_deadline and not short:
                short = True
                log(f"--max-time {config.max_time:g} s: block {i}'s calibration forwards alone took its share of the "
                    f"budget ({entry.seconds:.1f} s of {block_deadline - now:.1f} s); blocks left no time to train keep "
                    f"their input weights (the forwards alone need ~{1.5 * entry.seconds * len(s_blocks):.0f} s for "
                    f"{len(s_blocks)} blocks: give more, or fewer calibration samples)")
            bar.set_postfix_str(f"loss {entry.loss_before:.3g} -> {min(entry.loss_after, entry.loss_before):.3g}")
            if state:
                state.save(i, s_blocks[i], entry)
        return logs
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _recover_block(i, block, t_block, X, Y, s_in: _Inputs, t_in: _Inputs, kind: str, pruned: bool,
                   config: RecoverConfig, deadline: float | None, progress: bool):
    t0 = time.perf_counter()
    target = t_in.forward(t_block, Y)
    before = s_in.forward(block, X)
    loss_before = float(F.mse_loss(before, target))
    t_eval = time.perf_counter() - t0
    if deadline is not None:
        deadline -= t_eval  # the closing evaluations: two whole-set forwards, like each of the two above
        if time.perf_counter() >= deadline:
            # The forwards above took this block's share of --max-time. One step could only return the
            # input weights (the best state is the one before a step), so train nothing and skip the
            # closing evaluation: the time saved passes to the blocks after this one.
            entry = BlockLog(i, "", loss_before, loss_before, "input", 0, 0.0, time.perf_counter() - t0)
            return entry, before, target

    t_linears = find_linears(t_block)
    if kind == "quantized":
        originals = {n: m for n, m in find_linears(block, quantized=True).items() if isinstance(m, GPTQLinear)}
        learned = {n: LearnedGrid(m, linear_weight(t_linears[n]).detach(), rounding=True,
                                  mask=m.dequantized_weight() == 0 if pruned else None, follow=config.follow)
                   for n, m in originals.items()}
        for n, m in learned.items():
            set_module(block, n, m)
        params = [p for m in learned.values() for p in m.parameters()]
        lr = config.lr or SIGN_LR
        step, snapshot_of = _sign_step(learned, lr), list(learned.values())
    else:
        weights = {n: m.weight for n, m in find_linears(block).items()}
        originals = {n: w.detach().clone() for n, w in weights.items()}
        params = list(weights.values())
        for w in params:
            w.requires_grad_(True)
        hooks = [keep_zeros(w) for w in params]
        lr = config.lr or ADAMW_LR
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def step(k, planned):
            for group in opt.param_groups:
                group["lr"] = lr * (1 - k / planned)
            opt.step()
            opt.zero_grad(set_to_none=True)

        snapshot_of = params

    if not params:  # nothing of this block is compressed (a layer filter left it in float)
        entry = BlockLog(i, "", loss_before, loss_before, "input", 0, 0.0, time.perf_counter() - t0)
        return entry, before, target
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + i)
    bs = s_in.sizes[0]
    planned = config.iters
    bar = tqdm(total=planned, desc=f"block {i}", unit="it", leave=False, disable=not progress)
    threads = 1 if bs * X.shape[1] * X.shape[2] < SMALL_STEP else torch.get_num_threads()
    # Each sample's loss with the input weights: a mini-batch's loss is judged relative to it, so the
    # step kept as best is the one that improved most, not the one that drew the easiest samples.
    initial = (before - target).square().mean(dim=tuple(range(1, before.dim())))
    with torch_threads(threads):
        k, best, best_state = _iterate(block, X, target, initial, s_in, bs, gen, planned, deadline, config, step,
                                       snapshot_of, bar, t0, t_eval)
    bar.close()

    if kind != "quantized":
        for h in hooks:
            h.remove()
        for w in params:
            w.requires_grad_(False)

    def stored() -> dict[str, nn.Module]:
        """Put the trained layers in the block as the checkpoint will store them."""
        layers = {n: m.to_gptq() for n, m in learned.items()} if kind == "quantized" else {}
        for n, m in layers.items():
            set_module(block, n, m)
        return layers

    last_layers = stored()
    after = s_in.forward(block, X)
    loss_after = float(F.mse_loss(after, target))
    chosen = "last" if k else ""
    if best_state is not None and k > 0:
        # The best mini-batch is one draw of bs samples: a noisy judge. Its parameters stand against the
        # last step's (where the decayed learning rate has settled) on the whole calibration set.
        last_state = _snapshot(snapshot_of)
        _restore(snapshot_of, best_state)
        stored()
        out = s_in.forward(block, X)
        loss = float(F.mse_loss(out, target))
        if loss < loss_after or (math.isfinite(loss) and not math.isfinite(loss_after)):
            chosen, after, loss_after = "best batch", out, loss
        else:
            _restore(snapshot_of, last_state)
            for n, m in last_layers.items():
                set_module(block, n, m)
    kept = "recovered" if loss_after < loss_before else "input"
    if kept == "input":
        after = before
        if kind == "quantized":
            for n, m in originals.items():
                set_module(block, n, m)
        else:
            with torch.no_grad():
                for n, w in weights.items():
                    w.copy_(originals[n])
    entry = BlockLog(i, "grid" if kind == "quantized" else "weights", loss_before, loss_after, kept, k, lr,
                     time.perf_counter() - t0, chosen)
    return entry, after, target


def _iterate(block, X, target, initial, s_in: _Inputs, bs: int, gen, planned: int, deadline, config: RecoverConfig,
             step, snapshot_of: list, bar, t0: float, t_eval: float):
    """The training steps of one block: a mini-batch, the loss against the original block's
    outputs, a step. The parameters of the lowest loss seen (relative to the same samples' loss with
    the input weights) are kept. Returns (steps, best relative loss, best parameters)."""
    n = X.shape[0]
    best, best_state, k = float("inf"), None, 0
    amp = s_in.amp
    order, at = torch.randperm(n, generator=gen), 0
    while k < planned:
        # Mini-batches walk a shuffled order of the samples, reshuffled when fewer than bs are left (as
        # AutoRound's IndexSampler does): every sample is seen equally often, not as independent draws fall.
        if at + bs > n:
            order, at = torch.randperm(n, generator=gen), 0
        idx, at = order[at:at + bs], at + bs
        with torch.autocast(X.device.type, dtype=torch.bfloat16, enabled=amp):
            out = run_block(block, X[idx], s_in.args[0], s_in.kwargs[0])
        loss = F.mse_loss(out.float(), target[idx])
        if not torch.isfinite(loss):
            break
        value = float(loss.detach()) / max(float(initial[idx].mean()), 1e-30)
        if value < best:  # the parameters that gave this loss, before the step below moves them
            best, best_state = value, _snapshot(snapshot_of)
        loss.backward()
        step(k, planned)
        k += 1
        bar.update()
        bar.set_postfix(rel_loss=f"{value:.4g}", best=f"{best:.4g}",
                        tok_s=f"{k * bs * X.shape[1] / (time.perf_counter() - t0 - t_eval):.0f}")
        if deadline is not None:
            if k == 2:  # plan the iterations that fit, so the learning rate still decays to 0
                per = (time.perf_counter() - t0 - t_eval) / 2
                planned = max(k, min(config.iters, k + int((deadline - time.perf_counter()) / per)))
                bar.total = planned
            elif time.perf_counter() >= deadline:
                break
    return k, best, best_state


def _sign_step(learned: dict[str, LearnedGrid], lr: float):
    params = [p for m in learned.values() for p in m.parameters()]

    def step(k: int, planned: int) -> None:
        sign_sgd_(params, lr * (1 - k / planned))
        for m in learned.values():
            m.clamp_()

    return step


def _snapshot(items: list) -> list[torch.Tensor]:
    tensors = [p for m in items for p in (m.parameters() if isinstance(m, nn.Module) else [m])]
    return [t.detach().clone() for t in tensors]


def _restore(items: list, saved: list[torch.Tensor]) -> None:
    tensors = [p for m in items for p in (m.parameters() if isinstance(m, nn.Module) else [m])]
    with torch.no_grad():
        for t, s in zip(tensors, saved, strict=True):
            t.copy_(s)
