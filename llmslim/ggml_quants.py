"""GGUF weight types beyond Q4_0/Q8_0: the K-quants (Q4_K, Q5_K, Q6_K) and the 5-bit legacy types
(Q5_0, Q5_1) llama.cpp falls back to when a row is not whole super-blocks of 256.

What llama.cpp's quantizer does (ggml/src/ggml-quants.c of the llama.cpp that llama-cpp-python 0.3.36
vendors) is re-implemented here, vectorized over blocks in numpy float32 with the C code's order of
operations, so that the bytes are identical: every sum accumulates element by element from 0, as the
C loops do (numpy's pairwise ``sum`` would round differently), ``nearest_int`` is round-half-even, and
the fp16 conversions round to nearest even. ggml's base library is compiled without ``-march``, so
no multiply-add is fused there either.

  Q4_K / Q5_K  super-block of 256 = 8 sub-blocks of 32; w^ = (d*sc) * q - (dmin*m), q in 0..15 / 0..31,
               sc and m 6-bit integers, d and dmin fp16. Without an importance matrix each sub-block's
               (scale, min) is a weighted least-squares search (``make_qkx2_quants``) and the super-block
               scales are max/63; with one, ``make_qkx3_quants`` and ``make_qp_quants`` (a weighted fit of
               the 6-bit scales themselves).
  Q6_K         16 sub-blocks of 16; w^ = (d*sc) * (q - 32), q in 0..63, sc a signed 8-bit integer
               (``make_qx_quants``: an RMSE-weighted search of the scale).
  Q4_1 / Q5_0 / Q5_1  blocks of 32; w^ = d * q + m (q in 0..15) / d * (q - 16) / d * q + m (q in 0..31).

Every type is described the same way for the solvers (``Quantized.grid``): per sub-block
``scale``, integer ``zero`` and float ``offset`` with w^ = scale * (q - zero) + offset, which is
bit for bit the value ``gguf.quants.dequantize`` computes from the bytes (``encode``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

QK_K = 256
F = np.float32
GROUP_MAX_EPS = F(1e-15)

# type -> (weights per block, sub-block size, stored code range 0..maxq, zero)
LAYOUT = {
    "q4_0": (32, 32, 15, 8),
    "q4_1": (32, 32, 15, 0),
    "q5_0": (32, 32, 31, 16),
    "q5_1": (32, 32, 31, 0),
    "q8_0": (32, 32, 255, 128),
    "q4_k": (QK_K, 32, 15, 0),
    "q5_k": (QK_K, 32, 31, 0),
    "q6_k": (QK_K, 16, 63, 32),
}
BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34, "q4_k": 144, "q5_k": 176, "q6_k": 210}
K_TYPES = ("q4_k", "q5_k", "q6_k")


def block_size(kind: str) -> int:
    return LAYOUT[kind][0]


def sub_block(kind: str) -> int:
    return LAYOUT[kind][1]


@dataclass
class Quantized:
    """One tensor on a GGUF grid: stored codes and the (fp16 / small-integer) scales of its blocks.

    ``q`` uint8 ``[rows, cols]`` as stored (0..maxq); ``d`` float32 ``[rows, blocks]`` (fp16 values);
    ``m`` Q5_1's block min or a K-quant's ``dmin`` ``[rows, blocks]``; ``sc``/``mc`` a K-quant's
    sub-block scale and min integers ``[rows, sub-blocks]``.
    """

    kind: str
    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None
    sc: np.ndarray | None = None
    mc: np.ndarray | None = None

    def grid(self) -> tuple[np.ndarray, int, np.ndarray]:
        """``(scale, zero, offset)``, scale/offset float32 ``[rows, sub-blocks]``: w^ = scale * (q - zero)
        + offset, each product and sum rounded to float32 exactly as ``gguf.quants`` dequantizes."""
        _, sub, _, zero = LAYOUT[self.kind]
        per = block_size(self.kind) // sub  # sub-blocks per block
        d = np.repeat(self.d, per, axis=1)
        if self.kind in K_TYPES:
            scale = d * self.sc.astype(F)
            if self.kind == "q6_k":
                return scale, zero, np.zeros_like(scale)
            return scale, zero, -(np.repeat(self.m, per, axis=1) * self.mc.astype(F))
        offset = self.m if self.kind in ("q4_1", "q5_1") else np.zeros_like(d)
        return d, zero, offset

    def dequantize(self) -> np.ndarray:
        scale, zero, offset = self.grid()
        sub = sub_block(self.kind)
        k = (self.q.astype(np.int32) - zero).astype(F)
        return (np.repeat(scale, sub, axis=1) * k + np.repeat(offset, sub, axis=1)).astype(F)

    def with_codes(self, q: np.ndarray) -> Quantized:
        """The same scales with other codes (a solver that re-rounds on this grid)."""
        return replace(self, q=np.asarray(q, dtype=np.uint8))

    def encode(self) -> np.ndarray:
        """Raw GGUF bytes ``[rows, blocks * bytes_per_block]`` in ggml's block layout."""
        rows, cols = self.q.shape
        nb = cols // block_size(self.kind)
        q = self.q.reshape(rows, nb, block_size(self.kind)).astype(np.uint8)
        f16 = lambda a: a.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)  # noqa: E731
        if self.kind in ("q4_0", "q4_1", "q5_0", "q5_1"):
            lo = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)
            parts = [f16(self.d)]
            if self.kind in ("q4_1", "q5_1"):
                parts.append(f16(self.m))
            if self.kind in ("q5_0", "q5_1"):  # the fifth bits, one uint32 per block (little-endian)
                bits = (q >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)
                parts.append(np.bitwise_or.reduce(bits, axis=-1).astype("<u4").view(np.uint8).reshape(rows, nb, 4))
            parts.append(lo)
        elif self.kind == "q8_0":
            parts = [f16(self.d), (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
        elif self.kind in ("q4_k", "q5_k"):
            ls, lm = self.sc.reshape(rows, nb, 8).astype(np.uint8), self.mc.reshape(rows, nb, 8).astype(np.uint8)
            scales = np.concatenate([(ls[..., :4] & 63) | ((ls[..., 4:] >> 4) << 6),
                                     (lm[..., :4] & 63) | ((lm[..., 4:] >> 4) << 6),
                                     (ls[..., 4:] & 15) | ((lm[..., 4:] & 15) << 4)], axis=-1)
            chunks = q.reshape(rows, nb, 4, 2, 32)  # 64 weights per chunk: low nibbles, then high
            qs = ((chunks[..., 0, :] & 15) | ((chunks[..., 1, :] & 15) << 4)).reshape(rows, nb, 128)
            parts = [f16(self.d), f16(self.m), scales]
            if self.kind == "q5_k":
                hi = (chunks >> 4).astype(np.uint8)  # [.., chunk, half, 32]: bit 2*chunk + half of qh[j]
                shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
                parts.append(np.bitwise_or.reduce((hi << shifts[..., None]).reshape(rows, nb, 8, 32), axis=2))
            parts.append(qs)
        elif self.kind == "q6_k":
            c = q.reshape(rows, nb, 2, 4, 32)  # two chunks of 128 = four runs of 32
            ql = np.concatenate([(c[..., 0, :] & 15) | ((c[..., 2, :] & 15) << 4),
                                 (c[..., 1, :] & 15) | ((c[..., 3, :] & 15) << 4)], axis=-1).reshape(rows, nb, 128)
            qh = ((c[..., 0, :] >> 4) | ((c[..., 1, :] >> 4) << 2) | ((c[..., 2, :] >> 4) << 4)
                  | ((c[..., 3, :] >> 4) << 6)).reshape(rows, nb, 64)
            parts = [ql, qh, self.sc.reshape(rows, nb, 16).astype(np.int8).view(np.uint8), f16(self.d)]
        else:
            raise ValueError(self.kind)
        out = np.concatenate([p.astype(np.uint8) for p in parts], axis=-1)
        assert out.shape[-1] == BYTES[self.kind], (self.kind, out.shape)
        return out.reshape(rows, -1)


# --- llama.cpp's helpers, vectorized: x [blocks, n], one search per row --------------------------

def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` (the 1.5 * 2^23 trick): round half to even."""
    return np.rint(x).astype(np.int32)


def fp16(x: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``."""
    return np.asarray(x, dtype=F).astype(np.float16).astype(F)


def seq_sum(terms) -> np.ndarray:
    """Sum as a C loop does: from 0, one term after another (in float32)."""
    acc = None
    for t in terms:
        acc = F(0) + t if acc is None else acc + t
    return acc


def first_absmax(x: np.ndarray) -> np.ndarray:
    """The signed value of largest magnitude, the first one on ties (``if (ax > amax)``); +0.0 for a
    block of zeros, signed or not (the C loop never leaves its starting 0)."""
    m = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    return np.where(m == 0, F(0), m).astype(F)


def first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``if (x[i] < min) min = x[i]`` (and max): the first extreme, which keeps the sign of a zero."""
    mn = np.take_along_axis(x, x.argmin(-1)[:, None], -1)[:, 0]
    mx = np.take_along_axis(x, x.argmax(-1)[:, None], -1)[:, 0]
    return mn, mx


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (``rmse_type`` 1): codes ``L`` in 0..2*nmax-1 and the scale."""
    n = x.shape[1]
    mx = first_absmax(x)
    w = qw if qw is not None else x * x
    zero = np.abs(mx) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        def attempt(iscale):
            codes = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
            lf = codes.astype(F)
            sumlx = seq_sum(w[:, i] * x[:, i] * lf[:, i] for i in range(n))
            suml2 = seq_sum(w[:, i] * lf[:, i] * lf[:, i] for i in range(n))
            return codes, sumlx, suml2

        L, sumlx, suml2 = attempt(F(-nmax) / mx)
        scale = np.where(suml2 != 0, sumlx / suml2, F(0)).astype(F)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            cand, slx, sl2 = attempt(-(F(nmax) + F(0.1) * F(step)) / mx)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            L = np.where(better[:, None], cand, L)
            scale = np.where(better, slx / sl2, scale).astype(F)
            best = np.where(better, scale * slx, best).astype(F)
    L = np.where(zero[:, None], 0, L + nmax)
    return L, np.where(zero, F(0), scale).astype(F)


def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) search (``make_qkx2_quants``, and ``make_qkx3_quants`` with weights,
    which is the same computation): codes 0..nmax, scale, and the min as a positive offset."""
    n = x.shape[1]
    mn, mx = first_min_max(x)
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    mn = np.where(mn > 0, F(0), mn).astype(F)  # if (min > 0) min = 0 (a -0.0 stays)
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F(nmax) / (mx - mn)
        scale = F(1) / iscale
        L = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)

        def error(s, m, Lc):
            Lf = Lc.astype(F)
            return seq_sum(w[:, i] * np.square(s * Lf[:, i] + m - x[:, i]) for i in range(n))

        best = error(scale, mn, L)
        for step in range(nstep + 1):
            # The range (max - min) and the shift use the best min found so far, as the C loop does.
            iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (mx - mn)
            la = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            lf = la.astype(F)
            sum_l = seq_sum(w[:, i] * lf[:, i] for i in range(n))
            sum_l2 = seq_sum(w[:, i] * lf[:, i] * lf[:, i] for i in range(n))
            sum_xl = seq_sum(w[:, i] * lf[:, i] * x[:, i] for i in range(n))
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F(0), this_min).astype(F)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(F)
            cur = error(this_scale, this_min, la)
            better = (D > 0) & (cur < best) & ~flat
            L = np.where(better[:, None], la, L)
            best = np.where(better, cur, best).astype(F)
            scale = np.where(better, this_scale, scale).astype(F)
            mn = np.where(better, this_min, mn).astype(F)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, F(0), scale).astype(F)
    return L, scale, (-mn).astype(F)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted fit of non-negative values to ``scale * L``, L in 0..nmax (the 6-bit sub-block scales
    and mins of Q4_K/Q5_K with an importance matrix). Returns ``L`` (as stored: uint8) and the scale."""
    n = x.shape[1]
    mx = np.maximum(np.maximum.reduce(x, axis=1), F(0))
    zero = mx < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        def mse(s, lf):
            return seq_sum(qw[:, i] * (x[:, i] - s * lf[:, i]) * (x[:, i] - s * lf[:, i]) for i in range(n))

        iscale = F(nmax) / mx
        best = mse(F(1) / iscale, nearest_int(iscale[:, None] * x).astype(np.uint8).astype(F))
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_s = (F(0.1) * F(step) + F(nmax)) / mx
            e = mse(F(1) / iscale_s, np.minimum(nmax, nearest_int(iscale_s[:, None] * x)).astype(F))
            better = e < best
            best = np.where(better, e, best).astype(F)
            iscale = np.where(better, iscale_s, iscale).astype(F)
        codes = np.minimum(nmax, nearest_int(iscale[:, None] * x))
        L = codes.astype(np.uint8)
        lf = codes.astype(F)
        sumlx = seq_sum(qw[:, i] * x[:, i] * lf[:, i] for i in range(n))
        suml2 = seq_sum(qw[:, i] * lf[:, i] * lf[:, i] for i in range(n))
        active = np.ones(len(x), dtype=bool)
        for _ in range(5):
            changed = np.zeros(len(x), dtype=bool)
            for i in range(n):
                w, xi, Li = qw[:, i], x[:, i], L[:, i].astype(F)
                slx = sumlx - w * xi * Li
                sl2 = suml2 - w * Li * Li
                new_l = np.minimum(nmax, nearest_int(xi * sl2 / slx))
                nf = new_l.astype(F)
                try_it = active & (slx > 0) & (sl2 > 0) & (new_l != L[:, i])
                slx2 = slx + w * xi * nf
                sl22 = sl2 + w * nf * nf
                take = try_it & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[:, i] = np.where(take, new_l.astype(np.uint8), L[:, i])
                sumlx = np.where(take, slx2, sumlx).astype(F)
                suml2 = np.where(take, sl22, suml2).astype(F)
                changed |= take
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F(0)).astype(F)
    return np.where(zero[:, None], 0, L).astype(np.uint8), np.where(zero, F(0), scale).astype(F)


# --- the types -------------------------------------------------------------------------------------

def _rows_weights(imatrix: np.ndarray | None, rows: int, cols: int) -> np.ndarray | None:
    if imatrix is None:
        return None
    qw = np.asarray(imatrix, dtype=F).reshape(1, cols)
    return np.broadcast_to(qw, (rows, cols))


def _sigma2(x: np.ndarray, scale2: bool) -> np.ndarray:
    """``sum x^2 / n`` over the last axis as the C loop computes it (``2 * sum / n`` for the K types)."""
    s = seq_sum(x[..., i] * x[..., i] for i in range(x.shape[-1]))
    return (F(2) * s / F(x.shape[-1])) if scale2 else s / F(x.shape[-1])


def _legacy(x: np.ndarray, kind: str, qw: np.ndarray | None) -> Quantized:
    rows, cols = x.shape
    B = x.reshape(-1, 32)
    if qw is not None and kind != "q8_0":  # quantize_row_q*_impl: weights qw * sqrt(sigma2 + x^2)
        sigma2 = np.repeat(_sigma2(x, False), cols // 32)[:, None]
        weight = qw.reshape(-1, 32) * np.sqrt(sigma2 + B * B)
        if kind in ("q4_1", "q5_1"):
            L, d, mn = make_qkx_quants(B, weight, LAYOUT[kind][2], -0.9, 0.05, 36)
            return Quantized(kind, L.astype(np.uint8).reshape(rows, cols), fp16(d).reshape(rows, -1),
                             m=fp16(-mn).reshape(rows, -1))
        nmax = {"q4_0": 8, "q5_0": 16}[kind]
        L, d = make_qx_quants(B, nmax, weight)
        return Quantized(kind, L.astype(np.uint8).reshape(rows, cols), fp16(d).reshape(rows, -1))
    if kind in ("q4_1", "q5_1"):
        mn, mx = first_min_max(B)
        d = (mx - mn) / F(LAYOUT[kind][2])
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, F(1) / d, F(0)).astype(F)
        L = np.minimum(LAYOUT[kind][2], np.trunc((B - mn[:, None]) * inv[:, None] + F(0.5)).astype(np.int32))
        return Quantized(kind, L.astype(np.uint8).reshape(rows, cols), fp16(d).reshape(rows, -1),
                         m=fp16(mn).reshape(rows, -1))
    mx = first_absmax(B)
    if kind == "q8_0":
        d = np.abs(mx) / F(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, F(1) / d, F(0)).astype(F)
        v = B * inv[:, None]
        k = np.sign(v) * (np.floor(np.abs(v)) + np.floor(F(2) * (np.abs(v) - np.floor(np.abs(v)))))  # roundf
        return Quantized(kind, (k.astype(np.int32) + 128).astype(np.uint8).reshape(rows, cols),
                         fp16(d).reshape(rows, -1))
    half = {"q4_0": 8, "q5_0": 16}[kind]
    d = mx / F(-half)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F(1) / d, F(0)).astype(F)
    L = np.minimum(2 * half - 1, np.trunc(B * inv[:, None] + F(half + 0.5)).astype(np.int32))
    return Quantized(kind, L.astype(np.uint8).reshape(rows, cols), fp16(d).reshape(rows, -1))


def _k4_k5(x: np.ndarray, kind: str, qw: np.ndarray | None) -> Quantized:
    rows, cols = x.shape
    nmax = 15 if kind == "q4_k" else 31
    S = x.reshape(-1, 8, 32)  # super-blocks
    nsb = S.shape[0]
    if qw is None:  # quantize_row_q*_K_ref
        av_x = np.sqrt(_sigma2(S, False))  # per sub-block: sqrt(sum x^2 / 32)
        weights = av_x[..., None] + np.abs(S)
        rmin, nstep = (-1.0, 20) if kind == "q4_k" else (-0.5, 15)  # the two ref functions' search ranges
        L, scales, mins = make_qkx_quants(S.reshape(-1, 32), weights.reshape(-1, 32), nmax, rmin, 0.1, nstep)
        scales, mins = scales.reshape(nsb, 8), mins.reshape(nsb, 8)
        max_scale = np.maximum(np.maximum.reduce(scales, axis=1), F(0))
        max_min = np.maximum(np.maximum.reduce(mins, axis=1), F(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0)).astype(F)
            inv_min = np.where(max_min > 0, F(63) / max_min, F(0)).astype(F)
        ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
        d, dmin = fp16(max_scale / F(63)), fp16(max_min / F(63))
    else:  # quantize_row_q*_K_impl: sub-block weights from the importance matrix
        sigma2 = _sigma2(S.reshape(nsb, QK_K), True)
        weights = qw.reshape(nsb, 8, 32) * np.sqrt(sigma2[:, None, None] + S * S)
        sw = seq_sum(weights[..., i] for i in range(32))
        L, scales, mins = make_qkx_quants(S.reshape(-1, 32), weights.reshape(-1, 32), nmax, -0.9, 0.05, 36)
        ls, d = make_qp_quants(scales.reshape(nsb, 8), 63, sw)
        lm, dmin = make_qp_quants(mins.reshape(nsb, 8), 63, sw)
        ls, lm = np.minimum(63, ls.astype(np.int32)), np.minimum(63, lm.astype(np.int32))
        d, dmin = fp16(d), fp16(dmin)
    # The codes, once more, against the stored scales (those are what the file holds).
    ds = d[:, None] * ls.astype(F)
    dm = dmin[:, None] * lm.astype(F)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(nearest_int((S + dm[..., None]) / ds[..., None]), 0, nmax)
    L = np.where((ds != 0)[..., None], again, L.reshape(nsb, 8, 32))
    return Quantized(kind, L.astype(np.uint8).reshape(rows, cols), d.reshape(rows, -1), m=dmin.reshape(rows, -1),
                     sc=ls.reshape(rows, -1).astype(np.int32), mc=lm.reshape(rows, -1).astype(np.int32))


def _k6(x: np.ndarray, qw: np.ndarray | None) -> Quantized:
    rows, cols = x.shape
    S = x.reshape(-1, 16, 16)
    nsb = S.shape[0]
    L, scales = make_qx_quants(S.reshape(-1, 16), 32, None if qw is None else qw.reshape(-1, 16))
    L, scales = L.reshape(nsb, 16, 16), scales.reshape(nsb, 16)
    max_scale = first_absmax(scales)
    dead = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F(-128) / max_scale
        d = np.where(dead, F(0), fp16(F(1) / iscale)).astype(F)
        sc = np.where(dead[:, None], 0, np.minimum(127, nearest_int(iscale[:, None] * scales)))
        ds = d[:, None] * sc.astype(F)
        again = np.clip(nearest_int(S / ds[..., None]), -32, 31) + 32
    L = np.where((ds != 0)[..., None], again, L)
    L = np.where(dead[:, None, None], 0, L)
    return Quantized("q6_k", L.astype(np.uint8).reshape(rows, cols), d.reshape(rows, -1),
                     sc=sc.reshape(rows, -1).astype(np.int32))


def quantize(W, kind: str, imatrix=None) -> Quantized:
    """llama.cpp's quantization of a ``[rows, cols]`` float tensor to ``kind``, bit for bit
    (``ggml_quantize_chunk``): ``imatrix`` (``[cols]``, the mean squared activation of each input
    column, llama.cpp's importance matrix) selects the importance-weighted variant as llama.cpp does
    (Q8_0 ignores it)."""
    x = np.ascontiguousarray(np.asarray(W, dtype=F))
    rows, cols = x.shape
    if kind not in LAYOUT:
        raise ValueError(f"unknown GGUF type {kind!r}")
    if cols % block_size(kind):
        raise ValueError(f"{kind} needs rows of a multiple of {block_size(kind)} weights, got {cols}")
    qw = _rows_weights(imatrix, rows, cols)
    if kind in ("q4_k", "q5_k"):
        return _k4_k5(x, kind, qw)
    if kind == "q6_k":
        return _k6(x, qw)
    return _legacy(x, kind, qw)
