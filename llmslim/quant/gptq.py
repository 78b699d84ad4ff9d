"""The GPTQ solver: pure functions on one layer, in the notation of the paper.

Frantar, Ashkboos, Hoefler, Alistarh. "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv:2210.17323 (reference code: IST-DASLab/gptq).

    W   [rows, columns]  the layer weight (out x in)
    H   [columns, columns] = 2 X X^T, the Hessian of the layer-wise objective ||WX - QX||^2
    Hinv  the upper Cholesky factor of H^-1, which is all the column updates need
    Err   the scaled quantization error of the columns of one lazy block

With ``sparsity`` or ``nm`` the same sweep also prunes: SparseGPT's joint sparse + quantized mode
(Frantar & Alistarh, arXiv:2301.00774, Sec. 3.5), where each column is masked and quantized at
once and the OBS update lets the columns after it compensate both errors.

Nothing here knows about models or hooks; the driver in ``sequential.py`` feeds it.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .. import ggml_quants
from ..grid import GGUF_GRIDS, find_params, find_params_gguf, maxq_for, quantize_rtn
from . import masks


def accumulate_hessian(H: torch.Tensor, nsamples: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add the inputs ``X [..., columns]`` to a running mean of ``2 X X^T`` (H float32).

    The running mean (reference ``add_batch``) keeps H at the scale of one sample, so that
    hundreds of thousands of tokens never overflow or lose precision in float32. bf16 inputs (the
    block driver's bf16 forwards) are multiplied in bf16 and summed in float32: the product of two
    bf16 numbers is exact in float32, so H is the float32 GEMM's, ~2x faster on AMX/AVX512-BF16.
    """
    exact_in_bf16 = X.dtype == torch.bfloat16
    X = X.reshape(-1, X.shape[-1]).float()
    n, d = X.shape
    H.mul_(nsamples / (nsamples + n))
    nsamples += n
    alpha = 2 / nsamples  # the scaling rides on the GEMM instead of a copy of X
    with bf16_products() if exact_in_bf16 else nullcontext():
        if d < 512:
            H.addmm_(X.T, X, alpha=alpha)
            return H, nsamples
        # H is symmetric: compute the two diagonal blocks and one off-diagonal block, mirror the
        # other (3/4 of the GEMM work; the largest single cost of quantizing after the forward).
        h = d // 2
        A, B = X[:, :h], X[:, h:]
        H[:h, :h].addmm_(A.T, A, alpha=alpha)
        H[:h, h:].addmm_(A.T, B, alpha=alpha)
        H[h:, h:].addmm_(B.T, B, alpha=alpha)
    H[h:, :h] = H[:h, h:].T
    return H, nsamples


@contextmanager
def bf16_products():
    """float32 matrix products on CPU (oneDNN) may round their inputs to bf16 and accumulate in
    float32: exact for inputs that are bf16 numbers, at the speed of bf16 GEMMs. torch 2.13 has no
    bf16 x bf16 -> float32 GEMM on CPU (``mm``'s ``out_dtype`` is CUDA only), so this is how to get
    one. The setting is process-wide: only for products whose inputs are all bf16 numbers, and only
    where no other thread multiplies at the same time (the block driver's lanes take turns)."""
    mkldnn = torch.backends.mkldnn.matmul
    before = mkldnn.fp32_precision
    mkldnn.fp32_precision = "bf16"
    try:
        yield
    finally:
        mkldnn.fp32_precision = before


def layer_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """The layer objective ||WX - QX||^2 / n, computed from the Hessian: tr(D H D^T) / 2."""
    D = (W.float() - Wq.float())
    return float((D @ H * D).sum() / 2)


@dataclass
class GPTQResult:
    Q: torch.Tensor  # int32 [rows, columns], codes in [0, 2**bits)
    scales: torch.Tensor  # float32 [groups, rows], exactly representable in fp16
    zeros: torch.Tensor  # int32 [groups, rows]
    g_idx: torch.Tensor  # int32 [columns], the group of each input column
    loss: float  # GPTQ's own error estimate: sum (w - q)^2 / d^2 / 2
    damp_percent: float  # the damping that made H positive definite
    fallback: str | None = None  # why this layer fell back to RTN, if it did
    mask: torch.Tensor | None = None  # bool [rows, columns], True where joint pruning zeroed the weight
    # A ggml grid (K-quants, Q5_0, ...): w^ = scale * (q - zero) + offset per group, and the block
    # scales as GGUF stores them (``gguf.encode()`` is the file's bytes).
    offsets: torch.Tensor | None = None  # float32 [groups, rows]
    gguf: ggml_quants.Quantized | None = None

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        W = (self.Q.float() - self.zeros[g].T.float()) * self.scales[g].T
        return W if self.offsets is None else W + self.offsets[g].T


@contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` torch threads. The per-column loop runs on one: its ops are tiny
    vectors, and handing each to a thread pool costs more than the work (measured 10-20x slower
    with 2 threads on 2 cores). The ``mse`` grid search of a group stays on one thread too: with 2
    it was 6-14x slower whenever another job shared the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inverse_cholesky(H: torch.Tensor, damp_percent: float, max_tries: int = 8):
    """Upper Cholesky factor of (H + damp I)^-1, raising the damping until H is positive definite.

    Damping by a fraction of the mean diagonal is the paper's fix for near-singular H (Sec. 4,
    "Cholesky reformulation"); when 1% is not enough we double it, and give up (RTN) at 100%.
    """
    mean_diag = torch.mean(torch.diag(H))
    n = H.shape[0]
    flip = torch.arange(n - 1, -1, -1)
    percent = damp_percent
    for _ in range(max_tries):
        # chol(H^-1) without forming H^-1: with J the reversal, J H J = L L^T gives
        # H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular. One Cholesky and one
        # triangular solve instead of Cholesky, cholesky_inverse and a second Cholesky (~2.5x faster).
        # Each n x n copy is 0.5 GB at 11008 inputs, so at most three live at once here: flip(0, 1) is
        # J H J in one contiguous copy, damped on its diagonal in place (J keeps the diagonal on the
        # diagonal), and the identity exists only once the factor's input is gone.
        Hd = H.flip(0, 1)
        Hd.diagonal().add_(percent * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            U = torch.linalg.solve_triangular(L, torch.eye(n, dtype=H.dtype), upper=False)
            del L
            # indexing, not flip(): U is column-major, the result must be row-major; one axis at a
            # time so that the first copy is freed before the second is made
            U = U[flip]
            U = U[:, flip]
            if bool(torch.isfinite(U.diagonal()).all()):
                return U, percent
        percent = min(percent * 2, 1.0)
    return None, percent


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    mse: bool = False,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_group_aware: bool = False,
    grid: str | None = None,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    keep_zeros: torch.Tensor | None = None,
    importance: str | None = None,
    full_range: bool = False,
) -> GPTQResult:
    """GPTQ on one layer. ``grid`` (``q4_0``/``q8_0``) solves on that GGUF block grid instead of
    GPTQ's own: llama.cpp's scale rule per group of 32 (``grid.find_params_gguf``). Any other GGUF
    type of ``ggml_quants`` (``q4_k``, ``q6_k``, ``q5_0``, ...) is solved on a grid fitted before the
    sweep (``fit_ggml_grid``).

    ``importance`` weights the ``mse`` search of each group's scale: ``"hessian"`` by each column's
    Hessian diagonal (the importance matrix llama.cpp quantizes with), ``"imatrix"`` by that times
    sqrt(sigma2 + w^2) as llama.cpp's ``quantize_row_q4_0_impl`` weights it, ``None`` the unweighted
    |w - w^|^2.4 clipping search of the GPTQ reference code (``GPTQConfig.importance`` chooses: eval/gguf.md)."""
    if importance not in (None, "hessian", "imatrix"):
        raise ValueError(f"importance must be None, 'hessian' or 'imatrix', got {importance!r}")
    ggml = grid is not None and grid not in GGUF_GRIDS
    if ggml:  # the grid is fixed before the sweep, one group per sub-block
        if bool(sparsity) or nm is not None or keep_zeros is not None:
            raise ValueError(f"pruning does not combine with the {grid} grid")
        _, group_size, maxq, _ = ggml_quants.LAYOUT[grid]
        static_groups = True
    else:
        maxq = maxq_for(bits)
    W = W.detach().clone().float()
    H = H.detach().clone().float()
    rows, columns = W.shape

    # ``keep_zeros`` (bool [rows, columns]): a mask fixed in advance, e.g. the zeros of a model pruned
    # before; they stay exactly zero (the OBS updates would otherwise fill them in).
    prune = bool(sparsity) or nm is not None or keep_zeros is not None
    if not bool(torch.isfinite(H.sum())):
        return _rtn_fallback(W, bits, group_size, sym, mse, damp_percent, "Hessian is not finite", grid,
                             sparsity, nm, full_range)

    # Dead inputs (always zero in calibration) carry no information: fix their diagonal so H
    # stays invertible, and zero the weights since they never contribute (reference code).
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # A column's importance for its group's scale: its Hessian diagonal (fixed dead inputs included:
    # their weights are 0, any scale reproduces them).
    diag = torch.diag(H).clone()
    # llama.cpp's sigma2 for the "imatrix" weighting: the row's mean square
    sigma2 = W.square().mean(1, keepdim=True) if importance == "imatrix" else None

    def params(cols: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        imp = None
        if mse and importance is not None:
            imp = d[None, :] if importance == "hessian" else d[None, :] * torch.sqrt(sigma2 + cols.square())
        if grid:
            return find_params_gguf(cols, grid, mse, importance=imp)
        return find_params(cols, bits, sym, mse, importance=imp, full_range=full_range)

    if group_size == -1:
        g_idx = torch.zeros(columns, dtype=torch.long)
    else:
        g_idx = torch.arange(columns) // group_size  # natural groups (desc_act redefines them below)
    # N:M groups move as one unit through any reordering, so each stays M adjacent columns.
    perm, g_idx = column_order(torch.diag(H), g_idx, group_size, desc_act, static_groups, act_group_aware,
                               unit=nm[1] if nm else 1)

    # static_groups: fix every group's grid up front on the unpermuted weights (AutoGPTQ's option).
    fit = None
    if ggml:
        fit, static = fit_ggml_grid(W, H, grid)
    elif static_groups:
        static = [params(W[:, g_idx == g], diag[g_idx == g]) for g in range(int(g_idx.max()) + 1)]
    else:
        static = None
    W, H = W[:, perm], H[perm][:, perm]
    fixed = None if keep_zeros is None else keep_zeros[:, perm]
    gid = g_idx[perm]  # group of each column in quantization order; non-static groups are contiguous
    diag = diag[perm]

    Hinv, used_damp = inverse_cholesky(H, damp_percent)
    if Hinv is None:
        return _rtn_fallback(W[:, torch.argsort(perm)], bits, group_size, sym, mse, used_damp,
                             "Cholesky failed even at 100% damping", grid, sparsity, nm, full_range)

    Qint = torch.zeros(rows, columns)
    Losses = torch.zeros(rows, columns)
    Mask = torch.zeros(rows, columns, dtype=torch.bool) if prune else None
    grids: dict[int, tuple[torch.Tensor, ...]] = dict(enumerate(static)) if static else {}
    if group_size == -1:
        grids[0] = params(W, diag)
    current, offset = -1, None

    for i1 in range(0, columns, block_size):  # lazy batch updates (paper Sec. 4, "Lazy Batch-Updates")
        i2 = min(i1 + block_size, columns)
        # The block is held transposed ([columns, rows]) so that each column, and each rank-1
        # update of the columns after it, is one contiguous run of memory.
        W1 = W[:, i1:i2].T.clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = None  # [block columns, rows], True = pruned (the block is held transposed)
        if prune:
            # SparseGPT's adaptive mask selection (arXiv:2301.00774 Sec. 3.3): per block of columns,
            # prune the weights of least OBS saliency w^2 / [H^-1]_cc^2, as updated so far.
            d1 = torch.diag(Hinv1)[:, None]
            if fixed is not None:
                mask1 = fixed[:, i1:i2].T.contiguous()
            elif nm is None:
                k = masks.count_for(rows * i2, sparsity) - masks.count_for(rows * i1, sparsity)
                mask1 = masks.smallest(W1.square() / d1.square(), k)
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
        with torch_threads(1):
            for i in range(i2 - i1):
                if nm is not None and fixed is None and i % nm[1] == 0:
                    # N:M (Sec. 3.5): choose within the next M columns at the moment they are reached.
                    m = nm[1]
                    mask1[i:i + m] = masks.nm_mask((W1[i:i + m].square() / d1[i:i + m].square()).T, *nm).T
                g = int(gid[i1 + i])
                if g != current:
                    current = g
                    if g not in grids:
                        # A new group's grid comes from its columns as updated so far.
                        size = int((gid == g).sum())
                        ahead = W1[i:i + size].T
                        if mask1 is not None:  # weights already chosen for pruning need no grid range
                            chosen = mask1[i:i + size].T
                            if nm is not None and fixed is None:
                                # N:M runs of the group not reached yet: the weights the sweep would
                                # prune there now (by their saliency so far) stay out of the range too.
                                # Without this one pruned outlier sets a coarse grid for the whole
                                # group (measured on SmolLM2 at 2:4 + 4-bit g64, eval/pruning.md).
                                sal = W1[i:i + size].square() / d1[i:i + size].square()
                                chosen = chosen | masks.nm_mask(sal.T, *nm)
                            ahead = ahead.masked_fill(chosen, 0)
                        if ahead.shape[1] < size:
                            ahead = torch.cat([ahead, W[:, i2:i2 + size - ahead.shape[1]]], dim=1)
                        grids[g] = params(ahead, diag[i1 + i:i1 + i + size])
                    scale, zero = grids[g][0][:, 0], grids[g][1][:, 0]
                    offset = grids[g][2][:, 0] if len(grids[g]) > 2 else None
                    if offset is not None:  # a sub-block whose scale is 0 decodes to its offset, whatever q
                        divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
                # The hot loop (one iteration per input column): few ops, in place.
                w = W1[i]
                if offset is None:
                    # A pruned weight quantizes to its zero point, which dequantizes to exactly 0.
                    q = torch.div(w if mask1 is None else w.masked_fill(mask1[i], 0), scale).round_().add_(
                        zero).clamp_(0, maxq)
                    Q1[i] = q
                    err1 = q.sub_(zero).mul_(scale).neg_().add_(w).div_(Hinv1[i, i])  # (w - dequant(q)) / d
                else:  # w^ = scale * (q - zero) + offset, q = round((w - offset) / scale) + zero as llama.cpp
                    q = torch.sub(w, offset).div_(divisor).round_().add_(zero).clamp_(0, maxq)
                    Q1[i] = q
                    err1 = q.sub_(zero).mul_(scale).add_(offset).neg_().add_(w).div_(Hinv1[i, i])
                # OBS update of the not-yet-quantized columns of this block (paper eq. 3).
                W1[i:].addr_(Hinv1[i, i:], err1, alpha=-1)
                Err1[i] = err1
        Qint[:, i1:i2] = Q1.T
        Losses[:, i1:i2] = Err1.T.square() / 2
        if mask1 is not None:
            Mask[:, i1:i2] = mask1.T
        W[:, i2:] -= Err1.T @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    ngroups = len(grids)
    Q = Qint[:, invperm].to(torch.int32).contiguous()
    return GPTQResult(
        Q=Q,
        scales=torch.stack([grids[g][0][:, 0] for g in range(ngroups)]),
        zeros=torch.stack([grids[g][1][:, 0] for g in range(ngroups)]).to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        loss=float(Losses.sum()),
        damp_percent=used_damp,
        mask=None if Mask is None else Mask[:, invperm].contiguous(),
        offsets=torch.stack([grids[g][2][:, 0] for g in range(ngroups)]) if ggml else None,
        gguf=fit.with_codes(Q.numpy()) if ggml else None,
    )


def fit_ggml_grid(W: torch.Tensor, H: torch.Tensor, kind: str) -> tuple[ggml_quants.Quantized, list]:
    """The grid of a GGUF type whose block scales are themselves quantized (the K-quants' 6-bit
    sub-block scales and mins under an fp16 super-block scale; Q5_0/Q5_1's fp16 scale), fitted once,
    before the sweep, on the layer's weights: per group (sub-block) ``(scale, zero, offset)`` columns.

    Why up front: a K-quant super-block covers 256 inputs, 8 (or 16) GPTQ groups, and its sub-block
    scales are coded relative to each other (``d * sc`` with ``sc`` on 6 bits); fitting them per group
    as the sweep reaches it (GPTQ's default) would have to fix the super-block scale from the first
    sub-block alone. Fixing every group before the sweep is the static-groups choice of AutoGPTQ
    (also what GPTQ does for act-order with static groups); GPTQ's error compensation then works on
    the rounding of each weight (Frantar et al., arXiv:2210.17323, Sec. 4) against that fixed grid.

    The fit is llama.cpp's own quantizer with its importance matrix (``quantize_row_q4_K_impl`` etc.,
    ``ggml_quants.quantize``), fed with the Hessian's diagonal / 2 = the mean squared activation of
    each input column -- exactly what llama.cpp's imatrix tool collects from calibration text. So
    before any compensation the codes are llama.cpp's imatrix quantization of the same layer.
    """
    imatrix = (torch.diag(H) / 2).double().numpy().astype("float32")
    fit = ggml_quants.quantize(W.numpy(), kind, imatrix)
    scale, zero, offset = fit.grid()
    rows = W.shape[0]
    z = torch.full((rows, 1), float(zero))
    return fit, [(torch.from_numpy(scale[:, g:g + 1].copy()), z, torch.from_numpy(offset[:, g:g + 1].copy()))
                 for g in range(scale.shape[1])]


def column_order(
    diag: torch.Tensor,
    g_idx: torch.Tensor,
    group_size: int,
    desc_act: bool,
    static_groups: bool,
    act_group_aware: bool,
    unit: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The order in which columns are quantized, and the group of each column.

    ``unit`` > 1 keeps runs of ``unit`` adjacent columns together (N:M groups), ranked by their
    largest diagonal entry; it must divide the group size.
    """
    columns = diag.numel()
    score = diag if unit == 1 else diag.view(-1, unit).amax(1)  # one score per unit
    ug = g_idx if unit == 1 else g_idx[::unit]  # the group of each unit

    def expand(order: torch.Tensor) -> torch.Tensor:
        return order if unit == 1 else (order[:, None] * unit + torch.arange(unit)).flatten()

    if desc_act:
        # Act-order (paper Sec. 6, reference "--act-order"): quantize columns of large activation
        # first, while the most error can still be compensated by the remaining columns.
        perm = expand(torch.argsort(score, descending=True))
        if not static_groups and group_size != -1:
            g_idx = torch.empty_like(g_idx)
            g_idx[perm] = torch.arange(columns) // group_size  # groups follow quantization order
    elif act_group_aware and group_size != -1:
        # Group-aware reordering (GAR, Gafni et al., arXiv:2505.14638): act-order inside each group,
        # groups ordered by their largest diagonal. Groups stay contiguous in the original order,
        # so g_idx stays trivial and inference pays nothing for the reordering.
        order = torch.argsort(torch.stack([score[ug == g].max() for g in range(int(ug.max()) + 1)]),
                              descending=True)
        perm = expand(torch.cat([torch.nonzero(ug == g)[:, 0][torch.argsort(score[ug == g], descending=True)]
                                 for g in order.tolist()]))
    else:
        perm = torch.arange(columns)
    return perm, g_idx


def magnitude_mask(W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """The baseline mask: smallest |w| per layer, or per N:M group."""
    if nm is not None:
        return masks.nm_mask(W.abs(), *nm)
    return masks.smallest(W.abs(), masks.count_for(W.numel(), sparsity))


def _rtn_fallback(W, bits, group_size, sym, mse, damp_percent, why, grid=None, sparsity=0.0, nm=None,
                  full_range=False) -> GPTQResult:
    mask = None
    if sparsity or nm is not None:  # no Hessian to prune with: magnitude, then RTN keeps the zeros
        mask = magnitude_mask(W, sparsity, nm)
        W = W.masked_fill(mask, 0)
        why += "; magnitude pruning"
    if grid is not None and grid not in GGUF_GRIDS:  # llama.cpp's own rounding of that type
        fit = ggml_quants.quantize(W.numpy(), grid)
        scale, zero, offset = fit.grid()
        sub = ggml_quants.sub_block(grid)
        return GPTQResult(Q=torch.from_numpy(fit.q.astype("int32")), scales=torch.from_numpy(scale.T.copy()),
                          zeros=torch.full((scale.shape[1], scale.shape[0]), zero, dtype=torch.int32),
                          g_idx=torch.arange(W.shape[1], dtype=torch.int32) // sub, loss=float("nan"),
                          damp_percent=damp_percent, fallback=why, offsets=torch.from_numpy(offset.T.copy()), gguf=fit)
    Q, scales, zeros = quantize_rtn(W, bits, group_size, sym, mse, grid, full_range)
    columns = W.shape[1]
    g_idx = (torch.arange(columns, dtype=torch.int32) // group_size) if group_size != -1 else torch.zeros(
        columns, dtype=torch.int32)
    return GPTQResult(Q=Q, scales=scales, zeros=zeros, g_idx=g_idx, loss=float("nan"),
                      damp_percent=damp_percent, fallback=why, mask=mask)
