"""The 8-bit head (runtime/head.py, csrc/q8_matmul.cpp): codes and scales in the kernel's layout,
the kernel equal to the fp32 product of the dequantized weights (to fp32 summation order), a row's
bits the same alone as in any batch, the embedding looking up exactly the head's weights, and
``accelerate``'s choice of head."""

from __future__ import annotations

import pytest
import torch

from llmslim.runtime import head as H
from llmslim.runtime.fast import accelerate
from tests.conftest import make_tiny_model

kernel = H.q8_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="q8_matmul needs llmslim's kernels on an AVX512-BF16 CPU")


def dense(head: H.Q8Linear) -> torch.Tensor:
    """The head's weights as a plain fp32 matrix, row by row through ``dequantize_rows``."""
    return H.dequantize_rows(head.codes, head.scales, torch.arange(head.out_features))


@pytest.mark.parametrize("N,K", [(200, 96), (48, 32), (33, 640)])
def test_codes_are_blockwise_rtn(N, K, monkeypatch):
    monkeypatch.setattr(H, "CHUNK", 16)  # several chunks, as a real vocabulary
    w = torch.randn(N, K) * torch.logspace(-4, 1, N)[:, None]  # rows of very different sizes
    w[3, :32] = 0  # an all-zero block: scale 0, codes 0
    head = H.Q8Linear(w)
    Np = head.codes.shape[0] * 16
    assert Np % 16 == 0 and Np - N < 16 and head.scales.shape == (Np // 16, K // 32, 16)
    blocks = w.view(N, K // 32, 32)
    s = blocks.abs().amax(-1) / 127
    assert torch.equal(head.scales.transpose(1, 2).reshape(Np, -1)[:N], s)
    # each weight within half a step of its block's scale
    err = (dense(head) - w).view(N, K // 32, 32).abs()
    assert bool((err <= s.unsqueeze(-1) * 0.5 * (1 + 1e-6)).all())
    assert torch.equal(dense(head)[3, :32], torch.zeros(32))


def test_a_q8_0_weight_is_reproduced_exactly():
    """A head that already is Q8_0 (a GGUF's, fp16 scales) comes back bit for bit."""
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(64, 4, 1, generator=g) * 0.01 + 1e-4).half().float()
    q = torch.randint(-127, 128, (64, 4, 32), generator=g).float()
    q[:, :, 0] = 127  # the block's max code, as Q8_0's own quantizer leaves it
    w = (q * d).view(64, 128)
    assert torch.equal(dense(H.Q8Linear(w)), w)


def test_fallback_matches_dense_product():
    w, b = torch.randn(40, 64), torch.randn(40)
    head = H.Q8Linear(w, b)
    x = torch.randn(2, 3, 64)
    y = head._reference(x.view(-1, 64))[:, :40]
    assert torch.allclose(y, x.view(-1, 64) @ dense(head).T, atol=1e-5)
    out = head(x)
    assert out.shape == (2, 3, 40) and out.dtype == torch.float32
    assert torch.allclose(out, (x.to(torch.bfloat16).float() if kernel else x) @ dense(head).T + b, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("M,N,K", [(1, 49152 // 64, 576), (3, 48, 32), (9, 160, 640), (17, 32, 96)])
def test_kernel_matches_fp32_product(M, N, K):
    g = torch.Generator().manual_seed(M)
    head = H.Q8Linear(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).bfloat16()
    y = head.product()(x)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    ref = x.double() @ dense(head).double().T
    # fp32 sums of exact products: within fp32 summation error of the row's magnitudes (2^-16 leaves room for
    # K / 32 blocks of 16 pair-sums on any CPU's VDPBF16PS rounding; a wrong code or scale is off by far more)
    bound = (x.double().abs() @ dense(head).double().abs().T) * 2**-16
    assert bool(((y.double() - ref).abs() <= bound).all())


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_rows_are_batch_invariant(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        head = H.Q8Linear(torch.randn(4096, 576))
        f = head.product()
        x = torch.randn(19, 576).bfloat16()
        alone = torch.cat([f(x[i:i + 1]) for i in range(19)])
        for rows in (19, 8, 5):
            assert torch.equal(f(x[:rows]), alone[:rows])
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_kernel_rejects_bad_input():
    head = H.Q8Linear(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="columns"):
        kernel(torch.randn(1, 32).bfloat16(), head.codes, head.scales)
    with pytest.raises(RuntimeError, match="bf16"):
        kernel(torch.randn(1, 64), head.codes, head.scales)
    with pytest.raises(ValueError, match="multiple of 32"):
        H.Q8Linear(torch.randn(32, 48))


def test_embedding_looks_up_the_heads_weights():
    w = torch.randn(50, 64)
    head = H.Q8Linear(w)
    emb = H.Q8Embedding(head, torch.bfloat16, embed_scale=torch.tensor(8.0))
    ids = torch.tensor([[0, 49, 7], [7, 7, 1]])
    got = emb(ids)
    assert got.shape == (2, 3, 64) and got.dtype == torch.bfloat16
    assert torch.equal(got, dense(head)[ids].to(torch.bfloat16) * torch.tensor(8.0).to(torch.bfloat16))
    assert emb.codes is head.codes


def test_accelerate_head_choice():
    ids = torch.randint(0, 320, (1, 8))
    model = make_tiny_model("llama")
    with torch.inference_mode():
        want = model(ids).logits.float()
    accelerate(model)  # "auto"
    is_q8 = isinstance(model.get_output_embeddings(), H.Q8Linear)
    assert is_q8 == (kernel is not None)
    with torch.inference_mode():
        got = model(ids).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    kept = accelerate(make_tiny_model("llama"), head="keep")
    assert type(kept.get_output_embeddings()) is torch.nn.Linear
    fp32 = accelerate(make_tiny_model("llama"), torch.float32)  # auto: the kernel is for bf16 compute
    assert type(fp32.get_output_embeddings()) is torch.nn.Linear
