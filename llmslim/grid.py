"""Integer quantization grids: the ground floor under every quantizer, format and module.

A grid maps a row of floats to integers in ``[0, maxq]`` with one ``scale`` and one integer
``zero`` per row (GPTQ's convention, arXiv:2210.17323, reference ``quant.py``):

    q    = clamp(round(w / scale) + zero, 0, maxq)
    w^   = scale * (q - zero)

``quantize``/``dequantize`` are a round-trippable pair; ``find_params`` picks ``scale`` and
``zero`` for each row (min/max, or the MSE-optimal clipping search of the GPTQ reference code).
Grouping is done by the caller: a group is just a set of columns given to ``find_params``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def maxq_for(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return (1 << bits) - 1


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Floats -> integers in [0, maxq]. ``scale``/``zero`` broadcast against ``w`` (``[rows, 1]``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integers -> floats on the grid; the inverse of ``quantize`` for values on the grid."""
    return scale * (q - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


def _minmax_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    # A row that is all zeros would give scale 0; any scale then reproduces it exactly.
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        # GPTQ places the symmetric zero at (maxq + 1) / 2, e.g. 8 for 4 bits.
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        # The GPTQ v1 checkpoint stores zero - 1, so a zero of 0 cannot be written without
        # overflowing its bit field (every v1 loader adds 1 back). Keep zero in [1, maxq] and
        # widen the scale when needed so that the row's minimum stays on the grid.
        zero = torch.round(-xmin / scale)
        low = zero < 1
        scale = torch.where(low, torch.maximum(xmax / (maxq - 1), -xmin), scale)
        zero = torch.where(low, torch.ones_like(zero), torch.clamp(zero, 1, maxq))
    # Checkpoints store scales in fp16: quantize against exactly the scale that will be stored.
    return to_fp16_grid(scale), zero


def _full_range_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int):
    """The symmetric grid over all ``maxq + 1`` levels: the row's extreme value ``m`` (the larger
    magnitude, with its sign) lands exactly on code 0, ``scale = -2 m / (maxq + 1)`` (signed), and
    the other side reaches ``(maxq - 1) / 2`` steps: a step ``(maxq + 1) / maxq`` finer than
    ``_minmax_params``' symmetric grid, which spends half a step beyond each end. llama.cpp's Q4_0
    rule for any bit width; AutoRound's default "full range" symmetric grid."""
    m = torch.where(xmax >= -xmin, xmax, xmin)
    m = torch.where(m == 0, torch.ones_like(m), m)  # an all-zero row: any scale reproduces it
    half = (maxq + 1) // 2
    return _signed_fp16(m / -half), torch.full_like(m, half)


def to_fp16_grid(scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(scale, min=2**-20).half().float()


# The importance-weighted scale search. llama.cpp quantizes with an importance matrix by trying,
# per block, inverse scales (nmax + 0.1 k) / max for k = -9..9 -- shrinking AND widening the
# range by up to ~11% -- and for the codes each one gives, the weighted least-squares scale
# sum(w x l) / sum(w l^2); it keeps the candidate of least weighted error (ggml-quants.c
# ``make_qx_quants``, rmse_type 1, called by ``quantize_row_q4_0_impl`` and ``quantize_q6_K``;
# ``make_qkx3_quants`` does the same for the asymmetric types). Inside GPTQ the importance of a
# column is its Hessian diagonal diag(2 X X^T / n) -- llama-imatrix's statistic, times 2 --
# because ||(w - w^) X||^2 / n weights each column's error by exactly that (ignoring the
# cross terms, which GPTQ's updates handle).
EXPAND = 0.15  # widen the range by up to 15% (llama.cpp's widest candidate for Q4_0: 8 / 7.1 = 1.127)


def range_factors(grid: int = 100, maxshrink: float = 0.8) -> torch.Tensor:
    """Multipliers of the full range: ``find_params``' shrinks 1 - i/grid (i < maxshrink * grid)
    followed by widenings 1 + i/grid up to ``EXPAND``. The shrinks come first and are the very
    values of the unweighted search, so the weighted search's candidates include all of its."""
    shrink = [1 - i / grid for i in range(int(maxshrink * grid))]
    widen = [1 + i / grid for i in range(1, int(EXPAND * grid) + 1)]
    return torch.tensor(shrink + widen, dtype=torch.float32)


def weighted_search(
    w: torch.Tensor, importance: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, maxq: int, to_grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w [rows, cols]``, the candidate ``(scale, zero)`` (``[candidates, rows]`` each)
    of least ``sum importance * (w - w^)^2``, with each candidate's codes also refitted to their
    weighted least-squares scale (rounded by ``to_grid`` to the scale the format stores; the codes
    are re-rounded against it, as GPTQ will). Returns ``[rows]`` tensors.

    Ties go to the earlier candidate, so a row all of whose candidates are equally good (a row of
    zeros, an importance of 0) keeps the full range, as the unweighted search does."""
    imp = importance.float().expand_as(w)
    best_err = torch.full((w.shape[0],), float("inf"))
    best_s, best_z = scales[0].clone(), zeros[0].clone()
    step = max(1, (1 << 19) // w.numel())  # candidates at a time: ~2 MB per temporary, cache-sized
    for s, z in zip(scales.split(step), zeros.split(step), strict=True):
        q = quantize(w, s[..., None], z[..., None], maxq)
        err = (imp * (dequantize(q, s[..., None], z[..., None]) - w).square_()).sum(-1)
        # llama.cpp's refit: the codes fixed, the scale that minimizes the weighted error of the row.
        lvl = q.sub_(z[..., None])
        num, den = (imp * w * lvl).sum(-1), (imp * lvl * lvl).sum(-1)
        s2 = to_grid(torch.where(den > 0, num / den, s))
        ok = (den > 0) & (s2 * s > 0)  # never flip the sign of the scale
        s2 = torch.where(ok, s2, s)
        err2 = (imp * (fake_quantize(w, s2[..., None], z[..., None], maxq) - w).square_()).sum(-1)
        err2 = torch.where(ok, err2, torch.full_like(err2, float("inf")))
        for cs, ce in ((s, err), (s2, err2)):
            e, k = ce.min(0)  # first minimum over the chunk
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_s = torch.where(better, cs.gather(0, k[None])[0], best_s)
            best_z = torch.where(better, z.gather(0, k[None])[0], best_z)
    return best_s, best_z


def find_params(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    mse: bool = False,
    norm: float = 2.4,
    grid: int = 100,
    maxshrink: float = 0.8,
    importance: torch.Tensor | None = None,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``scale`` and ``zero`` (both ``[rows, 1]``) for a 2-D ``w``.

    The range always includes 0 (as in GPTQ), so zero lands inside the grid. With ``mse``,
    shrink the range by up to ``maxshrink`` and keep, per row, the candidate with the lowest
    ``|w - w^|^norm`` (the clipping search of the GPTQ reference implementation). With ``mse`` and
    an ``importance`` per column (``[cols]`` or ``[rows, cols]``), the search minimizes
    ``sum importance * (w - w^)^2`` instead, over more candidates (``weighted_search``).
    ``full_range`` (symmetric only): the signed-scale grid of ``_full_range_params``.
    """
    maxq = maxq_for(bits)
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if full_range and sym:
        def params(lo, hi):
            return _full_range_params(lo, hi, maxq)
        to_grid = _signed_fp16
    else:
        def params(lo, hi):
            return _minmax_params(lo, hi, maxq, sym)
        to_grid = to_fp16_grid
    scale, zero = params(xmin, xmax)
    if mse and importance is not None:
        p = range_factors(grid, maxshrink)[:, None]
        s, z = params(p * xmin, p * xmax)
        scale, zero = weighted_search(w, importance, s, z, maxq, to_grid)
    elif mse:
        best = torch.full_like(xmin, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            s, z = params(p * xmin, p * xmax)
            err = (fake_quantize(w, s[:, None], z[:, None], maxq) - w).abs_().pow_(norm).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale[:, None], zero[:, None]


def group_slices(columns: int, group_size: int) -> list[slice]:
    """Column ranges of each group; ``group_size == -1`` means one group (per-channel).

    The last group may be partial: a group size that does not divide the input size is
    valid in the GPTQ format (SmolLM2's 576 columns at g128 give 5 groups).
    """
    if group_size == -1:
        return [slice(0, columns)]
    return [slice(s, min(s + group_size, columns)) for s in range(0, columns, group_size)]


def quantize_rtn(
    W: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool = False, grid: str | None = None,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on a ``[out, in]`` weight.

    Returns integer codes ``[out, in]`` and ``scales``/``zeros`` of shape ``[groups, out]``
    (the layout of the checkpoint format). ``grid`` (``q4_0``/``q8_0``) puts the weights on that
    GGUF grid: llama.cpp's own rounding without ``mse``, an MSE-clipped scale with it.
    """
    if grid is not None and not mse:
        return quantize_gguf_reference(W, grid)
    maxq = maxq_for(bits)
    W = W.float()
    Q = torch.empty_like(W)
    scales, zeros = [], []
    for sl in group_slices(W.shape[1], group_size):
        scale, zero = (find_params_gguf(W[:, sl], grid, mse) if grid
                       else find_params(W[:, sl], bits, sym, mse, full_range=full_range))
        Q[:, sl] = quantize(W[:, sl], scale, zero, maxq)
        scales.append(scale[:, 0])
        zeros.append(zero[:, 0])
    return Q.to(torch.int32), torch.stack(scales), torch.stack(zeros).to(torch.int32)


def dequantize_groups(
    Q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """``[out, in]`` floats from codes, ``[groups, out]`` scales/zeros and the column->group map."""
    return (Q.float() - zeros[g_idx].T.float()) * scales[g_idx].T.float()


# --- GGUF's legacy block grids (llama.cpp ``ggml-quants.c``) ------------------------------------
# Blocks of 32 consecutive weights of a row share one fp16 scale ``d``:
#   Q4_0: w^ = d * (q - 8), q in 0..15       -- GPTQ 4-bit symmetric, group 32, zero 8
#   Q8_0: w^ = d * k,       k in -128..127   -- GPTQ 8-bit symmetric, group 32, zero 128 (q = k + 128)
# llama.cpp picks d from the block's largest magnitude: Q4_0 d = m / -8 with m that signed value
# (so m itself lands exactly on q = 0), Q8_0 d = max|w| / 127. Scales are signed for Q4_0.
GGUF_BLOCK = 32
GGUF_GRIDS = {"q4_0": (4, 8), "q8_0": (8, 128)}  # type -> (bits, zero)


def gguf_grid(kind: str) -> tuple[int, int, int]:
    """``(bits, zero, maxq)`` of a GGUF block grid."""
    if kind not in GGUF_GRIDS:
        raise ValueError(f"unknown GGUF grid {kind!r}; known: {', '.join(GGUF_GRIDS)}")
    bits, zero = GGUF_GRIDS[kind]
    return bits, zero, (1 << bits) - 1


def _gguf_base_scale(w: torch.Tensor, kind: str) -> torch.Tensor:
    """llama.cpp's scale of each row of ``w`` (float32, before the fp16 rounding)."""
    if kind == "q4_0":
        return torch.gather(w, -1, w.abs().argmax(-1, keepdim=True)).squeeze(-1) / -8
    return w.abs().amax(-1) / 127


def _signed_fp16(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d < 0, -1.0, 1.0) * to_fp16_grid(d.abs())


def find_params_gguf(
    w: torch.Tensor, kind: str, mse: bool = False, norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``scale`` and ``zero`` (``[rows, 1]``) on a GGUF block grid, for a group of columns.

    The scale follows llama.cpp's rule, rounded to fp16 (the scale the file stores, so GPTQ
    compensates exactly the error that will be there); ``mse`` shrinks it like ``find_params``,
    or with ``importance`` searches it by importance-weighted squared error (``weighted_search``).
    """
    _, z, maxq = gguf_grid(kind)
    w = w.float()
    base = _gguf_base_scale(w, kind)
    base = torch.where(base == 0, torch.ones_like(base), base)  # an all-zero row: any scale is exact
    scale = _signed_fp16(base)
    zero = torch.full_like(scale, z)
    if mse and importance is not None:
        s = _signed_fp16(range_factors(grid, maxshrink)[:, None] * base)
        scale, zero = weighted_search(w, importance, s, torch.full_like(s, z), maxq, _signed_fp16)
        return scale[:, None], zero[:, None]
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(maxshrink * grid)):
            s = _signed_fp16((1 - i / grid) * base)
            err = (fake_quantize(w, s[:, None], zero[:, None], maxq) - w).abs_().pow_(norm).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
    return scale[:, None], zero[:, None]


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf`` (halves away from zero), computed as gguf's reference does."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def quantize_gguf_reference(W: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's own round-to-nearest Q4_0/Q8_0 (``quantize_row_q*_0_ref``), bit for bit.

    The codes are chosen with the float32 scale and the fp16-rounded scale is stored, exactly as
    llama.cpp does. Returns codes ``[out, in]`` and ``scales``/``zeros`` ``[in/32, out]`` in the
    layout of ``quantize_rtn`` (an all-zero block gets scale 0, as in llama.cpp).
    """
    bits, z, maxq = gguf_grid(kind)
    rows, cols = W.shape
    if cols % GGUF_BLOCK:
        raise ValueError(f"{kind} needs rows of a multiple of {GGUF_BLOCK} weights, got {cols}")
    B = W.detach().float().reshape(rows, cols // GGUF_BLOCK, GGUF_BLOCK)
    d = _gguf_base_scale(B, kind).unsqueeze(-1)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    if kind == "q4_0":
        Q = torch.trunc(B * inv + 8.5).clamp(0, maxq)
    else:
        Q = _roundf(B * inv) + z
    scales = d.squeeze(-1).half().float().T.contiguous()
    return Q.reshape(rows, cols).to(torch.int32), scales, torch.full_like(scales, z, dtype=torch.int32)
