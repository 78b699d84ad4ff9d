"""Fast CPU modules: same product as GPTQLinear's reference (within bf16), every layout, no leftovers."""

from __future__ import annotations

import math

import pytest
import torch

from llmslim.nn import GPTQLinear
from llmslim.runtime.fast import accelerate, fast_module, module_summary
from llmslim.runtime.fusion import FusedLinear, FusedPart
from llmslim.runtime.head import Q8Linear
from llmslim.runtime.kernels import (
    Int4Linear,
    Int8Linear,
    Int8x2Linear,
    int4_available,
    int4_layout,
    int8_available,
)
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.skipif(not (int4_available() and int8_available()), reason="torch lacks the CPU int kernels")


def make_layer(out_f, in_f, bits, group_size, act_order=False, sym=True, bias=False, seed=0) -> GPTQLinear:
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else math.ceil(in_f / group_size)
    maxq = (1 << bits) - 1
    Q = torch.randint(0, maxq + 1, (out_f, in_f), generator=g)
    scales = torch.rand(groups, out_f, generator=g) * 0.02 + 0.005
    if sym:
        zeros = torch.full((groups, out_f), (maxq + 1) // 2)
    else:
        zeros = torch.randint(1, maxq + 1, (groups, out_f), generator=g)
    size = in_f if group_size == -1 else group_size
    g_idx = torch.arange(in_f) // size
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    b = torch.randn(out_f, generator=g) if bias else None
    return GPTQLinear.from_codes(Q, scales, zeros, g_idx, group_size, bits, b)


def assert_close_bf16(fast, ref: GPTQLinear, in_f: int, rows: int = 4, strict: bool = True):
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1))
    want = ref(x)  # fp32 reference: dequantize and F.linear
    got = fast(x.to(torch.bfloat16)).float()
    # bf16 carries 8 significant bits: allow a few roundings of the largest output.
    tol = 3 * 2**-8 * want.abs().max()
    err = (got - want).abs().max()
    assert err <= tol, f"max error {err:.4g} > {tol:.4g}"
    if not strict:
        return
    # and the fast path is as close as bf16 dequantization itself, within a factor
    bf16_ref = torch.nn.functional.linear(x.bfloat16(), ref.dequantized_weight(torch.bfloat16),
                                          None if ref.bias is None else ref.bias.bfloat16()).float()
    assert err <= 3 * (bf16_ref - want).abs().max() + 1e-6


CASES_4BIT = [
    # (out, in, group, act_order, sym, bias)
    (64, 128, 32, False, True, False),  # the plain case: no input rearrangement
    (64, 128, 64, True, True, True),  # act-order: one permutation of the activation
    (48, 96, 64, False, False, False),  # K=96 not a multiple of 64 (like 576 at g128) -> kernel group 32
    (64, 136, 128, False, True, False),  # K=136: no kernel group divides it -> zero-padded K
    (64, 136, 128, True, False, True),  # act-order and padding together
    (40, 64, 16, False, True, False),  # group 16 (< kernel minimum) and N=40 (not a multiple of 16)
    (64, 64, -1, False, False, False),  # per-channel
    (64, 512, 512, False, True, False),  # group larger than any kernel group
]


@pytest.mark.parametrize("out_f,in_f,group,act,sym,bias", CASES_4BIT)
def test_int4_matches_reference(out_f, in_f, group, act, sym, bias):
    ref = make_layer(out_f, in_f, 4, group, act, sym, bias)
    fast = fast_module(ref)
    assert isinstance(fast, Int4Linear)
    assert_close_bf16(fast, ref, in_f)


def testint4_layouts_cost_nothing_when_they_can():
    assert int4_layout(torch.arange(576) // 128, 576).mode == "none"  # SmolLM2: kernel group 64
    assert int4_layout(torch.arange(576) // 128, 576).kg == 64
    assert int4_layout(torch.arange(1536) // 128, 1536).kg == 128
    assert int4_layout(torch.arange(136) // 128, 136).mode == "pad"
    assert int4_layout((torch.arange(136) // 128)[torch.randperm(136)], 136).mode == "gather"
    assert int4_layout((torch.arange(128) // 64)[torch.randperm(128)], 128).mode == "perm"


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("act", [False, True])
def test_low_bits_run_on_the_int4_kernel(bits, act):
    ref = make_layer(64, 128, bits, 32, act, sym=False, bias=True)
    fast = fast_module(ref)
    assert isinstance(fast, Int4Linear)
    assert_close_bf16(fast, ref, 128)


def test_low_bit_codes_are_exact_in_the_kernel():
    # 2/3-bit codes shift into the 4-bit range with a zero of exactly 0: only the bf16 scale rounds.
    ref = make_layer(32, 64, 3, 32, sym=False)
    fast = fast_module(ref)
    assert (fast.scale_zeros[..., 1] == 0).all()


@pytest.mark.parametrize("sym,bias", [(True, False), (False, True)])
def test_int8_per_channel(sym, bias):
    ref = make_layer(64, 96, 8, -1, sym=sym, bias=bias)
    fast = fast_module(ref)
    assert isinstance(fast, Int8Linear)
    assert (fast.offset is None) == sym
    assert_close_bf16(fast, ref, 96)


@pytest.mark.parametrize("act,sym", [(False, False), (True, True)])
def test_int8_grouped(act, sym):
    ref = make_layer(64, 136, 8, 64, act, sym=sym, bias=True)
    fast = fast_module(ref)
    assert isinstance(fast, Int8x2Linear)
    # Asymmetric zeros far from 128 leave a per-group offset (136 - z) * s that the kernel holds
    # in bf16: still within bf16 output tolerance, but not as tight as per-weight rounding.
    assert_close_bf16(fast, ref, 136, strict=sym)


def test_leading_dims_and_dtypes():
    ref = make_layer(32, 64, 4, 32)
    fast = fast_module(ref)
    x = torch.randn(2, 3, 64)
    y = fast(x)  # fp32 in -> fp32 out (bf16 inside)
    assert y.shape == (2, 3, 32) and y.dtype == torch.float32
    assert torch.allclose(y, ref(x), atol=3 * 2**-8 * ref(x).abs().max().item())


def _quantized_tiny(arch: str, bits: int, group_size: int, desc_act: bool = False):
    from llmslim.config import GPTQConfig, RTNConfig
    from llmslim.pipeline.stages import quantize

    model = make_tiny_model(arch)
    if desc_act:
        calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
        quantize(model, GPTQConfig(bits=bits, group_size=group_size, desc_act=True), calib)
    else:
        quantize(model, RTNConfig(bits=bits, group_size=group_size, sym=False))
    return model


def _state_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bits,group,desc_act", [(4, 32, False), (4, 32, True), (8, -1, False), (3, 32, False)])
def test_accelerate_swaps_every_layer_and_keeps_the_logits(arch, bits, group, desc_act):
    model = _quantized_tiny(arch, bits, group, desc_act)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model(ids).logits.float()
    names = [n for n, m in model.named_modules() if isinstance(m, GPTQLinear)]
    before = _state_bytes(model)
    accelerate(model)
    assert "GPTQLinear" not in module_summary(model)
    for name in names:  # every quantized layer is now a fast module, or a slice of a fused one
        m = model.get_submodule(name)
        inner = m.fused.inner if isinstance(m, FusedPart) else m
        assert isinstance(inner, Int4Linear | Int8Linear), name
    with torch.inference_mode():
        got = model(ids).logits.float()
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    # no float copy of the quantized weights stays around: the float parts halve (fp32 -> bf16)
    # and the quantized weights stay at their packed size
    assert _state_bytes(model) < before


def test_accelerate_memory_matches_packed_size():
    model = _quantized_tiny("llama", 4, 32)
    packed = sum(m.qweight.numel() * 4 for m in model.modules() if isinstance(m, GPTQLinear))
    accelerate(model)
    held = sum(m.weight_packed.numel() for m in model.modules() if isinstance(m, Int4Linear))
    assert held == packed  # 4-bit stays 4-bit: half a byte per weight, nothing dequantized


def test_fused_projections_compute_each_slice_once():
    model = _quantized_tiny("llama", 4, 32)
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    x = torch.randn(1, 5, 64)
    want = [q(x), k(x), v(x)]
    accelerate(model)
    assert isinstance(attn.qkv_proj, FusedLinear) and isinstance(attn.k_proj, FusedPart)
    calls = []
    attn.qkv_proj.inner.register_forward_hook(lambda *a: calls.append(1))
    xb = x.bfloat16()
    got = [attn.q_proj(xb), attn.k_proj(xb), attn.v_proj(xb)]
    assert len(calls) == 1  # one kernel call for the three
    for g, w in zip(got, want, strict=True):
        assert (g.float() - w).abs().max() <= 0.02 * w.abs().max()
    attn.q_proj(xb)  # same input again: a new sequence, computed again (never a stale reuse)
    attn.q_proj(xb * 2)
    assert len(calls) == 3
    assert torch.allclose(attn.k_proj(xb * 2).float(), 2 * got[1].float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("desc_act", [False, True])
def test_siblings_of_different_bits_fuse_into_one_int4_kernel(desc_act):
    """A tuned model gives q, k and v (gate and up) their own bits; at 2-4 bits they all run on the
    int4 kernel's 4-bit codes, so they still fuse into one call, each slice its own layer's product."""
    from llmslim.config import GPTQConfig
    from llmslim.pipeline.stages import quantize

    model = make_tiny_model("llama")
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    overrides = ("model.layers.0.self_attn.q_proj=3:32", "model.layers.0.self_attn.k_proj=2:32",
                 "model.layers.0.mlp.up_proj=2:32", "model.layers.1.self_attn.v_proj=8:32")
    quantize(model, GPTQConfig(bits=4, group_size=32, desc_act=desc_act, overrides=overrides), calib)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert [attn.q_proj.bits, attn.k_proj.bits, attn.v_proj.bits] == [3, 2, 4]
    x = torch.randn(1, 5, 64)
    mods = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
    want = [m(x) for m in mods]
    accelerate(model)
    assert isinstance(attn.qkv_proj.inner, Int4Linear) and isinstance(mlp.gate_up_proj.inner, Int4Linear)
    xb = x.bfloat16()
    got = [attn.q_proj(xb), attn.k_proj(xb), attn.v_proj(xb), mlp.gate_proj(xb), mlp.up_proj(xb)]
    for g, w in zip(got, want, strict=True):
        assert (g.float() - w).abs().max() <= 0.02 * w.abs().max()
    # 8 bits and 4 bits are different kernels: block 1's q/k/v stay three modules.
    assert not hasattr(model.model.layers[1].self_attn, "qkv_proj")


def test_accelerate_int8_head_and_float_model():
    model = make_tiny_model("llama")
    ids = torch.randint(0, 320, (1, 8))
    with torch.inference_mode():
        want = model(ids).logits.float()
    accelerate(model, head="int8")
    assert isinstance(model.get_output_embeddings(), Q8Linear)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.inner, torch.nn.Linear)  # float layers fuse too
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        got = model(ids).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    with pytest.raises(ValueError):
        accelerate(model, head="int3")
