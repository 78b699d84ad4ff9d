"""Small helpers shared across stages: atomic writes, output folders that appear only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def partial_dir(out: Path) -> Path:
    """Where an output folder is built before it is renamed into place (and where resume looks)."""
    return out.parent / f".{out.name}.partial"


def check_output(out: Path, force: bool, resume: bool = False) -> None:
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
