"""Frozen, validated stage configs: one per compression method. ``quantize(model, config)`` and the
recipe runner dispatch on their type (``llmslim.pipeline.stages``), never on a string.

Field names are the CLI flag names (``group_size`` <-> ``--group-size``), which are the names
users of GPTQ tools already know. ``stage`` is the method's name: the ``--method`` value and the
stage key in a recipe file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .errors import UserError
from .grid import SUPPORTED_BITS


@dataclass(frozen=True)
class LayerFilter:
    """Which linear layers of the decoder blocks get quantized (fnmatch globs on full names).

    Embeddings and ``lm_head`` sit outside the decoder blocks and stay in float unless
    ``quantize_lm_head`` is set.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    quantize_lm_head: bool = False

    def __post_init__(self):
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def accepts(self, name: str) -> bool:
        from fnmatch import fnmatchcase

        if self.include and not any(fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatchcase(name, p) for p in self.exclude)


@dataclass(frozen=True)
class IntConfig:
    """An integer grid: shared by RTN and GPTQ, and by the GPTQ checkpoint format."""

    stage: ClassVar[str]

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    mse: bool = False
    layers: LayerFilter = field(default_factory=LayerFilter)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise UserError(f"--group-size must be -1 (per-channel) or a positive integer, got {self.group_size}")


@dataclass(frozen=True)
class RTNConfig(IntConfig):
    """Round-to-nearest: no calibration data, the baseline every other method must beat."""

    stage: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class GPTQConfig(IntConfig):
    """GPTQ (Frantar et al. 2022, arXiv:2210.17323) with the options GPTQ tools expose."""

    stage: ClassVar[str] = "gptq"
    # MSE-optimal clipping of each group's range (the GPTQ reference's search). On by default:
    # measured on SmolLM2-135M, 4-bit g128 11.87 -> 11.38 and 3-bit g128 29.17 -> 18.53 perplexity,
    # for ~10% more quantization time (eval/bench_gptq.py). RTN keeps plain min/max as its baseline.
    mse: bool = True
    desc_act: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    block_size: int = 128
    # Group-aware reordering (GAR): act-order inside groups, free at inference. GPTQModel's
    # default too; desc_act supersedes it.
    act_group_aware: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.damp_percent < 1:
            raise UserError(f"--damp-percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size <= 0:
            raise UserError(f"--block-size must be positive, got {self.block_size}")


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration tokens come from: ``llmslim.data.calibration_tokens`` takes these fields."""

    dataset: str = "wiki"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    text_field: str = "text"

    def __post_init__(self):
        if self.nsamples <= 0:
            raise UserError(f"--nsamples must be positive, got {self.nsamples}")
        if self.seqlen <= 1:
            raise UserError(f"--seqlen must be at least 2, got {self.seqlen}")


BNB_TYPES = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class BnbConfig:
    """bitsandbytes quantization (NF4/FP4 4-bit, LLM.int8), serialized in transformers' format.

    ``quant_type`` is the stage's name (``--method nf4``, ``nf4:`` in a recipe), not a recipe key.
    """

    quant_type: str = "nf4"
    double_quant: bool = False
    compute_dtype: str = "bf16"  # bf16 | fp32 (| fp16)
    int8_threshold: float = 6.0
    layers: LayerFilter = field(default_factory=LayerFilter)

    def __post_init__(self):
        if self.quant_type not in BNB_TYPES:
            raise UserError(f"bitsandbytes method must be one of {', '.join(BNB_TYPES)}, got {self.quant_type!r}")
        if self.compute_dtype not in ("bf16", "fp32", "fp16"):
            raise UserError(f"--compute-dtype must be bf16, fp32 or fp16, got {self.compute_dtype!r}")
        if self.quant_type == "int8" and self.compute_dtype != "bf16":  # the default; int8 has no compute dtype
            raise UserError("--compute-dtype applies to --method nf4/fp4 only, not int8")
        if self.quant_type == "int8" and self.double_quant:
            raise UserError("--double-quant applies to nf4/fp4 only, not int8")
        if self.quant_type != "int8" and self.int8_threshold != 6.0:
            raise UserError("--int8-threshold applies to --method int8 only")
        if self.int8_threshold < 0:
            raise UserError(f"--int8-threshold must be >= 0, got {self.int8_threshold}")

    @property
    def stage(self) -> str:
        return self.quant_type
