"""Models bigger than memory: read a safetensors checkpoint tensor by tensor, write one the same way.

``WeightSource`` indexes the shards of a checkpoint by their headers (``safe_open``; nothing is
read) and hands out single tensors, or rows of one, opening a shard only for as long as a read
takes, so no shard stays mapped. ``empty_model`` builds the model with every parameter on the
``meta`` device (accelerate's ``init_empty_weights``: no memory); ``materialize`` fills one
submodule from the source (accelerate's ``set_module_tensor_to_device``) and ``release`` empties
it again.

``ShardWriter`` (``llmslim.shards``) writes the output the same way: tensor by tensor, in any
order, into shards planned as ``save_pretrained`` plans them, byte for byte what it writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..shards import ShardWriter, safetensors_header, torch_dtype

__all__ = ["WeightSource", "ShardWriter", "safetensors_header", "empty_model", "checkpoint_names", "as_saved",
           "materialize", "release"]
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
                        self.dtype[key] = torch_dtype(s.get_dtype())
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

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor ``name`` into ``out`` (converted to its dtype, as ``load_state_dict`` copies) and
        return ``out``. The stored tensor is a view of the mapped shard, mapped only for this copy: its
        pages are the one extra tensor a load holds, never a second copy of the checkpoint."""
        if tuple(out.shape) != self.shape[name]:
            raise UserError(f"{self.folder}: weights do not match the model config: {name} has shape "
                            f"{self.shape[name]}, the model {tuple(out.shape)}")
        with self._open(self.file[name]) as f:
            out.copy_(f.get_tensor(name))
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


