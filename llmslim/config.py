"""Frozen, validated stage configs: one per compression method. ``quantize(model, config)`` and the
recipe runner dispatch on their type (``llmslim.pipeline.stages``), never on a string.

Field names are the CLI flag names (``group_size`` <-> ``--group-size``), which are the names
users of GPTQ tools already know. ``stage`` is the method's name: the ``--method`` value and the
stage key in a recipe file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

from . import ggml_quants
from .errors import UserError
from .grid import GGUF_BLOCK, GGUF_GRIDS, SUPPORTED_BITS

# The dtype the block driver runs calibration forwards in (``--forward-dtype``). bf16: linears and
# attention under autocast (AMX on recent Intel CPUs: ~3x a fp32 forward), activations kept in bf16
# between blocks; the weights the solvers read and write stay float32, and so do the statistics
# (H = 2XX^T of the bf16 inputs, exact: eval/scale.md#bf16-calibration-forwards). auto: bf16 where
# the device computes bf16 natively (CPUs with AMX or AVX512-BF16, CUDA GPUs with bf16), fp32 elsewhere
# (emulated bf16 is slower than fp32); on the reference model bf16 forwards gave the same quality.
FORWARD_DTYPES = ("auto", "fp32", "bf16")
FORWARD_DTYPE_HELP = ("dtype of the calibration forwards through each block: auto (default: bf16 where the device "
                      "has native bf16 matmuls -- CPUs with AMX or AVX512-BF16, CUDA -- else fp32), fp32 or bf16 "
                      "(about 3x faster forwards with AMX; the solvers' weights and statistics stay float32)")


# How GPTQ's MSE search weighs a weight's error when it picks a group's scale (``gptq_quantize``'s
# ``importance``): "auto" = "hessian" on the GGUF block grids (Q4_0/Q8_0: measured on the reference
# model, eval/gguf.md), "none" elsewhere (the GPTQ reference's unweighted search, until measured there).
IMPORTANCES = ("auto", "none", "hessian", "imatrix")
IMPORTANCE_HELP = ("how GPTQ's scale search weighs each weight's error: none (the GPTQ reference's |w - w^|^2.4), "
                   "hessian (the input column's Hessian diagonal, llama.cpp's importance matrix), imatrix "
                   "(that times sqrt(sigma^2 + w^2), llama.cpp's own weighting); auto (default): hessian on "
                   "--target gguf-q4_0/q8_0, none otherwise")


def check_forward_dtype(value: str) -> None:
    if value not in FORWARD_DTYPES:
        raise UserError(f"--forward-dtype must be one of {', '.join(FORWARD_DTYPES)}, got {value!r}")


# GGUF file types GPTQ solves for (--target gguf-q4_k_m): each layer on the type llama-quantize gives it.
GGUF_MIX_TARGETS = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k")


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
    # Symmetric grids: the signed-scale grid over all 2^bits levels (llama.cpp's Q4_0 rule, AutoRound's
    # default) instead of GPTQ's, which spends half a step beyond each end (grid._full_range_params).
    full_range: bool = False
    mse: bool = False
    layers: LayerFilter = field(default_factory=LayerFilter)
    # Solve on a GGUF block grid ("gguf-q4_0", "gguf-q8_0"): sets bits, group size 32 and the
    # symmetric zero; the checkpoint then exports to that GGUF type bit for bit.
    target: str = ""

    def __post_init__(self):
        if self.target:
            self._apply_target()
        if self.full_range and not self.sym:
            raise UserError("--full-range is a symmetric grid: drop --asym")
        if self.full_range and self.target:
            raise UserError(f"--target {self.target} fixes the grid: drop --full-range")
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise UserError(f"--group-size must be -1 (per-channel) or a positive integer, got {self.group_size}")

    def for_layer(self, name: str) -> IntConfig:
        """The grid one layer gets (GPTQ's per-layer overrides; the same for every layer here)."""
        return self

    @property
    def gguf_grid(self) -> str | None:
        """``q4_0``/``q8_0`` (or a K-quant file type such as ``q4_k_m``, or one layer's tensor type such as
        ``q6_k``) when solving on that GGUF grid, else None."""
        return self.target.removeprefix("gguf-") if self.target else None

    def _apply_target(self) -> None:
        kind = self.target.removeprefix("gguf-")
        if self.target.startswith("gguf-") and (kind in GGUF_MIX_TARGETS or kind in ggml_quants.LAYOUT) \
                and kind not in GGUF_GRIDS:
            # A grid whose block scales are themselves quantized: solved by GPTQ (scales fitted before the
            # sweep), written only as GGUF; a mix's per-layer types come from llama.cpp's rule at run time.
            if self.stage != "gptq":
                raise UserError(f"--target {self.target} with round-to-nearest is llama.cpp's own quantization: "
                                f"llmslim export MODEL --type {kind} --out model.gguf")
            if self.bits != 4 or self.group_size not in (128, 32) or not self.sym:
                raise UserError(f"--target {self.target} fixes the grid: drop --bits/--group-size/--asym")
            object.__setattr__(self, "group_size", 32)
            return
        if not self.target.startswith("gguf-") or kind not in GGUF_GRIDS:
            raise UserError(f"--target must be one of {', '.join('gguf-' + k for k in (*GGUF_GRIDS, *GGUF_MIX_TARGETS))}"
                            f", got {self.target!r}")
        bits = GGUF_GRIDS[kind][0]
        if self.bits not in (4, bits):  # 4 is the default: --target sets the bits
            raise UserError(f"--target {self.target} is {bits}-bit: drop --bits {self.bits}")
        if self.group_size not in (128, GGUF_BLOCK):  # 128 is the default
            raise UserError(f"--target {self.target} has blocks of {GGUF_BLOCK} weights: drop --group-size "
                            f"{self.group_size}")
        if not self.sym:
            raise UserError(f"--target {self.target} is a symmetric grid: drop --asym")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "group_size", GGUF_BLOCK)


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
    # Joint pruning in the same sweep (SparseGPT's joint sparse + quantized mode, arXiv:2301.00774
    # Sec. 3.5): 0 / "" = off; at most one of them.
    sparsity: float = 0.0
    nm: str = ""
    # Joint mode only: CG iterations of the exact refit of the kept weights (quant.refit) between
    # SparseGPT's mask and the GPTQ sweep, which then quantizes the refit weights with the mask fixed;
    # None: 20. 0: the paper's single sweep that masks and quantizes together.
    refit_iters: int | None = None
    # Per-layer grids (``llmslim tune``'s result): "FULL.LAYER.NAME=BITS:GROUP_SIZE" entries; every
    # other layer takes ``bits``/``group_size``. Written to the checkpoint as GPTQModel's ``dynamic``.
    overrides: tuple[str, ...] = ()
    # A GGUF mix target's per-layer tensor types, "FULL.LAYER.NAME=TYPE" (filled in by the gptq stage
    # from llama.cpp's rule, ``formats.gguf_mix``); not a user option.
    layer_types: tuple[str, ...] = ()
    forward_dtype: str = "auto"  # the block forwards on the calibration text (FORWARD_DTYPES)
    importance: str = "auto"  # the MSE scale search's weighting (IMPORTANCES)

    def __post_init__(self):
        super().__post_init__()
        if self.importance not in IMPORTANCES:
            raise UserError(f"--importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        settings = self.layer_settings  # checks every entry
        check_forward_dtype(self.forward_dtype)
        if settings and self.target:
            raise UserError(f"--target {self.target} fixes one grid for every layer: per-layer overrides do not apply")
        if self.gguf_grid in GGUF_GRIDS and self.desc_act and not self.static_groups:
            raise UserError(f"--target {self.target} needs each block of {GGUF_BLOCK} consecutive weights in one "
                            "group: with --desc-act add --static-groups")
        if not 0 < self.damp_percent < 1:
            raise UserError(f"--damp-percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size <= 0:
            raise UserError(f"--block-size must be positive, got {self.block_size}")
        check_sparsity(self.sparsity, self.nm, required=False)
        if self.joint and self.desc_act:
            raise UserError("--desc-act does not combine with --sparsity/--nm: the joint sweep runs in the natural "
                            "column order, as SparseGPT's does (reordered, it pruned worse); drop --desc-act")
        if self.refit_iters is not None:
            if not self.joint:
                raise UserError("--refit-iters applies to the joint sweep only: add --sparsity or --nm")
            if not isinstance(self.refit_iters, int) or self.refit_iters < 0:
                raise UserError(f"--refit-iters must be a whole number >= 0, got {self.refit_iters}")
        n_m = parse_nm(self.nm)
        if n_m:
            m = n_m[1]
            if self.block_size % m:
                raise UserError(f"--nm {self.nm}: M={m} must divide --block-size {self.block_size}")
            if self.group_size != -1 and self.group_size % m:
                raise UserError(f"--nm {self.nm}: M={m} must divide --group-size {self.group_size}")

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_nm(self.nm)

    @property
    def scale_importance(self) -> str | None:
        """``importance`` resolved for ``gptq_quantize``: None (unweighted), "hessian" or "imatrix"."""
        if self.importance == "auto":
            return "hessian" if self.gguf_grid in GGUF_GRIDS else None
        return None if self.importance == "none" else self.importance

    @property
    def layer_settings(self) -> dict[str, tuple[int, int]]:
        """``overrides`` parsed: full layer name -> (bits, group size)."""
        return dict(parse_override(x) for x in self.overrides)

    def for_layer(self, name: str) -> GPTQConfig:
        """The config one layer is solved with: its own bits and group size when overridden."""
        if self.layer_types:
            kind = dict(x.split("=", 1) for x in self.layer_types).get(name)
            # a layer on Q4_0/Q8_0 is a block-of-32 grid: act-order needs its groups fixed up front
            return replace(self, target=f"gguf-{kind}", layer_types=(),
                           static_groups=self.static_groups or self.desc_act) if kind else self
        setting = self.layer_settings.get(name)
        if setting is None:
            return self
        return replace(self, bits=setting[0], group_size=setting[1], overrides=())

    @property
    def joint(self) -> bool:
        """Pruning in the same sweep (SparseGPT's joint sparse + quantized mode)."""
        return bool(self.sparsity) or bool(self.nm)

    @property
    def refit(self) -> int:
        """Refit iterations of the joint mode in effect (0 when not joint)."""
        if not self.joint:
            return 0
        return REFIT_DEFAULT["sparsegpt"] if self.refit_iters is None else self.refit_iters


TUNE_BITS = (2, 3, 4, 8)
TUNE_GROUPS = (32, 64, 128)
BUDGET_KINDS = ("kl", "ppl", "size", "bpw")


@dataclass(frozen=True)
class Budget:
    """What ``llmslim tune`` must meet: ``kl`` (nats/token, KL to the original), ``ppl`` (relative
    perplexity increase, 0.05 for +5%), ``size`` (bytes of the checkpoint's weights) or ``bpw``
    (bits per weight of the quantized layers, scales and zeros included)."""

    kind: str
    value: float

    @property
    def quality(self) -> bool:
        return self.kind in ("kl", "ppl")

    def __str__(self) -> str:
        if self.kind == "ppl":
            return f"ppl=+{self.value * 100:g}%"
        if self.kind == "size":
            return f"size={self.value / 1e6:g}MB"
        return f"{self.kind}={self.value:g}"


def parse_budget(text: str) -> Budget:
    """``kl=0.1``, ``ppl=+5%``, ``size=90MB``, ``bpw=3.5`` -> ``Budget``."""
    from .util import parse_size

    kind, _, value = str(text).partition("=")
    kind = kind.strip().lower()
    if kind not in BUDGET_KINDS or not value.strip():
        raise UserError(f"--budget must be one of kl=0.1, ppl=+5%, size=90MB, bpw=3.5; got {text!r}")
    value = value.strip()
    try:
        if kind == "size":
            number = float(parse_size(value))
        elif kind == "ppl":
            number = float(value.lstrip("+").rstrip("%")) / (100 if value.endswith("%") else 1)
        else:
            number = float(value)
    except ValueError:
        raise UserError(f"--budget {text}: {value!r} is not a number") from None
    if not number > 0 or number != number or number == float("inf"):
        raise UserError(f"--budget {text}: the value must be positive")
    if kind == "bpw" and not 2 <= number <= 16:
        raise UserError(f"--budget {text}: bits per weight must be between 2 and 16")
    return Budget(kind, number)


@dataclass(frozen=True)
class TuneConfig(GPTQConfig):
    """GPTQ with each layer's grid chosen to meet a budget (``llmslim tune``): every candidate
    ``bits:group_size`` is priced on every layer (predicted KL increase, ``quant.sensitivity``),
    the smallest model within a quality budget (or the best one within a size budget) is solved
    for (``quant.allocate``), then GPTQ runs with the chosen grids. ``bits``/``group_size`` are
    only the checkpoint's base grid: each layer that differs gets a ``dynamic`` override."""

    stage: ClassVar[str] = "tune"
    budget: str = ""
    candidates: tuple[str, ...] = ()  # "bits:group_size"; () = bits 2/3/4/8 x groups 32/64/128
    fisher_samples: int = 16  # calibration sequences for the Fisher pass
    divisible: bool = True  # only group sizes that divide a layer's input size (vLLM needs it)

    def __post_init__(self):
        super().__post_init__()
        if self.overrides:
            raise UserError("tune chooses every layer's grid: drop overrides")
        if self.joint:
            raise UserError("tune does not combine with --sparsity/--nm")
        parse_budget(self.budget)
        object.__setattr__(self, "candidates", tuple(str(c) for c in self.candidates))
        if len(set(self.space)) != len(self.space):  # parsing checks every candidate
            raise UserError(f"tune candidates repeat: {', '.join(self.candidates)}")
        if not isinstance(self.fisher_samples, int) or self.fisher_samples < 1:
            raise UserError(f"fisher_samples must be a positive integer, got {self.fisher_samples!r}")

    @property
    def space(self) -> list[tuple[int, int]]:
        if not self.candidates:
            return [(b, g) for b in TUNE_BITS for g in TUNE_GROUPS]
        return [parse_override(f"x={c}")[1] for c in self.candidates]

    @property
    def target_budget(self) -> Budget:
        return parse_budget(self.budget)


def parse_override(entry: str) -> tuple[str, tuple[int, int]]:
    """``"model.layers.0.mlp.down_proj=3:64"`` -> (name, (3, 64))."""
    name, _, setting = str(entry).rpartition("=")
    try:
        bits, group = (int(x) for x in setting.split(":"))
    except ValueError:
        raise UserError(f"overrides: {entry!r} must look like LAYER.NAME=BITS:GROUP_SIZE "
                        "(e.g. model.layers.0.mlp.down_proj=3:64)") from None
    if not name:
        raise UserError(f"overrides: {entry!r} names no layer")
    if bits not in SUPPORTED_BITS:
        raise UserError(f"overrides: {entry!r}: bits must be one of {', '.join(map(str, SUPPORTED_BITS))}")
    if group != -1 and group <= 0:
        raise UserError(f"overrides: {entry!r}: group size must be -1 or positive")
    return name, (bits, group)


def parse_nm(nm: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): at most N nonzero weights in every M consecutive inputs (NVIDIA's
    convention; 2:4 and 4:8 are 50% sparse). ``""`` -> None."""
    if not nm:
        return None
    try:
        n, m = (int(x) for x in str(nm).split(":"))
    except ValueError:
        raise UserError(f"--nm must look like N:M (e.g. 2:4), got {nm!r}") from None
    if n < 1 or m < 2:
        raise UserError(f"--nm {nm}: need N >= 1 and M >= 2")
    if n >= m:
        raise UserError(f"--nm {nm}: N must be smaller than M (N:M keeps N of every M weights)")
    return n, m


def check_sparsity(sparsity: float, nm: str, required: bool, method: str = "") -> None:
    if sparsity and nm:
        raise UserError("--nm and --sparsity exclude each other: N:M sets the sparsity (1 - N/M); give one")
    if not isinstance(sparsity, int | float) or isinstance(sparsity, bool) or (sparsity and not 0 < sparsity < 1):
        raise UserError(f"--sparsity must be in (0, 1), got {sparsity}")
    if sparsity == 0 and not nm and required:
        raise UserError(f"--method {method} needs --sparsity S (0 < S < 1) or --nm N:M (e.g. 2:4)")
    parse_nm(nm)


PRUNE_METHODS = ("sparsegpt", "wanda", "magnitude", "depth", "width")
UNSTRUCTURED_METHODS = ("sparsegpt", "wanda", "magnitude")
# Refit iterations by default (PruneConfig.refit_iters): SparseGPT's mask with exact weights beat the
# sweep alone on SmolLM2-135M (eval/pruning.md); Wanda stays the paper's method (no weight update)
# unless asked. magnitude reads no calibration, so it has nothing to refit with.
REFIT_DEFAULT = {"sparsegpt": 20, "wanda": 0}
IMPORTANCE = ("bi", "kl")


@dataclass(frozen=True)
class PruneConfig:
    """Pruning: unstructured or N:M zeros (SparseGPT, Wanda, magnitude), or structured removal of
    whole decoder blocks (depth) or MLP channels and attention heads (width)."""

    stage: ClassVar[str] = "prune"

    method: str = "sparsegpt"
    sparsity: float = 0.0  # unstructured: fraction of zeros in each pruned linear
    nm: str = ""  # semi-structured: "2:4", "4:8"
    drop_blocks: int = 0  # depth: decoder blocks to remove
    importance: str = "bi"  # depth: bi (ShortGPT block influence) | kl (KL increase when skipped)
    mlp_keep: float = 1.0  # width: fraction of MLP intermediate channels kept
    heads_keep: float = 1.0  # width: fraction of attention heads (KV groups under GQA) kept
    damp_percent: float = 0.01  # sparsegpt: Hessian damping
    block_size: int = 128  # sparsegpt: lazy-update block size
    layers: LayerFilter = field(default_factory=LayerFilter)
    # sparsegpt/wanda: False (default) reads every layer's input from one forward of the block as it
    # was, as the SparseGPT/Wanda reference code and llm-compressor do; True lets each group of a
    # block (q/k/v, o, gate/up, down) see inputs computed with the groups before it already pruned,
    # as GPTQ does. Measured on SmolLM2-135M at 50%: True was worse for both (eval/pruning.md).
    true_sequential: bool = False
    # sparsegpt N:M: sweep the runs of M columns in decreasing order of their largest Hessian diagonal
    # entry (GPTQ's act-order on whole runs) instead of left to right. Measured on SmolLM2-135M at 2:4:
    # better (eval/pruning.md); unstructured masks are chosen per block of columns, where it was not.
    act_order: bool = True
    forward_dtype: str = "auto"  # the forwards on the calibration text: sparsegpt/wanda's blocks, depth/width's importance (FORWARD_DTYPES)
    # sparsegpt/wanda: conjugate-gradient iterations of the exact least-squares refit of the kept
    # weights once the mask is chosen (quant.refit); None: the method's default (REFIT_DEFAULT).
    # 0 is the reference algorithm: SparseGPT's sweep alone, Wanda without any weight update.
    refit_iters: int | None = None

    def __post_init__(self):
        m = self.method
        if m not in PRUNE_METHODS:
            raise UserError(f"prune --method must be one of {', '.join(PRUNE_METHODS)}, got {m!r}")
        defaults = {f.name: f.default for f in fields(PruneConfig) if f.name != "layers"}
        own = {"sparsegpt": ("sparsity", "nm", "damp_percent", "block_size", "true_sequential", "act_order",
                             "forward_dtype", "refit_iters"),
               "wanda": ("sparsity", "nm", "true_sequential", "forward_dtype", "refit_iters", "damp_percent"),
               "magnitude": ("sparsity", "nm"), "depth": ("drop_blocks", "importance", "forward_dtype"),
               "width": ("mlp_keep", "heads_keep", "forward_dtype")}[m]
        foreign = [k for k, v in defaults.items() if k not in ("method", *own) and getattr(self, k) != v]
        if foreign:
            raise UserError(f"--method {m} does not use " + ", ".join("--" + k.replace("_", "-") for k in foreign))
        if self.layers.quantize_lm_head:
            raise UserError("pruning never touches lm_head: drop --quantize-lm-head")
        check_forward_dtype(self.forward_dtype)
        if m in UNSTRUCTURED_METHODS:
            check_sparsity(self.sparsity, self.nm, required=True, method=m)
            n_m = parse_nm(self.nm)
            if n_m and self.block_size % n_m[1]:
                raise UserError(f"--nm {self.nm}: M={n_m[1]} must divide --block-size {self.block_size}")
            if not self.act_order and not n_m:
                raise UserError("--no-act-order applies to N:M pruning (--nm) only: unstructured masks keep the "
                                "natural column order")
            if not 0 < self.damp_percent < 1:
                raise UserError(f"--damp-percent must be in (0, 1), got {self.damp_percent}")
            if self.refit_iters is not None and (not isinstance(self.refit_iters, int) or self.refit_iters < 0):
                raise UserError(f"--refit-iters must be a whole number >= 0, got {self.refit_iters}")
            if m == "wanda" and not self.refit and self.damp_percent != defaults["damp_percent"]:
                raise UserError("--damp-percent applies to wanda only with --refit-iters N (N > 0): "
                                "Wanda alone updates no weight")
            if self.block_size <= 0:
                raise UserError(f"--block-size must be positive, got {self.block_size}")
            return
        if self.layers.include or self.layers.exclude:
            raise UserError(f"--method {m} removes whole blocks/channels/heads: --include/--exclude do not apply")
        if m == "depth":
            if not isinstance(self.drop_blocks, int) or self.drop_blocks < 1:
                raise UserError(f"--method depth needs --drop-blocks N (N >= 1), got {self.drop_blocks}")
            if self.importance not in IMPORTANCE:
                raise UserError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        else:
            for flag, v in (("--mlp-keep", self.mlp_keep), ("--heads-keep", self.heads_keep)):
                if not 0 < v <= 1:
                    raise UserError(f"{flag} must be in (0, 1], got {v}")
            if self.mlp_keep == 1 and self.heads_keep == 1:
                raise UserError("--method width needs --mlp-keep and/or --heads-keep below 1")

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_nm(self.nm)

    @property
    def refit(self) -> int:
        """Refit iterations in effect: ``refit_iters``, or the method's default."""
        return REFIT_DEFAULT.get(self.method, 0) if self.refit_iters is None else self.refit_iters

    @property
    def calibrated(self) -> bool:
        """Magnitude pruning reads only the weights; every other method reads calibration text."""
        return self.method != "magnitude"


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


# GGUF file types llmslim writes (llama-quantize's names): each tensor's type follows llama.cpp's mix
# (formats.gguf_mix); and the tensor types --token-embedding-type/--output-tensor-type accept.
GGUF_TYPES = ("q4_0", "q8_0", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q4_1", "q5_0", "q5_1", "f16", "f32")
GGUF_TENSOR_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "f16", "f32")
# Types llama.cpp has that llmslim does not produce (yet): named in the error instead of "unknown".
GGUF_OTHER_TYPES = ("q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k", "q5_k", "q3_k", "iq4_nl", "iq4_xs",
                    "tq1_0", "tq2_0", "bf16")


@dataclass(frozen=True)
class ExportConfig:
    """Export to a single-file format that other runtimes run (GGUF: llama.cpp, Ollama, LM Studio).

    A checkpoint on the target's grid is written bit for bit (a GPTQ 4-bit symmetric checkpoint whose
    groups are whole blocks of 32 -> Q4_0, 8-bit -> Q8_0); any other checkpoint is refused (re-fit it
    with ``--target``), and a float model is rounded to nearest exactly as llama.cpp would.
    ``token_embedding_type``/``output_tensor_type`` are llama-quantize's options of the same names.
    """

    stage: ClassVar[str] = "export"

    format: str = "gguf"
    type: str = "q4_0"
    token_embedding_type: str = "auto"
    output_tensor_type: str = "auto"
    # Round float weights with llama.cpp's importance-weighted quantizers, the importance matrix being
    # each linear's mean squared input activation on the calibration text (what llama-imatrix collects).
    imatrix: bool = False

    def __post_init__(self):
        if self.format != "gguf":
            raise UserError(f"--format must be gguf, got {self.format!r}")
        for flag, value, allowed in (("--type", self.type, GGUF_TYPES),
                                     ("--token-embedding-type", self.token_embedding_type,
                                      ("auto", *GGUF_TENSOR_TYPES)),
                                     ("--output-tensor-type", self.output_tensor_type, ("auto", *GGUF_TENSOR_TYPES))):
            if value not in allowed:
                what = "is a GGUF type llmslim cannot produce yet" if value in GGUF_OTHER_TYPES else "is unknown"
                raise UserError(f"{flag} {value!r} {what}; choose one of {', '.join(allowed)}")


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


RECOVER_MODES = ("block", "e2e")


@dataclass(frozen=True)
class RecoverConfig:
    """Recovery: win back what compression lost by learning from the original model (the teacher).

    ``block``: per decoder block, against the original block's outputs on calibration inputs, learn
    the quantization grid of a GPTQ/RTN student (AutoRound's signed-gradient rounding offsets in
    [-0.5, 0.5] and per-group scale/zero adjustments, arXiv:2309.05516), or the remaining weights of
    a sparse float student under its fixed mask; a block keeps its input weights unless the learned
    ones lower its calibration loss. It trains on the recipe's calibration tokens.
    ``e2e``: logit distillation KL(teacher || student) at ``temperature`` on ``tokens`` tokens of
    ``data`` (its calibration part only): scales/zeros of a quantized student through a straight-
    through estimator, or all weights (or LoRA adapters of ``lora_rank``, merged back) of a float one.

    ``lr`` None means the default of what is trained (block: 5e-3 for the signed gradient, 1e-5
    for float weights; e2e: 1e-3 for scales, 1e-4 for LoRA and for all weights). ``max_time``
    (seconds, 0 = none) stops cleanly with the best student so far.
    """

    stage: ClassVar[str] = "recover"

    mode: str = "block"
    iters: int = 200  # block: signed-gradient steps per block (AutoRound's default)
    batch_size: int = 8  # samples per step
    lr: float | None = None
    max_time: float = 0.0
    seed: int = 0
    data: str = "wiki"  # e2e: training text (built-in corpora: their calibration part only)
    text_field: str = "text"
    tokens: int = 262144  # e2e: training tokens
    seqlen: int = 512  # e2e: tokens per training sequence
    temperature: float = 1.0  # e2e
    lora_rank: int = 0  # e2e, float students: 0 = train all weights
    checkpoint_every: int = 20  # e2e: optimizer steps between checkpoints (resume)
    # bf16 autocast for the training steps (losses compared in float32); None: where the CPU multiplies
    # bf16 in hardware (AMX, AVX512-BF16), float32 elsewhere, where emulated bf16 is several times slower
    amp: bool | None = None
    follow: bool = False  # block, quantized: codes re-rounded on the learned scale (AutoRound's min/max tuning)

    def autocast(self) -> bool:
        """Whether the training steps autocast to bf16: ``amp``, or by the CPU when it is None."""
        from .util import native_bf16

        return native_bf16() if self.amp is None else self.amp

    def __post_init__(self):
        if self.mode not in RECOVER_MODES:
            raise UserError(f"recover --mode must be one of {', '.join(RECOVER_MODES)}, got {self.mode!r}")
        for flag, v in (("--iters", self.iters), ("--batch-size", self.batch_size), ("--tokens", self.tokens),
                        ("--checkpoint-every", self.checkpoint_every)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{flag} must be a positive integer, got {v!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise UserError(f"--seqlen must be at least 2, got {self.seqlen!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, int | float)
                                    or not self.lr > 0):
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not self.max_time >= 0:
            raise UserError(f"--max-time must be >= 0 seconds (0 = no limit), got {self.max_time}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise UserError(f"--lora-rank must be >= 0 (0 = train all weights), got {self.lora_rank!r}")
        if not self.data:
            raise UserError("--data must name the training text (e.g. wiki, or a file)")
        if self.amp not in (None, True, False):
            raise UserError(f"amp must be true, false or null (automatic), got {self.amp!r}")
        own = {"block": ("iters", "follow"), "e2e": ("data", "text_field", "tokens", "seqlen", "temperature", "lora_rank",
                                             "checkpoint_every")}
        defaults = {f.name: f.default for f in fields(RecoverConfig)}
        foreign = [k for k in (*own["block"], *own["e2e"]) if k not in own[self.mode]
                   and getattr(self, k) != defaults[k]]
        if foreign:
            hint = " (block mode trains on the recipe's calibration tokens)" if self.mode == "block" else ""
            raise UserError(f"recover --mode {self.mode} does not use "
                            + ", ".join("--" + k.replace("_", "-") for k in foreign) + hint)
