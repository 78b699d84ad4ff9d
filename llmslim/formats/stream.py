"""Models bigger than memory: read a safetensors checkpoint tensor by tensor, write one the same way.

``WeightSource`` indexes the shards of a checkpoint by their headers (``safe_open``; nothing is
read) and hands out single tensors, or rows of one, opening a shard only for as long as a read
takes, so no shard stays mapped. ``empty_model`` builds the model with every parameter on the
``meta`` device (accelerate's ``init_empty_weights``: no memory); ``materialize`` fills one
submodule from the source (accelerate's ``set_module_tensor_to_device``) and ``release`` empties
it again.

``ShardWriter`` writes a checkpoint whose tensors arrive one at a time, in any order: every name,
dtype and shape is known in advance (the model on ``meta`` says it), so the shards are planned as
``save_pretrained`` plans them (huggingface_hub's ``split_torch_state_dict_into_shards``), each
file is created at its final size with its header, and each tensor lands at its offset. The
files are byte for byte what ``safetensors.torch.save_file`` writes for the same tensors, plus
the same ``model.safetensors.index.json``, without ever holding a shard in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

# safetensors' dtype names, in the order it lays tensors out in a file (then by name): measured
# on safetensors 0.8 and checked against ``save_file`` in tests/formats/test_stream.py.
_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
    torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_RANK = {name: i for i, name in enumerate(_DTYPES.values())}
_BY_NAME = {v: k for k, v in _DTYPES.items()}
CHUNK_BYTES = 64 * 2**20  # rows of a large tensor are copied in pieces of about this size


def _unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"{path} is unreadable or corrupt: {e}")


class WeightSource:
    """The tensors of a (possibly sharded) safetensors checkpoint, read one at a time."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise UserError(f"{index} is unreadable or corrupt: {e}") from None
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.folder} has no .safetensors weight files")
        self.file: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        for name in files:
            path = self.folder / name
            try:
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                        s = f.get_slice(key)
                        self.file[key] = path
                        self.shape[key] = tuple(s.get_shape())
                        self.dtype[key] = _BY_NAME.get(s.get_dtype(), torch.float32)
            except Exception as e:  # safetensors' own error type for a truncated or corrupt file
                if type(e).__name__ == "SafetensorError" or isinstance(e, OSError):
                    raise _unreadable(path, e) from None
                raise

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def nbytes(self, name: str | None = None) -> int:
        names = [name] if name else list(self.file)
        return sum(self.dtype[n].itemsize * _numel(self.shape[n]) for n in names)

    @contextmanager
    def _open(self, path: Path) -> Iterator:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                yield f
        except Exception as e:
            if type(e).__name__ == "SafetensorError" or isinstance(e, OSError):
                raise _unreadable(path, e) from None
            raise

    def get(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (converted to ``dtype``); each shard is opened once, then closed."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file[n], []).append(n)
        for path, keys in by_file.items():
            with self._open(path) as f:
                for k in keys:
                    t = f.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()
        return out

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor, as stored."""
        with self._open(self.file[name]) as f:
            return f.get_slice(name)[start:stop]

    def row_chunks(self, name: str) -> Iterator[tuple[int | None, torch.Tensor]]:
        """(first row, rows) of a tensor in pieces of about ``CHUNK_BYTES``; (None, the tensor) for
        one without rows (a scalar, or empty)."""
        shape = self.shape[name]
        if len(shape) < 1 or shape[0] == 0:
            yield None, self.get([name])[name]
            return
        row = max(1, self.dtype[name].itemsize * _numel(shape[1:]))
        step = max(1, CHUNK_BYTES // row)
        for start in range(0, shape[0], step):
            yield start, self.rows(name, start, min(shape[0], start + step))

    def gather_rows(self, name: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``weight[ids]`` for an embedding matrix, reading it piece by piece (never whole)."""
        flat = ids.reshape(-1)
        out = torch.empty(flat.numel(), *self.shape[name][1:], dtype=dtype)
        for start, chunk in self.row_chunks(name):
            start = start or 0
            hit = (flat >= start) & (flat < start + chunk.shape[0])
            if hit.any():
                out[hit] = chunk[flat[hit] - start].to(dtype)
        return out.reshape(*ids.shape, *self.shape[name][1:])


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def empty_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``config`` with every parameter on ``meta`` (buffers real: rotary tables and
    masks are computed, not stored), in eval mode. Costs no memory for the weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .hf import no_init

    try:
        with init_empty_weights(include_buffers=False), no_init():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise UserError(f"not a causal language model: {str(e).splitlines()[0]}") from None
    model.tie_weights()  # as from_pretrained does: a tied lm_head is the embedding, stored once
    return model.eval()


def checkpoint_names(model: nn.Module, source: WeightSource) -> dict[str, str] | None:
    """Model tensor name -> checkpoint tensor name, found exactly as ``from_pretrained`` finds it
    (transformers' weight conversions: renamed keys, a base model's checkpoint without the causal
    LM's prefix ...). It also records on ``model`` which conversions were used, as loading does,
    so that saving writes the names (and order) the in-memory path writes. None when a conversion
    is more than a renaming (tensors merged or split): then tensors cannot be read one by one."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    prefix = model.base_model_prefix
    names: dict[str, str] = {}
    for key in sorted(source.file, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        if renamed in meta:
            if pattern is not None:
                return None
            names[renamed] = key
    model._weight_conversions = [c for c in conversions if c.was_used()]
    tied: dict[int, list[str]] = {}
    for n, t in model.state_dict(keep_vars=True).items():
        tied.setdefault(id(t), []).append(n)
    for group in tied.values():  # a tied lm_head reads the embedding's tensor
        stored = next((names[n] for n in group if n in names), None)
        for n in group if stored else ():
            names.setdefault(n, stored)
    return names


def as_saved(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """``tensors`` (distinct objects) renamed and ordered as ``save_pretrained`` writes them
    (transformers turns the weight conversions used in loading back into the checkpoint's names,
    e.g. GPT-NeoX's ``embed_out``), and model name -> saved name. None when that is more than a
    renaming (tensors merged or split): then they cannot be written one at a time."""
    from transformers.core_model_loading import revert_weight_conversion

    out = revert_weight_conversion(model, dict(tensors))
    ids = {id(t): n for n, t in tensors.items()}
    if len(out) != len(tensors) or any(id(t) not in ids for t in out.values()):
        return None
    return out, {ids[id(t)]: k for k, t in out.items()}


def materialize(model: nn.Module, names: list[str], source: WeightSource, checkpoint: dict[str, str],
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
    """Load the model's tensors ``names`` (full state-dict names) from ``source`` (``checkpoint``:
    model name -> checkpoint name), floats converted to ``dtype``. A name the checkpoint lacks
    keeps what the model has (a buffer computed at construction); a parameter it lacks is an error."""
    from accelerate.utils import set_module_tensor_to_device

    wanted = {}
    for full in names:
        stored = checkpoint.get(full)
        if stored is None:
            if _tensor_of(model, full).device.type == "meta":
                raise UserError(f"{source.folder}: the checkpoint lacks {full}")
            continue
        wanted[stored] = full
    tensors = source.get(list(wanted), dtype)
    for stored, full in wanted.items():
        t = tensors.pop(stored)
        expected = _tensor_of(model, full).shape
        if tuple(t.shape) != tuple(expected):
            raise UserError(f"{source.folder}: {stored} has shape {tuple(t.shape)}, the config says {tuple(expected)}")
        set_module_tensor_to_device(model, full, device, value=t)


def missing_tensors(model: nn.Module, checkpoint: dict[str, str]) -> list[str]:
    """Parameters of ``model`` the checkpoint does not have (tied ones count once)."""
    return [n for n, _ in model.named_parameters() if n not in checkpoint]


def names_under(model: nn.Module, prefix: str) -> list[str]:
    """State-dict names of the submodule ``prefix``, in full."""
    module = model.get_submodule(prefix)
    return [f"{prefix}.{k}" for k in module.state_dict(keep_vars=True)]


def _tensor_of(model: nn.Module, full: str) -> torch.Tensor:
    owner, _, leaf = full.rpartition(".")
    m = model.get_submodule(owner) if owner else model
    return m._parameters[leaf] if leaf in m._parameters else m._buffers[leaf]


def release(module: nn.Module) -> None:
    """Drop the weights of ``module`` (parameters and persistent buffers back to ``meta``)."""
    module.to("meta")


# --- writing ------------------------------------------------------------------------------------------


def safetensors_header(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The bytes before the data of a safetensors file holding ``tensors`` (name -> dtype, shape),
    exactly as safetensors writes them, and each tensor's offset from the start of the file."""
    order = sorted(tensors, key=lambda n: (_RANK[_DTYPES[tensors[n][0]]], n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, offsets = 0, {}
    for name in order:
        dtype, shape = tensors[name]
        size = dtype.itemsize * _numel(shape)
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets[name] = offset
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {n: start + o for n, o in offsets.items()}


class ShardWriter:
    """A checkpoint's safetensors shards, written tensor by tensor.

    ``plan``: every tensor the checkpoint will hold, name -> meta (or real) tensor with its final
    dtype and shape, in state-dict order (which decides the shards, as for ``save_pretrained``).
    """

    def __init__(self, out_dir: Path, plan: dict[str, torch.Tensor], max_shard_size: int | str = "2GB",
                 total_parameters: int | None = None, metadata: dict[str, str] | None = None):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.out_dir = Path(out_dir)
        meta = {n: (t if t.device.type == "meta" else torch.empty(t.shape, dtype=t.dtype, device="meta"))
                for n, t in plan.items()}
        split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        self.split = split
        self.total_parameters = total_parameters
        self.spec = {n: (t.dtype, tuple(t.shape)) for n, t in plan.items()}
        self.offset: dict[str, int] = {}
        self.path: dict[str, Path] = {}
        self.pending = set(plan)
        self.rows_left: dict[str, int] = {}  # rows not yet written, for tensors written in pieces
        self._fds: dict[Path, int] = {}
        metadata = {"format": "pt"} if metadata is None else metadata
        try:
            for filename, names in split.filename_to_tensors.items():
                path = self.out_dir / filename
                head, offsets = safetensors_header({n: self.spec[n] for n in names}, metadata)
                size = len(head) + sum(self.spec[n][0].itemsize * _numel(self.spec[n][1]) for n in names)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[path] = fd
                _reserve(fd, size)
                os.pwrite(fd, head, 0)
                for n in names:
                    self.offset[n] = offsets[n]
                    self.path[n] = path
        except BaseException:
            self.abort()
            raise

    def __contains__(self, name: str) -> bool:
        return name in self.spec

    def write(self, name: str, tensor: torch.Tensor, first_row: int | None = None) -> None:
        """Write ``tensor`` as ``name``, or with ``first_row`` a piece of its rows starting there."""
        dtype, shape = self.spec[name]
        whole = first_row is None
        if tensor.dtype != dtype or (whole and tuple(tensor.shape) != shape) or \
                (not whole and (tensor.dim() != len(shape) or tuple(tensor.shape[1:]) != shape[1:]
                                or first_row + tensor.shape[0] > shape[0])):
            raise ValueError(f"{name}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
                             + ("" if whole else f" at row {first_row}"))
        t = tensor.detach().contiguous().cpu()
        row = dtype.itemsize * _numel(shape[1:])
        data = _bytes(t)
        if data.nbytes:
            os.pwrite(self._fds[self.path[name]], data, self.offset[name] + (first_row or 0) * row)
        total = shape[0] if shape else 1
        left = self.rows_left.get(name, total) - (total if whole else t.shape[0])
        self.rows_left[name] = left
        if left <= 0:
            self.pending.discard(name)

    def close(self) -> list[str]:
        """Flush the shards and write the index (when there is more than one); returns the files."""
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} tensors were never written, e.g. {sorted(self.pending)[0]}")
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        files = list(self.split.filename_to_tensors)
        if self.split.is_sharded:
            meta = dict(self.split.metadata)
            if self.total_parameters is not None:
                meta = {"total_parameters": self.total_parameters, **meta}
            index = {"metadata": meta, "weight_map": self.split.tensor_to_filename}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True)
                                                                     + "\n")
            files.append("model.safetensors.index.json")
        return files

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _reserve(fd: int, size: int) -> None:
    """Claim the file's space now: a disk too small fails before the work, not after it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except (AttributeError, OSError) as e:
        import errno

        if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
                   torch.uint64):
        t = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])
    return memoryview(t.numpy()).cast("B")
