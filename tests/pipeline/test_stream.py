"""Models bigger than memory: the block-by-block path writes the same bytes as the in-memory path
(every architecture, GPTQ and RTN, one shard or many), never holds more than one block, spills
activations to disk with the same result, resumes, and takes --max-memory and --device."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmslim.cli import main
from llmslim.config import CalibConfig, GPTQConfig, LayerFilter, RTNConfig
from llmslim.errors import UserError
from llmslim.pipeline.recipe import Recipe
from llmslim.pipeline.run import compress_to_folder
from tests.conftest import ARCHS, BlockCrash


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times."
                                for i in range(400)))
    return path


def digest(folder: Path) -> dict[str, str]:
    """Every file of a checkpoint but the log (which holds timings)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "quant_log.json"}


def both_paths(src, recipe: Recipe, root: Path, **kw) -> tuple[dict, dict]:
    compress_to_folder(str(src), recipe, root / "memory", stream=False, **kw)
    compress_to_folder(str(src), recipe, root / "streamed", stream=True, **kw)
    return digest(root / "memory"), digest(root / "streamed")


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_gptq_is_byte_identical_to_in_memory(tiny_folder, tmp_path, calib_file, arch):
    src = tiny_folder(arch)
    recipe = Recipe((GPTQConfig(bits=4, group_size=32),), CalibConfig(str(calib_file), 8, 32))
    memory, streamed = both_paths(src, recipe, tmp_path, batch_size=4)
    assert "model.safetensors" in memory and memory == streamed


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_bf16_forwards_are_byte_identical_to_in_memory(tiny_folder, tmp_path, calib_file, arch):
    """--forward-dtype bf16: the streamed path (embeddings row by row, blocks loaded one at a time)
    and the in-memory one run the same bf16 forwards: the same bytes, and not fp32's."""
    src = tiny_folder(arch)
    calib = CalibConfig(str(calib_file), 8, 32)
    memory, streamed = both_paths(src, Recipe((GPTQConfig(bits=4, group_size=32, forward_dtype="bf16"),), calib),
                                  tmp_path, batch_size=4)
    assert memory == streamed
    compress_to_folder(str(src), Recipe((GPTQConfig(bits=4, group_size=32, forward_dtype="fp32"),), calib),
                       tmp_path / "fp32", batch_size=4)
    fp32 = digest(tmp_path / "fp32")
    assert memory["model.safetensors"] != fp32["model.safetensors"]
    assert "forward_dtype: bf16" in (tmp_path / "streamed" / "recipe.yaml").read_text()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D layers and a tied lm_head
def test_streamed_rtn_with_lm_head_is_byte_identical(tiny_folder, tmp_path, arch):
    src = tiny_folder(arch)
    recipe = Recipe((RTNConfig(bits=8, group_size=-1, layers=LayerFilter(quantize_lm_head=True)),))
    memory, streamed = both_paths(src, recipe, tmp_path)
    assert memory == streamed
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is True


def test_many_shards_with_index_identical_and_loadable(tmp_path, calib_file, monkeypatch):
    """A sharded source and sharded output (tiny shards stand in for 2 GB ones): the same shard
    files and index as save_pretrained's, and llmslim's loader reads them."""
    from llmslim.formats import gptq
    from llmslim.loader import load
    from tests.conftest import make_tiny_model, make_tiny_tokenizer

    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src, max_shard_size="50KB")
    make_tiny_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").exists()
    monkeypatch.setattr(gptq, "MAX_SHARD_SIZE", "30KB")
    recipe = Recipe((GPTQConfig(bits=3, group_size=32, desc_act=True),), CalibConfig(str(calib_file), 8, 32))
    memory, streamed = both_paths(src, recipe, tmp_path, batch_size=4)
    shards = [n for n in streamed if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]
    assert len(shards) > 2 and "model.safetensors.index.json" in streamed and memory == streamed
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(shards)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    a, _ = load(str(tmp_path / "memory"))
    b, _ = load(str(tmp_path / "streamed"))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("forward_dtype", ["fp32", "bf16"])
def test_disk_spill_equals_in_memory(tiny_folder, tmp_path, calib_file, monkeypatch, forward_dtype):
    """Activations beyond a quarter of --max-memory go to files (bf16 ones with bf16 forwards): the
    checkpoint does not change."""
    from llmslim.quant import sequential

    spilled = []
    real = sequential.Activations.__init__

    def record(self, spill=None, count=0):
        spilled.append(spill)
        real(self, spill, count)

    monkeypatch.setattr(sequential.Activations, "__init__", record)
    src = tiny_folder("llama")
    recipe = Recipe((GPTQConfig(bits=4, group_size=32, forward_dtype=forward_dtype),), CalibConfig(str(calib_file), 8, 32))
    for name, budget in [("in-memory", 1e12), ("on-disk", 1e5)]:
        spilled.clear()
        compress_to_folder(str(src), recipe, tmp_path / name, batch_size=2, max_memory=budget)
        assert any(spilled) == (name == "on-disk")
    assert digest(tmp_path / "in-memory") == digest(tmp_path / "on-disk")


def test_one_block_in_memory_and_never_the_whole_model(tiny_folder, tmp_path, calib_file, monkeypatch):
    from llmslim.pipeline import run, stream

    def no_whole_model(*a, **k):
        raise AssertionError("the streamed path loaded the whole model")

    monkeypatch.setattr(run, "load_hf", no_whole_model)
    seen = []
    real_load = stream._BlockIO.load

    def load(self, i, block):
        real_load(self, i, block)
        loaded = [j for j, b in enumerate(self.run.blocks)
                  if any(p.device.type != "meta" for p in b.parameters())]
        seen.append(loaded)
        embedding = self.run.model.get_input_embeddings().weight
        assert embedding.device.type == "meta"  # read row by row, never whole

    monkeypatch.setattr(stream._BlockIO, "load", load)
    src = tiny_folder("llama")
    recipe = Recipe((GPTQConfig(bits=4, group_size=32),), CalibConfig(str(calib_file), 8, 32))
    compress_to_folder(str(src), recipe, tmp_path / "out")
    assert seen == [[0], [1]]


@pytest.mark.parametrize("forward_dtype", ["fp32", "bf16"])
def test_streamed_resume_with_spilled_activations(tiny_folder, tmp_path, calib_file, monkeypatch, forward_dtype):
    """Killed after block 0 with activations on disk; --resume ends with the same bytes."""

    src = tiny_folder("llama")
    recipe = Recipe((GPTQConfig(bits=4, group_size=32, forward_dtype=forward_dtype),), CalibConfig(str(calib_file), 8, 32))
    kw = dict(batch_size=2, max_memory=1e5)
    compress_to_folder(str(src), recipe, tmp_path / "clean", **kw)
    BlockCrash(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        compress_to_folder(str(src), recipe, tmp_path / "resumed", **kw)
    activations = tmp_path / ".resumed.partial" / "_state" / "stage_0" / "activations"
    kept = {load_file(f)["h"].dtype for f in activations.rglob("*.safetensors")}  # what the resume reads
    assert kept == {torch.bfloat16 if forward_dtype == "bf16" else torch.float32}
    compress_to_folder(str(src), recipe, tmp_path / "resumed", resume=True, **kw)
    assert digest(tmp_path / "clean") == digest(tmp_path / "resumed")


def test_what_is_not_streamed_falls_back_or_is_named(tiny_folder, tmp_path, calib_file):
    src = tiny_folder("llama")
    lm_head = Recipe((GPTQConfig(bits=4, group_size=32, layers=LayerFilter(quantize_lm_head=True)),),
                     CalibConfig(str(calib_file), 8, 32))
    with pytest.raises(UserError, match="lm_head"):
        compress_to_folder(str(src), lm_head, tmp_path / "o", stream=True)
    compress_to_folder(str(src), lm_head, tmp_path / "o")  # auto: loads the model whole instead


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err, err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line_exit_2(tiny_folder, tmp_path, calib_file, capsys):
    src = tiny_folder("llama")
    for cmd in (["quantize", str(src), "--method", "gptq"], ["prune", str(src), "--method", "wanda", "--sparsity",
                                                               "0.5"]):
        capsys.readouterr()
        assert main([*cmd, "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "32", "--device", "cuda",
                     "--out", str(tmp_path / "o")]) == 2
        assert "no CUDA GPU" in one_error_line(capsys.readouterr().err)
        assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_device_and_memory_flags(tiny_folder, tmp_path, calib_file, capsys):
    """--device auto/cpu and --max-memory give the default's bytes; flags a method would ignore are refused."""
    src = tiny_folder("llama")
    base = ["quantize", str(src), "--method", "gptq", "--group-size", "32", "--calib", str(calib_file),
            "--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    if not torch.cuda.is_available():
        assert main([*base, "--device", "auto", "--max-memory", "1.5GB", "--out", str(tmp_path / "auto")]) == 0
        assert digest(tmp_path / "auto") == digest(tmp_path / "default")
    for cmd, needle in [([*base, "--max-memory", "lots"], "not a size"),
                        (["quantize", str(src), "--method", "rtn", "--device", "cpu", "--max-memory", "1GB"], None),
                        (["quantize", str(src), "--method", "rtn", "--device", "auto"], "does not use --device"),
                        (["quantize", str(src), "--method", "nf4", "--max-memory", "1GB"], "--max-memory"),
                        (["prune", str(src), "--method", "depth", "--drop-blocks", "1", "--device", "auto"],
                         "does not use --device")]:
        capsys.readouterr()
        out = tmp_path / f"o{len(needle or '')}"
        rc = main([*cmd, "--out", str(out)])
        if needle is None:
            assert rc == 0
            continue
        assert rc == 2 and needle in one_error_line(capsys.readouterr().err)


def test_resolve_device():
    from llmslim.quant.sequential import resolve_device

    assert resolve_device("cpu") == "cpu" and resolve_device(None) == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device must be"):
        resolve_device("tpu")


def test_parse_size():
    from llmslim.util import parse_size

    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("800MiB") == 800 * 2**20
    assert parse_size("2e9") == 2_000_000_000 and parse_size("1024") == 1024
    for bad in ("lots", "-1GB", "0", "1.5XB"):
        with pytest.raises(UserError):
            parse_size(bad)


@pytest.mark.parametrize("batch_size", [None, 4])  # one forward per block, or a forward per group
def test_the_device_code_path_gives_the_same_result(batch_size):
    """device="cpu:0" takes every branch a GPU takes (blocks and kwargs moved, solvers under the
    device context, activations back to CPU memory) on the CPU: the same tensors, bit for bit."""
    from llmslim.config import PruneConfig
    from llmslim.quant.prune import prune_blocks
    from llmslim.quant.sequential import gptq_blocks
    from tests.conftest import make_tiny_model

    calib = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    for run in (lambda m, **kw: gptq_blocks(m, GPTQConfig(bits=4, group_size=32), calib, batch_size=batch_size,
                                            log=lambda s: None, **kw),
                lambda m, **kw: prune_blocks(m, PruneConfig("sparsegpt", nm="2:4"), calib, batch_size=batch_size,
                                             **kw)):
        here, there = make_tiny_model("llama"), make_tiny_model("llama")
        run(here)
        run(there, device="cpu:0")
        a, b = here.state_dict(), there.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
