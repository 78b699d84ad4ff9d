import pytest
import torch

from llmslim.errors import UserError
from llmslim.quant.walk import capture_block_inputs, find_blocks, find_linears, run_block, sequential_groups
from tests.conftest import ARCHS, make_tiny_model

EXPECTED_GROUPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "qwen2": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "gpt_neox": [["attention.query_key_value"], ["attention.dense"], ["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"]],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_linears_and_groups(arch):
    model = make_tiny_model(arch)
    name, blocks = find_blocks(model)
    assert len(blocks) == 2
    linears = find_linears(blocks[0])
    assert "lm_head" not in " ".join(linears)
    ids = torch.randint(0, 320, (2, 16))
    inputs = capture_block_inputs(model, blocks, [ids])
    assert inputs.hidden[0].shape[:2] == (2, 16)
    groups = sequential_groups(
        blocks[0], list(linears), lambda: run_block(blocks[0], inputs.hidden[0], inputs.args[0], inputs.kwargs[0]))
    assert groups == EXPECTED_GROUPS[arch]


def test_not_a_decoder():
    with pytest.raises(UserError):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))
