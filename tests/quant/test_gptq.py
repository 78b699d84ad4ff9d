import os
from pathlib import Path

import pytest
import torch

from llmslim.grid import dequantize_groups, quantize_rtn
from llmslim.quant.gptq import accumulate_hessian, gptq_quantize, layer_loss


def synthetic_layer(rows=64, columns=128, tokens=2048, seed=0):
    """A weight and correlated, unevenly scaled inputs (like real activations), and H = 2XX^T/n."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    mix = torch.randn(columns, columns, generator=g) / columns**0.5
    X = (torch.randn(tokens, columns, generator=g) @ (torch.eye(columns) + mix)) * (
        torch.rand(columns, generator=g) * 4 + 0.1)
    H = torch.zeros(columns, columns)
    H, _ = accumulate_hessian(H, 0, X)
    return W, X, H


def test_running_mean_hessian_equals_batch_formula():
    _, X, H = synthetic_layer()
    H2 = torch.zeros_like(H)
    n = 0
    for chunk in X.split(300):
        H2, n = accumulate_hessian(H2, n, chunk)
    expected = 2 * X.T @ X / X.shape[0]
    torch.testing.assert_close(H, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(H2, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("columns", [96, 576, 777])  # wide inputs take the symmetric-block path
def test_hessian_of_wide_layers_matches_the_formula(columns):
    X = torch.randn(500, columns, generator=torch.Generator().manual_seed(1))
    H, n = torch.zeros(columns, columns), 0
    for chunk in X.split(200):
        H, n = accumulate_hessian(H, n, chunk)
    torch.testing.assert_close(H, 2 * X.T @ X / 500, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("columns", [96, 576, 777])
def test_hessian_of_bf16_inputs_is_float32_and_exact(columns):
    """bf16 inputs (the block driver's bf16 forwards) give a float32 H as exact as float32 inputs do:
    products of bf16 numbers are exact in float32 and summed in float32 (oneDNN's bf16 math mode, set
    only for these products and put back), not a bf16 GEMM's output (~1e-3 off)."""
    g = torch.Generator().manual_seed(2)
    X = (torch.randn(3000, columns, generator=g) * (torch.rand(columns, generator=g) * 4 + 0.1)).bfloat16()
    X[:, :3] *= 40  # massive-activation channels
    before = torch.backends.mkldnn.matmul.fp32_precision
    H, n = torch.zeros(columns, columns), 0
    for chunk in X.split(700):
        H, n = accumulate_hessian(H, n, chunk)
    assert H.dtype == torch.float32 and torch.backends.mkldnn.matmul.fp32_precision == before
    exact = 2 * X.double().T @ X.double() / 3000

    def error(A):
        return float((A.double() - exact).norm() / exact.norm())

    H32, _ = accumulate_hessian(torch.zeros(columns, columns), 0, X.float())  # the float32 path, same values
    # float32 summation of 3000 products: ~1e-7..1e-6. A Zen 4's native bf16 dot products sum pairs
    # in their own way: 3-7x the float32 path's error there (0.5-0.9e-6), still float32-level.
    assert error(H) < 2e-6 and error(H) < 10 * error(H32) + 1e-7
    assert error(2 * (X.T @ X) / 3000) > 100 * error(H)  # what summing bf16 GEMM outputs would cost


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 32), (2, 64), (8, -1), (4, -1)])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn_on_layer_objective(bits, group_size, sym):
    W, X, H = synthetic_layer()
    r = gptq_quantize(W, H, bits, group_size, sym)
    Q, s, z = quantize_rtn(W, bits, group_size, sym)
    g_idx = torch.arange(W.shape[1]) // (group_size if group_size != -1 else W.shape[1])
    rtn = dequantize_groups(Q, s, z, g_idx)
    gptq_err = ((W - r.dequantize()) @ X.T).pow(2).sum()
    rtn_err = ((W - rtn) @ X.T).pow(2).sum()
    assert gptq_err < rtn_err
    # the Hessian form of the objective agrees with the direct one
    n = X.shape[0]
    assert layer_loss(W, r.dequantize(), H) == pytest.approx(float(gptq_err) / n, rel=1e-3)
    assert r.Q.min() >= 0 and r.Q.max() < 2**bits and r.fallback is None


def test_act_order_g_idx_is_consistent():
    W, X, H = synthetic_layer()
    r = gptq_quantize(W, H, 4, 32, True, desc_act=True)
    groups = r.scales.shape[0]
    assert groups == 4
    # every group holds exactly group_size columns, in descending-Hessian order
    assert torch.bincount(r.g_idx.long(), minlength=groups).tolist() == [32] * 4
    perm = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(r.g_idx[perm].long(), torch.arange(128) // 32)
    # dequantizing through g_idx reproduces what the solver quantized against
    assert ((W - r.dequantize()) @ X.T).pow(2).sum() < ((W @ X.T).pow(2).sum() * 0.05)


def test_static_groups_keep_natural_g_idx():
    W, _, H = synthetic_layer()
    r = gptq_quantize(W, H, 4, 32, True, desc_act=True, static_groups=True)
    assert torch.equal(r.g_idx.long(), torch.arange(128) // 32)


def test_dead_columns_are_zeroed():
    W, X, _ = synthetic_layer()
    X[:, :5] = 0
    H, _ = accumulate_hessian(torch.zeros(128, 128), 0, X)
    r = gptq_quantize(W, H, 4, 32, False)
    assert torch.allclose(r.dequantize()[:, :5], torch.zeros(64, 5), atol=1e-6)


def test_cholesky_failure_raises_damping_then_falls_back():
    W, _, H = synthetic_layer()
    # Strongly indefinite H: 1% damping is not enough, more damping is.
    H_bad = H - 0.05 * torch.diag(H).mean() * torch.eye(128)
    r = gptq_quantize(W, H_bad, 4, 32, True)
    assert r.fallback is None and r.damp_percent > 0.01
    # Non-finite H: no damping helps; the layer falls back to RTN and says why.
    H_nan = H.clone()
    H_nan[0, 0] = float("nan")
    r = gptq_quantize(W, H_nan, 4, 32, True)
    assert r.fallback is not None
    Q, _, _ = quantize_rtn(W, 4, 32, True)
    assert torch.equal(r.Q, Q)


def test_deterministic():
    W, _, H = synthetic_layer()
    a = gptq_quantize(W, H, 3, 32, False, desc_act=True)
    b = gptq_quantize(W, H, 3, 32, False, desc_act=True)
    assert torch.equal(a.Q, b.Q) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_option_runs_and_helps_rtn_part(seed):
    W, X, H = synthetic_layer(seed=seed)
    plain = gptq_quantize(W, H, 3, 32, True)
    mse = gptq_quantize(W, H, 3, 32, True, mse=True)
    err = lambda r: ((W - r.dequantize()) @ X.T).pow(2).sum()  # noqa: E731
    # It must help, clearly: 18-25% less output error on these layers (measured), so at least 10%.
    assert err(mse) < err(plain) * 0.9


@pytest.mark.parametrize("columns,group_size", [(128, 32), (112, 32)])  # 112: a partial last group
def test_group_aware_reordering_keeps_natural_groups_and_helps(columns, group_size):
    W, X, H = synthetic_layer(columns=columns, seed=3)
    plain = gptq_quantize(W, H, 3, group_size, True)
    gar = gptq_quantize(W, H, 3, group_size, True, act_group_aware=True)
    assert torch.equal(gar.g_idx.long(), torch.arange(columns) // group_size)
    assert gar.scales.shape == plain.scales.shape
    err = lambda r: ((W - r.dequantize()) @ X.T).pow(2).sum()  # noqa: E731
    assert err(gar) < err(plain)


def test_inverse_cholesky_holds_at_most_three_copies_of_the_hessian():
    """At 11008 inputs (a 7B down_proj) each n x n copy is 0.5 GB: the factorization may hold three at
    once beyond H itself (the damped J H J, its factor, the inverse), not more. Measured as the peak
    RSS of a fresh process over what it held before the call (Linux: VmHWM, reset by clear_refs)."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    n = 3072  # 36 MB per copy: above glibc's largest heap-served size, so every copy is its own pages
    code = f"""
import torch
from llmslim.quant.gptq import inverse_cholesky
torch.set_num_threads(1)
X = torch.randn({n} + 256, {n})
H = X.T @ X
del X
def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
U, _ = inverse_cholesky(H, 0.01)
print((status("VmHWM") - before) / ({n} * {n} * 4))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert float(out.strip().splitlines()[-1]) < 3.5
