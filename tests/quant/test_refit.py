"""The exact refit of a pruned layer's kept weights: equal to a per-row direct solve, never worse than
where it starts, zeros kept at zero; and what it does to SparseGPT's and Wanda's results."""

import pytest
import torch

from llmslim.quant import masks
from llmslim.quant.gptq import layer_loss
from llmslim.quant.refit import refit_kept
from llmslim.quant.sparsegpt import sparsegpt_prune
from llmslim.quant.wanda import wanda_prune
from tests.quant.test_gptq import synthetic_layer


def direct_solve(W, H, mask, damp):
    """Row by row, with nothing clever: solve (H + damp I)_SS q_S = (w (H + damp I))_S on the kept set S."""
    Hd = (H + damp * torch.diag(H).mean() * torch.eye(H.shape[0])).double()
    out = torch.zeros_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        S = ~mask[r]
        out[r, S] = torch.linalg.solve(Hd[S][:, S], (W[r].double() @ Hd)[S])
    return out.float()


def test_refit_reaches_the_direct_solution_and_keeps_zeros():
    W, X, H = synthetic_layer(rows=16, columns=32, seed=1)
    r = sparsegpt_prune(W, H, sparsity=0.5)
    Q = refit_kept(W, r.W, H, r.mask, iters=32, damp_percent=0.01)  # CG is exact after |S| <= 32 steps
    torch.testing.assert_close(Q, direct_solve(W, H, r.mask, 0.01), rtol=1e-3, atol=1e-4)
    assert torch.equal(Q == 0, r.mask)


def test_refit_only_lowers_the_objective_and_zero_iterations_change_nothing():
    W, X, H = synthetic_layer(rows=64, columns=128, seed=3)
    S = torch.diag(H)
    for r in (sparsegpt_prune(W, H, sparsity=0.5), sparsegpt_prune(W, H, nm=(2, 4)), wanda_prune(W, S, 0.5)):
        losses = [layer_loss(W, refit_kept(W, r.W, H, r.mask, it), H) for it in (0, 1, 5, 20)]
        assert losses[0] == layer_loss(W, r.W, H)
        assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses  # strictly better at every step here
        assert losses[-1] < 0.97 * losses[0]
    # Wanda's mask refit lands below Wanda's weights; a solved row stays solved (no division by 0).
    w = wanda_prune(W, S, 0.5)
    Q = refit_kept(W, w.W, H, w.mask, 200)
    assert torch.isfinite(Q).all() and torch.equal(Q == 0, w.mask)


def test_rows_with_everything_pruned_or_nothing_pruned():
    W, _, H = synthetic_layer(rows=4, columns=16, seed=5)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[0] = True  # row 0 fully pruned; rows 1-3 keep everything: their optimum is W itself
    Q = refit_kept(W, W.masked_fill(mask, 0), H, mask, 16)
    assert (Q[0] == 0).all()
    torch.testing.assert_close(Q[1:], W[1:], rtol=1e-4, atol=1e-5)


def test_joint_refit_keeps_the_mask_and_beats_the_single_sweep():
    """quantize --nm/--sparsity with a refit: SparseGPT's mask, the refit, then GPTQ with the mask fixed.
    The zeros dequantize to exactly 0, the pattern holds, and the layer objective against the original
    weight is below the paper's single joint sweep; the errors of the two steps add up exactly."""
    from llmslim.config import GPTQConfig
    from llmslim.quant.gptq import gptq_quantize
    from llmslim.quant.sequential import prune_refit_quantize, solver_options

    W, X, H = synthetic_layer(rows=64, columns=128, seed=6)
    for kw in (dict(nm="2:4"), dict(sparsity=0.5)):
        config = GPTQConfig(bits=4, group_size=32, **kw)
        assert config.refit == 20 and GPTQConfig(bits=4, group_size=32, refit_iters=0, **kw).refit == 0
        r = prune_refit_quantize(W, H, config)
        Q = r.dequantize()
        single = gptq_quantize(W, H, **solver_options(config)).dequantize()
        assert (Q == 0).float().mean() >= 0.5  # (kept weights may also round to the zero point)
        if kw.get("nm"):
            assert masks.nm_holds(Q, 2, 4)
        assert layer_loss(W, Q, H) < layer_loss(W, single, H)
        # Pythagoras: the refit residual is orthogonal, in the damped H the refit solves with, to the
        # quantization error on the kept weights (up to CG's tolerance after 20 iterations).
        p = sparsegpt_prune(W, H, config.sparsity, config.n_m, act_order=config.n_m is not None)
        Wr = refit_kept(W, p.W, H, p.mask, 20)
        Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(128)
        assert layer_loss(W, Q, Hd) == pytest.approx(layer_loss(W, Wr, Hd) + layer_loss(Wr, Q, Hd), rel=1e-3)
        assert (Q[p.mask] == 0).all() and int(p.mask.sum()) == W.numel() // 2
