"""The K-quant and 5-bit GGUF grids (``llmslim.ggml_quants``): bytes that the gguf library's reference
dequantizer reads back as exactly the values llmslim claims, the legacy types byte-identical to the
gguf library's reference quantizer, and (slow, with llama.cpp built by ``make llama``) every type,
with and without an importance matrix, byte-identical to llama.cpp's own ``ggml_quantize_chunk``."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

from llmslim import ggml_quants as gq

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[2]
LLAMA_VENV = Path(os.environ.get("LLMSLIM_LLAMA_VENV", ROOT / ".llama-venv"))
ALL = tuple(gq.LAYOUT)


def qtype(kind: str):
    return gguf.GGMLQuantizationType[kind.upper()]


def awkward(rows: int = 16, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Random rows at several magnitudes plus the blocks that trip quantizers: zeros, a constant
    block, ties, outliers, tiny values, an all-positive and an all-negative block."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, cols)) * np.logspace(-3, 0, rows)[:, None]).astype(np.float32)
    W[0, :256] = 0
    W[1, :32] = 0.25
    W[2, 32:64] = np.round(W[2, 32:64] * 8) / 8
    W[3, 64:96] *= 1e-6
    W[4, 100] = 40.0
    W[5, :256] = np.abs(W[5, :256])
    W[6, 256:] = -np.abs(W[6, 256:])
    W[7, :] = 0
    return W


def importance(cols: int = 512, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random(cols).astype(np.float32) ** 3) * 2


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("weighted", [False, True])
def test_bytes_dequantize_to_the_claimed_values(kind, weighted):
    W = awkward()
    qz = gq.quantize(W, kind, importance() if weighted else None)
    raw = qz.encode()
    assert raw.shape == (W.shape[0], W.shape[1] // gq.block_size(kind) * gq.BYTES[kind])
    ref = gguf.quants.dequantize(raw, qtype(kind)).reshape(W.shape)
    np.testing.assert_array_equal(qz.dequantize(), ref)
    # the (scale, zero, offset) description the solvers use is the same function of the codes
    scale, zero, offset = qz.grid()
    sub = gq.sub_block(kind)
    again = np.repeat(scale, sub, 1) * (qz.q.astype(np.float32) - zero) + np.repeat(offset, sub, 1)
    np.testing.assert_array_equal(again, ref)
    # and it is a quantization of W, not any bytes: the error is a fraction of the weights' spread
    err = np.abs(ref - W).max(axis=1)
    assert (err <= np.abs(W).max(axis=1) * 0.6 + 1e-12).all()


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_legacy_types_match_the_gguf_reference_quantizer(kind):
    W = awkward()
    # On a block of signed zeros llama.cpp's C loop keeps max = +0.0 (Q4_0 stores d = -0.0) while
    # gguf's numpy port picks the first -0.0 (d = +0.0); llmslim follows llama.cpp (the slow test).
    W[W == 0] = 0.0
    np.testing.assert_array_equal(gq.quantize(W, kind).encode().reshape(-1),
                                  gguf.quants.quantize(W, qtype(kind)).reshape(-1))


@pytest.mark.parametrize("kind", ALL)
def test_other_codes_on_the_same_grid(kind):
    """A solver may put any code on the fitted grid: the bytes still decode to scale*(q-zero)+offset."""
    W = awkward()
    qz = gq.quantize(W, kind)
    maxq = gq.LAYOUT[kind][2]
    q = np.random.default_rng(3).integers(0, maxq + 1, size=W.shape)
    moved = qz.with_codes(q)
    scale, zero, offset = moved.grid()
    sub = gq.sub_block(kind)
    expect = np.repeat(scale, sub, 1) * (q.astype(np.float32) - zero) + np.repeat(offset, sub, 1)
    np.testing.assert_array_equal(gguf.quants.dequantize(moved.encode(), qtype(kind)).reshape(W.shape), expect)


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        gq.quantize(np.zeros((2, 576), np.float32), "q4_k")


# --- llama.cpp itself ----------------------------------------------------------------------------

GGML_TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}


def ggml_base():
    lib = LLAMA_VENV / "build" / "bin" / "libggml-base.so"
    if not lib.is_file():
        pytest.skip(f"llama.cpp is not built ({lib} is missing): make llama")
    cdll = ctypes.CDLL(str(lib))
    cdll.ggml_quantize_chunk.restype = ctypes.c_size_t
    cdll.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return cdll


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_identical_bytes_to_llama_cpp(seed):
    """``ggml_quantize_chunk`` is what llama-quantize calls per tensor (imatrix or not)."""
    lib = ggml_base()
    W = awkward(seed=seed)
    if seed == 1:
        W = np.random.default_rng(seed).standard_normal((64, 1536)).astype(np.float32) * 0.02
    imatrix = importance(W.shape[1], seed)
    for kind, t in GGML_TYPES.items():
        lib.ggml_quantize_init(t)
        for im in (None, imatrix):
            ref = np.zeros((W.shape[0], W.shape[1] // gq.block_size(kind) * gq.BYTES[kind]), np.uint8)
            lib.ggml_quantize_chunk(t, W.ctypes.data, ref.ctypes.data, 0, W.shape[0], W.shape[1],
                                    None if im is None else im.ctypes.data)
            mine = gq.quantize(W, kind, im).encode()
            assert np.array_equal(mine, ref), (kind, im is not None, int((mine != ref).sum()))


# --- GPTQ on these grids ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k", "q5_0", "q5_1", "q4_1"])
@pytest.mark.parametrize("order", ["gar", "desc_act"])
def test_gptq_on_a_ggml_grid_is_exact_and_beats_llama_cpp_rounding(kind, order):
    import torch

    from llmslim.quant.gptq import gptq_quantize, layer_loss

    g = torch.Generator().manual_seed(0)
    rows, cols = 64, 512
    W = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(cols, generator=g) * 0.5) * 0.02
    X = torch.randn(2048, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    X = X + 0.5 * X[:, torch.randperm(cols, generator=g)]  # correlated inputs: something to compensate
    H = 2 * X.T @ X / X.shape[0]
    r = gptq_quantize(W, H, 4, grid=kind, desc_act=order == "desc_act", act_group_aware=order == "gar")
    Wq = r.dequantize()
    # the bytes decode (gguf's reference) to exactly the weights GPTQ compensated against
    ref = gguf.quants.dequantize(r.gguf.encode(), qtype(kind)).reshape(rows, cols)
    np.testing.assert_array_equal(Wq.numpy(), ref)
    # and the grid is llama.cpp's imatrix fit (Hessian diagonal / 2 = mean x^2): same block scales
    fit = gq.quantize(W.numpy(), kind, (torch.diag(H) / 2).numpy())
    for name in ("d", "m", "sc", "mc"):
        a, b = getattr(r.gguf, name), getattr(fit, name)
        assert (a is None and b is None) or np.array_equal(a, b), name
    rtn = torch.from_numpy(gq.quantize(W.numpy(), kind).dequantize())
    imatrix = torch.from_numpy(fit.dequantize())
    loss = layer_loss(W, Wq, H)
    assert loss < 0.85 * layer_loss(W, imatrix, H) and loss < 0.6 * layer_loss(W, rtn, H)
