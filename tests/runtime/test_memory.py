"""Memory of the fast path (issue 16): no float copy of a quantized weight survives ``accelerate`` (an
8-bit head tied to the embedding included), and loading straight in bf16 (what ``llmslim serve`` does on the fast path, to skip a float32 copy of the
embeddings) gives the very model that loading in float32 and casting gives, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from llmslim.config import RTNConfig
from llmslim.formats.gptq import save_gptq
from llmslim.formats.hf import save_hf
from llmslim.loader import load
from llmslim.nn import GPTQLinear
from llmslim.pipeline.stages import quantize
from llmslim.runtime.fast import accelerate
from llmslim.runtime.head import Q8Embedding, Q8Linear, dequantize_rows
from llmslim.runtime.kernels import int4_available
from tests.conftest import make_tiny_tokenizer
from tests.runtime.test_lean import FAMILIES, IDS, lean_logits, tiny


def tensors(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | {k: v for k, v in model.named_buffers() if v is not None}


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoints(request, tmp_path_factory):
    """A float and a 4-bit GPTQ checkpoint of one tiny family (the GPTQ one stores fp16, as GPTQ does)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    save_hf(tiny(family), make_tiny_tokenizer(), root / "float")
    model, config = tiny(family), RTNConfig(bits=4, group_size=32, sym=False)
    quantize(model, config)
    save_gptq(model, make_tiny_tokenizer(), root / "gptq", config)
    return root


@pytest.mark.parametrize("kind", ["float", "gptq"])
def test_bf16_load_is_the_cast_fp32_load(checkpoints, kind):
    folder = str(checkpoints / kind)
    want_model, got_model = accelerate(load(folder)[0]), accelerate(load(folder, dtype=torch.bfloat16)[0])
    want, got = tensors(want_model), tensors(got_model)
    assert want.keys() == got.keys()
    for name, t in want.items():
        if name.endswith("embed_scale"):
            # Gemma's scalar buffer takes the default dtype at construction; its forward casts it to
            # the embedding's dtype (bf16) before use, so both loads multiply by the same number
            assert torch.equal(got[name].to(torch.bfloat16), t.to(torch.bfloat16)), name
            continue
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name  # rotary stays fp32 in both
    # and they compute the same: transformers' forward (the server's prefill) and the lean one
    ids = torch.tensor([[5, 17, 200, 31, 9, 77, 120, 4]])
    with torch.inference_mode():
        assert torch.equal(want_model(ids).logits, got_model(ids).logits)
    assert torch.equal(lean_logits(want_model, ids[0].tolist(), [5]), lean_logits(got_model, ids[0].tolist(), [5]))


@pytest.mark.skipif(not int4_available(), reason="needs torch's CPU int4 kernel")
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_no_float_copy_of_a_quantized_weight(family):
    model = tiny(family)
    quantize(model, RTNConfig(bits=4, group_size=32, sym=False))
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, GPTQLinear)}
    accelerate(model, head="keep")
    # the embeddings and the head stay float: they are not quantized (RTN, like GPTQ, leaves them)
    unquantized = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for name, t in tensors(model).items():
        if not t.is_floating_point() or t.dim() < 2 or id(t) in unquantized:
            continue
        # what may stay float: the kernels' scales and zeros, one pair per group and output
        assert name.endswith("scale_zeros"), f"{name} {tuple(t.shape)} {t.dtype}"
        assert tuple(t.shape[:2]) not in shapes


@pytest.mark.skipif(not int4_available(), reason="needs torch's CPU int4 kernel")
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_int8_head_of_a_tied_model_leaves_no_float_matrix(family):
    model = tiny(family)
    model.lm_head.weight = model.get_input_embeddings().weight  # tied, as SmolLM2 and Gemma are
    quantize(model, RTNConfig(bits=4, group_size=32, sym=False))
    plain = copy.deepcopy(model.get_input_embeddings())
    got = accelerate(model, torch.bfloat16, head="int8")
    embed, head = got.get_input_embeddings(), got.get_output_embeddings()
    assert isinstance(embed, Q8Embedding) and isinstance(head, Q8Linear)
    assert embed.codes is head.codes  # one int8 matrix for both
    for name, t in tensors(got).items():  # what may be float: the scales, one per 32 weights
        assert not t.is_floating_point() or t.dim() < 2 or name.endswith(("scale_zeros", "scales")), name
    # lookups read exactly the head's dequantized rows: the same logits as a bf16 embedding holding them
    want = copy.deepcopy(got)
    rows = dequantize_rows(head.codes, head.scales, torch.arange(head.out_features))
    plain.weight = torch.nn.Parameter(rows.to(torch.bfloat16), requires_grad=False)
    want.model.embed_tokens = plain.to(torch.bfloat16)
    assert torch.equal(lean_logits(got, IDS, [8]), lean_logits(want, IDS, [8]))
    with torch.inference_mode():
        ids = torch.tensor([IDS])
        assert torch.equal(got(ids).logits, want(ids).logits)
