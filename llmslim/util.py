"""Small helpers shared by every layer: atomic writes, output folders that appear only when
complete, and the process's memory use (the one RSS reader of the package and its scripts)."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary name beside ``path``; what was written there replaces ``path`` in
    one rename when the block ends, so readers see the old file or the new one, never half of one."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name (not mkstemp, which makes files 0600): the file gets the usual umask permissions.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)


def update_json(path: Path | str, key: str, value: object) -> None:
    """Set ``key`` in the JSON object stored at ``path`` (created if missing), written atomically:
    how benchmark scripts add a labelled run to their raw result file."""
    import json

    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: AMX or AVX512-BF16 on a CPU (elsewhere
    oneDNN emulates bf16: 5-7x slower than float32 on an AVX2 CPU), bf16 support on a CUDA GPU."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the kernel's pick), for a server a script or test starts."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident memory of this process: VmRSS/VmHWM on Linux, else getrusage."""
    current = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not peak:
        import resource
        import sys

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = ru if sys.platform == "darwin" else ru * 1024  # macOS reports bytes, Linux KiB
    return current or peak, peak


def peak_rss_bytes() -> int:
    return rss_bytes()[1]


def _meminfo_bytes(key: str, default: float) -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return default


def available_memory_bytes() -> float:
    """Memory the system can give this process now (MemAvailable; 8 GiB where unknown)."""
    return _meminfo_bytes("MemAvailable", 8 * 2**30)


def total_memory_bytes() -> float:
    """The machine's memory (MemTotal; 16 GiB where unknown): unlike what is free now, the same on
    every run, so a size derived from it reproduces."""
    return _meminfo_bytes("MemTotal", 16 * 2**30)


@functools.cache
def _libc():
    """glibc through ctypes, or None where there is none (its malloc tunables are glibc's own). Looked
    up once: ``find_library`` runs ``ldconfig``, and the driver asks for it at every layer."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand memory the process freed back to the system (glibc keeps it otherwise: after tokenizing
    a corpus, hundreds of MB stay resident though nothing uses them). A no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's malloc.h; 128 KiB is both thresholds' value before anything sets them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _GLIBC_DEFAULT = -1, -3, 128 * 2**10
_mmap_threshold = _GLIBC_DEFAULT


def map_large_allocations(threshold: int = 256 * 2**10) -> None:
    """Make glibc give every allocation of ``threshold`` bytes or more its own pages, returned to
    the system when freed. By default glibc raises that threshold to the largest block freed (up to
    32 MB) and serves tensors below it from its heap, where tensors freed between long-lived ones
    leave holes that stay resident: with many forwards waiting at once (the block driver's lanes)
    that was +700 MB for SmolLM2-135M. For the rest of the process; a no-op elsewhere."""
    global _mmap_threshold
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
        _mmap_threshold = int(threshold)


@contextmanager
def heap_allocations(threshold: int = 4 * 2**20) -> Iterator[None]:
    """Serve allocations below ``threshold`` bytes from glibc's heap while the block runs, then trim
    it. For loops that make and free the same temporaries many times (a solver's scale search):
    each one mapped afresh costs a page fault per 4 KiB, which made GPTQ's weighted scale search 75%
    system time (eval/solver_allocations.py). Larger allocations (whole-matrix copies) keep their own
    pages, returned as soon as they are freed: with every size served from the heap the reference
    model's GPTQ peaked 58 MB higher and ran slower (eval/gguf.md). Afterwards the thresholds are what
    they were and the freed heap goes back to the system, so nothing stays resident."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, max(int(threshold), _mmap_threshold))
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)  # or the heap's top is returned (and faulted in again) per free
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
        libc.malloc_trim(0)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """``"1.5GB"`` -> 1500000000, ``"800MiB"``, ``"2e9"``: a size in bytes (decimal units, or binary with i)."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"not a size: {text!r} (examples: 1.5GB, 800MB, 2GiB)")
    try:
        value = float(m.group(1)) * _UNITS[unit]
    except ValueError:
        raise UserError(f"not a size: {text!r} (examples: 1.5GB, 800MB, 2GiB)") from None
    if value <= 0:
        raise UserError(f"a size must be positive, got {text!r}")
    return int(value)


def partial_dir(out: Path) -> Path:
    """Where an output folder is built before it is renamed into place (and where resume looks)."""
    return out.parent / f".{out.name}.partial"


def check_output(out: Path, force: bool, resume: bool = False) -> None:
    """Refuse, before any work, an output that would be overwritten, left half-done, or cannot be written."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {out}: {parent} is not writable (read-only file system or permissions)")
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; pass --force to overwrite it")
    part = partial_dir(out)
    if part.exists() and not (force or resume):
        raise UserError(f"an interrupted run left {part}; pass --resume to continue it or --force to start over")


@contextmanager
def staged_output(out: Path, force: bool, resume: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``out`` in one rename, on failure it stays
    (for ``--resume``) and ``out`` is untouched."""
    out = Path(out)
    check_output(out, force, resume)
    part = partial_dir(out)
    if part.exists() and not resume:
        shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    yield part
    _usual_permissions(part)
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        part.rename(out)
        shutil.rmtree(old)
    else:
        part.rename(out)


def _usual_permissions(folder: Path) -> None:
    """Give every file the mode a plain ``open`` would (0644 under the usual umask).

    Some writers (transformers' safetensors saving among them) create files through ``mkstemp``,
    which makes them 0600: a checkpoint another user or a serving container cannot read.
    """
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)
