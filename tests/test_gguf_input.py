"""A GGUF model as input: converted once into a cached HF folder, tensor by tensor (never the whole
model in float32), with exactly the tensors and config transformers' own GGUF loader produces."""

from __future__ import annotations

import json

import pytest
import torch

from llmslim.config import ExportConfig
from llmslim.formats.hf import read_safetensors
from llmslim.models import gguf_by_tensor, gguf_to_folder
from llmslim.pipeline.run import export_to_file
from tests.formats.test_gguf import needs_llama_cpp, spm_folder  # noqa: F401 - spm_folder is a fixture


def transformers_reads(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, {k: v for k, v in model.state_dict().items()}


@needs_llama_cpp
@pytest.mark.parametrize("arch,kind", [("llama", "q4_0"), ("qwen2", "q8_0"), ("gemma2", "f16")])
def test_tensor_by_tensor_equals_transformers_gguf_loader(spm_folder, tmp_path, arch, kind,  # noqa: F811
                                                          monkeypatch):
    src = spm_folder(arch)
    gguf_file = tmp_path / f"{arch}.gguf"
    export_to_file(str(src), ExportConfig(type=kind), gguf_file)
    out = tmp_path / "converted"
    out.mkdir()
    assert gguf_by_tensor(gguf_file, out)
    ours = read_safetensors(out)
    model, theirs = transformers_reads(gguf_file)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(ours) == set(theirs) - tied
    for name, t in ours.items():  # llama's q/k permutation and gemma2's norm offset undone alike
        assert t.dtype == torch.float32 and torch.equal(t, theirs[name]), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["num_hidden_layers"] == model.config.num_hidden_layers

    # gguf_to_folder uses it (and the tokenizer from the file), cached by path, size and mtime.
    monkeypatch.setenv("LLMSLIM_CACHE", str(tmp_path / "cache"))
    folder = gguf_to_folder(gguf_file)
    assert (folder / "tokenizer_config.json").exists() and read_safetensors(folder).keys() == ours.keys()
    assert gguf_to_folder(gguf_file) == folder


@needs_llama_cpp
def test_two_first_runs_at_once_both_get_the_folder(spm_folder, tmp_path):  # noqa: F811
    """Two processes converting the same GGUF at once: one converts, the other waits for it (they used
    to share one staging folder: one of them failed to read a half-written tokenizer)."""
    import os
    import subprocess
    import sys

    gguf_file = tmp_path / "llama.gguf"
    export_to_file(str(spm_folder("llama")), ExportConfig(type="q8_0"), gguf_file)
    env = dict(os.environ, LLMSLIM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    code = ("import sys; from pathlib import Path; from llmslim.models import gguf_to_folder; "
            "from transformers import AutoTokenizer; f = gguf_to_folder(Path(sys.argv[1])); "
            "AutoTokenizer.from_pretrained(str(f)); print(f)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(gguf_file)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    folders = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(folders) == 1
    assert sum("converting" in out for out, _ in results) == 1  # the other one waited, then reused it
