"""End-to-end recovery: logit distillation from the original model (Hinton et al., arXiv:1503.02531).

The student learns to match the teacher's next-token distribution on training text: the loss is
KL(teacher || student) between the temperature-softened distributions, times T^2, averaged over
tokens. What the student trains depends on what it is:

- quantized (``GPTQLinear`` layers): only the scales (and, on asymmetric grids, the zeros) of every
  quantized layer, through a straight-through estimator; the integer codes stay as they are, so the
  result packs into the same checkpoint (EfficientQAT's E2E-QP, arXiv:2407.11062);
- float (structure-pruned, or sparse): every parameter of the decoder blocks (embeddings, final norm
  and head stay frozen), or with ``lora_rank`` low-rank adapters on the blocks' linears, merged into
  the weights at the end; a sparse student's zeros stay zero either way.

AdamW at a constant learning rate; the forward and backward passes under bf16 autocast (``amp``; by
default only where the CPU multiplies bf16 natively, float32 elsewhere); sequences processed in
micro-batches that bound the logits' memory, with gradient checkpointing of the decoder blocks when
their activations would not fit. The model stays in eval mode (no dropout).

A few validation windows (drawn from the training text, never from held-out text) are scored at
the start and at every checkpoint; the student returned is the best one seen, so it is never worse
than the input on them. Checkpoints (every ``checkpoint_every`` steps, and when ``max_time`` stops
the run) hold the trained tensors, the optimizer state and the best student: ``resume`` continues
an interrupted run and reaches the same student as an uninterrupted one. Data order is fixed by the
windows, so a seed fixes the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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
from ..util import atomic_path, available_memory_bytes
from .learn import LearnedGrid, LoRALinear, keep_zeros
from .walk import find_blocks, find_linears, linear_weight, set_module

# Defaults by what is trained. All weights: 1e-4, the peak rate of Minitron's distillation of pruned
# models (arXiv:2408.11796). Measured (eval/recover.md, width MLP 75%, 30 minutes): 1e-5 moved the weights
# too little in the few dozen steps a CPU budget buys.
LR = {"scales": 1e-3, "lora": 1e-4, "weights": 1e-4}
LOGIT_BUDGET = 2**24  # logits per forward (float32: 64 MiB; a few copies live during the backward)


@dataclass
class DistillReport:
    trained: str  # "scales" | "weights" | "lora"
    lr: float
    steps: int  # optimizer steps done, earlier (resumed) runs included
    planned_steps: int
    tokens: int  # tokens trained on
    val_before: float  # KL on the validation windows, input student
    val_after: float  # KL of the student returned (the best seen)
    best_step: int
    stopped: str  # "done" | "max-time"
    checkpointing: bool
    micro_batch: int
    history: list = field(default_factory=list)  # {step, tokens, train_kl (mean since the last entry), val_kl}
    seconds: float = 0.0


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at ``temperature``, times T^2 (so gradients keep their
    scale across temperatures, as Hinton et al. do)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


class Trainable:
    """What the student trains, and how it goes back to an ordinary (GPTQ or float) model."""

    def __init__(self, student: nn.Module, config: RecoverConfig, pruned: bool):
        self.student = student
        self.hooks: list = []
        self.flags = {p: p.requires_grad for p in student.parameters()}
        for p in student.parameters():
            p.requires_grad_(False)
        _, blocks = find_blocks(student)
        quantized = {n: m for n, m in student.named_modules() if isinstance(m, GPTQLinear)}
        if quantized:
            if config.lora_rank:
                raise UserError("--lora-rank applies to float students; a quantized student trains its scales")
            self.what = "scales"
            self.modules = {n: LearnedGrid(m, rounding=False, mask=m.dequantized_weight() == 0 if pruned else None)
                            for n, m in quantized.items()}
            for n, m in self.modules.items():
                set_module(student, n, m)
            self.params = [p for m in self.modules.values() for p in m.parameters()]
        elif config.lora_rank:
            self.what = "lora"
            gen = torch.Generator().manual_seed(config.seed)
            blocks_name = next(n for n, m in student.named_modules() if m is blocks)
            self.modules = {}
            for n, m in find_linears(blocks, prefix=f"{blocks_name}.").items():
                W = linear_weight(m)
                mask = (W == 0) if pruned else None
                self.modules[n] = LoRALinear(m, min(config.lora_rank, *W.shape), gen, mask=mask)
                set_module(student, n, self.modules[n])
            self.params = [p for m in self.modules.values() for p in (m.A, m.B)]
        else:
            self.what = "weights"
            self.modules = {}
            self.params = [p for p in blocks.parameters() if p.is_floating_point()]
            for p in self.params:
                p.requires_grad_(True)
            if pruned:
                self.hooks = [keep_zeros(m.weight) for m in find_linears(blocks).values()]
        for p in self.params:
            p.requires_grad_(True)

    def tensors(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.params]

    def load(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, t in zip(self.params, tensors, strict=True):
                p.copy_(t)

    def finish(self) -> None:
        """Back to GPTQ layers (learned scales/zeros) or plain linears (adapters merged)."""
        for n, m in self.modules.items():
            set_module(self.student, n, m.to_gptq() if isinstance(m, LearnedGrid) else m.merge())
        for h in self.hooks:
            h.remove()
        for p, flag in self.flags.items():
            p.requires_grad_(flag)


@contextmanager
def checkpointed(blocks: nn.ModuleList, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing of each decoder block: its activations are recomputed in the backward
    pass instead of kept (works in eval mode, unlike transformers' own switch)."""
    from torch.utils.checkpoint import checkpoint

    if not enabled:
        yield
        return
    for b in blocks:
        b.forward = (lambda *a, _f=b.forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw))
    try:
        yield
    finally:
        for b in blocks:
            del b.forward



def activation_bytes(model: nn.Module, rows: int, seqlen: int) -> float:
    """A rough size of what the backward pass keeps of the decoder blocks for ``rows`` sequences:
    every linear's output, plus the attention probabilities, in float32."""
    _, blocks = find_blocks(model)
    outs = sum(linear_weight(m).shape[0] if not isinstance(m, GPTQLinear) else m.out_features
               for m in find_linears(blocks[0], quantized=True).values())
    heads = getattr(model.config, "num_attention_heads", None) or getattr(model.config, "n_head", 1)
    per_block = rows * seqlen * (3 * outs + heads * seqlen) * 4
    return per_block * len(blocks)


def fingerprint(config: RecoverConfig, train: torch.Tensor, val: torch.Tensor, student: nn.Module) -> str:
    h = hashlib.sha256(repr(replace(config, max_time=0.0, checkpoint_every=1)).encode())
    h.update(train.numpy().tobytes())
    h.update(val.numpy().tobytes())
    h.update(repr(student.config.to_dict() if hasattr(student, "config") else type(student)).encode())
    return h.hexdigest()


class _Checkpoint:
    """state.safetensors: trained tensors, optimizer state, best student; its metadata the progress."""

    def __init__(self, folder: Path, fingerprint: str):
        self.path = Path(folder) / "e2e.safetensors"
        self.fingerprint = fingerprint
        Path(folder).mkdir(parents=True, exist_ok=True)

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        if not self.path.exists():
            return None
        with safe_open(self.path, "pt") as f:
            meta = json.loads(f.metadata()["progress"])
        if meta["fingerprint"] != self.fingerprint:
            raise UserError(f"cannot resume from {self.path.parent}: it was made with other settings, data or "
                            "models; rerun with --force to start over")
        return meta, load_file(self.path)

    def save(self, meta: dict, params: list[torch.Tensor], best: list[torch.Tensor],
             optimizer: torch.optim.Optimizer) -> None:
        tensors = {f"param.{i}": t.contiguous() for i, t in enumerate(params)}
        tensors |= {f"best.{i}": t.contiguous() for i, t in enumerate(best)}
        for i, s in optimizer.state_dict()["state"].items():
            for k, v in s.items():
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
        with atomic_path(self.path) as tmp:
            save_file(tensors, tmp, metadata={"progress": json.dumps(meta | {"fingerprint": self.fingerprint})})


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = t
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: torch.Tensor,
    val: torch.Tensor,
    config: RecoverConfig,
    state_dir: Path | None = None,
    resume: bool = False,
    pruned: bool = False,
    checkpointing: bool | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_checkpoint: Callable[[int, int, nn.Module], None] | None = None,
) -> DistillReport:
    """Distill ``teacher`` into ``student`` in place on the token windows ``train`` ``[n, seqlen]``
    (``config.batch_size`` windows per step, in order), keeping the best student on ``val``.

    ``pruned``: the student's zero weights are pruned ones and stay zero. ``checkpointing`` None
    decides by memory. ``on_checkpoint(step, tokens, student)`` is called after each validation
    (for measurements; its time is not counted against ``max_time``)."""
    t_start = time.perf_counter()
    _check_vocabularies(student, teacher)
    if train.numel() == 0 or val.numel() == 0:
        raise UserError("no training text: --data gave no token windows")
    _, blocks = find_blocks(student)
    seqlen, vocab = train.shape[1], _vocab(student)
    micro = max(1, min(config.batch_size, train.shape[0], LOGIT_BUDGET // (seqlen * vocab)))
    if checkpointing is None:
        checkpointing = activation_bytes(student, micro, seqlen) > 0.3 * available_memory_bytes()
    trainable = Trainable(student, config, pruned)
    try:
        return _train(student, teacher, blocks, train, val, config, trainable, micro, state_dir, resume,
                      checkpointing, progress, log, on_checkpoint, t_start)
    finally:
        trainable.finish()


def _vocab(m: nn.Module) -> int | None:
    head = m.get_output_embeddings()
    if isinstance(head, GPTQLinear):
        return head.out_features
    return None if head is None else linear_weight(head).shape[0]


def _check_vocabularies(student: nn.Module, teacher: nn.Module) -> None:
    vs, vt = _vocab(student), _vocab(teacher)
    if vs is None or vt is None or vs != vt:
        raise UserError(f"the student and the teacher have different vocabularies ({vs} and {vt} output tokens): "
                        "distillation compares their next-token distributions token by token")


def _train(student, teacher, blocks, train, val, config: RecoverConfig, trainable: Trainable, micro: int,
           state_dir, resume, checkpointing, progress, log, on_checkpoint, t_start) -> DistillReport:
    student.eval()
    teacher.eval()
    lr = config.lr or LR[trainable.what]
    optimizer = torch.optim.AdamW(trainable.params, lr=lr, weight_decay=0.0)
    n, seqlen = train.shape
    bs = min(config.batch_size, n)
    planned = math.ceil(n / bs)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast())

    def kl_on(ids: torch.Tensor, grad: bool) -> float:
        """Mean KL over ``ids`` (micro-batch by micro-batch); with ``grad``, gradients accumulate."""
        total = 0.0
        for chunk in ids.split(micro):
            with torch.no_grad(), amp:
                t_logits = teacher(input_ids=chunk, use_cache=False).logits
            with torch.set_grad_enabled(grad), amp:
                loss = kl_divergence(student(input_ids=chunk, use_cache=False).logits, t_logits, config.temperature)
            if grad:
                (loss * len(chunk) / len(ids)).backward()
            total += float(loss.detach()) * len(chunk)
        return total / len(ids)

    timing = {"step": 0.0, "val": 0.0, "excluded": 0.0}  # seconds: a step, a validation, measurements
    ckpt = _Checkpoint(Path(state_dir), fingerprint(config, train, val, student)) if state_dir else None
    saved = ckpt.load() if ckpt and resume else None
    if saved:
        meta, tensors = saved
        trainable.load([tensors[f"param.{i}"] for i in range(len(trainable.params))])
        best = [tensors[f"best.{i}"] for i in range(len(trainable.params))]
        _load_optimizer(optimizer, tensors)
        step, history, best_val, best_step = meta["step"], meta["history"], meta["best_val"], meta["best_step"]
        val_before, val_at, running = meta["val_before"], meta["val_at"], meta["running"]
        log(f"resuming: {step} of {planned} steps already done")
    else:
        step, history, best_step, val_at = 0, [], 0, 0
        running = [0.0, 0]  # train KL sum and count since the last validation
        t0 = time.perf_counter()
        val_before = best_val = kl_on(val, grad=False)
        timing["val"] = time.perf_counter() - t0
        best = [t.clone() for t in trainable.tensors()]
        history.append({"step": 0, "tokens": 0, "train_kl": None, "val_kl": val_before})
        if on_checkpoint:
            t1 = time.perf_counter()
            on_checkpoint(0, 0, student)
            timing["excluded"] += time.perf_counter() - t1

    def checkpoint_now() -> None:
        nonlocal best, best_val, best_step, val_at
        t0 = time.perf_counter()
        v = kl_on(val, grad=False)
        val_at = step
        history.append({"step": step, "tokens": step * bs * seqlen, "train_kl": running[0] / max(running[1], 1),
                        "val_kl": v})
        running[:] = [0.0, 0]
        if v < best_val:
            best, best_val, best_step = [t.clone() for t in trainable.tensors()], v, step
        if ckpt:
            meta = {"step": step, "history": history, "best_val": best_val, "best_step": best_step,
                    "val_before": val_before, "val_at": val_at, "running": running}
            ckpt.save(meta, trainable.tensors(), best, optimizer)
        timing["val"] = time.perf_counter() - t0
        if on_checkpoint:
            t1 = time.perf_counter()
            on_checkpoint(step, step * bs * seqlen, student)
            timing["excluded"] += time.perf_counter() - t1

    stopped = "done"
    run_start, first = time.perf_counter(), step
    bar = tqdm(total=planned, initial=step, desc=f"distill ({trainable.what})", unit="step", disable=not progress)
    with checkpointed(blocks, checkpointing):
        while step < planned:
            if config.max_time:
                elapsed = time.perf_counter() - t_start - timing["excluded"]
                if elapsed + timing["step"] + timing["val"] > config.max_time:
                    stopped = "max-time"
                    break
            t0 = time.perf_counter()
            ids = train[step * bs:(step + 1) * bs]
            loss = kl_on(ids, grad=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for m in trainable.modules.values():
                if isinstance(m, LearnedGrid):
                    m.clamp_()
            step += 1
            running[0] += loss
            running[1] += 1
            dt = time.perf_counter() - t0
            timing["step"] = dt if step == first + 1 else 0.9 * timing["step"] + 0.1 * dt
            bar.update()
            rate = (step - first) * bs * seqlen / (time.perf_counter() - run_start - timing["excluded"])
            bar.set_postfix(kl=f"{loss:.4f}", best_val=f"{best_val:.4f}", tok_s=f"{rate:.0f}")
            if step % config.checkpoint_every == 0 or step == planned:
                checkpoint_now()
    bar.close()
    if stopped == "max-time" and val_at != step:
        checkpoint_now()  # the students trained since the last checkpoint get their chance too
        log(f"--max-time {config.max_time:g} s reached after {step} of {planned} steps")
    trainable.load(best)
    return DistillReport(trainable.what, lr, step, planned, step * bs * seqlen, val_before, best_val, best_step,
                         stopped, checkpointing, micro, history, time.perf_counter() - t_start)

