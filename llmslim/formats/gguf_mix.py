"""Which GGUF type each tensor gets in a llama.cpp file type ("mix"): Q4_K_M, Q5_K_S, ...

The rule is llama.cpp's (``llama_tensor_get_type_impl`` and ``tensor_type_fallback`` in
src/llama-quant.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors), restricted to the file
types llmslim writes and the dense architectures it exports (no MoE, no Falcon, no 70B special case;
Phi-3's fused attn_qkv follows attn_v's rule, as llama.cpp's does):

- the output matrix (or the token embedding, when tied to it): Q8_0 when its width is not whole
  blocks of the file's base type, else Q6_K (unless the base is Q8_0);
- attn_v: Q6_K in the "more bits" layers for Q4_K_M/Q5_K_M (the first and last eighth, and every
  third layer between), Q5_K in the first four layers for Q4_K_S;
- ffn_down: the same "more bits" layers get Q6_K for Q4_K_M/Q5_K_M, the first eighth Q5_K for
  Q4_K_S; with an importance matrix, Q4_0/Q5_0 files put the first eighth in Q4_1/Q5_1;
- a row that is not whole super-blocks of 256 falls back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
  (SmolLM2's 576-wide layers do), and to F16 if not even blocks of 32.
"""

from __future__ import annotations

import re

from ..ggml_quants import block_size

# file type -> the base tensor type (llama-quantize's default_type)
FILE_BASE = {"q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0",
             "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def category(name: str) -> str | None:
    """llama.cpp's tensor category of an HF linear name (None: a category no mix rule touches).
    Phi-3's fused projections: llama.cpp counts attn_qkv as attn_v (``category_is_attn_v``: the same
    "more bits" rule, layer by layer) and the fused gate_up as ffn_up."""
    for suffix, cat in (("qkv_proj", "attn_v"), ("gate_up_proj", "ffn_up"), ("v_proj", "attn_v"), ("down_proj", "ffn_down"), ("k_proj", "attn_k"),
                        ("q_proj", "attn_q"), ("o_proj", "attn_output"), ("gate_proj", "ffn_gate"),
                        ("up_proj", "ffn_up")):
        if name.endswith(suffix):
            return cat
    return None


def fallback(kind: str, cols: int) -> str:
    """``tensor_type_fallback``: a type whose blocks fit a row of ``cols`` weights."""
    if kind in ("f16", "f32") or cols % block_size(kind) == 0:
        return kind
    kind = FALLBACK.get(kind, kind)
    return kind if cols % block_size(kind) == 0 else "f16"


def output_type(file_type: str, cols: int) -> str:
    """The output matrix's (and a tied embedding's) type when not set by hand."""
    base = FILE_BASE.get(file_type, file_type)
    if base in ("f16", "f32"):
        return base
    if cols % block_size(base):
        return "q8_0"
    return base if base == "q8_0" else "q6_k"


def linear_type(file_type: str, name: str, cols: int, n_layers: int, imatrix: bool = False) -> str:
    """The type of one decoder linear (HF ``name``, ``cols`` inputs) in a file of ``file_type``."""
    base = FILE_BASE.get(file_type, file_type)
    if base in ("f16", "f32"):
        return base
    m = _LAYER.search(name)
    i = int(m.group(1)) if m else 0
    cat = category(name)
    kind = base
    if cat == "attn_v":  # the i-th attn_v tensor is layer i's
        if file_type in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layers):
            kind = "q6_k"
        elif file_type == "q4_k_s" and i < 4:
            kind = "q5_k"
    elif cat == "ffn_down":
        if file_type in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layers):
            kind = "q6_k"
        elif file_type == "q4_k_s" and i < n_layers // 8:
            kind = "q5_k"
        elif file_type in ("q4_0", "q5_0") and imatrix and i < n_layers // 8:
            kind = {"q4_0": "q4_1", "q5_0": "q5_1"}[file_type]
    return fallback(kind, cols)


def layer_types(model, config):
    """A GPTQ config for a mix target (``--target gguf-q4_k_m``) with each layer's tensor type fixed
    by the rule above; layers the rule keeps in F16 (rows not whole blocks of 32) are excluded."""
    from dataclasses import replace

    from ..quant.walk import linear_weight, select_layers

    file_type = config.gguf_grid
    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    linears, _ = select_layers(model, config.layers, lambda i, o: True)
    types = {name: linear_type(file_type, name, linear_weight(m).shape[1], n_layers) for name, m in linears.items()}
    floats = tuple(n for n, t in types.items() if t in ("f16", "f32"))
    layers = replace(config.layers, exclude=(*config.layers.exclude, *floats)) if floats else config.layers
    return replace(config, layers=layers,
                   layer_types=tuple(f"{n}={t}" for n, t in types.items() if t not in ("f16", "f32")))
