"""Depth and width pruning: the outputs load in plain transformers and equal the original model with
those blocks / channels / heads removed; importance finds a block that does nothing; bad inputs."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmslim.errors import UserError
from llmslim.quant.structured import block_influence, depth_prune, skip_kl, width_prune
from llmslim.quant.walk import find_blocks
from tests.conftest import ARCHS, make_tiny_model

IDS = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def reload(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # plain transformers, nothing of ours


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("importance", ["bi", "kl"])
def test_depth_equals_the_original_without_those_blocks(arch, importance, tmp_path):
    model = make_tiny_model(arch)
    record = depth_prune(model, 1, importance, IDS)
    (dropped,) = record["dropped"]
    assert model.config.num_hidden_layers == 1
    loaded = reload(model, tmp_path)
    reference = make_tiny_model(arch)  # same seed: the original weights
    name, blocks = find_blocks(reference)
    del blocks[dropped]
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-5, atol=1e-5)
    out = loaded.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)  # KV cache indexed by the new layer_idx
    assert out.shape == (1, 7)


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_kl_equals_running_the_whole_model_with_each_block_skipped(arch):
    # skip_kl starts from each block's recorded input; the reference runs every block before it
    # again and makes block i return its input (a hook), as the method defines "skipped".
    model = make_tiny_model(arch)
    _, blocks = find_blocks(model)
    ids = IDS[:2]
    before = logits(model, ids)
    logp = torch.log_softmax(before, -1)
    want = []
    for block in blocks:
        def identity(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            return (x, *output[1:]) if isinstance(output, tuple) else x

        handle = block.register_forward_hook(identity, with_kwargs=True)
        logq = torch.log_softmax(logits(model, ids), -1)
        handle.remove()
        want.append(float((logp.exp() * (logp - logq)).sum() / ids.numel()))
    assert min(want) > 0
    torch.testing.assert_close(torch.tensor(skip_kl(model, [ids])), torch.tensor(want), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(logits(model, ids), before)  # every block computes again afterwards
    assert all("forward" not in b.__dict__ for b in blocks)


def test_depth_importance_finds_a_block_that_does_nothing():
    model = make_tiny_model("llama")
    model.config.num_hidden_layers = 3
    model.model.layers.append(make_tiny_model("llama", seed=1).model.layers[0])
    model.model.layers[2].self_attn.layer_idx = 2
    idle = model.model.layers[1]
    idle.self_attn.o_proj.weight.data.zero_()
    idle.mlp.down_proj.weight.data.zero_()  # its output is its input
    bi, kl = block_influence(model, [IDS]), skip_kl(model, [IDS])
    assert min(range(3), key=bi.__getitem__) == 1 and bi[1] == pytest.approx(0, abs=1e-6)
    assert min(range(3), key=kl.__getitem__) == 1 and kl[1] == pytest.approx(0, abs=1e-6)
    assert depth_prune(model, 1, "kl", IDS)["dropped"] == [1]


def zero_removed(reference, record, heads):
    """The original model with the removed channels' and heads' contributions zeroed."""
    _, blocks = find_blocks(reference)
    for i, block in enumerate(blocks):
        linears = dict(block.named_modules())
        down = next(m for n, m in linears.items() if n.split(".")[-1] in ("down_proj", "fc2", "dense_4h_to_h")
                    or n == "mlp.c_proj")
        keep = torch.tensor(record["kept"]["mlp"][i])
        drop = torch.ones(down.weight.shape[1 if not hasattr(down, "nf") else 0], dtype=torch.bool)
        drop[keep] = False
        if hasattr(down, "nf"):  # Conv1D: weight [in, out]
            down.weight.data[drop] = 0
        else:
            down.weight.data[:, drop] = 0
        if heads:
            head_dim, per_group = heads
            o = block.self_attn.o_proj
            cols = torch.ones(o.weight.shape[1], dtype=torch.bool)
            for g in record["kept"]["kv_groups"][i]:
                cols[g * per_group * head_dim:(g + 1) * per_group * head_dim] = False
            o.weight.data[:, cols] = 0


@pytest.mark.parametrize("arch,heads_keep", [("llama", 0.5), ("qwen2", 0.5), ("llama", 1.0), ("opt", 1.0),
                                             ("gpt2", 1.0), ("gpt_neox", 1.0)])
def test_width_equals_the_original_with_those_channels_and_heads_removed(arch, heads_keep, tmp_path):
    model = make_tiny_model(arch)
    record = width_prune(model, 0.75, heads_keep, IDS)
    loaded = reload(model, tmp_path)
    reference = make_tiny_model(arch)
    heads = None
    if heads_keep < 1:
        assert record["kv_heads"] == [2, 1] and loaded.config.num_attention_heads == 2
        heads = (16, 2)  # hidden 64 / 4 heads; 4 heads / 2 KV heads
    zero_removed(reference, record, heads)
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in make_tiny_model(arch).parameters())
    loaded.generate(IDS[:1, :4], max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("arch", ["opt", "gpt2", "gpt_neox"])
def test_heads_of_architectures_whose_config_ties_head_size_are_refused(arch):
    model = make_tiny_model(arch)
    before = logits(model)
    with pytest.raises(UserError, match="heads|config cannot describe"):
        width_prune(model, 1.0, 0.5, IDS)
    torch.testing.assert_close(logits(model), before)  # refused before anything changed


def test_dropping_all_blocks_or_more_is_refused():
    for n in (2, 3):
        with pytest.raises(UserError, match="at least one must remain"):
            depth_prune(make_tiny_model("llama"), n, "bi", IDS)


@pytest.mark.parametrize("method", ["depth", "width"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_importance_forwards_run_in_the_forward_dtype(method, dtype):
    model = make_tiny_model("llama")
    seen = set()
    for b in find_blocks(model)[1]:
        b.mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype))
    if method == "depth":
        depth_prune(model, 1, "kl", IDS, dtype=dtype)
    else:
        width_prune(model, 0.5, 1.0, IDS, dtype=dtype)
    # (width also runs one float32 probe forward first, to read the block layout)
    assert seen == {dtype or torch.float32} if method == "depth" else seen == {torch.float32, dtype or torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights themselves stay float32


def test_forward_dtype_is_an_option_of_depth_and_width_only_where_calibrated():
    from llmslim.config import PruneConfig

    assert PruneConfig("depth", drop_blocks=1, forward_dtype="bf16").forward_dtype == "bf16"
    assert PruneConfig("width", mlp_keep=0.5, forward_dtype="fp32").forward_dtype == "fp32"
    with pytest.raises(UserError, match="does not use --forward-dtype"):
        PruneConfig("magnitude", sparsity=0.5, forward_dtype="bf16")
