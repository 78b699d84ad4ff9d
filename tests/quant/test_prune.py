"""Pruning solvers on one layer: SparseGPT against a direct implementation of the paper's update,
exact sparsity, N:M patterns, joint prune + quantize keeping zeros at zero, and the masks."""

import pytest
import torch

from llmslim.nn import GPTQLinear
from llmslim.quant import masks
from llmslim.quant.gptq import column_order, gptq_quantize, inverse_cholesky
from llmslim.quant.sparsegpt import sparsegpt_prune
from llmslim.quant.wanda import accumulate_sq_norms, magnitude_prune, wanda_prune
from tests.quant.test_gptq import synthetic_layer


def err(W, Wp, X):
    return float(((W - Wp) @ X.T).pow(2).sum())


def direct_obs(W, H, mask, damp):
    """The paper's update (arXiv:2301.00774 eq. 3) with nothing clever: for each column i in order,
    invert the Hessian of the columns not yet visited, F = {i, ..., d-1}; set the pruned weights of
    column i to 0 and move the others of F by -(w_i - q_i) / [H_F^-1]_00 * [H_F^-1]_0,:."""
    W = W.clone().double()
    Hd = (H + damp * torch.diag(H).mean() * torch.eye(H.shape[0])).double()
    for i in range(W.shape[1]):
        Finv = torch.linalg.inv(Hd[i:, i:])
        q = W[:, i].masked_fill(mask[:, i], 0)
        e = (W[:, i] - q) / Finv[0, 0]
        W[:, i:] -= e[:, None] * Finv[0][None, :]
        W[:, i] = q
    return W.float()


def test_sparsegpt_equals_the_paper_update_on_a_hand_made_case():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 12, generator=g)
    X = torch.randn(200, 12, generator=g) @ (torch.eye(12) + 0.3 * torch.randn(12, 12, generator=g))
    H = 2 * X.T @ X / X.shape[0]
    r = sparsegpt_prune(W, H, sparsity=0.5, block_size=4)  # three lazy blocks
    assert r.fallback is None and int(r.mask.sum()) == 36
    torch.testing.assert_close(r.W, direct_obs(W, H, r.mask, r.damp_percent), rtol=1e-4, atol=1e-4)
    # One block = one mask chosen up front by the OBS saliency w^2 / [Hinv]_cc^2 of the unchanged W.
    one = sparsegpt_prune(W, H, sparsity=0.5, block_size=12)
    Hinv, _ = inverse_cholesky(H, 0.01)
    saliency = W.square() / torch.diag(Hinv)[None, :].square()
    assert torch.equal(one.mask, masks.smallest(saliency, 36))
    torch.testing.assert_close(one.W, direct_obs(W, H, one.mask, one.damp_percent), rtol=1e-4, atol=1e-4)
    # N:M: the same update, with each mask chosen when its run of M columns is reached.
    nm = sparsegpt_prune(W, H, nm=(2, 4), block_size=4)
    assert masks.nm_holds(nm.W, 2, 4)
    torch.testing.assert_close(nm.W, direct_obs(W, H, nm.mask, nm.damp_percent), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_exact_sparsity_per_layer_and_per_row(sparsity):
    W, X, H = synthetic_layer(rows=48, columns=256)
    n = int(W.numel() * sparsity)
    for r in (sparsegpt_prune(W, H, sparsity), magnitude_prune(W, sparsity)):  # per layer
        assert int((r.W == 0).sum()) == n and int(r.mask.sum()) == n
    S, _ = accumulate_sq_norms(torch.zeros(256), 0, X)
    w = wanda_prune(W, S, sparsity)  # per output row (Wanda's comparison group)
    assert ((w.W == 0).sum(1) == int(256 * sparsity)).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_holds_in_every_group_of_m_inputs(n, m):
    W, X, H = synthetic_layer(rows=32, columns=128)
    S, _ = accumulate_sq_norms(torch.zeros(128), 0, X)
    for r in (sparsegpt_prune(W, H, nm=(n, m)), wanda_prune(W, S, nm=(n, m)), magnitude_prune(W, nm=(n, m))):
        groups = (r.W.reshape(32, 128 // m, m) != 0).sum(-1)
        assert (groups == n).all()  # exactly N kept (random weights have no zeros of their own)
    joint = gptq_quantize(W, H, 4, 32, nm=(n, m))
    assert masks.nm_holds(joint.dequantize(), n, m)


def test_sparsegpt_act_order_is_the_natural_sweep_over_runs_sorted_by_their_largest_hessian_diagonal():
    W, _, H = synthetic_layer(rows=32, columns=128)
    r = sparsegpt_prune(W, H, nm=(2, 4), act_order=True)
    assert ((r.W.reshape(32, 32, 4) != 0).sum(-1) == 2).all()  # the 2:4 pattern holds in the stored order
    assert torch.equal(r.W == 0, r.mask)
    perm = (torch.argsort(torch.diag(H).view(-1, 4).amax(1), descending=True)[:, None] * 4 + torch.arange(4)).flatten()
    by_hand = sparsegpt_prune(W[:, perm], H[perm][:, perm], nm=(2, 4))
    torch.testing.assert_close(r.W[:, perm], by_hand.W)
    assert not torch.equal(perm, torch.arange(128))  # the case does reorder
    with pytest.raises(ValueError, match="N:M"):
        sparsegpt_prune(W, H, 0.5, act_order=True)


def test_sparsegpt_beats_wanda_beats_magnitude_on_the_layer_objective():
    W, X, H = synthetic_layer(rows=64, columns=128, seed=2)
    S, _ = accumulate_sq_norms(torch.zeros(128), 0, X)
    for kw in (dict(sparsity=0.5), dict(nm=(2, 4))):
        sg, wa, mag = sparsegpt_prune(W, H, **kw), wanda_prune(W, S, **kw), magnitude_prune(W, **kw)
        assert err(W, sg.W, X) < err(W, wa.W, X) < err(W, mag.W, X)


@pytest.mark.parametrize("kw", [dict(sym=True), dict(sym=False), dict(group_size=-1, sym=False), dict(mse=True)])
@pytest.mark.parametrize("prune", [dict(sparsity=0.5), dict(nm=(2, 4))])
def test_joint_prune_quantize_keeps_zeros_at_zero(kw, prune):
    W, X, H = synthetic_layer(rows=64, columns=128, seed=4)
    opts = dict(group_size=32) | kw
    r = gptq_quantize(W, H, 4, **opts, **prune)
    assert r.mask is not None and r.fallback is None
    Wq = r.dequantize()
    assert (Wq[r.mask] == 0).all()
    assert float(r.mask.float().mean()) == pytest.approx(0.5, abs=1e-3)
    # ... and through the GPTQ v1 buffers every consumer reads
    layer = GPTQLinear.from_codes(r.Q, r.scales, r.zeros, r.g_idx, opts["group_size"], 4, None)
    assert (layer.dequantized_weight()[r.mask] == 0).all()
    # one sweep beats pruning first and rounding after (the quantizer compensates the pruning error)
    pruned = sparsegpt_prune(W, H, **prune)
    two = gptq_quantize(pruned.W, H, 4, **opts, keep_zeros=pruned.mask)
    assert (two.dequantize()[pruned.mask] == 0).all()
    from llmslim.grid import quantize_rtn

    Q, s, z = quantize_rtn(pruned.W, 4, opts["group_size"], opts.get("sym", True))
    g = torch.arange(128) // (opts["group_size"] if opts["group_size"] != -1 else 128)
    rtn_after = (Q.float() - z[g].T.float()) * s[g].T
    assert err(W, Wq, X) < err(W, rtn_after, X)
    # the reorderings keep every zero (group-aware reordering is on in the CLI's joint mode, act-order refused)
    for order in (dict(desc_act=True), dict(act_group_aware=True)):
        r = gptq_quantize(W, H, 4, 32, **order, **prune)
        assert (r.dequantize()[r.mask] == 0).all()
        if "nm" in prune:
            assert masks.nm_holds(r.dequantize(), *prune["nm"])


def test_joint_nm_grid_leaves_out_weights_pruned_later_in_the_group():
    # One group of 8 columns, 2:4. H is diagonal (no OBS cross-updates): columns 4 and 5 are the least
    # salient of the second run (column 5 is a large weight on a nearly unused input), so both get
    # pruned when the sweep reaches them. The group's grid, fixed at column 0, must not stretch to
    # reach column 5: the kept +-1 weights then round within a step of 2/15, not of 6/15.
    W = torch.tensor([[1.0, -1, 1, -1, 0.1, 3, 1, -1]]).repeat(4, 1)
    H = torch.diag(torch.tensor([100.0, 100, 100, 100, 100, 1e-6, 100, 100]))
    r = gptq_quantize(W, H, 4, 8, sym=True, mse=False, nm=(2, 4))
    assert r.mask[:, 4:6].all()
    Wq = r.dequantize()
    kept = ~r.mask
    assert float((Wq[kept] - W[kept]).abs().max()) < 0.1  # 0.8 on the stretched grid
    assert float(r.scales.max()) < 0.2  # 2 / 15 for |w| <= 1, not 6 / 15 for the pruned 3


def test_joint_without_pruning_is_plain_gptq():
    W, _, H = synthetic_layer(rows=32, columns=64)
    a, b = gptq_quantize(W, H, 4, 32), gptq_quantize(W, H, 4, 32, sparsity=0.0, nm=None)
    assert torch.equal(a.Q, b.Q) and b.mask is None


def test_joint_falls_back_to_magnitude_then_rtn_when_cholesky_fails():
    W, _, H = synthetic_layer(rows=32, columns=64)
    H = H.clone()
    H[0, 0] = float("nan")
    r = gptq_quantize(W, H, 4, 32, nm=(2, 4))
    assert "magnitude" in r.fallback and masks.nm_holds(r.dequantize(), 2, 4)
    p = sparsegpt_prune(W, H, sparsity=0.5)
    assert "magnitude" in p.fallback and int(p.mask.sum()) == W.numel() // 2


def test_column_order_keeps_nm_units_together():
    diag = torch.rand(64, generator=torch.Generator().manual_seed(0))
    g_idx = torch.arange(64) // 16
    for kw in (dict(desc_act=True, static_groups=False, act_group_aware=False),
               dict(desc_act=False, static_groups=False, act_group_aware=True)):
        perm, gi = column_order(diag, g_idx, 16, unit=4, **kw)
        assert sorted(perm.tolist()) == list(range(64))
        units = perm.view(-1, 4)
        assert ((units[:, 1:] - units[:, :-1]) == 1).all() and (units[:, 0] % 4 == 0).all()
        if kw["act_group_aware"]:
            assert torch.equal(gi, g_idx)
    # unit 1 is exactly the old order
    perm1, _ = column_order(diag, g_idx, 16, True, False, False)
    assert torch.equal(perm1, torch.argsort(diag, descending=True))


def test_masks_select_exactly_k_even_with_ties():
    scores = torch.ones(4, 8)
    assert int(masks.smallest(scores, 13).sum()) == 13
    assert (masks.smallest_per_row(scores, 3).sum(1) == 3).all()
    m = masks.nm_mask(torch.arange(16.0).view(2, 8), 2, 4)
    assert m.tolist()[0] == [True, True, False, False, True, True, False, False]
    with pytest.raises(ValueError):
        masks.nm_mask(torch.ones(2, 6), 2, 4)
