"""The layer-by-layer driver: one decoder block at a time, statistics by hooks, solving elsewhere.

For each block: feed it the calibration activations, accumulate each linear's statistic from its
inputs (the Hessian H = 2XX^T, or only its diagonal), hand (W, H) to a ``LayerSolver`` (GPTQ,
SparseGPT, Wanda ...), write the compressed weights back, and pass the compressed block's outputs
on to the next block. With true-sequential (the default) the layers are solved
group by group in execution order (q/k/v, then o, then gate/up, then down), each group seeing
inputs computed with the groups before it already quantized.

One forward per block is enough: each calibration batch's forward runs in a thread of its own
(``_Lanes``) and waits at the first layer of each group until every batch's input of that group
was added to H and the group is quantized, then goes on with the quantized weights. Only one
batch computes at a time, so memory holds what the waiting forwards keep (the residual stream
and a group's input) and one batch's temporaries, never all samples' attention scores or MLP
intermediates at once. Batches beyond what half of ``max_memory`` lets wait stop at each group
instead and rerun the block from its input once the group is solved: more work, the same floats.

Finished blocks and the activations after them are checkpointed, so ``resume`` continues an
interrupted run and reaches the same result as an uninterrupted one.

Bounded memory: with a ``BlockIO`` the model need not be in memory at all (its blocks on the
``meta`` device): each block is loaded just before it is solved and handed back (written, freed)
right after. The activations between blocks move to files when they would pass a share of
``max_memory`` (read back exactly: the same result). With ``device`` (e.g. ``cuda``) each block's
forwards and solves run there, the activations stay in CPU memory or on disk.

The forwards run in the stage's ``forward_dtype`` (``auto``, the default: bf16 where the device
multiplies bf16 natively, float32 elsewhere): with bf16 the linears and attention compute under
autocast (AMX tiles on this project's CPU: ~3x a float32 block forward) and the activations between
blocks are kept in bf16, as GPTQModel and llm-compressor run them on GPUs. What the solvers read stays
float32: the weights (autocast casts a copy at each call), and each layer's statistic, accumulated in
float32 from exactly the bf16 inputs the layer computed with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import GPTQConfig
from ..errors import UserError
from ..nn import GGUFLinear, GPTQLinear, can_pack
from ..util import (
    atomic_path,
    atomic_write_text,
    available_memory_bytes,
    heap_allocations,
    map_large_allocations,
    native_bf16,
    release_free_memory,
)
from .gptq import GPTQResult, accumulate_hessian, gptq_quantize, layer_loss
from .refit import refit_kept
from .sparsegpt import sparsegpt_prune
from .walk import (
    StopForward,
    capture_block_inputs,
    feed_until,
    find_blocks,
    find_linears,
    is_conv1d,
    linear_weight,
    module_name,
    run_block,
    select_layers,
    sequential_groups,
    set_module,
)


@dataclass
class LayerLog:
    name: str
    rows: int
    columns: int
    gptq_loss: float  # the solver's own error estimate
    layer_loss: float  # ||WX - QX||^2 / n from the Hessian
    damp_percent: float
    seconds: float
    fallback: str | None


def solver_options(config: GPTQConfig) -> dict:
    return dict(bits=config.bits, group_size=config.group_size, sym=config.sym, mse=config.mse,
                desc_act=config.desc_act, static_groups=config.static_groups, damp_percent=config.damp_percent,
                block_size=config.block_size, act_group_aware=config.act_group_aware and not config.desc_act,
                grid=config.gguf_grid, sparsity=config.sparsity, nm=config.n_m,
                importance=config.scale_importance if config.mse else None, full_range=config.full_range)


def prune_refit_quantize(W: torch.Tensor, H: torch.Tensor, config: GPTQConfig) -> GPTQResult:
    """The joint mode with a refit: SparseGPT's mask (its N:M act-order included), the kept weights
    refit exactly (``refit.refit_kept``), then the GPTQ sweep on them with the mask fixed. The errors
    add up exactly: the refit leaves a residual W - Wr whose gradient vanishes on the kept weights,
    so it is H-orthogonal to anything GPTQ changes there, and ||(W - Q)X||^2 = ||(W - Wr)X||^2 +
    ||(Wr - Q)X||^2. One set of statistics serves both, so it stays one pass over the model."""
    p = sparsegpt_prune(W, H, config.sparsity, config.n_m, config.block_size, config.damp_percent,
                        act_order=config.n_m is not None)
    Wr = p.W if p.fallback else refit_kept(W, p.W, H, p.mask, config.refit, p.damp_percent or config.damp_percent)
    return gptq_quantize(Wr, H, **(solver_options(config) | {"sparsity": 0.0, "nm": None}), keep_zeros=p.mask)


def resolve_forward_dtype(name: str, device: str) -> torch.dtype | None:
    """``forward_dtype`` -> the dtype block forwards autocast to; None: the model's own (float32 as
    llmslim loads it). ``auto``: bf16 where ``device`` has native bf16 matmuls, else float32."""
    if name == "auto":
        name = "bf16" if native_bf16(device) else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16}[name]


class LayerSolver:
    """What the block driver does with one linear: which statistic of its inputs to collect, how
    to compress ``(W, H)``, and what module the layer becomes once its block is done.

    ``solve`` returns the new float weight (the rest of the block's forward runs with it), a
    payload for ``finish`` and a log entry (a dataclass). The driver owns the order, the hooks,
    the checkpoints and resuming.
    """

    label = "blocks"  # progress bar
    log_type: type = LayerLog
    fallback_note = ""  # appended to a log entry's ``fallback`` in the warning

    def __init__(self, config):
        self.config = config  # fingerprinted: a resumed run must use the same one

    def forward_dtype(self, device: str) -> torch.dtype | None:
        """The dtype the block forwards on ``device`` autocast to (the stage's ``forward_dtype``); None:
        the model's own."""
        return resolve_forward_dtype(getattr(self.config, "forward_dtype", "fp32"), device)

    def statistic(self, columns: int) -> torch.Tensor:
        return torch.zeros(columns, columns)

    def accumulate(self, stat: torch.Tensor, count: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
        return accumulate_hessian(stat, count, X)

    def solve(self, name: str, layer: nn.Module, W: torch.Tensor, H: torch.Tensor):
        raise NotImplementedError

    def postfix(self, log) -> str:
        return ""

    def finish(self, layer: nn.Module, payload) -> nn.Module | None:
        """The module that replaces ``layer`` when its block is done (None: keep it). Called right
        after ``solve``; the driver swaps it in once the block's forwards are over."""
        return None

    def restore(self, block: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Put a checkpointed finished block back (resume); ``prefix`` is the block's full name + "."."""
        block.load_state_dict(tensors)


class GPTQSolver(LayerSolver):
    label = "GPTQ blocks"
    fallback_note = "; used RTN for this layer"

    def __init__(self, config, keep_zeros: bool = False):
        super().__init__(config)
        self.keep_zeros = keep_zeros  # a pruned model: its zeros stay zeros

    def solve(self, name, layer, W, H):
        t0 = time.perf_counter()
        keep = (W == 0) if self.keep_zeros else None
        config = self.config.for_layer(name)  # a tuned model's layers each have their own grid
        if config.refit and keep is None:
            r = prune_refit_quantize(W, H, config)
        else:
            r = gptq_quantize(W, H, **solver_options(config), keep_zeros=keep)
        Wq = r.dequantize()
        log = LayerLog(name, W.shape[0], W.shape[1], r.loss, layer_loss(W, Wq, H), r.damp_percent,
                       time.perf_counter() - t0, r.fallback)
        return Wq, (r, config), log

    def postfix(self, log) -> str:
        return f"loss={log.gptq_loss:.3g}"

    def finish(self, layer, payload):
        return _to_module(layer, *payload)

    def restore(self, block, tensors, prefix=""):
        _swap_quantized(block, self.config, tensors, prefix)


def _set_weight(layer: nn.Module, Wq: torch.Tensor) -> None:
    w = Wq.T if is_conv1d(layer) else Wq
    layer.weight.data.copy_(w.to(layer.weight.dtype))


def _to_module(layer: nn.Module, r: GPTQResult, config: GPTQConfig) -> GPTQLinear | GGUFLinear:
    bias = getattr(layer, "bias", None)
    if r.gguf is not None:  # a GGUF grid with no GPTQ-checkpoint form (K-quants, ...): its own module
        return GGUFLinear(r.gguf, bias)
    return GPTQLinear.from_codes(r.Q, r.scales, r.zeros, r.g_idx, config.group_size, config.bits, bias)


def auto_batch_size(nsamples: int, seqlen: int, widest: int, budget_bytes: float) -> int:
    """Samples per forward so that a block's activations (~8 float32 tensors of the widest
    layer) stay within ``budget_bytes``; all samples at once when they fit."""
    per_sample = seqlen * widest * 4 * 8
    return int(max(1, min(nsamples, budget_bytes // per_sample)))


# One batch's activations by default (auto_batch_size's estimate): a constant, not a share of this
# machine's memory, so that the default split -- and so the bytes written -- is the same on every
# machine. A block runs once whatever the split (``_Lanes``): larger batches would only cost
# memory. SmolLM2-135M at 128 x 512 tokens: 5 samples a batch.
BATCH_BYTES = 2**27


def default_max_memory() -> float:
    """The memory budget when none is given: half of what the machine has available now."""
    return 0.5 * available_memory_bytes()


def default_batch_size(nsamples: int, seqlen: int, widest: int, max_memory: float | None,
                       log: Callable[[str], None] = print) -> int:
    """Samples per forward when ``--batch-size`` is not given. A different split changes the floats
    summed into each Hessian, and so some rounded codes: the split must not follow how much memory
    happens to be free, or the same command writes different bytes under load (nor this machine's
    size, or it writes different bytes on another machine). It is as many samples as keep one
    batch's activations within ``BATCH_BYTES``, fewer when ``max_memory`` is smaller than that
    needs; without ``max_memory``, lowered only when not even that is free now (with a warning
    naming the size to reproduce)."""
    wanted = auto_batch_size(nsamples, seqlen, widest, BATCH_BYTES)
    if max_memory is not None:
        return min(wanted, auto_batch_size(nsamples, seqlen, widest, 0.5 * max_memory))
    fits = auto_batch_size(nsamples, seqlen, widest, 0.5 * available_memory_bytes())
    if fits < wanted:
        log(f"warning: {fits} calibration samples per forward instead of {wanted} (less memory free "
            f"now); the result differs from a run with --batch-size {wanted}")
    return min(wanted, fits)


def held_batches(nbatches: int, batch_size: int, seqlen: int, width: int, widest: int, budget: float) -> int:
    """How many of a block's batches wait inside its forward (``_Lanes``; the others rerun it per
    group, which costs forwards): as many as fit half ``budget``, at least one. A waiting forward
    holds about 3 hidden-wide tensors (its input, the residual stream, a normed copy) and a group's
    input up to the widest layer's, in float32 (Llama measured: 3 x 576 + 1536 floats a token while
    ``down_proj`` waits)."""
    per_batch = batch_size * seqlen * (3 * width + widest) * 4
    return int(max(1, min(nbatches, 0.5 * budget // per_batch)))


class BlockIO:
    """Where the blocks' weights are when the model is not all in memory (``formats.stream``
    implements it): the driver asks for each block before touching it and hands it back once it
    is finished (a resumed run too, for the blocks it restores). ``embed`` maps token ids to input
    embeddings when the embedding matrix is not loaded."""

    embed: Callable[[torch.Tensor], torch.Tensor] | None = None

    def load(self, i: int, block: nn.Module) -> None:
        pass

    def done(self, i: int, block: nn.Module) -> None:
        pass


class Activations:
    """Hidden states between two blocks, one tensor per calibration batch, in memory or (with
    ``spill``, a folder) in files: the same values either way, written and read back exactly."""

    def __init__(self, spill: Path | None = None, count: int = 0):
        self.spill = spill
        self._mem: list[torch.Tensor] = []
        self._n = count
        if spill is not None and not count:
            shutil.rmtree(spill, ignore_errors=True)
            spill.mkdir(parents=True)

    def like(self, spill: Path | None) -> Activations:
        """An empty store of the same kind (in ``spill`` when this one is on disk)."""
        return Activations(spill if self.spill is not None else None)

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().cpu()
        if self.spill is None:
            self._mem.append(t)
        else:
            save_file({"h": t.contiguous()}, self.spill / f"h{self._n:05d}.safetensors")
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j: int) -> torch.Tensor:
        if not 0 <= j < self._n:
            raise IndexError(j)
        return self._mem[j] if self.spill is None else load_file(self.spill / f"h{j:05d}.safetensors")["h"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[j] for j in range(self._n))

    def take(self, j: int) -> torch.Tensor:
        """Batch ``j``, forgotten by the store (its block's forward holds it from now on)."""
        t = self[j]
        if self.spill is None:
            self._mem[j] = None
        return t


class _Discard:
    def append(self, t: torch.Tensor) -> None:
        pass


class _Casting:
    """Appends to ``store`` in ``dtype``: the first block's inputs are kept as its forwards read them."""

    def __init__(self, store, dtype: torch.dtype | None):
        self.store = store
        self.dtype = dtype

    def append(self, t: torch.Tensor) -> None:
        self.store.append(_cast(t, self.dtype))


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


@contextlib.contextmanager
def _forward_mode(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    """How a block's calibration forwards run, entered in each thread that runs one (a lane): no
    autograd, new tensors on ``device``, and with ``dtype`` (bf16) the linears, matmuls and attention
    in it by autocast. Autocast casts a copy of each float32 weight at each call, so the weights stay
    what the solvers read and write; its cache stays off, as a lane's weights change while it waits."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(_on(device))
        if dtype is not None:
            stack.enter_context(torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False))
        yield


def _take(hidden, j: int) -> torch.Tensor:
    """Batch ``j`` of a block's inputs, dropped from their store when it can (the block's forward
    holds it from now on: all samples' inputs and the forwards' copies would be twice the memory)."""
    if isinstance(hidden, Activations):
        return hidden.take(j)
    t = hidden[j]
    if isinstance(hidden, list):
        hidden[j] = None
    return t


class _LaneClosed(BaseException):
    """Ends a waiting lane's forward when the run stops early (BaseException: no model code catches it)."""


class _Lanes:
    """The forwards of one block over its calibration batches, interleaved so the block runs once.

    True-sequential quantization solves a block's layers group by group, each group from its inputs
    computed with the groups before it already solved: every batch must reach a group before it is
    solved, and no batch may go past it until then. The first ``held`` batches each run in a
    thread of their own (a lane) and wait at a group's first layer (``pause``); the others stop
    there (``StopForward``) and rerun from the block's input once the group is solved, which costs
    forwards but holds nothing. Once every batch waits or stopped, the driver solves the earliest
    group waited for and lets them go on. Exactly one thread computes at a time and batches take
    turns in batch order, so every float is what running the batches one after another computes,
    whatever ``held``: the same bytes however much memory there is.
    """

    def __init__(self, n: int, held: int):
        self.held = held
        self.cv = threading.Condition()
        self.turn: int | None = None  # the lane computing now; None: the driver
        self.waiting: list[int | None] = [None] * n  # the group a batch waits for (None: runnable)
        self.done = [False] * n
        self.threads: list[threading.Thread | None] = [None] * n
        self.outputs: dict[int, object] = {}
        self.error: BaseException | None = None
        self.closing = False
        self.local = threading.local()

    def pause(self, group: int) -> None:
        """In a batch's forward, at ``group``'s first layer: wait until it is solved (a held batch),
        or stop and rerun later (the others)."""
        j = self.local.lane
        self.waiting[j] = group
        if j >= self.held:
            raise StopForward
        with self.cv:
            self.turn = None
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn == j)
        if self.closing:
            raise _LaneClosed

    def _lane(self, j: int, body: Callable[[int], object]) -> None:
        self.local.lane = j
        try:
            self.outputs[j] = body(j)
        except _LaneClosed:
            pass
        except BaseException as e:  # handed to the driver, which raises it
            self.error = e
        finally:
            with self.cv:
                self.done[j] = True
                self.turn = None
                self.cv.notify_all()

    def _step(self, j: int, body: Callable[[int], object]) -> None:
        """Let batch ``j`` compute until it waits, stops or ends."""
        if j >= self.held:  # here, from the block's input
            self.local.lane = j
            try:
                self.outputs[j] = body(j)
                self.done[j] = True
            except StopForward:
                pass
            return
        with self.cv:
            self.turn = j
            if self.threads[j] is None:  # a held batch's lane starts on its first turn
                self.threads[j] = threading.Thread(target=self._lane, args=(j, body), daemon=True,
                                                   name=f"llmslim-lane-{j}")
                self.threads[j].start()
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn is None)
        if self.error is not None:
            raise self.error

    def run(self, body: Callable[[int], object], solve: Callable[[int], None]) -> Iterator:
        """Run ``body(j)`` (batch j's forward, which calls ``pause``) for every batch; ``solve(g)``
        once every unfinished batch waits and ``g`` is the earliest group waited for. Yields the
        batches' outputs in batch order, each as soon as it and those before it are done."""
        n, emitted = len(self.done), 0
        try:
            while True:
                for j in range(n):
                    if not self.done[j] and self.waiting[j] is None:
                        self._step(j, body)
                    while emitted in self.outputs:
                        yield self.outputs.pop(emitted)
                        emitted += 1
                waited = [g for g, d in zip(self.waiting, self.done, strict=True) if not d and g is not None]
                if not waited:
                    return
                group = min(waited)
                solve(group)
                self.waiting = [None if g == group else g for g in self.waiting]
        finally:
            self.close()

    def close(self) -> None:
        """End every lane still waiting (an error or an interrupt stopped the run) and join them."""
        self.closing = True
        for j, thread in enumerate(self.threads):
            if thread is None:
                continue
            with self.cv:
                self.cv.wait_for(lambda: self.turn is None)  # a lane computing when the driver stopped
                if not self.done[j]:
                    self.turn = j
                    self.cv.notify_all()
                    self.cv.wait_for(lambda j=j: self.done[j])
            thread.join()


def resolve_device(device: str | None) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is refused."""
    device = device or "cpu"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU on this machine; "
                        "use --device cpu (the default) or auto")
    if device not in ("cpu", "meta") and not device.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda (cuda:N), got {device!r}")
    return device


def _on(device: str):
    """Tensors created without a device go to ``device`` (the solvers are written device-free)."""
    return contextlib.nullcontext() if device == "cpu" else torch.device(device)


def _to(obj, device: str):
    if device == "cpu" and not (torch.is_tensor(obj) and obj.device.type != "cpu"):
        return obj
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class BlockState:
    """Checkpoints of finished blocks in ``state_dir``: block_NNNN.safetensors, hidden.safetensors."""

    def __init__(self, state_dir: Path, fingerprint: str):
        self.dir = state_dir
        self.fingerprint = fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)

    def start(self, resume: bool) -> int:
        """Blocks already done (0 for a fresh run). Refuses a state made with other settings."""
        meta = self.dir / "run.json"
        if resume and meta.exists():
            saved = json.loads(meta.read_text())["fingerprint"]
            if saved != self.fingerprint:
                raise UserError(f"cannot resume from {self.dir}: it was made with other settings or "
                                "calibration data; rerun with --force to start over")
            hidden = self.dir / "hidden.safetensors"
            if not hidden.exists():
                return 0
            from safetensors import safe_open

            with safe_open(hidden, "pt") as f:
                done = int(f.metadata()["blocks_done"])
            if all((self.dir / f"block_{i:04d}.safetensors").exists() for i in range(done)):
                return done
            return 0
        atomic_write_text(meta, json.dumps({"fingerprint": self.fingerprint}))
        return 0

    def save_block(self, i: int, block: nn.Module, logs: list, hidden) -> None:
        tensors = {k: v.contiguous().cpu() for k, v in block.state_dict().items()}
        _atomic_save(tensors, self.dir / f"block_{i:04d}.safetensors",
                     {"logs": json.dumps([asdict(x) for x in logs])})
        # Written last: the hidden states say how many blocks are done (activations spilled to
        # files are named, not copied: they stay until the block after next is done).
        if isinstance(hidden, Activations) and hidden.spill is not None:
            _atomic_save({}, self.dir / "hidden.safetensors", {"blocks_done": str(i + 1), "spill": str(hidden.spill),
                                                                "batches": str(len(hidden))})
            return
        _atomic_save({f"h{j}": h.contiguous() for j, h in enumerate(hidden)}, self.dir / "hidden.safetensors",
                     {"blocks_done": str(i + 1)})

    def load_block(self, i: int, log_type: type = LayerLog) -> tuple[dict[str, torch.Tensor], list]:
        from safetensors import safe_open

        path = self.dir / f"block_{i:04d}.safetensors"
        with safe_open(path, "pt") as f:
            logs = [log_type(**x) for x in json.loads(f.metadata()["logs"])]
        return load_file(path), logs

    def load_hidden(self):
        from safetensors import safe_open

        path = self.dir / "hidden.safetensors"
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        if "spill" in meta:
            return Activations(Path(meta["spill"]), count=int(meta["batches"]))
        t = load_file(path)
        return [t[f"h{j}"] for j in range(len(t))]


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def fingerprint(config, calib: torch.Tensor, model: nn.Module) -> str:
    h = hashlib.sha256(repr(config).encode())
    h.update(calib.numpy().tobytes())
    h.update(repr(model.config.to_dict() if hasattr(model, "config") else type(model)).encode())
    return h.hexdigest()


def gptq_blocks(
    model: nn.Module,
    config: GPTQConfig,
    calib: torch.Tensor,
    state_dir: Path | None = None,
    resume: bool = False,
    batch_size: int | None = None,
    log: Callable[[str], None] = print,
    keep_zeros: bool = False,
    io: BlockIO | None = None,
    device: str = "cpu",
    max_memory: float | None = None,
) -> list[LayerLog]:
    """Quantize every accepted linear of the decoder blocks in place (swapped for GPTQLinear);
    with ``keep_zeros`` (a model pruned before) every exact zero weight stays zero."""
    # Names only: a dict of the modules held here would keep every replaced float layer alive.
    targets = set(select_layers(model, replace(config.layers, quantize_lm_head=False),
                                lambda in_f, out_f: can_pack(in_f, out_f, config.bits))[0])
    return run_blocks(model, GPTQSolver(config, keep_zeros), targets, calib, state_dir, resume, batch_size, log,
                      io=io, device=device, max_memory=max_memory)


def run_blocks(
    model: nn.Module,
    solver: LayerSolver,
    targets: set[str],
    calib: torch.Tensor,
    state_dir: Path | None = None,
    resume: bool = False,
    batch_size: int | None = None,
    log: Callable[[str], None] = print,
    io: BlockIO | None = None,
    device: str = "cpu",
    max_memory: float | None = None,
) -> list:
    """Run ``solver`` on the linears named in ``targets`` (full names), block by block; returns
    the solver's log entries in order.

    ``io``: the blocks' weights come from it and go back to it (a model bigger than memory).
    ``max_memory`` (bytes; default ``default_max_memory()``): half of it bounds the samples per
    forward and the forwards waiting inside a block (beyond that, a forward per group instead: the
    same result), a quarter the activations kept in memory between blocks (beyond that they go to
    files in ``state_dir``, or a temporary folder). ``device``: where the forwards and solves run.
    """
    blocks_name, blocks = find_blocks(model)
    config = solver.config
    io = io or BlockIO()
    map_large_allocations()  # the waiting forwards' tensors would leave resident holes in glibc's heap
    nsamples, seqlen = calib.shape
    widest = max(max(linear_weight(m).shape) for m in find_linears(blocks[0]).values())
    budget = default_max_memory() if max_memory is None else max_memory
    if batch_size is None:
        batch_size = default_batch_size(nsamples, seqlen, widest, max_memory, log)
    batches = list(calib.split(batch_size))
    state = BlockState(state_dir, fingerprint(config, calib, model)) if state_dir else None
    start = state.start(resume) if state else 0
    width = getattr(getattr(model, "config", None), "hidden_size", None) or widest
    held = held_batches(len(batches), batch_size, seqlen, width, widest, budget)
    dtype = solver.forward_dtype(device)
    element = 4 if dtype is None else dtype.itemsize
    spill_root = None
    with contextlib.ExitStack() as stack:
        if 2 * nsamples * seqlen * width * element > 0.25 * budget:  # block inputs + outputs
            spill_root = state.dir / "activations" if state else Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="llmslim-act-")))
        # A resumed run needs only the kwargs (masks, positions): its hidden states are in the checkpoint.
        hidden = _Discard() if start else Activations(spill_root / "gen0" if spill_root else None)
        inputs = capture_block_inputs(model, blocks, batches, embed=io.embed, store=_Casting(hidden, dtype))
        inputs.hidden = []
        inputs.args = [_to(a, device) for a in inputs.args]
        inputs.kwargs = [_to(k, device) for k in inputs.kwargs]
        logs: list = []
        if start:
            log(f"resuming: {start} of {len(blocks)} blocks already done")
            for i in range(start):
                tensors, block_logs = state.load_block(i, solver.log_type)
                io.load(i, blocks[i])
                solver.restore(blocks[i], tensors, f"{blocks_name}.{i}.")
                io.done(i, blocks[i])
                logs += block_logs
            hidden = state.load_hidden()

        bar = tqdm(range(start, len(blocks)), desc=solver.label, unit="block", initial=start, total=len(blocks))
        for i in bar:
            block = blocks[i]
            io.load(i, block)
            prefix = f"{blocks_name}.{i}."
            names = [n for n in find_linears(block) if prefix + n in targets]
            outs = _outputs(hidden, spill_root, i)
            if device != "cpu":
                block.to(device)
            block_logs = _solve_block(block, prefix, names, solver, hidden, inputs, bar, outs, device, held)
            if device != "cpu":
                block.to("cpu")
            hidden = outs
            logs += block_logs
            if state:
                state.save_block(i, block, block_logs, hidden)
            io.done(i, block)
    return logs


def _outputs(hidden, spill_root: Path | None, i: int) -> Activations:
    """Where block ``i`` puts its outputs: its inputs' kind of store; on disk, the other of two
    folders, so the inputs (and a resumable checkpoint naming them) stay intact meanwhile."""
    if isinstance(hidden, Activations):
        return hidden.like(spill_root / f"gen{(i + 1) % 2}" if spill_root else None)
    return Activations()


def _swap_quantized(block: nn.Module, config: GPTQConfig, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    for name, layer in find_linears(block).items():
        if f"{name}.codes" in tensors:
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            set_module(block, name, GGUFLinear.from_state(config.for_layer(prefix + name).gguf_grid, own))
            continue
        if f"{name}.qweight" not in tensors:
            continue
        in_f, out_f = linear_weight(layer).shape[1], linear_weight(layer).shape[0]
        own = config.for_layer(prefix + name)
        q = GPTQLinear(in_f, out_f, own.bits, own.group_size, getattr(layer, "bias", None) is not None)
        q.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        set_module(block, name, q)


# One forward at a time (no lanes): each batch's forward makes and frees the same temporaries,
# which glibc's heap serves again without a page fault, where pages of their own (the driver's
# default, ``map_large_allocations``) are faulted in afresh each time. Wanda 50% on SmolLM2-135M,
# 32 x 512 tokens: 22.5-23.3 s from the heap, 38.8-44.6 s mapped, the same bytes (eval/pruning.md,
# session 14). The heap is trimmed when the forwards end. 32 MiB is glibc's largest mmap threshold; a batch's
# tensors are within it by the batch size's choice (``BATCH_BYTES``: ~8 of the widest).
FORWARD_HEAP_BYTES = 32 * 2**20


def _solve_block(block, prefix, names, solver: LayerSolver, hidden, inputs, bar, outs: Activations,
                 device: str = "cpu", held: int | None = None) -> list:
    """Compress the linears ``names`` of one block; returns their logs, the block's outputs go to
    ``outs``. ``held``: how many batches wait inside the forward (``_Lanes``; default all)."""
    with _on(device):
        return _solve_block_here(block, prefix, names, solver, hidden, inputs, bar, outs, device,
                                 len(hidden) if held is None else held)


def _solve_block_here(block, prefix, names, solver: LayerSolver, hidden, inputs, bar, outs, device, held):
    args, kwargs = inputs.args, inputs.kwargs
    config = solver.config
    dtype = solver.forward_dtype(device)
    layers = {n: block.get_submodule(n) for n in names}
    H: dict[str, tuple[torch.Tensor, int]] = {}
    results: dict[str, object] = {}
    logs: list = []

    def run(h: torch.Tensor, a: tuple, kw: dict) -> torch.Tensor:
        """One forward of the block, in the forward mode; its output in the forward dtype."""
        with _forward_mode(device, dtype):
            return _cast(run_block(block, h, a, kw), dtype)

    def probe():
        run(_cast(_to(hidden[0][:1], device), dtype), _slice_args(args[0], 1), _slice_kwargs(kwargs[0], 1))

    sets = sequential_groups(block, names, probe)  # layers sharing one input tensor
    true_sequential = getattr(config, "true_sequential", True)
    steps = sets if true_sequential else [[n for s in sets for n in s]]

    def solve(group: list[str]) -> None:
        for n in group:
            key = _set_key(sets, n)
            Hn, _ = H[key]
            W = linear_weight(layers[n]).detach().float()
            with heap_allocations():  # the solver's search makes and frees large temporaries by the thousand
                Wnew, payload, entry = solver.solve(prefix + n, layers[n], W, Hn)
            del Hn, W
            _set_weight(layers[n], Wnew)
            # The module the layer becomes, made now: packed codes are a fraction of the solver's
            # full-size payload, which would otherwise wait for the rest of the block's forward.
            # Outside inference mode (solve may run inside the block's forward): the new module's
            # buffers must be ordinary tensors, or loading a resumed state into them fails.
            with torch.inference_mode(False):
                results[n] = solver.finish(layers[n], payload)
            del payload
            if all(m in results for s in sets if key in s for m in s):
                del H[key]  # every layer reading this input is solved
            logs.append(entry)
            if getattr(entry, "fallback", None):
                tqdm.write(f"warning: {prefix + n}: {entry.fallback}{solver.fallback_note}")
            bar.set_postfix_str(f"{n} {solver.postfix(entry)}")
            # The solver's temporaries are freed, but glibc keeps them in its heap, fragmented: over
            # a block's layers that is hundreds of MB resident for nothing (measured at width 1024).
            release_free_memory()

    def accumulate(name: str, X: torch.Tensor) -> None:
        key = _set_key(sets, name)
        if key != name:
            return  # layers of one set share the input: one Hessian for all of them
        Hn, count = H.get(key, (None, 0))
        # Under autocast a layer computes with its input cast to the forward dtype: that is the X of
        # its statistic, which is float32 all the same (autocast off: it would run the statistic's
        # own products in bf16).
        X = _cast(X, dtype)
        with contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, enabled=False):
            H[key] = solver.accumulate(solver.statistic(X.shape[-1]) if Hn is None else Hn, count, X)

    if true_sequential:
        # Each batch's forward waits (or stops, to rerun) at a set's first layer until every
        # batch's input of it was added to H and the set is solved, then goes on with its new weights.
        lanes = _Lanes(len(hidden), held)
        index = {n: g for g, s in enumerate(sets) for n in s}
        solved: set[int] = set()
        x = _cast(_to(hidden[0][:1].clone(), device), dtype)
        dead = _dead_while_waiting(block, [layers[s[0]] for s in sets], lambda: run(
            x, _slice_args(args[0], 1), _slice_kwargs(kwargs[0], 1)), x)
        del x
        seen: list[dict] = [{} for _ in range(held)]  # a waiting batch's tensors that may die early

        def hook(layer, a, name):
            g = index[name]
            if g in solved:
                return
            accumulate(sets[g][0], a[0])
            j = lanes.local.lane
            if j < held:
                # Free what the forward will not read again: its frames still refer to it, and
                # every waiting batch's copy of it would stay resident until the forward ends.
                key, gone = dead[g]
                seen[j][key] = weakref.ref(a[0])
                for key in gone:
                    ref = seen[j].pop(key, None)
                    if ref is not None and ref() is not None:
                        _drop_storage(ref())
            lanes.pause(g)

        def forward(j: int) -> torch.Tensor:
            if j >= held:  # a batch that reruns reads its input again
                h = _cast(_to(hidden[j], device), dtype)
            else:
                h = _cast(_to(_take(hidden, j), device), dtype)
                seen[j]["in"] = weakref.ref(h)
            return run(h, args[j], kwargs[j])  # the forward mode is per thread: entered in the lane

        def solve_set(g: int) -> None:
            solve(sets[g])
            solved.add(g)

        handles = [layers[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
        try:
            for out in lanes.run(forward, solve_set):
                outs.append(out)
        finally:
            for h in handles:
                h.remove()
    else:
        for step in steps:
            remaining: set[str] = set()

            def hook(layer, a, name, remaining=remaining):
                accumulate(name, a[0])
                remaining.discard(name)
                if not remaining:
                    raise StopForward  # the rest of the block is not needed for this step

            handles = [layers[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in step]
            try:
                with heap_allocations(FORWARD_HEAP_BYTES):
                    for j, h in enumerate(hidden):
                        remaining.update(step)
                        try:
                            run(_cast(_to(h, device), dtype), args[j], kwargs[j])
                        except StopForward:
                            pass
            finally:
                for h in handles:
                    h.remove()
            solve(step)
        with heap_allocations(FORWARD_HEAP_BYTES):
            for j, h in enumerate(hidden):
                outs.append(run(_cast(_to(h, device), dtype), args[j], kwargs[j]))

    for n in names:
        if results[n] is not None:
            set_module(block, n, results[n])
    return logs


def _dead_while_waiting(block: nn.Module, firsts: list[nn.Module], probe: Callable[[], object],
                        x: torch.Tensor) -> list[tuple[object, set]]:
    """For each set g (``firsts[g]`` its first layer): the key of its input, and the tensors of a
    forward the block never reads again once it has reached g -- its input ``x`` ("in") and the
    inputs of earlier sets (keyed by set index) -- from the torch ops that read each tensor's
    storage in ``probe`` (a forward on ``x``, one sample). A Llama block waiting at ``down_proj``
    no longer reads its input nor the normed copy gate/up read: 2 of the 4 hidden-wide tensors
    its frames hold."""
    from torch.overrides import TorchFunctionMode

    keys: dict[int, object] = {_address(x): "in"}  # storage address -> "in" or the set reading it
    last: dict[object, int] = {}
    arrival: dict[int, int] = {}
    own: dict[int, object] = {}
    kept = [x]  # alive until the end: a freed storage's address, reused, would pass for another's
    count = 0

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal count
            count += 1
            for t in _tensors((args, kwargs)):
                key = keys.get(_address(t))
                if key is not None:
                    last[key] = count
            return func(*args, **(kwargs or {}))

    def arrive(g: int, a: tuple) -> None:
        if g not in arrival:
            arrival[g] = count
            own[g] = keys.setdefault(_address(a[0]), g)
            kept.append(a[0])

    handles = [m.register_forward_pre_hook(lambda m, a, g=g: arrive(g, a)) for g, m in enumerate(firsts)]
    try:
        with torch.inference_mode(), Reads():
            probe()
    finally:
        for h in handles:
            h.remove()
    return [(own.get(g, g), {k for k, n in last.items() if g in arrival and n < arrival[g] and k != own[g]})
            for g in range(len(firsts))]


def _tensors(obj) -> Iterator[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, tuple | list):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _drop_storage(t: torch.Tensor) -> None:
    """Free ``t``'s memory though references to it remain (it must never be read again). Only a
    tensor owning its whole storage (a view of a larger buffer would take the rest with it), and
    one torch allocated (not a file's mapping, nor numpy's memory)."""
    storage = t.untyped_storage()
    if storage.resizable() and storage.nbytes() == t.numel() * t.element_size():
        storage.resize_(0)


def _set_key(sets: list[list[str]], name: str) -> str:
    return next(s[0] for s in sets if name in s)


def _slice_args(args: tuple, n: int) -> tuple:
    return tuple(a[:n] if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] > 1 else a for a in args)


def _slice_kwargs(kwargs: dict, n: int) -> dict:
    out = {}
    for k, v in kwargs.items():
        if torch.is_tensor(v) and v.dim() > 1 and v.shape[0] > 1:
            v = v[:n]
        elif isinstance(v, tuple) and all(torch.is_tensor(t) for t in v):
            v = tuple(t[:n] if t.dim() > 1 and t.shape[0] > 1 else t for t in v)
        out[k] = v
    return out


def gptq_lm_head(model: nn.Module, config: GPTQConfig, calib: torch.Tensor, batch_size: int | None) -> dict:
    """lm_head with GPTQ: its inputs are the final hidden states, so run the quantized model once."""
    head = model.get_output_embeddings()
    name = module_name(model, head)
    H = torch.zeros(head.in_features, head.in_features)
    count = 0

    def hook(module, args):
        nonlocal H, count
        H, count = accumulate_hessian(H, count, args[0])
        raise StopForward

    feed_until(model, head, hook, tqdm(calib.split(batch_size or 8), desc="lm_head inputs"))
    W = head.weight.detach().float()
    # quantized only: pruning (a joint --sparsity/--nm) never touches lm_head, as the prune stage never does
    r = gptq_quantize(W, H, **(solver_options(config) | {"sparsity": 0.0, "nm": None}))
    set_module(model, name, _to_module(head, r, config))
    return {"name": name, "rows": W.shape[0], "columns": W.shape[1], "gptq_loss": r.loss,
            "layer_loss": layer_loss(W, r.dequantize(), H), "damp_percent": r.damp_percent, "fallback": r.fallback}
