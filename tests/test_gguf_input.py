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
