"""From per-layer sensitivities and a budget to per-layer grids: the planning half of ``llmslim tune``.

``sensitivities`` measures every candidate on every layer (``quant.sensitivity``, one pass of the
block driver, and the calibration of their sums on a reference model) or reads them from the
cache, so a second budget on the same model takes seconds. ``plan`` groups layers into units -- layers the fast kernels fuse (q/k/v, gate/up: they read the
same input) choose together among the combinations that still fuse (one grid, or one group size at
2-4 bits each), so a tuned model decodes with as many kernel calls as a uniform one -- and solves the allocation (``quant.allocate``) for a KL target in calibrated units: the
allocation adds up per-layer predictions, ``Calibration`` maps their sum to the whole model's
KL, and being monotone it maps the budget back to a target for the sum. The result is a ``GPTQConfig`` with
``overrides``: an ordinary GPTQ stage that reproduces the checkpoint without searching again.
Checking the result on held-out text is the command's job (``llmslim.tune``): it needs metrics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..config import Budget, CalibConfig, GPTQConfig, TuneConfig
from ..errors import UserError
from ..models import cache_root
from ..nn import FUSE_GROUPS
from ..quant.allocate import Allocation, Unreachable, allocate, pareto_front
from ..quant.sensitivity import Calibration, Sensitivities, layer_bytes, measure
from ..util import atomic_write_text

# The GPTQ options that change what a candidate costs (the cache key); bits/group are the candidates.
_SOLVER_FIELDS = ("sym", "mse", "desc_act", "static_groups", "true_sequential", "damp_percent", "block_size",
                  "act_group_aware", "forward_dtype", "importance")


MEASUREMENT = 4  # what the pass measures (4: a grouped calibration reference); cached tables of others are stale


@dataclass(frozen=True)
class Unit:
    """Layers the fast kernels fuse, with the options they can take together (one "bits:group_size"
    per layer), each option's total bytes and predicted KL."""

    names: tuple[str, ...]
    options: tuple[tuple[str, ...], ...]
    bytes: tuple[int, ...]
    kl: tuple[float, ...]
    params: int  # weights in these layers


@dataclass
class Plan:
    budget: Budget
    config: GPTQConfig  # the GPTQ stage that makes it
    choice: dict[str, str]  # layer -> "bits:group_size"
    predicted_kl: float  # calibrated: the whole model's KL predicted from the layers' sum
    predicted_sum: float  # the sum of the chosen layers' predicted KL increases
    predicted_bytes: int  # the checkpoint's weights: quantized layers + everything stored in float
    bpw: float  # bits per weight of the quantized layers (scales, zeros, g_idx included)
    internal: float  # the allocation's own target (max calibrated KL, or max bytes of the quantized layers)


def cache_key(folder: str, config: TuneConfig, calib: CalibConfig) -> str:
    """Same model files, calibration, solver options, space and Fisher samples -> same sensitivities."""
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(folder).glob("*.safetensors"))
    solver = {f: getattr(config, f) for f in _SOLVER_FIELDS}
    key = json.dumps([str(Path(folder).resolve()), files, asdict(calib), solver, sorted(config.space),
                      config.fisher_samples, config.divisible, asdict(config.layers), __version__, MEASUREMENT],
                     default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def cache_path(key: str) -> Path:
    return cache_root() / "tune" / f"{key}.json"


def save_sensitivities(s: Sensitivities, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(s.as_dict()))


def load_sensitivities(path: Path) -> Sensitivities | None:
    try:
        return Sensitivities.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or from another version: measure again


def sensitivities(model: nn.Module, config: TuneConfig, calib: torch.Tensor, key: str | None = None,
                  batch_size: int | None = None, device: str = "cpu",
                  max_memory: float | None = None) -> tuple[Sensitivities, bool]:
    """The model's sensitivities, from the cache under ``key`` when there (second value True)."""
    if key is not None:
        cached = load_sensitivities(cache_path(key))
        if cached is not None:
            return cached, True
    s, _ = measure(model, config, config.space, calib, config.fisher_samples, config.divisible,
                   batch_size=batch_size, device=device, max_memory=max_memory, unit_of=unit_key)
    if not s.layers:
        raise UserError("no layer of the model can take any candidate of the space (bits "
                        f"{sorted({b for b, _ in config.space})}, groups {sorted({g for _, g in config.space})})")
    if key is not None:
        save_sensitivities(s, cache_path(key))
    return s, False


def unit_key(name: str) -> tuple:
    """Layers with one key are one unit: siblings the fast kernels fuse (they read one input), else
    the layer alone. The anchors measure a unit as a whole, and the allocation chooses for it at once."""
    parent, _, child = name.rpartition(".")
    fused = next((g for g, members in FUSE_GROUPS.items() if child in members), None)
    return (parent, fused) if fused else (name,)


def _grid(candidate: str) -> tuple[int, int]:
    bits, group = (int(v) for v in candidate.split(":"))
    return bits, group


def fusable(choice: tuple[str, ...]) -> bool:
    """Whether siblings with these grids still fuse into one kernel call: one grid for all, or one
    group size at 2-4 bits each (the int4 kernel's codes are 4-bit whatever the source's bits;
    ``runtime.kernels.Int4Linear.from_gptq_parts``)."""
    grids = [_grid(c) for c in choice]
    return len(set(grids)) == 1 or (len({g for _, g in grids}) == 1 and all(b <= 4 for b, _ in grids))


def units(s: Sensitivities) -> list[Unit]:
    """Layers grouped as the fast kernels fuse them; a unit's options are its layers' candidates in
    every combination that still fuses (siblings of one group size at their own 2-4 bits), less the
    combinations another one beats in both size and predicted KL."""
    by_name = {x.name: x for x in s.layers}
    groups: dict[tuple, list[str]] = {}
    for name in by_name:
        groups.setdefault(unit_key(name), []).append(name)
    out = []
    for names in groups.values():
        combos = [c for c in itertools.product(*(by_name[n].candidates for n in names)) if fusable(c)]
        if not combos:  # siblings that share no kernel: each on its own
            out += [_unit(s, [n], by_name, [(c,) for c in by_name[n].candidates]) for n in names]
            continue
        out.append(_unit(s, names, by_name, combos))
    return out


def _unit(s: Sensitivities, names: list[str], by_name: dict, options: list[tuple[str, ...]]) -> Unit:
    size, kl = [], []
    for option in options:
        size.append(sum(layer_bytes(*s.shapes[n][:2], *_grid(c), s.shapes[n][2]) for n, c in zip(names, option,
                                                                                                  strict=True)))
        kl.append(sum(by_name[n].kl[by_name[n].candidates.index(c)] for n, c in zip(names, option, strict=True)))
    # Keep an option unless another is no larger and no costlier, and better in one (ties: the first).
    keep = [j for j in range(len(options))
            if not any((size[k] <= size[j] and kl[k] <= kl[j]) and (size[k] < size[j] or kl[k] < kl[j] or k < j)
                       for k in range(len(options)) if k != j)]
    params = sum(s.shapes[n][0] * s.shapes[n][1] for n in names)
    return Unit(tuple(names), tuple(options[j] for j in keep), tuple(size[j] for j in keep),
                tuple(kl[j] for j in keep), params)


HEADER_BYTES_PER_TENSOR = 100  # the safetensors JSON header: name, dtype, shape and offsets of each tensor


def float_bytes(model: nn.Module, quantized: set[str]) -> int:
    """Bytes of everything the checkpoint's weight files hold besides the quantized layers' tensors:
    the float tensors (fp16, tied ones once) and an estimate of the header, which names every tensor
    (about 100 bytes each: 0.1 MB on SmolLM2-135M, enough to break a size budget set to the byte)."""
    total, seen, tensors = 0, set(), 4 * len(quantized)  # qweight, qzeros, scales, g_idx
    skip = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}
    for k, v in model.state_dict(keep_vars=True).items():
        if k in skip or v.data_ptr() in seen:
            tensors += k in skip and k.endswith(".bias")
            continue
        seen.add(v.data_ptr())
        tensors += 1
        total += v.numel() * (2 if v.is_floating_point() else v.element_size())
    return total + HEADER_BYTES_PER_TENSOR * tensors


def plan(s: Sensitivities, budget: Budget, base: GPTQConfig, fixed_bytes: int, internal: float | None = None) -> Plan:
    """Per-layer grids for ``budget``. ``internal``: the allocation's target, when a retry tightens
    it (default: the budget itself; ``ppl=+x%`` is the KL ln(1 + x): to first order a KL of k nats
    per token raises the held-out perplexity by exp(k)). A quality target is a calibrated KL: the
    allocation bounds the sum of the layers' predictions by ``calibration.predicted_for(target)``."""
    us = units(s)
    cal = s.calibration
    sizes, costs = [list(u.bytes) for u in us], [list(u.kl) for u in us]
    params = sum(u.params for u in us)
    if internal is None:
        internal = {"kl": budget.value, "ppl": math.log1p(budget.value), "size": budget.value - fixed_bytes,
                    "bpw": budget.value * params / 8}[budget.kind]
    if budget.quality:
        result = allocate(sizes, costs, max_cost=cal.predicted_for(internal))
    else:
        result = allocate(sizes, costs, max_size=internal)
    if isinstance(result, Unreachable):
        best = result.best
        reach = (f"the least KL any choice predicts is {cal.kl(best.cost):.4g} (at {(best.size + fixed_bytes) / 1e6:.4g} MB)"
                 if budget.quality else
                 f"the smallest choice is {(best.size + fixed_bytes) / 1e6:.4g} MB, "
                 f"{best.size * 8 / params:.2f} bits per weight")
        raise UserError(f"--budget {budget} cannot be met with this space: {reach}")
    return _plan(us, result, budget, base, fixed_bytes, params, internal, cal, s.shapes)


def _plan(us: list[Unit], a: Allocation, budget: Budget, base: GPTQConfig, fixed_bytes: int, params: int,
          internal: float, cal: Calibration, shapes: dict[str, tuple[int, int, bool]]) -> Plan:
    choice = {n: c for u, j in zip(us, a.choice, strict=True) for n, c in zip(u.names, u.options[j], strict=True)}
    # The base grid: the one most weights use, so the dynamic rules stay few.
    weight = Counter()
    for n, c in choice.items():
        weight[c] += shapes[n][0] * shapes[n][1]
    bits, group = (int(v) for v in weight.most_common(1)[0][0].split(":"))
    overrides = tuple(f"{n}={c}" for n, c in choice.items() if c != f"{bits}:{group}")
    keep = {f.name: getattr(base, f.name) for f in fields(GPTQConfig) if f.name not in ("bits", "group_size", "overrides")}
    config = GPTQConfig(**keep, bits=bits, group_size=group, overrides=overrides)
    return Plan(budget, config, choice, cal.kl(a.cost), a.cost, int(a.size + fixed_bytes), a.size * 8 / params,
                internal)


def uniform_points(s: Sensitivities, fixed_bytes: int) -> list[dict]:
    """Predicted KL (calibrated, and the layers' sum) and bytes of every uniform setting of the space,
    for the Pareto plot. A layer that cannot take a setting (its group size does not divide the layer
    in a divisible space) takes the same bits at its largest group size below it, and the point says
    how many did (``substituted``); a setting with no such stand-in in some layer is left out."""
    params = sum(i * o for i, o, _ in s.shapes.values())
    names = sorted({c for x in s.layers for c in x.candidates}, key=_grid)
    out = []
    for c in names:
        bits, group = _grid(c)
        size = kl = 0.0
        substituted = 0
        for x in s.layers:
            if c in x.candidates:
                j = x.candidates.index(c)
            else:
                finer = [k for k, (b, g) in enumerate(map(_grid, x.candidates))
                         if b == bits and g != -1 and (group == -1 or g < group)]
                if not finer:
                    break
                j = max(finer, key=lambda k: _grid(x.candidates[k])[1])
                substituted += 1
            size += layer_bytes(*s.shapes[x.name][:2], *_grid(x.candidates[j]), s.shapes[x.name][2])
            kl += x.kl[j]
        else:
            out.append({"setting": c, "predicted_kl": s.calibration.kl(kl), "predicted_sum": kl,
                        "bytes": int(size + fixed_bytes), "bpw": size * 8 / params, "substituted": substituted})
    return out


def front(s: Sensitivities, fixed_bytes: int, points: int = 48) -> list[dict]:
    us = units(s)
    params = sum(u.params for u in us)
    return [{"predicted_kl": s.calibration.kl(a.cost), "predicted_sum": a.cost, "bytes": int(a.size + fixed_bytes),
             "bpw": a.size * 8 / params}
            for a in pareto_front([list(u.bytes) for u in us], [list(u.kl) for u in us], points)]


def tune_stage_config(model: nn.Module, config: TuneConfig, calib: torch.Tensor, batch_size: int | None = None,
                      device: str = "cpu", max_memory: float | None = None) -> tuple[GPTQConfig, dict]:
    """What the recipe stage ``tune`` runs before GPTQ: measure (no cache: a stage has no model
    identity), plan for the budget as predicted. Returns the GPTQ config and the facts to log."""
    s, _ = sensitivities(model, config, calib, None, batch_size, device, max_memory)
    fixed = float_bytes(model, set(s.shapes))
    p = plan(s, config.target_budget, replace(config), fixed)
    facts = {"budget": str(p.budget), "predicted_kl": p.predicted_kl, "predicted_sum": p.predicted_sum,
             "predicted_bytes": p.predicted_bytes, "bpw": p.bpw, "choice": p.choice, "sensitivity_seconds": s.seconds,
             "calibration": asdict(s.calibration),
             "note": "predicted only: llmslim tune verifies on held-out text"}
    return p.config, facts
