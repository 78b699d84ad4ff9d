"""bitsandbytes quantization: NF4/FP4 (optionally double-quantized) and LLM.int8, through transformers.

The quantization itself is bitsandbytes' own, driven by transformers' ``BitsAndBytesConfig``: the
float model is loaded with that config (each linear quantized as it is read) and saved with
``save_pretrained``. The result is the standard serialized bitsandbytes checkpoint that plain
``AutoModelForCausalLM.from_pretrained(DIR)`` loads, with the tokenizer beside it.

This module only plans: which layers, which ``BitsAndBytesConfig``, which dtype. The pipeline's
bitsandbytes stage does the loading; ``formats.bnb`` saves and loads the result.
"""

from __future__ import annotations

import logging

import torch

from ..config import BnbConfig
from ..errors import UserError, missing_extra
from .walk import find_linears, linear_shape, select_layers

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
    return torch.float16 if config.quant_type == "int8" else COMPUTE_DTYPES[config.compute_dtype]


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
    every = find_linears(model)
    head = model.get_output_embeddings()
    if config.layers.quantize_lm_head and head is not None and (
            getattr(hf_config, "tie_word_embeddings", False) or head.weight is model.get_input_embeddings().weight):
        raise UserError("lm_head shares its weight with the input embeddings (tie_word_embeddings), "
                        "and bitsandbytes cannot quantize a tied lm_head; drop --quantize-lm-head")
    fits = (lambda in_f, out_f: True) if config.quant_type == "int8" else fits_cpu_4bit
    targets, too_odd = select_layers(model, config.layers, fits)
    notes = []
    for name in too_odd:
        in_f, out_f = linear_shape(every[name])
        notes.append(f"note: {name} kept in float: bitsandbytes' CPU 4-bit kernels need input size "
                     f"a multiple of {BLOCKSIZE_4BIT} and output size a multiple of {CPU_TILE_ROWS} "
                     f"(it is {in_f} -> {out_f})")
    layers = [{"name": n, "rows": linear_shape(m)[1], "columns": linear_shape(m)[0]} for n, m in targets.items()]
    quantized = {x["name"] for x in layers}
    return layers, sorted(n for n in every if n not in quantized), notes


def bnb_quantization_config(config: BnbConfig, skip: list[str]):
    """transformers' ``BitsAndBytesConfig`` for ``config``; ``skip`` are full module names."""
    from transformers import BitsAndBytesConfig

    if config.quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.int8_threshold,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
        llm_int8_skip_modules=skip,  # transformers reads this list for 4-bit too
    )
