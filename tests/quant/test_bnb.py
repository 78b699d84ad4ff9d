"""bitsandbytes checkpoints: save -> load round trip, plain transformers, options, filter, errors.

Everything runs on tiny random models saved as HF folders (no download). The tiny Llama's
linears are 64/128 wide, which bitsandbytes' CPU 4-bit kernels take (inputs a multiple of 64,
outputs a multiple of 32); ``odd_folder`` has layers they do not take.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from llmslim.config import BnbConfig, LayerFilter  # noqa: E402
from llmslim.errors import UserError  # noqa: E402
from llmslim.formats.bnb import cpu_state, to_fast_state  # noqa: E402
from llmslim.loader import load  # noqa: E402
from llmslim.models import read_config  # noqa: E402
from llmslim.pipeline.run import quantize_to_folder  # noqa: E402
from llmslim.quant.bnb import bnb_quantization_config, plan_layers, storage_dtype  # noqa: E402

CONFIGS = {
    "nf4": BnbConfig("nf4"),
    "fp4": BnbConfig("fp4"),
    "nf4-dq": BnbConfig("nf4", double_quant=True),
    "int8": BnbConfig("int8"),
}
IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 128, 1]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def in_memory(folder, config: BnbConfig) -> nn.Module:
    """The model bitsandbytes quantizes in memory, exactly as quantize_to_folder asks for it."""
    from transformers import AutoModelForCausalLM

    _, skipped, _ = plan_layers(read_config(str(folder)), config)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=storage_dtype(config),
                                                 quantization_config=bnb_quantization_config(config, skipped))
    return to_fast_state(model)


def assert_fast(model: nn.Module) -> None:
    state = cpu_state(model)
    assert state["training"] == 0
    if state["cpu_has_fast_kernel"]:  # AVX512-BF16 CPUs: every 4-bit layer already repacked
        assert state["repacked"] == state["linear4bit"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_gives_identical_logits(tiny_folder, tmp_path, name):
    src = tiny_folder("llama")
    config = CONFIGS[name]
    out = tmp_path / name
    summary = quantize_to_folder(str(src), out, config)

    assert summary["method"] == config.quant_type
    assert summary["skipped"] == ["lm_head"]
    assert len(summary["layers"]) == 2 * 7
    assert 0 < summary["bytes_after"] < summary["bytes_before"]
    assert json.loads((out / "quant_log.json").read_text())["bytes_after"] == summary["bytes_after"]

    reference = logits(in_memory(src, config))
    model, tokenizer = load(str(out), dtype=storage_dtype(config))  # same float dtype as in memory
    assert_fast(model)
    kind = bnb.nn.Linear8bitLt if config.quant_type == "int8" else bnb.nn.Linear4bit
    assert isinstance(model.model.layers[1].mlp.down_proj, kind)
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(logits(model), reference)
    assert tokenizer.encode("Once upon a time") == tokenizer.__class__.from_pretrained(src).encode("Once upon a time")

    # The default float32 load computes the float parts in fp32: close, not identical.
    model32, _ = load(str(out))
    assert_fast(model32)
    torch.testing.assert_close(logits(model32), reference.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plain_transformers_loads_the_checkpoint(tiny_folder, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = CONFIGS[name]
    out = tmp_path / name
    quantize_to_folder(str(tiny_folder("llama")), out, config)
    plain = AutoModelForCausalLM.from_pretrained(out)  # no dtype, no quantization_config: all from config.json
    assert plain.dtype == storage_dtype(config)
    assert plain.is_quantized
    ours, _ = load(str(out), dtype=storage_dtype(config))
    assert torch.equal(logits(plain), logits(ours))
    assert AutoTokenizer.from_pretrained(out).encode("the lazy dog")


@pytest.mark.parametrize("config,expected", [
    (BnbConfig("nf4"), {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
                        "bnb_4bit_compute_dtype": "bfloat16"}),
    (BnbConfig("fp4", compute_dtype="fp32"), {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                              "bnb_4bit_compute_dtype": "float32"}),
    (BnbConfig("nf4", double_quant=True, compute_dtype="fp16"),
     {"bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float16"}),
    (BnbConfig("int8"), {"load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": 6.0}),
    (BnbConfig("int8", int8_threshold=3.5), {"load_in_8bit": True, "llm_int8_threshold": 3.5}),
])
def test_each_option_is_recorded_in_config_json(tiny_folder, tmp_path, config, expected):
    out = tmp_path / "q"
    quantize_to_folder(str(tiny_folder("llama")), out, config)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    assert qc["llm_int8_skip_modules"] == ["lm_head"]
    for key, value in expected.items():
        assert qc[key] == value, key
    if config.quant_type != "int8":
        model, _ = load(str(out))
        assert model.model.layers[0].self_attn.q_proj.compute_dtype == {
            "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[config.compute_dtype]
    else:
        model, _ = load(str(out))
        assert model.model.layers[0].self_attn.q_proj.state.threshold == config.int8_threshold


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_module_filter_keeps_excluded_layers_in_float(tiny_folder, tmp_path, method):
    from transformers import AutoModelForCausalLM

    config = BnbConfig(method, layers=LayerFilter(exclude=("model.layers.0.mlp.*",)))
    out = tmp_path / "q"
    summary = quantize_to_folder(str(tiny_folder("llama")), out, config)
    kept = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert summary["skipped"] == ["lm_head", *kept]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == [
        "lm_head", *kept]
    for model in (load(str(out))[0], AutoModelForCausalLM.from_pretrained(out)):
        for name in kept:
            assert type(model.get_submodule(name)) is nn.Linear, name
        for name in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
            assert isinstance(model.get_submodule(name), bnb.nn.Linear4bit | bnb.nn.Linear8bitLt), name
        assert torch.isfinite(logits(model)).all()


def test_include_filter_and_lm_head(tiny_folder):
    src = tiny_folder("llama")
    hf_config = read_config(str(src))
    layers, skipped, _ = plan_layers(hf_config, BnbConfig("nf4", layers=LayerFilter(include=("*.self_attn.*",))))
    assert {x["name"].split(".")[-1] for x in layers} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert "lm_head" in skipped and "model.layers.1.mlp.up_proj" in skipped
    layers, skipped, _ = plan_layers(hf_config, BnbConfig("nf4", layers=LayerFilter(quantize_lm_head=True)))
    assert "lm_head" in [x["name"] for x in layers] and skipped == []


def test_quantized_lm_head_round_trip(tiny_folder, tmp_path):
    out = tmp_path / "q"
    quantize_to_folder(str(tiny_folder("llama")), out, BnbConfig("nf4", layers=LayerFilter(quantize_lm_head=True)))
    model, _ = load(str(out))
    assert isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert torch.isfinite(logits(model)).all()


def test_tied_lm_head_cannot_be_quantized(tmp_path):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    src = tmp_path / "tied"
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    with pytest.raises(UserError, match="tied"):
        quantize_to_folder(str(src), tmp_path / "q", BnbConfig("nf4", layers=LayerFilter(quantize_lm_head=True)))
    assert not (tmp_path / "q").exists()


@pytest.fixture
def odd_folder(tmp_path):
    """A Llama whose 96-wide layers bitsandbytes' CPU 4-bit kernels cannot run (96 % 64 != 0)."""
    import transformers as T

    from tests.conftest import make_tiny_tokenizer

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "odd"
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_4bit_keeps_layers_the_cpu_kernels_cannot_run_in_float(odd_folder, tmp_path, capsys):
    summary = quantize_to_folder(str(odd_folder), tmp_path / "q", BnbConfig("nf4"))
    assert [x["name"] for x in summary["layers"]] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "model.layers.0.self_attn.q_proj" in summary["skipped"]
    assert "kept in float" in capsys.readouterr().out
    model, _ = load(str(tmp_path / "q"))  # every layer left quantized runs in the fast CPU state
    assert_fast(model)
    assert torch.isfinite(logits(model)).all()
    # LLM.int8 has no such limit
    summary = quantize_to_folder(str(odd_folder), tmp_path / "q8", BnbConfig("int8"))
    assert summary["skipped"] == ["lm_head"]


def test_missing_bitsandbytes_says_how_to_install(tiny_folder, tmp_path, monkeypatch):
    src = tiny_folder("llama")
    quantize_to_folder(str(src), tmp_path / "q", BnbConfig("nf4"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # "import bitsandbytes" now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'llmslim\[bnb\]'"):
        quantize_to_folder(str(src), tmp_path / "q2", BnbConfig("nf4"))
    assert not (tmp_path / "q2").exists()
    with pytest.raises(UserError, match=r"pip install 'llmslim\[bnb\]'"):
        load(str(tmp_path / "q"))


def test_existing_output_needs_force(tiny_folder, tmp_path):
    src = tiny_folder("llama")
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        quantize_to_folder(str(src), out, BnbConfig("nf4"))
    assert (out / "keep.txt").read_text() == "mine"
    quantize_to_folder(str(src), out, BnbConfig("nf4"), force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".q.*"))  # no staging folder left behind


def test_unsupported_combinations_are_named(tiny_folder, tmp_path):
    src = tiny_folder("llama")
    with pytest.raises(UserError, match="--compute-dtype applies to --method nf4/fp4 only"):
        quantize_to_folder(str(src), tmp_path / "q", BnbConfig("int8", compute_dtype="fp32"))
    with pytest.raises(UserError, match="--double-quant"):
        BnbConfig("int8", double_quant=True)
    with pytest.raises(UserError, match="no linear layer"):
        quantize_to_folder(str(src), tmp_path / "q", BnbConfig("nf4", layers=LayerFilter(include=("nothing",))))
    quantize_to_folder(str(src), tmp_path / "q", BnbConfig("nf4"))
    with pytest.raises(UserError, match="already quantized"):
        quantize_to_folder(str(tmp_path / "q"), tmp_path / "q2", BnbConfig("int8"))
    assert not (tmp_path / "q2").exists()


def test_pickle_sources_are_refused_unless_allowed(tiny_folder, tmp_path):
    from tests.conftest import make_tiny_model

    src = tiny_folder("llama", name="pickled")
    (src / "model.safetensors").unlink()
    torch.save(make_tiny_model("llama").state_dict(), src / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        quantize_to_folder(str(src), tmp_path / "q", BnbConfig("nf4"))
    assert not (tmp_path / "q").exists()
    quantize_to_folder(str(src), tmp_path / "q", BnbConfig("nf4"), allow_pickle=True)
    assert (tmp_path / "q" / "model.safetensors").exists()  # the output is safetensors either way
