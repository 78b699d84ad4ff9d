"""How much each layer's compression costs the model: the measurements behind ``llmslim tune``.

The quantity wanted is the increase of KL(original || model), per token on calibration text, when
only one layer is compressed with one candidate grid. Measuring it directly costs a forward of
the rest of the model per (layer, candidate): 210 layers x 12 candidates on SmolLM2-135M is
thousands of forwards. Instead it is predicted, in one pass of the block driver, by the
second-order expansion of the KL around the original (the Fisher information is the KL's
Hessian; Amari 1998, and HAWQ-V2 / SqueezeLLM use it the same way for mixed precision):

    KL(p || p_delta) ~= 1/2 sum_t delta_t^T F_t delta_t,   F_t = E_{y ~ p}[g_t g_t^T],

where ``delta_t`` is the change of the layer's output at token ``t`` and ``g_t`` the gradient of
the log-likelihood of a label *sampled from the model itself* w.r.t. that output (the true
Fisher; real labels would give the empirical Fisher, which is not the KL's Hessian). Keeping
F's diagonal and averaging it over tokens (``f_c``, per output channel) makes the prediction a
Fisher-weighted version of GPTQ's own layer objective:

    KL_layer ~= 1/2 sum_c f_c  dW_c (X X^T / N) dW_c^T,    dW = W - Q(W),

which needs only the layer's Hessian H = 2 X X^T / N that the block driver already collects.
``output_fisher`` computes ``f`` (one forward + backward over a few calibration sequences).

Pricing a candidate without running GPTQ for it. Running GPTQ for every candidate on every layer
costs the space's size times GPTQ's solves. But GPTQ's result has a closed form to second order:
with H = L D L^T (L unit lower triangular, in GPTQ's column order), GPTQ's layer objective is
exactly sum_j (w~_j - q_j)^2 D_j / 2, where w~_j is column j's weight after the compensations of
the columns before it and q_j its rounding (this is GPTQ's own loss; QuIP, Chee et al. 2023,
Thm. 1, derives the same "LDLQ" form). The compensated weights round like the original ones,
so the cost of a candidate is estimated as

    proxy = 1/4 sum_c f_c sum_j r_cj^2 D_j,      r = W - RTN(W) on the candidate's grid,

(round-to-nearest with the same MSE clipping, at a coarser resolution), and corrected per layer
and bit width by the ratio GPTQ / proxy measured with real GPTQ on a sample of the layer's rows
(GPTQ solves every row independently, so a row sample is exactly those rows of the full result):
where the compensations inflate the rounding error (2 bits) or the Hessian makes them unusually
effective, the ratio says so. Measured on SmolLM2-135M (16 layers of 4 blocks x 12 candidates,
against GPTQ's exact Fisher-weighted cost): Spearman 0.997 for the proxy alone, 0.9997 with the
ratio, median error 1% (eval/tune.md). The pass costs one forward per block, the Hessians, an RTN
per candidate and one GPTQ on at most ``SAMPLE_ROWS`` rows per bit width: about one GPTQ run.

The layer sums are not the whole model's KL: errors compound through the later layers, the
expansion is second order only, and the Fisher is averaged over tokens (on SmolLM2 that makes the
sum over-predict round-to-nearest models ~5x -- RTN errors sit where a few massive-activation
tokens dominate H but barely matter -- while GPTQ, which keeps its error away from H's large
directions, is predicted 0.6-1x). ``Calibration`` measures the map on a reference model whose
per-layer prices are exact: every layer at 4 bits, solved by GPTQ on all its rows in the same pass
(the correction's solve for that bit width, kept), one forward on calibration sequences kept out
of the pass (so the map also covers what GPTQ fits to its own calibration text);
measured = a * predicted (a power law when given more points), and ``llmslim tune`` plans and
reports with it.

``SensitivitySolver`` prices every candidate on each layer's true inputs, then hands the block its
*original* weight back, so every layer is priced with all others untouched. After the pass,
``anchors`` measures every unit exactly at the lowest bit width and corrects the predictions where
the expansion is off (up to 9x, always low, on SmolLM2). ``exact.measured_kl`` is the exact quantity
for any set of layers, for checking the prediction's ranking (with ``keep``, the pass keeps the full
GPTQ result of chosen (layer, candidate) pairs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import GPTQConfig
from ..grid import find_params, maxq_for, quantize
from ..nn import can_pack
from ..pack import packed_len
from .anchors import (
    ANCHOR_SEQUENCES,
    SCALE_UNITS,
    anchor_setting,
    interpolated,
    measure_anchors,
    unit_factors,
)
from .exact import Rounded, reference_kl
from .gptq import column_order, gptq_quantize, inverse_cholesky
from .sequential import LayerSolver, resolve_forward_dtype, run_blocks, solver_options
from .walk import linear_shape, select_layers

# The proxy's clipping search: shrink ratios 1.0, 0.9, ..., 0.3 (GPTQ's own search: 0.01 steps). On
# SmolLM2-135M the coarse search changed the ranking of (layer, candidate) pairs by nothing
# measurable once corrected by the GPTQ ratio (Spearman 0.9997 at 10 and at 100), at 1/10 the cost.
PROXY_GRID = 10
# Rows of real GPTQ per layer and bit width for the correction (every k-th row: all heads, all
# regions of the layer). GPTQ's cost per column is mostly fixed overhead, not rows.
SAMPLE_ROWS = 128


def layer_bytes(in_features: int, out_features: int, bits: int, group_size: int, bias: bool) -> int:
    """Bytes of one GPTQ v1 linear on disk: qweight, qzeros, fp16 scales, g_idx, fp16 bias."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    return (packed_len(in_features, bits) * out_features * 4 + groups * packed_len(out_features, bits) * 4
            + groups * out_features * 2 + in_features * 4 + (out_features * 2 if bias else 0))


def candidate_name(bits: int, group_size: int) -> str:
    return f"{bits}:{group_size}"


def allowed(in_features: int, out_features: int, candidates: list[tuple[int, int]],
            divisible: bool) -> list[tuple[int, int]]:
    """The candidates a layer can take: its shape packs at those bits, and (``divisible``) the
    group size divides its input size, which vLLM requires."""
    return [(b, g) for b, g in candidates if can_pack(in_features, out_features, b)
            and (not divisible or g == -1 or in_features % g == 0)]


def output_fisher(model: nn.Module, names: list[str], calib: torch.Tensor, batch_size: int = 1,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Per output channel of each named linear, the mean over tokens of the squared gradient of
    sum_t log p(y_t), y_t drawn from the model's own next-token distribution: the diagonal of the
    Fisher information of the layer's output, averaged over positions (module docstring)."""
    fisher = {n: None for n in names}
    gen = torch.Generator().manual_seed(seed)
    tokens = 0
    handles = []

    def keep(name):
        def hook(module, args, out):
            def grad_hook(g):
                sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                fisher[name] = sq if fisher[name] is None else fisher[name] + sq
            out.register_hook(grad_hook)
        return hook

    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(keep(n)))
    embed = model.get_input_embeddings()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients of the activations only: none for 100M+ weights
        p.requires_grad_(False)
    try:
        for ids in tqdm(calib.split(batch_size), desc="Fisher", unit="batch"):
            x = embed(ids).detach().requires_grad_(True)  # the weights need no gradient: the activations do
            logits = model(inputs_embeds=x, use_cache=False).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            with torch.no_grad():
                y = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=gen)
            logp.reshape(-1, logp.shape[-1]).gather(1, y).sum().backward()
            tokens += ids.numel()
            del logits, logp
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    return {n: f / tokens for n, f in fisher.items() if f is not None}


def round_to_grid(W: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool, g_idx: torch.Tensor,
                  grid: int = PROXY_GRID, full_range: bool = False) -> Rounded:
    """Round-to-nearest of ``W [rows, columns]`` on the grid ``bits``/``group_size`` with the groups
    ``g_idx`` (as GPTQ forms them): each group's scale and zero from its own weights (``mse``: the
    clipping search of ``grid.find_params`` at resolution ``grid``; ``full_range``: the signed
    full-range symmetric grid GPTQ will use), all groups of the layer in one call (groups are
    ``group_size`` columns but the last)."""
    maxq = maxq_for(bits)
    rows, columns = W.shape
    size = columns if group_size == -1 else group_size
    order = torch.argsort(g_idx, stable=True)  # groups contiguous, in group order
    Ws = W.float()[:, order]
    full = columns // size * size
    parts = [Ws[:, :full].reshape(rows, -1, size)] + ([Ws[:, full:, None].transpose(1, 2)] if full < columns else [])
    codes, scales, zeros = [], [], []
    for part in parts:  # [rows, groups, columns per group]
        s, z = find_params(part.reshape(-1, part.shape[-1]), bits, sym, mse, grid=grid, full_range=full_range)
        s, z = s.view(rows, -1, 1), z.view(rows, -1, 1)
        codes.append(quantize(part, s, z, maxq).reshape(rows, -1))
        scales.append(s[..., 0])
        zeros.append(z[..., 0])
    Q = torch.empty(rows, columns, dtype=torch.uint8, device=W.device)
    Q[:, order] = torch.cat(codes, 1).to(torch.uint8)
    return Rounded(Q, torch.cat(scales, 1).T.contiguous(), torch.cat(zeros, 1).T.contiguous(), g_idx)


def ldl_diagonal(H: torch.Tensor, perm: torch.Tensor, damp_percent: float) -> torch.Tensor | None:
    """D of H = L D L^T with the columns in GPTQ's order ``perm``, given per original column (0 for
    inputs that are always zero): GPTQ's layer objective is exactly sum_j (w~_j - q_j)^2 D_j / 2.
    D_j = 1 / U_jj^2 for U the upper Cholesky factor of H^-1 that GPTQ itself uses (damped the
    same way). None where GPTQ would fall back to RTN (Cholesky fails)."""
    dead = torch.diag(H) == 0
    Hd = H.clone()
    Hd[dead, dead] = 1
    U, _ = inverse_cholesky(Hd[perm][:, perm], damp_percent)
    if U is None:
        return None
    D = torch.empty(H.shape[0], device=H.device)
    D[perm] = U.diagonal().pow(-2)
    return D.masked_fill_(dead, 0)


def group_order(group_size: int) -> int:
    """Sort key of group sizes, coarsest last (-1 is one group per row)."""
    return 1 << 62 if group_size == -1 else group_size


@dataclass
class SensitivityLog:
    name: str
    rows: int
    columns: int
    bias: bool
    candidates: list[str]  # "bits:group_size"
    kl: list[float]  # the cost: KL increase per token, each candidate alone in this layer (GPTQ), anchored
    proxy: list[float]  # the LDL proxy before the GPTQ correction, each candidate
    ratio: dict[str, float]  # bits -> GPTQ / proxy on the sampled rows (the correction)
    seconds: float
    fallback: str | None = None
    second_order: list[float] = field(default_factory=list)  # kl before the anchors' correction
    anchor: dict[str, float] = field(default_factory=dict)  # anchor bits -> the unit's measured / predicted


class SensitivitySolver(LayerSolver):
    """Prices every candidate grid on each layer (the LDL proxy, corrected by GPTQ on a sample of
    rows: module docstring) and leaves the layer as it was. ``anchors``: layer -> {bits: candidate}
    (the calibration's reference, the lowest bits' anchor): GPTQ runs on all rows of that candidate
    for its bit width's correction (which, and so its price, is then exact) and the result is kept in
    ``rounded``. ``keep``: (layer, candidate) pairs solved by full GPTQ and kept in ``kept`` for an
    exact measurement."""

    label = "sensitivity blocks"
    log_type = SensitivityLog

    def __init__(self, config: GPTQConfig, candidates: dict[str, list[tuple[int, int]]],
                 fisher: dict[str, torch.Tensor], keep: set[tuple[str, str]] = frozenset(),
                 anchors: dict[str, dict[int, str]] | None = None):
        super().__init__(config)
        self.candidates, self.fisher, self.keep = candidates, fisher, keep
        self.anchors = anchors or {}
        self.kept: dict[tuple[str, str], torch.Tensor] = {}
        self.rounded: dict[tuple[str, str], Rounded] = {}

    def solve(self, name, layer, W, H):
        t0 = time.perf_counter()
        f = self.fisher[name].to(W.device)
        rows, columns = W.shape
        sample = torch.arange(0, rows, -(-rows // SAMPLE_ROWS), device=W.device)
        score = torch.diag(H).masked_fill(torch.diag(H) == 0, 1)  # GPTQ orders dead inputs as if 1
        ldl: dict[int, tuple] = {}  # group size -> (groups, D): GPTQ's column order depends on it
        proxy_rows: dict[tuple[int, int], torch.Tensor] = {}
        names, notes = [], []
        for bits, group in self.candidates[name]:
            o = solver_options(replace(self.config, bits=bits, group_size=group))
            key = candidate_name(bits, group)
            names.append(key)
            if group not in ldl:
                natural = torch.arange(columns, device=W.device) // (columns if group == -1 else group)
                perm, g_idx = column_order(score, natural, group, o["desc_act"], o["static_groups"],
                                           o["act_group_aware"])
                ldl[group] = (g_idx, ldl_diagonal(H, perm, o["damp_percent"]))
            g_idx, D = ldl[group]
            rounded = round_to_grid(W, bits, group, o["sym"], o["mse"], g_idx, full_range=o["full_range"])
            R = W - rounded.weight()
            if D is None:  # GPTQ would round to nearest: the cost is R's own
                notes.append(f"{key}: Cholesky failed, priced as RTN")
                proxy_rows[(bits, group)] = ((R @ H) * R).sum(1) / 2
            else:
                proxy_rows[(bits, group)] = (R.square() * D).sum(1) / 2
            if (name, key) in self.keep:
                self.kept[(name, key)] = gptq_quantize(W, H, **o).dequantize().cpu()
            del R, rounded
        ratio = {}
        for bits in sorted({b for b, _ in self.candidates[name]}):
            groups = sorted((g for b, g in self.candidates[name] if b == bits), key=group_order)
            group = groups[len(groups) // 2]
            anchor = self.anchors.get(name, {}).get(bits)
            full = anchor is not None
            if full:  # an anchor (the reference model's layer): all rows, kept
                group = int(anchor.split(":")[1])
            rows_used = slice(None) if full else sample
            o = solver_options(replace(self.config, bits=bits, group_size=group))
            r = gptq_quantize(W[rows_used], H, **o)
            E = W[rows_used] - r.dequantize()
            exact = float((f[rows_used] * ((E @ H) * E).sum(1)).sum())
            estimate = float((f[rows_used] * proxy_rows[(bits, group)][rows_used]).sum() * 2)
            ratio[str(bits)] = exact / estimate if estimate > 0 else 1.0
            if full:
                self.rounded[(name, anchor)] = Rounded.of(r).cpu()
            if r.fallback:
                notes.append(f"{candidate_name(bits, group)}: {r.fallback}")
        proxy = [float((f * proxy_rows[c]).sum() / 2) for c in self.candidates[name]]
        kl = [p * ratio[str(b)] for p, (b, _) in zip(proxy, self.candidates[name], strict=True)]
        log = SensitivityLog(name, rows, columns, getattr(layer, "bias", None) is not None, names, kl, proxy,
                             ratio, time.perf_counter() - t0, "; ".join(notes) or None)
        return W, None, log  # the original weight: the next layers see untouched inputs

    def postfix(self, log) -> str:
        return f"kl@{log.candidates[0]}={log.kl[0]:.2g}" if log.kl else ""


@dataclass
class Calibration:
    """The whole model's KL against the sum of its layers' predicted costs, measured on reference
    models: ``measured = a * predicted**b`` (a scale through one reference, as ``measure`` makes; a
    power law through two or more; b = 1, a = 1 when none could be measured). ``points``: the references, each
    ``{"setting", "predicted", "measured"}``; ``tokens``: calibration tokens each was measured on."""

    points: list[dict] = field(default_factory=list)
    a: float = 1.0
    b: float = 1.0
    tokens: int = 0
    unseen: bool = False  # measured on calibration sequences the reference's GPTQ did not see

    def kl(self, predicted: float) -> float:
        """The calibrated KL of an allocation whose per-layer predictions sum to ``predicted``."""
        return self.a * max(predicted, 0.0) ** self.b

    def predicted_for(self, kl: float) -> float:
        """The inverse: the largest predicted sum whose calibrated KL is ``kl``."""
        return (max(kl, 0.0) / self.a) ** (1 / self.b)

    @classmethod
    def fit(cls, points: list[dict], tokens: int, unseen: bool = False) -> Calibration:
        """Least squares in log-log space (exact through two points). A non-positive slope would say
        that more predicted cost means less KL: then a scale alone (the geometric mean ratio)."""
        ok = [p for p in points if p["predicted"] > 0 and p["measured"] > 0]
        if not ok:
            return cls(points, tokens=tokens, unseen=unseen)
        x = [math.log(p["predicted"]) for p in ok]
        y = [math.log(p["measured"]) for p in ok]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxx = sum((v - mx) ** 2 for v in x)
        b = sum((u - mx) * (v - my) for u, v in zip(x, y, strict=True)) / sxx if sxx > 1e-12 else 1.0
        if not b > 0:
            b = 1.0
        return cls(points, math.exp(my - b * mx), b, tokens, unseen)


@dataclass
class Sensitivities:
    """Every layer's candidates, predicted KL increase and bytes, and the calibration of their sum;
    what the tune cache holds."""

    layers: list[SensitivityLog]
    shapes: dict[str, tuple[int, int, bool]]  # name -> (in, out, bias)
    fisher_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)
    anchors: list[dict] = field(default_factory=list)  # the units' exact measurements (``anchors``)

    def as_dict(self) -> dict:
        return {"layers": [asdict(x) for x in self.layers], "shapes": self.shapes, "fisher_tokens": self.fisher_tokens,
                "seconds": self.seconds, "calibration": asdict(self.calibration), "anchors": self.anchors}

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivities:
        return cls([SensitivityLog(**x) for x in d["layers"]], {k: tuple(v) for k, v in d["shapes"].items()},
                   d["fisher_tokens"], d["seconds"], Calibration(**d["calibration"]), d["anchors"])


def reference_setting(per_layer: dict[str, list[tuple[int, int]]]) -> tuple[str, dict[str, str]]:
    """The calibration's reference model, (label, {layer: candidate}): every layer at 4 bits (the
    bits of the space nearest 4 when it has none), each at its coarsest group of those bits -- the
    middle of the budgets one tunes for -- but per channel (-1) only when the layer has no group:
    the second-order price of a per-channel grid is far off, like round-to-nearest's (SmolLM2 at
    4-bit per channel: predicted 3.34, measured 0.79), and a scale fitted there under-predicted the
    grouped choices of a vllm-cpu space 3.8x. A layer that cannot take those bits stays in float, in
    the prediction as in the measurement."""
    bits = sorted({b for cands in per_layer.values() for b, _ in cands})
    b = min(bits, key=lambda x: (abs(x - 4), -x))

    def coarsest(groups: list[int]) -> int:
        return max([g for g in groups if g != -1] or groups, key=group_order)

    choice = {n: candidate_name(b, coarsest([g for bb, g in cands if bb == b]))
              for n, cands in per_layer.items() if any(bb == b for bb, _ in cands)}
    return f"uniform {b}-bit (GPTQ per layer)", choice


def measure(
    model: nn.Module,
    config: GPTQConfig,
    candidates: list[tuple[int, int]],
    calib: torch.Tensor,
    fisher_samples: int = 16,
    divisible: bool = True,
    batch_size: int | None = None,
    keep: set[tuple[str, str]] = frozenset(),
    log: Callable[[str], None] = print,
    device: str = "cpu",
    max_memory: float | None = None,
    unit_of: Callable[[str], object] | None = None,
    anchored: bool = True,
) -> tuple[Sensitivities, dict[tuple[str, str], torch.Tensor]]:
    """Predicted KL increase of every (layer, candidate) the layer can take, and the calibration of
    their sums; the model is left as it was. The first ``fisher_samples`` calibration sequences give
    the Fisher; the first eighth of them (at most ``fisher_samples``) are kept out of the pass and
    measure the reference model and (``anchored``) every unit at its anchors (``anchors``: layers
    with equal ``unit_of(name)`` are one unit, measured together; default: each layer alone).
    Returns the sensitivities and the kept GPTQ weights (``keep``)."""
    targets, _ = select_layers(model, config.layers, lambda i, o: bool(allowed(i, o, candidates, divisible)))
    shapes = {n: (*linear_shape(m), getattr(m, "bias", None) is not None) for n, m in targets.items()}
    per_layer = {n: allowed(i, o, candidates, divisible) for n, (i, o, _) in shapes.items()}
    label, reference = reference_setting(per_layer)
    low = {n: anchor_setting(per_layer[n], reference.get(n), group_order) if anchored else {} for n in per_layer}
    anchors = {n: {**low[n], **({int(reference[n].split(":")[0]): reference[n]} if n in reference else {})}
               for n in per_layer}  # solved on all rows and kept: the anchors and the calibration's reference
    # The reference is measured on sequences its GPTQ never saw (kept out of the pass's Hessians), so
    # the calibration also covers what GPTQ fits to its own calibration text -- as the held-out
    # verification will see it. With a single sequence there is nothing to keep out.
    unseen = min(fisher_samples, max(1, len(calib) // 8)) if len(calib) > 1 else 0
    check, solved = (calib[:unseen], calib[unseen:]) if unseen else (calib, calib)
    t0 = time.perf_counter()
    fisher_calib = calib[:fisher_samples]
    fisher = output_fisher(model, list(targets), fisher_calib)
    t1 = time.perf_counter()
    solver = SensitivitySolver(config, per_layer, fisher, keep, anchors)
    logs = run_blocks(model, solver, set(targets), solved, batch_size=batch_size, log=log, device=device,
                      max_memory=max_memory)
    t2 = time.perf_counter()
    records = []
    if any(low.values()):
        units: dict[object, list[str]] = {}
        for x in logs:
            units.setdefault(unit_of(x.name) if unit_of else x.name, []).append(x.name)
        predicted = {x.name: dict(zip(x.candidates, x.kl, strict=True)) for x in logs}
        groups = list(units.values())
        records = measure_anchors(model, groups, low, predicted, solver.rounded, check[:ANCHOR_SEQUENCES],
                                  resolve_forward_dtype(config.forward_dtype, device))
        sample = groups[:: max(1, len(groups) // SCALE_UNITS)][:SCALE_UNITS]
        refs = {n: {int(c.split(":")[0]): c} for n, c in reference.items()}
        scale = measure_anchors(model, sample, refs, predicted, solver.rounded, check[:ANCHOR_SEQUENCES])
        factors = unit_factors(records, scale)
        records += [r | {"scale": True} for r in scale]
        for x in logs:
            f = factors.get(x.name, {})
            x.second_order, x.anchor = list(x.kl), {str(b): v for b, v in f.items()}
            x.kl = [k * interpolated(f, int(c.split(":")[0])) for k, c in zip(x.kl, x.candidates, strict=True)]
    t3 = time.perf_counter()
    by_name = {x.name: x for x in logs}
    weights = {n: solver.rounded[(n, c)] for n, c in reference.items()}
    solver.rounded.clear()
    measured = reference_kl(model, {label: weights}, check)[label]
    del weights
    predicted_sum = sum(by_name[n].kl[by_name[n].candidates.index(c)] for n, c in reference.items())
    calibration = Calibration.fit([{"setting": label, "predicted": predicted_sum, "measured": measured}],
                                  check.numel(), unseen=bool(unseen))
    seconds = {"fisher": round(t1 - t0, 1), "pass": round(t2 - t1, 1), "anchors": round(t3 - t2, 1),
               "calibration": round(time.perf_counter() - t3, 1)}
    return Sensitivities(logs, shapes, fisher_calib.numel(), seconds, calibration, records), solver.kept


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for u in t.unique():  # ties share their mean rank
            m = t == u
            r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-300))
