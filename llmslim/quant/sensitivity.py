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
``output_fisher`` computes ``f`` (one forward + backward over a few calibration sequences);
``SensitivitySolver`` runs GPTQ for every candidate on each layer's true inputs and prices the
result, then hands the block its *original* weight back, so every layer is measured with all
others untouched. ``measured_kl`` is the exact quantity, for checking the prediction's ranking.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import GPTQConfig
from ..nn import can_pack
from ..pack import packed_len
from .gptq import gptq_quantize, layer_loss
from .sequential import LayerSolver, run_blocks, solver_options
from .walk import linear_shape, select_layers


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


@dataclass
class SensitivityLog:
    name: str
    rows: int
    columns: int
    bias: bool
    candidates: list[str]  # "bits:group_size"
    kl: list[float]  # predicted KL increase per token, each candidate alone in this layer
    loss: list[float]  # GPTQ's layer objective ||WX - QX||^2 / n, each candidate
    seconds: float
    fallback: str | None = None


class SensitivitySolver(LayerSolver):
    """Prices every candidate grid on each layer (GPTQ on the layer's true inputs) and leaves the
    layer as it was. ``keep``: (layer, candidate) pairs whose quantized weights are kept in
    ``kept`` for an exact measurement afterwards."""

    label = "sensitivity blocks"
    log_type = SensitivityLog

    def __init__(self, config: GPTQConfig, candidates: dict[str, list[tuple[int, int]]],
                 fisher: dict[str, torch.Tensor], keep: set[tuple[str, str]] = frozenset()):
        super().__init__(config)
        self.candidates, self.fisher, self.keep = candidates, fisher, keep
        self.kept: dict[tuple[str, str], torch.Tensor] = {}

    def solve(self, name, layer, W, H):
        t0 = time.perf_counter()
        f = self.fisher[name].to(W.device)
        names, kl, loss, notes = [], [], [], []
        for bits, group in self.candidates[name]:
            r = gptq_quantize(W, H, **solver_options(replace(self.config, bits=bits, group_size=group)))
            D = W - r.dequantize()
            per_channel = ((D @ H) * D).sum(1) / 2  # dW_c (X X^T / N) dW_c^T: H is 2 X X^T / N
            key = candidate_name(bits, group)
            names.append(key)
            kl.append(float((f * per_channel).sum() / 2))
            loss.append(layer_loss(W, W - D, H))
            if r.fallback:
                notes.append(f"{key}: {r.fallback}")
            if (name, key) in self.keep:
                self.kept[(name, key)] = (W - D).cpu()
        log = SensitivityLog(name, W.shape[0], W.shape[1], getattr(layer, "bias", None) is not None, names, kl,
                             loss, time.perf_counter() - t0, "; ".join(notes) or None)
        return W, None, log  # the original weight: the next layers see untouched inputs

    def postfix(self, log) -> str:
        return f"kl@{log.candidates[0]}={log.kl[0]:.2g}" if log.kl else ""


@dataclass
class Sensitivities:
    """Every layer's candidates, predicted KL increase and bytes; what the tune cache holds."""

    layers: list[SensitivityLog]
    shapes: dict[str, tuple[int, int, bool]]  # name -> (in, out, bias)
    fisher_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)


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
) -> tuple[Sensitivities, dict[tuple[str, str], torch.Tensor]]:
    """Predicted KL increase of every (layer, candidate) the layer can take; the model is left as
    it was. Returns the sensitivities and the kept quantized weights (``keep``)."""
    targets, _ = select_layers(model, config.layers, lambda i, o: bool(allowed(i, o, candidates, divisible)))
    shapes = {n: (*linear_shape(m), getattr(m, "bias", None) is not None) for n, m in targets.items()}
    per_layer = {n: allowed(i, o, candidates, divisible) for n, (i, o, _) in shapes.items()}
    t0 = time.perf_counter()
    fisher_calib = calib[:fisher_samples]
    fisher = output_fisher(model, list(targets), fisher_calib)
    t1 = time.perf_counter()
    solver = SensitivitySolver(config, per_layer, fisher, keep)
    logs = run_blocks(model, solver, set(targets), calib, batch_size=batch_size, log=log, device=device,
                      max_memory=max_memory)
    seconds = {"fisher": round(t1 - t0, 1), "gptq_candidates": round(time.perf_counter() - t1, 1)}
    return Sensitivities(logs, shapes, fisher_calib.numel(), seconds), solver.kept


@torch.inference_mode()
def kl_to(model: nn.Module, base_logp: list[torch.Tensor], calib: torch.Tensor, batch_size: int = 1) -> float:
    """Mean KL(original || model) per token on ``calib``, given the original's log-probabilities
    per batch (``base_log_probs``)."""
    total, n = 0.0, 0
    for ids, lq in zip(calib.split(batch_size), base_logp, strict=True):
        lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        total += float((lq.exp() * (lq - lp)).sum())
        n += ids.numel()
    return total / n


@torch.inference_mode()
def base_log_probs(model: nn.Module, calib: torch.Tensor, batch_size: int = 1) -> list[torch.Tensor]:
    return [torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            for ids in calib.split(batch_size)]


def measured_kl(model: nn.Module, weights: dict[str, torch.Tensor], base_logp: list[torch.Tensor],
                calib: torch.Tensor, batch_size: int = 1) -> float:
    """The exact KL increase with the named layers' weights replaced (``[out, in]`` floats) and
    every other layer as it is; the model is restored afterwards."""
    from .walk import linear_weight

    saved = {}
    try:
        for name, w in weights.items():
            p = linear_weight(model.get_submodule(name))
            saved[name] = p.detach().clone()
            p.data.copy_((w.T if p.shape != w.shape else w).to(p.dtype))
        return kl_to(model, base_logp, calib, batch_size)
    finally:
        for name, w in saved.items():
            linear_weight(model.get_submodule(name)).data.copy_(w)


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
