"""Recipes: an ordered list of stages, each a frozen config, plus where calibration text comes from.

The file format (YAML, or JSON, which YAML reads too)::

    calibration: {dataset: wiki, nsamples: 128, seqlen: 512, seed: 0}
    stages:
      - gptq: {bits: 4, group_size: 128, sym: true, desc_act: false}

Stage names are the ``--method`` names; keys are the config fields, which are the CLI flag names
with underscores (a layer filter is written flat: ``include``, ``exclude``, ``quantize_lm_head``).
Everything is checked before any work: unknown stage or key, wrong type, impossible order.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

from .. import __version__
from ..config import (
    GGUF_MIX_TARGETS,
    BnbConfig,
    CalibConfig,
    ExportConfig,
    GPTQConfig,
    IntConfig,
    LayerFilter,
    PruneConfig,
    RecoverConfig,
    RTNConfig,
    TuneConfig,
)
from ..errors import UserError
from ..formats.gguf import stage_grid_problem
from ..grid import GGUF_GRIDS
from .stages import SAME, handler_for, needs_calibration

# The names a recipe file uses -> the config each builds. Parsing only: work is dispatched on the
# config's type (stages.HANDLERS). nf4/fp4/int8 are one config whose quant_type is the name.
STAGES: dict[str, Callable[..., object]] = {
    "gptq": GPTQConfig,
    "rtn": RTNConfig,
    "nf4": partial(BnbConfig, "nf4"),
    "fp4": partial(BnbConfig, "fp4"),
    "int8": partial(BnbConfig, "int8"),
    "export": ExportConfig,
    "prune": PruneConfig,
    "recover": RecoverConfig,
    "tune": TuneConfig,
}
_CONFIG_TYPES = {"gptq": GPTQConfig, "rtn": RTNConfig, "nf4": BnbConfig, "fp4": BnbConfig, "int8": BnbConfig,
                 "export": ExportConfig, "prune": PruneConfig, "recover": RecoverConfig, "tune": TuneConfig}
_IMPLIED = {"quant_type"}  # fields named by the stage itself, not keys
_LAYER_KEYS = tuple(f.name for f in fields(LayerFilter))
TOP_KEYS = ("llmslim_version", "calibration", "stages")


@dataclass(frozen=True)
class Recipe:
    stages: tuple
    calibration: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        check_order(self.stages)
        check_export(self.stages)

    @property
    def calibrated(self) -> bool:
        return any(needs_calibration(s) for s in self.stages)

    def to_dict(self) -> dict:
        """Every field of every stage, defaults included: the file reproduces the run even if
        llmslim's defaults change later."""
        d: dict = {"llmslim_version": __version__}
        if self.calibrated:
            d["calibration"] = dataclasses.asdict(self.calibration)
        d["stages"] = [{s.stage: stage_dict(s)} for s in self.stages]
        return d

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def stage_dict(config) -> dict:
    """A stage config as recipe keys (the layer filter flattened)."""
    out = {}
    for f in fields(config):
        if f.name in _IMPLIED:
            continue
        value = getattr(config, f.name)
        if isinstance(value, LayerFilter):
            out.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(value).items()})
        else:
            out[f.name] = value
    return out


def check_order(stages: tuple) -> None:
    """Each stage must accept the kind of model the one before it makes (a float model first)."""
    if not stages:
        raise UserError("the recipe has no stages")
    kind, previous = "float", "the input model"
    for i, config in enumerate(stages, 1):
        h = handler_for(config)
        if kind not in h.takes:
            raise UserError(f"recipe stage {i} ({config.stage}) cannot follow {previous}: it takes a "
                            f"{' or '.join(sorted(h.takes))} model, and {previous} makes a {kind} one")
        kind, previous = kind if h.makes == SAME else h.makes, f"stage {i} ({config.stage})"


def check_export(stages: tuple) -> None:
    """A GGUF export after a GPTQ/RTN/tune stage writes that stage's codes bit for bit, so its type must
    hold the stage's grid: refused here, before the stage's minutes of work, not after them."""
    export = stages[-1]
    if not isinstance(export, ExportConfig):
        return
    for i, config in enumerate(stages[:-1], 1):
        problem = stage_grid_problem(config, export.type) if isinstance(config, IntConfig) else None
        if problem:
            raise UserError(f"recipe stage {len(stages)} (export {export.type}) cannot write stage {i} "
                            f"({config.stage})'s grid without rounding it again: {problem}; "
                            f"{_export_fix(i, config, export.type)}")


def _export_fix(i: int, config: IntConfig, kind: str) -> str:
    if isinstance(config, TuneConfig):
        return f"give stage {i} only candidates that {kind} holds"
    if kind in GGUF_GRIDS or (kind in GGUF_MIX_TARGETS and isinstance(config, GPTQConfig)):
        return f"give stage {i} target: gguf-{kind} (--target gguf-{kind}), which solves on that grid"
    if kind in ("f16", "f32"):
        return "export as f32"
    return f"drop stage {i} (export rounds the float model to {kind} itself, llama.cpp's rule) or export as q4_0/q8_0"


def parse_recipe(data: object, where: str = "recipe") -> Recipe:
    """A ``Recipe`` from the parsed file, or a one-line ``UserError`` naming what is wrong."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with 'stages' (and 'calibration'), got {type(data).__name__}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(TOP_KEYS)})")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{where}: 'stages' must be a non-empty list, e.g. [{{gptq: {{bits: 4}}}}]")
    configs = tuple(_parse_stage(i, entry, where) for i, entry in enumerate(stages, 1))
    calib = data.get("calibration")
    if calib is None:
        calibration = CalibConfig()
    else:
        if not any(needs_calibration(c) for c in configs):
            raise UserError(f"{where}: 'calibration' is given but no stage uses calibration data")
        calibration = _build(CalibConfig, CalibConfig, calib, f"{where}: calibration")
    return Recipe(configs, calibration)


def _parse_stage(i: int, entry: object, where: str):
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise UserError(f"{where}: stage {i} must be one 'name: {{key: value}}' mapping, got {entry!r}")
    (name, options), = entry.items()
    if name not in STAGES:
        raise UserError(f"{where}: stage {i}: unknown stage {name!r} (known: {', '.join(STAGES)})")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise UserError(f"{where}: stage {i} ({name}): options must be a mapping, got {options!r}")
    options = dict(options)
    layer_opts = {k: options.pop(k) for k in _LAYER_KEYS if k in options}
    label = f"{where}: stage {i} ({name})"
    if layer_opts:
        options["layers"] = _build(LayerFilter, LayerFilter, layer_opts, label)
    return _build(_CONFIG_TYPES[name], STAGES[name], options, label)


def _build(cls: type, make: Callable[..., object], options: object, label: str):
    if not isinstance(options, dict):
        raise UserError(f"{label}: expected a mapping, got {options!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.name not in _IMPLIED]
    if cls in (GPTQConfig, RTNConfig, BnbConfig, PruneConfig, TuneConfig):
        known = [k for k in known if k != "layers"] + list(_LAYER_KEYS)
    for key, value in options.items():
        if key == "layers" and isinstance(value, LayerFilter):
            continue
        if key not in known:
            raise UserError(f"{label}: unknown key {key!r} (keys: {', '.join(known)})")
        if not _type_ok(value, hints[key]):
            raise UserError(f"{label}: {key} must be {_type_name(hints[key])}, got {value!r}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return make(**options)


def _type_ok(value: object, hint: object) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    return True


def _type_name(hint: object) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def read_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (YAML or JSON)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {path}: {e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                        f"{str(e).splitlines()[0]}") from None
    return parse_recipe(data, str(path))
