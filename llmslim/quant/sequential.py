"""The layer-by-layer driver: one decoder block at a time, statistics by hooks, solving elsewhere.

For each block: feed it the calibration activations, accumulate each linear's statistic from its
inputs (the Hessian H = 2XX^T, or only its diagonal), hand (W, H) to a ``LayerSolver`` (GPTQ,
SparseGPT, Wanda ...), write the compressed weights back, and pass the compressed block's outputs
on to the next block. With true-sequential (the default) the layers are solved
group by group in execution order (q/k/v, then o, then gate/up, then down), each group seeing
inputs computed with the groups before it already quantized.

When the whole calibration set fits in one batch, one forward per block is enough: a pre-hook
on each group's first layer accumulates H from the full input, quantizes the group on the spot
and lets the forward go on with the quantized weights. Otherwise each group costs a forward
that stops as soon as the group's inputs were seen.

Finished blocks and the activations after them are checkpointed, so ``resume`` continues an
interrupted run and reaches the same result as an uninterrupted one.

Bounded memory: with a ``BlockIO`` the model need not be in memory at all (its blocks on the
``meta`` device): each block is loaded just before it is solved and handed back (written, freed)
right after. The activations between blocks move to files when they would pass a share of
``max_memory`` (read back exactly: the same result). With ``device`` (e.g. ``cuda``) each block's
forwards and solves run there, the activations stay in CPU memory or on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
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
    release_free_memory,
    total_memory_bytes,
)
from .gptq import GPTQResult, accumulate_hessian, gptq_quantize, layer_loss
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
                block_size=config.block_size, act_group_aware=config.act_group_aware and not config.desc_act
                and not config.joint, grid=config.gguf_grid, sparsity=config.sparsity, nm=config.n_m)


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


def default_max_memory() -> float:
    """The memory budget when none is given: half of what the machine has available now."""
    return 0.5 * available_memory_bytes()


def default_batch_size(nsamples: int, seqlen: int, widest: int, max_memory: float | None,
                       log: Callable[[str], None] = print) -> int:
    """Samples per forward when ``--batch-size`` is not given. A different split changes the floats
    summed into each Hessian, and so some rounded codes: the split must not follow how much memory
    happens to be free, or the same command on the same machine writes different bytes under load.
    It is derived from ``max_memory`` when given, else from the machine's total memory; only when
    that much is not free now is it lowered (with a warning naming the size to reproduce)."""
    if max_memory is not None:
        return auto_batch_size(nsamples, seqlen, widest, 0.5 * max_memory)
    # A quarter of the machine's memory, when twice that is free now.
    wanted = auto_batch_size(nsamples, seqlen, widest, 0.25 * total_memory_bytes())
    fits = auto_batch_size(nsamples, seqlen, widest, 0.5 * available_memory_bytes())
    if fits < wanted:
        log(f"warning: {fits} calibration samples per forward instead of {wanted} (less memory free "
            f"now); the result differs from a run with --batch-size {wanted}")
    return min(wanted, fits)


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


class _Discard:
    def append(self, t: torch.Tensor) -> None:
        pass


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
    forward, a quarter the activations kept in memory between blocks (beyond that they go to files
    in ``state_dir``, or a temporary folder). ``device``: where the forwards and solves run.
    """
    blocks_name, blocks = find_blocks(model)
    config = solver.config
    io = io or BlockIO()
    nsamples, seqlen = calib.shape
    widest = max(max(linear_weight(m).shape) for m in find_linears(blocks[0]).values())
    budget = default_max_memory() if max_memory is None else max_memory
    if batch_size is None:
        batch_size = default_batch_size(nsamples, seqlen, widest, max_memory, log)
    batches = list(calib.split(batch_size))
    state = BlockState(state_dir, fingerprint(config, calib, model)) if state_dir else None
    start = state.start(resume) if state else 0
    width = getattr(getattr(model, "config", None), "hidden_size", None) or widest
    spill_root = None
    with contextlib.ExitStack() as stack:
        if 2 * nsamples * seqlen * width * 4 > 0.25 * budget:  # block inputs + outputs, float32
            spill_root = state.dir / "activations" if state else Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="llmslim-act-")))
        # A resumed run needs only the kwargs (masks, positions): its hidden states are in the checkpoint.
        hidden = _Discard() if start else Activations(spill_root / "gen0" if spill_root else None)
        inputs = capture_block_inputs(model, blocks, batches, embed=io.embed, store=hidden)
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
            block_logs = _solve_block(block, prefix, names, solver, hidden, inputs, bar, outs, device)
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


def _solve_block(block, prefix, names, solver: LayerSolver, hidden, inputs, bar, outs: Activations,
                 device: str = "cpu") -> list:
    """Compress the linears ``names`` of one block; returns their logs, the block's outputs go to ``outs``."""
    with _on(device):
        return _solve_block_here(block, prefix, names, solver, hidden, inputs, bar, outs, device)


def _solve_block_here(block, prefix, names, solver: LayerSolver, hidden, inputs, bar, outs, device):
    args, kwargs = inputs.args, inputs.kwargs
    config = solver.config
    layers = {n: block.get_submodule(n) for n in names}
    H: dict[str, tuple[torch.Tensor, int]] = {}
    results: dict[str, object] = {}
    logs: list = []

    def probe():
        run_block(block, _to(hidden[0][:1], device), _slice_args(args[0], 1), _slice_kwargs(kwargs[0], 1))

    sets = sequential_groups(block, names, probe)  # layers sharing one input tensor
    true_sequential = getattr(config, "true_sequential", True)
    steps = sets if true_sequential else [[n for s in sets for n in s]]

    def solve(group: list[str]) -> None:
        for n in group:
            key = _set_key(sets, n)
            Hn, _ = H[key]
            W = linear_weight(layers[n]).detach().float()
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
        H[key] = solver.accumulate(solver.statistic(X.shape[-1]) if Hn is None else Hn, count, X)

    single_pass = len(hidden) == 1 and true_sequential
    handles = []
    if single_pass:
        # One forward: each set is solved the moment its input arrives, then the forward goes on.
        def hook(layer, a, name):
            group = next(s for s in sets if name in s)
            if group[0] in results:
                return
            accumulate(group[0], a[0])
            solve(group)

        for n in names:
            handles.append(layers[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)))
        try:
            with torch.inference_mode():
                outs.append(run_block(block, _to(hidden[0], device), args[0], kwargs[0]))
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
                with torch.inference_mode():
                    for j, h in enumerate(hidden):
                        remaining.update(step)
                        try:
                            run_block(block, _to(h, device), args[j], kwargs[j])
                        except StopForward:
                            pass
            finally:
                for h in handles:
                    h.remove()
            solve(step)
        with torch.inference_mode():
            for j, h in enumerate(hidden):
                outs.append(run_block(block, _to(h, device), args[j], kwargs[j]))

    for n in names:
        if results[n] is not None:
            set_module(block, n, results[n])
    return logs


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
    r = gptq_quantize(W, H, **solver_options(config))
    set_module(model, name, _to_module(head, r, config))
    return {"name": name, "rows": W.shape[0], "columns": W.shape[1], "gptq_loss": r.loss,
            "layer_loss": layer_loss(W, r.dequantize(), H), "damp_percent": r.damp_percent, "fallback": r.fallback}
