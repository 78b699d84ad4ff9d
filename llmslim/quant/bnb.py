"""bitsandbytes quantization: NF4/FP4 (optionally double-quantized) and LLM.int8, through transformers.

The quantization itself is bitsandbytes' own, driven by transformers' ``BitsAndBytesConfig``: the
float model is loaded with that config (each linear quantized as it is read) and saved with
``save_pretrained``. The result is the standard serialized bitsandbytes checkpoint that plain
``AutoModelForCausalLM.from_pretrained(DIR)`` loads, with the tokenizer beside it.

CPU speed: bitsandbytes 0.50 repacks a 4-bit layer into its AVX512-BF16 layout on the first
forward in eval mode without grad (``Linear4bit.forward``); until then every call dequantizes the
whole weight. ``load_bnb`` hands back an eval-mode model whose layers are already repacked.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..config import BnbConfig
from ..errors import UserError, missing_extra
from ..util import atomic_write_text, check_output, staged_output
from .walk import find_blocks, find_linears, linear_shape

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

# transformers quantizes 4-bit weights in blocks of 64; bitsandbytes' fast CPU layout packs
# output rows in tiles of 32. A 4-bit layer of any other shape fails on its first eval-mode
# forward on AVX512-BF16 CPUs (bitsandbytes 0.50.2: "N must be divisible by block_n" or a
# reshape error), so such layers stay in float, like GPTQ layers that do not pack.
BLOCKSIZE_4BIT = 64
CPU_TILE_ROWS = 32


def require_bnb():
    """The bitsandbytes module, or the one-line fix when it is missing."""
    try:
        import bitsandbytes
    except ImportError:
        raise missing_extra("bitsandbytes", "bnb") from None
    _quiet_int8_cast_warning()
    return bitsandbytes


class _DropInt8CastWarning(logging.Filter):
    # LLM.int8 logs "inputs will be cast from ... to float16" on every forward of every layer
    # whose input is not fp16 (always the case on CPU); the cast is by design, not a problem.
    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in str(record.msg)


def _quiet_int8_cast_warning() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in log.filters):
        log.addFilter(_DropInt8CastWarning())


def fits_cpu_4bit(in_features: int, out_features: int) -> bool:
    return in_features % BLOCKSIZE_4BIT == 0 and out_features % CPU_TILE_ROWS == 0


def storage_dtype(config: BnbConfig) -> torch.dtype:
    """dtype of the tensors that stay in float (embeddings, norms, skipped linears).

    4-bit: the compute dtype, so that plain ``from_pretrained(DIR)`` runs the whole model in it
    (bf16 is what is fast on CPU). int8: fp16, LLM.int8's own dtype (it casts inputs to fp16).
    """
    return torch.float16 if config.method == "int8" else COMPUTE_DTYPES[config.compute_dtype]


def plan_layers(hf_config, config: BnbConfig) -> tuple[list[dict], list[str], list[str]]:
    """(layers to quantize with their shapes, every linear kept in float, notes for the user).

    The same walk as RTN/GPTQ: the linears of the decoder blocks that the filter accepts, plus
    ``lm_head`` only when asked. Everything else is listed for ``llm_int8_skip_modules``, because
    transformers converts every linear it is not told to skip.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # names and shapes only: no memory, no weights read
        try:
            model = AutoModelForCausalLM.from_config(hf_config)
        except ValueError as e:
            raise UserError(f"not a causal language model: {str(e).splitlines()[0]}") from None
    blocks_name, blocks = find_blocks(model)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    every = find_linears(model)
    wanted = [n for n in find_linears(blocks, prefix=f"{blocks_name}.") if config.layers.accepts(n)]
    if config.layers.quantize_lm_head and head_name in every:
        if getattr(hf_config, "tie_word_embeddings", False) or head.weight is model.get_input_embeddings().weight:
            raise UserError("lm_head shares its weight with the input embeddings (tie_word_embeddings), "
                            "and bitsandbytes cannot quantize a tied lm_head; drop --quantize-lm-head")
        wanted.append(head_name)
    layers, notes = [], []
    for name in wanted:
        in_f, out_f = linear_shape(every[name])
        if config.method != "int8" and not fits_cpu_4bit(in_f, out_f):
            notes.append(f"note: {name} kept in float: bitsandbytes' CPU 4-bit kernels need input size "
                         f"a multiple of {BLOCKSIZE_4BIT} and output size a multiple of {CPU_TILE_ROWS} "
                         f"(it is {in_f} -> {out_f})")
            continue
        layers.append({"name": name, "rows": out_f, "columns": in_f})
    quantized = {x["name"] for x in layers}
    return layers, sorted(n for n in every if n not in quantized), notes


def bnb_quantization_config(config: BnbConfig, skip: list[str]):
    """transformers' ``BitsAndBytesConfig`` for ``config``; ``skip`` are full module names."""
    from transformers import BitsAndBytesConfig

    if config.method == "int8":
        if config.compute_dtype != "bf16":  # the default; int8 has no compute dtype to set
            raise UserError("--compute-dtype applies to --method nf4/fp4 only, not int8")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.int8_threshold,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.method,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
        llm_int8_skip_modules=skip,  # transformers reads this list for 4-bit too
    )


def quantize_bnb_to_folder(
    source: str, out: str | Path, config: BnbConfig, force: bool = False, allow_pickle: bool = False
) -> dict:
    """Quantize ``source`` with bitsandbytes and write a standard bitsandbytes checkpoint to ``out``
    (atomically: a staging folder renamed into place). Returns a summary, also in quant_log.json.

    ``allow_pickle`` lets a source without safetensors load from .bin files (only ones you trust)."""
    from tqdm.auto import tqdm

    from ..load import _from_pretrained, load_tokenizer
    from ..models import read_config, resolve
    from .api import _config_dict, folder_bytes

    require_bnb()
    bnb_quantization_config(config, [])  # unsupported options fail before minutes of loading
    out = Path(out)
    t0 = time.perf_counter()
    check_output(out, force)
    folder = resolve(source)
    hf_config = read_config(folder)
    if getattr(hf_config, "quantization_config", None):
        raise UserError(f"{source} is already quantized; quantize the original float model")
    layers, skipped, notes = plan_layers(hf_config, config)
    for note in notes:
        tqdm.write(note)
    if not layers:
        raise UserError(f"no linear layer of {source} is left to quantize; check --include/--exclude")
    tokenizer = load_tokenizer(folder)
    model = _from_pretrained(folder, dtype=storage_dtype(config), use_safetensors=not allow_pickle or None,
                             quantization_config=bnb_quantization_config(config, skipped))
    seconds = time.perf_counter() - t0
    with staged_output(out, force) as tmp:
        # Saved straight after quantizing, before any forward: an eval-mode forward repacks 4-bit
        # weights for the CPU (scales rounded to bf16, double-quant scales expanded), and saving a
        # repacked model re-quantizes them: reloaded, its logits differ (bitsandbytes 0.50.2).
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        summary = {
            "source": source,
            "method": config.method,
            "config": _config_dict(config),
            "library": {"bitsandbytes": require_bnb().__version__},
            "seconds": round(time.perf_counter() - t0, 1),
            "quantize_seconds": round(seconds, 1),
            "bytes_before": folder_bytes(folder) if Path(folder).is_dir() else None,
            "bytes_after": folder_bytes(tmp),
            "skipped": skipped,
            "layers": layers,
        }
        atomic_write_text(tmp / "quant_log.json", json.dumps(summary, indent=1))
    return summary


def load_bnb(folder: str, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes checkpoint -> eval-mode model with its layers in bitsandbytes' fast CPU state.

    ``dtype`` is the dtype of the parts left in float; 4-bit layers compute in the checkpoint's
    ``bnb_4bit_compute_dtype`` (on AVX512-BF16 CPUs always bf16, the only fast kernel there).
    """
    from ..load import _from_pretrained

    require_bnb()
    model = _from_pretrained(folder, dtype=dtype, use_safetensors=True)
    cast_float_parts(model, dtype)
    return to_fast_state(model)


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> None:
    """Give the parameters outside bitsandbytes layers ``dtype``.

    transformers 5.24 leaves them in the checkpoint's stored dtype whatever ``dtype=`` asks for
    (a float checkpoint is cast). Buffers are left alone: rotary frequencies stay float32 by design.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            continue
        for p in module.parameters(recurse=False):  # a tied embedding is one Parameter: cast once for both
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype


@torch.inference_mode()
def to_fast_state(model: nn.Module) -> nn.Module:
    """Eval mode, and every 4-bit layer repacked now rather than on the first real request.

    The repack happens inside ``Linear4bit.forward`` (eval mode, no grad, CPU input, AVX512-BF16
    CPU), so each layer is called once on a single zero row: bitsandbytes' own code decides and
    converts; nothing here depends on its private layout.
    """
    import bitsandbytes as bnb

    model.eval()
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cpu":
            if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
                layer(torch.zeros(1, layer.in_features, dtype=layer.compute_dtype or float_dtype))
    return model


def cpu_state(model: nn.Module) -> dict:
    """How many bitsandbytes layers the model has and how many are in the fast CPU state."""
    import bitsandbytes as bnb

    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    eight = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    return {
        "linear4bit": len(four),
        "repacked": sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in four),
        "cpu_has_fast_kernel": all(getattr(m, "support_avx512bf16_for_cpu", False) for m in four) if four else None,
        "linear8bit": len(eight),
        "training": sum(m.training for m in [*four, *eight]),
    }

