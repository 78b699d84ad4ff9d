"""Reading a checkpoint tensor by tensor and writing one the same way (llmslim.formats.stream):
the writer's files are byte for byte what safetensors and ``save_pretrained`` write, and
transformers loads what it writes."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmslim.errors import UserError
from llmslim.formats import stream
from llmslim.formats.stream import ShardWriter, WeightSource, empty_model
from tests.conftest import make_tiny_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.int16, torch.int8,
          torch.uint8, torch.bool, torch.float64]


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = {}
    for i in range(12):
        dtype = rng.choice(DTYPES)
        shape = rng.choice([(), (0,), (3,), (5, 7), (2, 3, 4), (1, 9)])
        t = torch.randn(shape, generator=g) * 10
        out[f"t{rng.randint(0, 99)}.{i}"] = t.to(dtype) if dtype != torch.bool else t > 0
    return out


@pytest.mark.parametrize("seed", range(5))
def test_written_piecewise_in_any_order_equals_save_file(tmp_path, seed):
    tensors = random_tensors(seed)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    (tmp_path / "ours").mkdir()
    writer = ShardWriter(tmp_path / "ours", tensors, max_shard_size="10GB")
    names = list(tensors)
    random.Random(seed).shuffle(names)
    for n in names:
        t = tensors[n]
        if t.dim() and t.shape[0] > 1:  # in two pieces of rows, the second first
            writer.write(n, t[1:], first_row=1)
            writer.write(n, t[:1], first_row=0)
        else:
            writer.write(n, t)
    assert writer.close() == ["model.safetensors"]
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_unwritten_tensor_and_wrong_dtype_are_caught(tmp_path):
    tensors = {"a": torch.zeros(2, 2), "b": torch.ones(3, dtype=torch.int32)}
    writer = ShardWriter(tmp_path, tensors)
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(2, 2, dtype=torch.float16))
    writer.write("a", tensors["a"])
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    writer.abort()


def test_shards_and_index_equal_save_pretrained_and_load_in_transformers(tmp_path):
    """A float model's tensors through the writer: the same shards and index as save_pretrained,
    and transformers loads the folder."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "ref", max_shard_size="40KB")
    ours = tmp_path / "ours"
    ours.mkdir()
    state = model.state_dict()
    writer = ShardWriter(ours, {k: v.to("meta") for k, v in state.items()}, "40KB",
                         total_parameters=model.num_parameters())
    for k in reversed(list(state)):
        writer.write(k, state[k])
    files = writer.close()
    ref = sorted(p.name for p in (tmp_path / "ref").glob("model*"))
    assert sorted(files) == ref and len(ref) > 2 and "model.safetensors.index.json" in ref
    for name in ref:
        assert (ours / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    (ours / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(ours)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_source_reads_shards_one_tensor_at_a_time(tmp_path, monkeypatch):
    model = make_tiny_model("gpt2")
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    source = WeightSource(tmp_path)
    assert set(source.file) == set(index["weight_map"])
    state = model.state_dict()
    name = "transformer.wte.weight"
    got = source.get([name, "transformer.h.1.mlp.c_fc.weight"], torch.float64)
    assert got[name].dtype == torch.float64 and torch.equal(got[name].float(), state[name])
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1000)  # many pieces of rows
    ids = torch.tensor([[5, 319, 5, 0], [17, 200, 64, 63]])
    assert torch.equal(source.gather_rows(name, ids, torch.float32), state[name][ids])
    assert source.nbytes() == sum(v.numel() * v.element_size() for k, v in state.items() if k in source)


def test_corrupt_shard_is_one_user_error(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt"):
        WeightSource(tmp_path)


def test_empty_model_holds_no_weights_and_ties_like_from_pretrained():
    cfg = make_tiny_model("opt").config
    model = empty_model(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert not model.training


def test_files_are_loadable_by_safetensors_after_partial_rows(tmp_path):
    t = torch.arange(40, dtype=torch.float16).reshape(10, 4)
    writer = ShardWriter(tmp_path, {"w": t})
    for start in (8, 0, 4):
        writer.write("w", t[start:start + 4], first_row=start)
    writer.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], t)
