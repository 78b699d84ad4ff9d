"""Save -> load gives the same model; the files follow the GPTQ v1 layout consumers read."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llmslim.config import GPTQConfig, RTNConfig
from llmslim.formats.gptq import save_gptq
from llmslim.loader import load
from llmslim.nn import GPTQLinear
from llmslim.pipeline.stages import quantize
from tests.conftest import make_tiny_model, make_tiny_tokenizer


def reference_dequant(qweight, qzeros, scales, g_idx, bits):
    """Dequantize as AutoGPTQ's torch path does (wf shifts, zeros + 1), for 2/4/8 bits."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32)[None, :]
    zeros = torch.bitwise_right_shift(qzeros[:, :, None].expand(-1, -1, 32 // bits), wf[None]).to(torch.int32)
    zeros = torch.bitwise_and(zeros, 2**bits - 1).reshape(qzeros.shape[0], -1) + 1
    weight = torch.bitwise_right_shift(qweight[:, None, :].expand(-1, 32 // bits, -1), wf[:, :, None]).to(torch.int32)
    weight = torch.bitwise_and(weight, 2**bits - 1).reshape(-1, qweight.shape[1])
    return (scales[g_idx.long()].float() * (weight - zeros[g_idx.long()]).float()).T


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_same_outputs(tmp_path, arch, bits):
    model = make_tiny_model(arch)
    ids = torch.randint(0, 320, (4, 24))
    config = GPTQConfig(bits=bits, group_size=32, desc_act=(bits == 4), sym=(bits != 3))
    quantize(model, config, ids)
    with torch.inference_mode():
        expected = model(ids).logits
    save_gptq(model, make_tiny_tokenizer(), tmp_path / "ckpt", config)
    loaded, tok = load(str(tmp_path / "ckpt"))
    with torch.inference_mode():
        got = loaded(ids).logits
    # non-quantized tensors are stored in fp16, like every GPTQ checkpoint
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    assert sum(isinstance(m, GPTQLinear) for m in loaded.modules()) == {"opt": 12, "gpt2": 8}.get(arch, 14)
    assert tok("hello").input_ids


def test_files_follow_gptq_v1(tmp_path):
    model = make_tiny_model("qwen2")
    config = RTNConfig(bits=4, group_size=32, sym=False)
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    quantize(model, config)
    save_gptq(model, make_tiny_tokenizer(), tmp_path, config)
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    for key in ("bits", "group_size", "desc_act", "sym", "true_sequential", "damp_percent", "static_groups"):
        assert key in qc
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert json.loads((tmp_path / "quantize_config.json").read_text())["bits"] == 4
    t = load_file(tmp_path / "model.safetensors")
    p = "model.layers.0.self_attn.q_proj"
    assert t[f"{p}.qweight"].dtype == torch.int32 and t[f"{p}.qweight"].shape == (64 * 4 // 32, 64)
    assert t[f"{p}.qzeros"].shape == (2, 64 * 4 // 32)
    assert t[f"{p}.scales"].dtype == torch.float16 and t[f"{p}.scales"].shape == (2, 64)
    assert t[f"{p}.g_idx"].tolist() == [i // 32 for i in range(64)]
    assert f"{p}.bias" in t  # qwen2 q_proj has a bias
    # an independent dequantizer (AutoGPTQ's) reads our bits back to the RTN weights
    W_hat = reference_dequant(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], t[f"{p}.g_idx"], 4)
    step = t[f"{p}.scales"].float().max()
    assert (W_hat - W).abs().max() <= step / 2 + 1e-3


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_full_range_grid_round_trips_with_signed_scales(tmp_path, method):
    """The full-range symmetric grid stores a signed fp16 scale per group (AutoRound's and llama.cpp's
    convention); a v1 reader's dequantization, scale * (q - zero), reads it back unchanged."""
    model = make_tiny_model("llama")
    ids = torch.randint(0, 320, (4, 24))
    grid = dict(bits=4, group_size=32, full_range=True)
    config = RTNConfig(**grid) if method == "rtn" else GPTQConfig(**grid)
    W = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    quantize(model, config, ids)
    with torch.inference_mode():
        expected = model(ids).logits
    save_gptq(model, make_tiny_tokenizer(), tmp_path, config)
    t = load_file(tmp_path / "model.safetensors")
    p = "model.layers.0.mlp.down_proj"
    assert (t[f"{p}.scales"] < 0).any() and (t[f"{p}.scales"] > 0).any()
    W_hat = reference_dequant(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], t[f"{p}.g_idx"], 4)
    if method == "rtn":  # each group's extreme sits exactly on the grid
        ext = W.reshape(W.shape[0], -1, 32).abs().amax(-1)
        got = W_hat.reshape(W.shape[0], -1, 32).abs().amax(-1)
        torch.testing.assert_close(got, ext, rtol=1e-3, atol=1e-6)
    loaded, _ = load(str(tmp_path))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=2e-2, atol=2e-2)


def test_partial_last_group(tmp_path):
    """Group size not dividing the input size (SmolLM2 576 at g128): last group is partial."""
    model = make_tiny_model("llama")  # hidden 64, intermediate 128
    ids = torch.randint(0, 320, (2, 16))
    config = GPTQConfig(bits=4, group_size=48)
    quantize(model, config, ids)
    q = model.model.layers[0].self_attn.q_proj
    assert q.scales.shape == (2, 64) and q.g_idx.max() == 1
    save_gptq(model, make_tiny_tokenizer(), tmp_path, config)
    loaded, _ = load(str(tmp_path))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=2e-2, atol=2e-2)


def test_decoded_weights_give_identical_outputs():
    from llmslim.nn import decoded_weights

    model = make_tiny_model("llama")
    ids = torch.randint(0, 320, (2, 16))
    quantize(model, RTNConfig(bits=3, group_size=32))
    with torch.inference_mode():
        ref = model(ids).logits
        with decoded_weights(model):
            fast = model(ids).logits
        assert all(m._decoded is None for m in model.modules() if isinstance(m, GPTQLinear))
    assert torch.equal(ref, fast)


def test_gptq_lm_head_round_trip(tmp_path):
    from llmslim.config import LayerFilter

    model = make_tiny_model("llama")
    ids = torch.randint(0, 320, (4, 24))
    config = GPTQConfig(bits=8, group_size=32, layers=LayerFilter(quantize_lm_head=True))
    report = quantize(model, config, ids)
    assert isinstance(model.lm_head, GPTQLinear) and report.layers[-1]["name"] == "lm_head"
    with torch.inference_mode():
        expected = model(ids).logits
    save_gptq(model, make_tiny_tokenizer(), tmp_path, config)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["lm_head"] is True
    loaded, _ = load(str(tmp_path))
    assert isinstance(loaded.lm_head, GPTQLinear)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=2e-2, atol=2e-2)


def test_tied_embeddings_stored_once(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 320, (2, 16))
    config = RTNConfig(bits=4, group_size=32)
    quantize(model, config)
    save_gptq(model, make_tiny_tokenizer(), tmp_path, config)
    t = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in t and "model.embed_tokens.weight" in t
    loaded, _ = load(str(tmp_path))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=2e-2, atol=2e-2)


def test_config_records_the_reordering_actually_used():
    """desc_act switches group-aware reordering off; the saved config must say so (GPTQModel
    refuses to load a config with both on)."""
    from llmslim.formats.gptq import quantization_config

    meta = quantization_config(GPTQConfig(bits=4, group_size=32, desc_act=True), [], False)["meta"]
    assert meta["act_group_aware"] is False
    meta = quantization_config(GPTQConfig(bits=4, group_size=32), [], False)["meta"]
    assert meta["act_group_aware"] is True


def whole_file_load(folder, dtype):
    """The loader as it was before tensor-by-tensor reading: every tensor of the file in memory, a
    model with real (uninitialized) float linears, GPTQ layers swapped in, ``load_state_dict``."""
    from llmslim.formats.gptq import layer_grid
    from llmslim.formats.hf import empty_model
    from llmslim.models import read_config
    from llmslim.pack import pack, unpack
    from llmslim.quant.walk import linear_shape, set_module

    config = read_config(str(folder))
    qc = config.quantization_config
    del config.quantization_config
    weights = load_file(folder / "model.safetensors")
    model = empty_model(config, dtype)
    for name in sorted(k[: -len(".qweight")] for k in weights if k.endswith(".qweight")):
        in_f, out_f = linear_shape(model.get_submodule(name))
        bits, group = layer_grid(qc, name)
        set_module(model, name, GPTQLinear(in_f, out_f, bits, group, f"{name}.bias" in weights))
        if qc.get("checkpoint_format") == "gptq_v2":
            weights[f"{name}.qzeros"] = pack(unpack(weights[f"{name}.qzeros"], bits, 1) - 1, bits, 1)
    model.load_state_dict(weights, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])  # tied embedding; q/k/v biases
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_by_tensor_load_equals_the_whole_file_load(tmp_path, arch, tied, v2, dtype):
    """``load_gptq`` reads one tensor at a time into its final buffer (issue 16: the load held the file's
    tensors and the model's copies at once): every tensor, its dtype, its parameter-ness and the ties
    are what loading the whole file with ``load_state_dict`` gives, for v1 and v2 checkpoints, mixed
    grids, fp32 and bf16."""
    from llmslim.pack import pack, unpack

    model = make_tiny_model(arch)
    model.config.tie_word_embeddings = tied
    if tied:
        model.tie_weights()
    config = GPTQConfig(bits=4, group_size=32, sym=False, overrides=("model.layers.1.mlp.down_proj=8:64",))
    quantize(model, config, torch.randint(0, 320, (4, 24)))
    save_gptq(model, make_tiny_tokenizer(), tmp_path, config)
    if v2:  # the same checkpoint as GPTQ v2 stores it: true zeros
        t = load_file(tmp_path / "model.safetensors")
        for k in [k for k in t if k.endswith(".qzeros")]:
            bits = 8 if "layers.1.mlp.down_proj" in k else 4
            t[k] = pack(unpack(t[k], bits, 1) + 1, bits, 1)
        from safetensors.torch import save_file

        save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    want, got = whole_file_load(tmp_path, dtype), load(str(tmp_path), dtype)[0]
    want_sd, got_sd = want.state_dict(keep_vars=True), got.state_dict(keep_vars=True)
    assert list(want_sd) == list(got_sd)
    for name, w in want_sd.items():
        g = got_sd[name]
        assert type(g) is type(w) and g.dtype == w.dtype and g.requires_grad == w.requires_grad, name
        assert torch.equal(g, w) and not g.is_meta, name
    assert dict(want.named_buffers()).keys() == dict(got.named_buffers()).keys()
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tied
    assert got.model.layers[1].mlp.down_proj.bits == 8
    ids = torch.randint(0, 320, (2, 16))
    with torch.inference_mode():
        assert torch.equal(got(ids).logits, want(ids).logits)


def test_bad_checkpoints_are_named(tmp_path):
    from llmslim.errors import UserError

    model = make_tiny_model("llama")
    config = RTNConfig(bits=4, group_size=32)
    quantize(model, config)
    save_gptq(model, make_tiny_tokenizer(), tmp_path, config)
    from safetensors.torch import save_file

    t = load_file(tmp_path / "model.safetensors")
    full = dict(t)
    del t["model.norm.weight"]
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="checkpoint lacks 1 tensors, e.g. model.norm.weight"):
        load(str(tmp_path))
    full["model.norm.weight"] = full["model.norm.weight"][:-1]
    save_file(full, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"do not match the model config: model.norm.weight has shape \(63,\)"):
        load(str(tmp_path))
