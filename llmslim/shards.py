"""Writing a safetensors checkpoint tensor by tensor: ``ShardWriter``.

Every name, dtype and shape is known before the first byte (a model on ``meta`` says them), so
the shards are planned as ``save_pretrained`` plans them (huggingface_hub's
``split_torch_state_dict_into_shards``), each file is created at its final size with its header,
and each tensor (or piece of its rows) lands at its offset whenever it is ready, in any order.
The files are byte for byte what ``safetensors.torch.save_file`` writes for the same tensors, with
the same ``model.safetensors.index.json``, and no shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

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


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"F16"`` -> ``torch.float16``)."""
    return _BY_NAME[name]




def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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
