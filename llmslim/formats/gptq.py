"""The GPTQ v1 checkpoint: what vLLM, transformers (optimum/gptqmodel) and AutoGPTQ load.

Per quantized linear ``<name>``: ``qweight`` int32 ``[in*bits/32, out]``, ``qzeros`` int32
``[groups, out*bits/32]`` holding zero - 1, ``scales`` fp16 ``[groups, out]``, ``g_idx`` int32
``[in]``, and ``bias``. Everything else is an ordinary HF folder: safetensors (sharded when
large), ``config.json`` with ``quantization_config``, ``quantize_config.json`` for AutoGPTQ-era
tools, the tokenizer and the generation config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..config import IntConfig
from ..errors import UserError
from ..nn import FUSE_GROUPS, GPTQLinear
from ..pack import pack, unpack
from ..quant.walk import linear_shape, set_module
from .stream import WeightSource, empty_model

MAX_SHARD_SIZE = "2GB"  # safetensors shards of at most this (the index file names them): any size loads


def module_pattern(name: str, sign: str = "+") -> str:
    """A GPTQModel/vLLM ``dynamic`` key matching exactly the module ``name`` (``+:`` override, ``-:`` skip)."""
    return f"{sign}:^{name.replace('.', r'[.]')}$"


def quantization_config(config: IntConfig, skipped: list[str], lm_head: bool,
                        grids: dict[str, tuple[int, int]] | None = None) -> dict:
    """The ``quantization_config`` block, with the keys GPTQ consumers read. ``grids``: every
    quantized module's (bits, group size); those that differ from the config's become ``dynamic``
    overrides (GPTQModel's form, which vLLM reads too: the first matching regex wins)."""
    qc = {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": bool(getattr(config, "desc_act", False)),
        "sym": config.sym,
        "true_sequential": bool(getattr(config, "true_sequential", True)),
        "damp_percent": float(getattr(config, "damp_percent", 0.01)),
        "static_groups": bool(getattr(config, "static_groups", False)),
        "checkpoint_format": "gptq",
        "lm_head": lm_head,
        "meta": {"quantizer": [f"llmslim:{__version__}"], "method": config.stage,
                 "mse": config.mse,
                 # GAR is off under desc_act (the solver ignores it); GPTQModel refuses a config with both on.
                 "act_group_aware": bool(getattr(config, "act_group_aware", False))
                 and not bool(getattr(config, "desc_act", False))},
    }
    if getattr(config, "sparsity", 0) or getattr(config, "nm", ""):
        # Joint pruning (SparseGPT's sparse + quantized mode): the zeros are stored as zero points.
        qc["meta"]["sparsity"] = float(config.sparsity) if config.sparsity else None
        qc["meta"]["nm"] = config.nm or None
        qc["meta"]["refit_iters"] = config.refit  # 0: the paper's single sweep (quant.sequential.prune_refit_quantize)
    # GPTQModel/vLLM "dynamic" rules: a "-:" regex excludes a module from quantization, a "+:" one
    # gives it its own bits/group size.
    dynamic = {module_pattern(name, "-"): {} for name in skipped}
    for name, (bits, group) in (grids or {}).items():
        if (bits, group) != (config.bits, config.group_size):
            dynamic[module_pattern(name)] = {"bits": bits, "group_size": group}
    dynamic |= fused_rules(dynamic, set(skipped) | set(grids or {}))
    if dynamic:
        qc["dynamic"] = dynamic
    return qc


def fused_units(names: set[str]):
    """(parent, fused name, sibling names) for every q/k/v or gate/up set whose siblings are all in ``names``."""
    for parent in sorted({n.rpartition(".")[0] for n in names}):
        for fused, members in FUSE_GROUPS.items():
            full = [f"{parent}.{m}" for m in members]
            if all(n in names for n in full):
                yield parent, fused, full


def fused_rules(dynamic: dict, names: set[str]) -> dict:
    """The same rule for the fused module vLLM makes of siblings that all have it: vLLM loads q/k/v
    as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` and looks the rules up under that name,
    so an exact-name rule of each sibling alone would leave the fused layer on the base grid (and its
    weights fail to load). Siblings that differ have no fused rule: vLLM cannot load them as one."""
    by_pattern = {k[2:]: (k[0], v) for k, v in dynamic.items()}  # "^name$" -> (sign, values)
    out = {}
    for parent, fused, full in fused_units(names):
        rules = [by_pattern.get(module_pattern(n)[2:]) for n in full]
        if rules[0] is not None and all(r == rules[0] for r in rules):
            sign, values = rules[0]
            out[module_pattern(f"{parent}.{fused}", sign)] = dict(values)
    return out


def layer_grid(qc: dict, name: str) -> tuple[int, int]:
    """(bits, group size) of module ``name`` under a ``quantization_config``: its first matching
    ``+:`` (or bare) ``dynamic`` rule's values, else the config's own (GPTQModel's and vLLM's rule)."""
    import re

    bits, group = int(qc["bits"]), int(qc["group_size"])
    for pattern, override in (qc.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        try:
            hit = re.match(raw, name)
        except re.error:
            raise UserError(f"quantization_config.dynamic: {pattern!r} is not a valid regex") from None
        if hit:
            if negative:
                break
            return int(override.get("bits", bits)), int(override.get("group_size", group))
    return bits, group


def stored_dtype(model: nn.Module) -> torch.dtype:
    """Float tensors are stored in fp16 like every GPTQ checkpoint (bf16 models stay bf16)."""
    src_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.bfloat16 if src_dtype == torch.bfloat16 else torch.float16


def stored(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as the checkpoint holds it (floats in ``dtype``; fp16 ones as they are)."""
    v = v.detach()
    return (v.to(dtype) if v.is_floating_point() and v.dtype != torch.float16 else v).contiguous()


def gptq_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint of ``model`` holds, by name, in state-dict order. Works on a
    model whose weights are on ``meta`` too (names, dtypes and shapes: what a streamed write plans).

    Tied tensors (embeddings shared with lm_head) are stored once: converting each name's tensor
    separately would write a second copy of the embedding matrix.
    """
    dtype = dtype or stored_dtype(model)
    state, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        key = id(v) if v.device.type == "meta" else v.data_ptr()
        if key in seen and v.numel():
            continue
        seen.add(key)
        state[k] = stored(v, dtype)
    for k in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(k, None)
    return state


def save_gptq(
    model: nn.Module,
    tokenizer,
    out_dir: Path,
    config: IntConfig,
    skipped: list[str] | None = None,
    max_shard_size: str | None = None,
    weights_written: bool = False,
) -> None:
    """Write ``model`` (its linears already swapped for ``GPTQLinear``) as a GPTQ v1 folder.

    ``weights_written``: the safetensors shards are already in ``out_dir`` (a streamed run wrote
    them block by block; ``model`` may be on ``meta``): write the rest of the folder only.
    """
    out_dir = Path(out_dir)
    quantized = [n for n, m in model.named_modules() if isinstance(m, GPTQLinear)]
    lm_head = any(n == "lm_head" or n.endswith(".lm_head") for n in quantized)
    grids = {n: (m.bits, m.group_size) for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    qc = quantization_config(config, skipped or [], lm_head, grids)
    dtype = stored_dtype(model)
    state = None if weights_written else gptq_tensors(model, dtype)
    if lm_head:
        model.config.tie_word_embeddings = False
    model.config.quantization_config = qc
    old_dtype = getattr(model.config, "dtype", None)
    model.config.dtype = dtype
    try:
        if weights_written:
            save_config(model, out_dir)
        else:
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True,
                                  max_shard_size=max_shard_size or MAX_SHARD_SIZE)
    finally:
        del model.config.quantization_config
        model.config.dtype = old_dtype
    (out_dir / "quantize_config.json").write_text(json.dumps(
        {k: v for k, v in qc.items() if k not in ("quant_method", "lm_head")} | {"model_file_base_name": None},
        indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def save_config(model: nn.Module, out_dir: Path) -> None:
    """config.json and generation_config.json exactly as ``save_pretrained`` writes them."""
    config = model.config
    old = config.dtype, getattr(config, "architectures", None)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [model.__class__.__name__]
    try:
        config.save_pretrained(out_dir)
        if model.can_generate():
            model.generation_config.save_pretrained(out_dir)
    finally:
        config.dtype, config.architectures = old


def divisibility_problems(model: nn.Module, group_size: int) -> list[tuple[str, int]]:
    """Quantized layers whose input size the group size does not divide (vLLM refuses these).
    Each layer is checked with its own group size (a tuned model's may differ from ``group_size``)."""
    if group_size == -1:
        return []
    return [(n, m.in_features) for n, m in model.named_modules()
            if isinstance(m, GPTQLinear) and m.group_size != -1 and m.in_features % m.group_size]


def largest_dividing_group(sizes: list[int], group_size: int) -> int:
    g = group_size
    while g > 1 and any(s % g for s in sizes):
        g //= 2
    return g


def load_gptq(folder: str, config, dtype: torch.dtype, build: Callable[[object, torch.dtype], nn.Module] = empty_model
              ) -> nn.Module:
    """A GPTQ v1 (or v2) checkpoint -> model with ``GPTQLinear`` layers on the reference path.

    The model is built by ``build`` (transformers' class by default; ``runtime.bare`` passes its own)
    with every tensor on ``meta`` (no memory), and each stored tensor is read into its final buffer
    one at a time (``fill``), so the load's peak is the model plus one tensor, not the model plus the
    whole checkpoint; the result is what ``load_state_dict`` of the whole file gives
    (``tests/formats/test_checkpoint.py``)."""
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    del config.quantization_config
    source = WeightSource(folder)  # the shards' headers: nothing read yet
    model = build(config, dtype)
    v2 = qc.get("checkpoint_format", "gptq") == "gptq_v2"
    for name in sorted(k[: -len(".qweight")] for k in source.file if k.endswith(".qweight")):
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{folder}: quantized tensor {name}.qweight matches no layer of the model") from None
        in_f, out_f = linear_shape(layer)
        bits, group_size = layer_grid(qc, name)  # mixed checkpoints: each module's own grid
        with torch.device("meta"):
            set_module(model, name, GPTQLinear(in_f, out_f, bits, group_size, f"{name}.bias" in source))

    def read(key: str, out: torch.Tensor) -> None:
        if v2 and key.endswith(".qzeros"):  # v2 stores true zeros; our buffers hold the v1 convention (zero - 1)
            bits = model.get_submodule(key[: -len(".qzeros")]).bits
            out.copy_(pack(unpack(source.get([key])[key], bits, 1) - 1, bits, 1))
        else:
            source.read_into(key, out)

    fill(model, source, folder, getattr(config, "tie_word_embeddings", False), read)
    model.config.quantization_config = qc
    return model


def fill(model: nn.Module, source: WeightSource, folder: str, tied: bool,
         read: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Every tensor of ``model``'s state dict (on ``meta``) read from ``source`` into a buffer of its own,
    one at a time (``read(key, out)``, by default ``source.read_into``); a tied head is tied again."""
    read = read or source.read_into
    targets = model.state_dict(keep_vars=True)
    missing = [k for k in targets if k not in source]
    if tied:
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    missing = [k for k in missing if "rotary" not in k]  # non-persistent buffers are computed, not stored
    if missing:
        raise UserError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    made: dict[int, torch.Tensor] = {}  # a tied tensor (one object under two names) is made once
    for key, old in targets.items():
        if key not in source:
            continue
        if id(old) not in made:
            made[id(old)] = torch.empty(old.shape, dtype=old.dtype)
        new = made[id(old)] = _placed(model, key, made[id(old)], old)
        read(key, new.data)
    if tied:
        model.tie_weights()
    left = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise UserError(f"{folder}: checkpoint lacks {len(left)} tensors, e.g. {left[0]}")


def _placed(model: nn.Module, key: str, value: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Put ``value`` where the state-dict name ``key`` points (a parameter keeps its ``requires_grad``);
    returns the object placed, which a second, tied name receives as it is."""
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value
    return value
