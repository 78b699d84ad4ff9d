"""GGUF export: the single-file format of llama.cpp, Ollama and LM Studio.

llmslim supplies the tensors; everything else comes from llama.cpp's own code. Its HF -> GGUF
conversion (``convert_hf_to_gguf.py`` and its ``conversion`` package: tensor names, the
per-architecture tensor transforms such as Llama's q/k row permutation, hyper-parameters,
tokenizer) runs in a separate interpreter (``llama_cpp_worker.py``) next to the ``gguf`` package
of the same llama.cpp tree, and the ``gguf`` library writes the file. Quantized tensors cross
over as raw GGUF blocks; the worker passes a row-index probe through llama.cpp's transform of each
one and moves the blocks' rows the same way, refusing any transform that is not a row permutation.

The grids are exact (``grid.py``): Q4_0 = d * (q - 8) per block of 32, Q8_0 = d * k. A GPTQ layer
whose codes and fp16 scales lie on the grid -- symmetric, every block of 32 inputs inside one
group -- is written bit for bit (``scales[g_idx]`` already folds any act-order back into the weight
order); any other checkpoint is refused with the command that re-fits it (``--target``). A float
model is rounded to nearest with llama.cpp's own quantizers (``ggml_quants``: Q4_0 ... Q6_K), each
tensor in the type llama-quantize gives it for the file type (``gguf_mix``: Q4_K_M, Q5_K_S, ...), so
the result is byte-identical to llama.cpp's quantizer on the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..config import GGUF_MIX_TARGETS, ExportConfig, IntConfig
from ..errors import UserError
from ..ggml_quants import block_size
from ..ggml_quants import quantize as ggml_quantize
from ..grid import GGUF_BLOCK, GGUF_GRIDS
from ..models import ALIASES, alias_file
from ..nn import GGUFLinear, GPTQLinear
from ..quant.walk import linear_weight, select_layers
from .gguf_mix import FILE_BASE, fallback, linear_type, output_type

# The architectures llmslim exports: those its fast path covers (runtime/families.py). llama.cpp
# converts many more; these are the ones whose round trip is tested (tests/formats/test_gguf.py:
# transformers' GGUF loader reads each back, and llama.cpp runs each; Gemma 1 by llama.cpp only, as
# transformers has no GGUF reader for it).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM")
# Architectures whose GGUF form attends over the whole context: llama.cpp converts Mistral to its
# "llama" architecture (no sliding window), ignores Qwen2/3's, and switches Phi-3's off when it
# loads the file (llama.cpp PR 13676). Gemma 2/3 keep theirs.
_FULL_ATTENTION_IN_GGUF = ("MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM")
FILE_TYPES = {"q4_0": "MOSTLY_Q4_0", "q8_0": "MOSTLY_Q8_0", "f16": "MOSTLY_F16", "f32": "ALL_F32",
              "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1", "q4_k_s": "MOSTLY_Q4_K_S",
              "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}
FLOATS = ("f16", "f32")
# Where a GGUF type's integers live: value = d * k, k in [lo, hi].
_K_RANGE = {"q4_0": (-8, 7), "q8_0": (-128, 127)}
LLAMA_CPP_ENV = "LLMSLIM_LLAMA_CPP"
LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp `make setup` unpacks
WORKER = Path(__file__).with_name("llama_cpp_worker.py")


# --- the blocks ---------------------------------------------------------------------------------

def encode_blocks(kind: str, d: torch.Tensor, k: torch.Tensor) -> np.ndarray:
    """Raw GGUF bytes ``[rows, blocks * bytes_per_block]`` from fp16-exact scales ``d [rows, blocks]``
    and signed integers ``k [rows, cols]`` (value = d * k), in ggml's ``block_q4_0``/``block_q8_0``
    layout: the fp16 scale, then Q4_0's nibbles (byte j holds k[j] + 8 low, k[j + 16] + 8 high) or
    Q8_0's int8s. A block of zeros gets the scale llama.cpp writes for it (Q4_0: 0 / -8 = -0.0)."""
    rows, cols = k.shape
    nb = cols // GGUF_BLOCK
    k = k.reshape(rows, nb, GGUF_BLOCK).to(torch.int32)
    zero = torch.full_like(d, -0.0 if kind == "q4_0" else 0.0)
    d = torch.where((k == 0).all(-1) & (d != 0), zero, d.float())
    dbytes = d.numpy().astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    if kind == "q4_0":
        q = (k + 8).numpy().astype(np.uint8)
        payload = q[..., :16] | (q[..., 16:] << np.uint8(4))
    elif kind == "q8_0":
        payload = k.numpy().astype(np.int8).view(np.uint8)
    else:
        raise ValueError(kind)
    return np.concatenate([dbytes, payload], axis=-1).reshape(rows, -1)


def layer_blocks(m: GPTQLinear, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d [rows, blocks], k [rows, cols])`` of a GPTQ layer on a GGUF grid, exactly, or a
    ``ValueError`` saying why its weights are not on that grid."""
    if m.in_features % GGUF_BLOCK:
        raise ValueError(f"its {m.in_features} inputs are not whole blocks of {GGUF_BLOCK}")
    Q, zeros = m.codes()
    blocks = m.g_idx.long().reshape(-1, GGUF_BLOCK)
    if not bool((blocks == blocks[:, :1]).all()):
        raise ValueError(f"its groups of {m.group_size} split blocks of {GGUF_BLOCK}" if m.group_size % GGUF_BLOCK
                         else "its act-order groups (g_idx) are not contiguous blocks; quantize with --static-groups")
    k = Q.long() - zeros[m.g_idx.long()].T.long()
    lo, hi = _K_RANGE[kind]
    if int(k.min()) < lo or int(k.max()) > hi:
        asym = bool((zeros != zeros.flatten()[0]).any())
        raise ValueError(f"its codes minus zero span [{int(k.min())}, {int(k.max())}], outside {kind.upper()}'s "
                         f"[{lo}, {hi}]" + (" (an asymmetric grid)" if asym else ""))
    d = m.scales.float()[blocks[:, 0]].T  # fp16 values: the very scales of the checkpoint
    return d.contiguous(), k


# --- the same question from the grid alone, before any weight is solved or loaded -----------------

def grid_problem(kind: str, bits: int, group_size: int, sym: bool, act_order: bool = False) -> str | None:
    """Why no layer quantized on this grid can be written as GGUF type ``kind`` bit for bit, or None
    when every one can (``layer_blocks`` still checks each layer's shape when the file is written).
    ``act_order``: desc_act without static_groups, whose groups are scattered over the inputs."""
    if kind == "f32":
        return None
    if kind == "f16":
        return "F16 would round its weights (scale x code is not always an fp16 number)"
    if kind not in _K_RANGE:
        return f"llmslim writes GPTQ codes as Q4_0, Q8_0 or F32, not as {kind.upper()}"
    lo, hi = _K_RANGE[kind]
    maxq = (1 << bits) - 1
    # code - zero: symmetric grids put the zero at (maxq + 1) / 2, asymmetric ones anywhere in [1, maxq].
    k_lo, k_hi = (-(maxq + 1) // 2, (maxq - 1) // 2) if sym else (-maxq, maxq - 1)
    if k_lo < lo or k_hi > hi:
        return (f"{kind.upper()} holds codes in [{lo}, {hi}] around the zero, {'an' if bits == 8 else 'a'} {bits}-bit "
                f"{'symmetric' if sym else 'asymmetric'} grid spans [{k_lo}, {k_hi}]")
    if group_size != -1 and group_size % GGUF_BLOCK:
        return (f"{kind.upper()} gives each block of {GGUF_BLOCK} weights one scale, and groups of {group_size} "
                "split those blocks")
    if act_order and group_size != -1:
        return (f"{kind.upper()} gives each block of {GGUF_BLOCK} consecutive weights one scale, and act-order "
                "groups (desc_act without static_groups) are scattered over the inputs")
    return None


def refit_hint(kind: str) -> str:
    """How to get weights solved on ``kind``'s grid, for the end of a refusal; only types GPTQ can
    target (``--target``) get a command: the others (q4_1, q5_0, q5_1) only from the float model."""
    if kind in ("q4_0", "q8_0", *GGUF_MIX_TARGETS):
        return (f"; or re-fit the original model on it: llmslim quantize ORIGINAL_MODEL --method gptq "
                f"--target gguf-{kind} --out model.gguf")
    return f"; or export the original (float) model as {kind}: llmslim export ORIGINAL_MODEL --type {kind}"


def stage_grid_problem(config: IntConfig, kind: str) -> str | None:
    """``grid_problem`` for every grid a GPTQ/RTN/tune stage may give a layer (its own, its per-layer
    overrides, a tune stage's candidates); a stage solved on a K-quant mix is written only as that mix."""
    target = config.gguf_grid
    if target and target not in GGUF_GRIDS:
        return None if kind == target else f"its layers are solved on {target.upper()}'s grids, which only {target} holds"
    grids = [(config.bits, config.group_size), *getattr(config, "layer_settings", {}).values(),
             *getattr(config, "space", [])]
    act_order = bool(getattr(config, "desc_act", False)) and not getattr(config, "static_groups", False)
    return next(filter(None, (grid_problem(kind, b, g, config.sym, act_order) for b, g in grids)), None)


def checkpoint_grid_problem(qc: dict, kind: str) -> str | None:
    """``grid_problem`` for a GPTQ checkpoint's ``quantization_config``: its grid and every ``dynamic``
    override's (``-:`` rules exclude layers: they stay float)."""
    bits, group = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    grids = [(bits, group), *((int(o.get("bits", bits)), int(o.get("group_size", group)))
                              for p, o in (qc.get("dynamic") or {}).items() if not p.startswith("-:"))]
    act_order = bool(qc.get("desc_act")) and not qc.get("static_groups")
    sym = bool(qc.get("sym", True))
    return next(filter(None, (grid_problem(kind, b, g, sym, act_order) for b, g in grids)), None)


# --- planning: what each tensor becomes ----------------------------------------------------------

def architecture(model: nn.Module) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return archs[0]


def check_architecture(arch: str | None) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)}; this model is {arch}")


def sliding_window_lost(model: nn.Module) -> str | None:
    """A warning when the model limits some layers' attention to a sliding window that its GGUF
    form (llama.cpp's own conversion) does not keep: the file then matches the model only on
    contexts up to that window."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    windowed = ("sliding_attention" in types) if types is not None else window is not None
    if architecture(model) not in _FULL_ATTENTION_IN_GGUF or not windowed or not window:
        return None
    return (f"warning: {architecture(model)}'s sliding window ({window} tokens) is not kept in GGUF: llama.cpp "
            f"attends over the whole context (as with its own conversion), so past {window} tokens the file's "
            "outputs differ from the model's")


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None, bool]:
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and not isinstance(out, GPTQLinear) and getattr(out, "weight", None) is not None \
        and out.weight.data_ptr() == emb.weight.data_ptr()
    return emb, out, tied


def _role_types(config: ExportConfig, tied: bool, emb_cols: int, out_cols: int) -> tuple[str, str]:
    """(token_embd type, output type): llama-quantize's choice when "auto" (``gguf_mix``): the output
    matrix (the embedding, when tied) Q6_K, or Q8_0 when its width is not whole blocks of the base type."""
    out_t = (fallback(output_type(config.type, out_cols), out_cols) if config.output_tensor_type == "auto"
             else config.output_tensor_type)
    emb_t = (fallback(FILE_BASE.get(config.type, config.type), emb_cols) if config.token_embedding_type == "auto"
             else config.token_embedding_type)
    if tied:  # one tensor serves both: the output rule wins unless the user set the embedding type
        emb_t = out_t if config.token_embedding_type == "auto" else emb_t
    return emb_t, out_t


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def plan(model: nn.Module, config: ExportConfig) -> dict[str, tuple[str, str]]:
    """HF module name -> (GGUF type, how) for every quantized layer, every linear llmslim rounds
    and the embeddings; raises ``UserError`` for anything that cannot be exported as asked."""
    check_architecture(architecture(model))
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    solved = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}  # GPTQ on a ggml grid
    out: dict[str, tuple[str, str]] = {n: (m.kind, "GPTQ on the grid, bit-exact") for n, m in solved.items()}
    if solved and config.type in FLOATS:
        raise UserError(f"these layers were solved on GGUF grids ({next(iter(solved.values())).kind}, ...): export "
                        "them as that file type, not as floats")
    if quantized and config.type == "f16":
        raise UserError("--type f16 would round this quantized checkpoint's weights (scale x code is not always an "
                        "fp16 number); use --type q4_0/q8_0 (its grid) or f32 (exact)")
    if quantized and config.type == "f32":
        out.update({n: ("f32", "dequantized, exact") for n in quantized})
    elif quantized:
        # Each layer's type: the file's, or in a mix the one llama.cpp's rule gives it (a GPTQ run on a
        # mix solves its Q8_0/Q4_0 layers on those grids as GPTQLinear, the rest as GGUFLinear).
        n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        kinds = {n: linear_type(config.type, n, m.in_features, n_layers) for n, m in quantized.items()}
        kinds = {n: config.type if t in FLOATS else t for n, t in kinds.items()}  # layer_blocks says why not
        if config.type not in ("q4_0", "q8_0") and any(t not in ("q4_0", "q8_0") for t in kinds.values()):
            raise UserError(f"a GPTQ checkpoint's layers cannot be written as {config.type.upper()} without "
                            f"rounding them again; export it as q4_0/q8_0 (its grid) or f32{refit_hint(config.type)}")
        bad = []
        for name, m in quantized.items():
            try:
                layer_blocks(m, kinds[name])
                out[name] = (kinds[name], "bit-exact from the checkpoint")
            except ValueError as e:
                bad.append(f"{name}: {e}")
        if bad:
            raise UserError(f"{len(bad)} quantized layers are not on the {config.type.upper()} grid ({bad[0]})"
                            f"{refit_hint(config.type)}")
    if config.type not in FLOATS:
        from ..config import LayerFilter

        linears, _ = select_layers(model, LayerFilter(), lambda i, o: True)
        n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        for name, layer in linears.items():
            if name in quantized or name in solved:
                continue
            t = linear_type(config.type, name, linear_weight(layer).shape[1], n_layers, imatrix=config.imatrix)
            if quantized or solved:
                out[name] = ("f16", "float in the checkpoint: kept in float")
            elif t in FLOATS:
                out[name] = ("f16", f"inputs not whole blocks of {GGUF_BLOCK}: kept in float")
            else:
                out[name] = (t, "round-to-nearest, llama.cpp's rule" + (" with the importance matrix"
                                                                          if config.imatrix else ""))
    names = _names(model)
    emb, head, tied = _embeddings(model)
    out_cols = linear_weight(head).shape[1] if head is not None and not tied else emb.weight.shape[1]
    emb_t, out_t = _role_types(config, tied, emb.weight.shape[1], out_cols)
    roles = [(names[id(emb)], emb, emb_t, "token embedding" + (", tied to the output" if tied else ""))]
    if head is not None and not tied and not isinstance(head, GPTQLinear):
        roles.append((names[id(head)], head, out_t, "output"))
    for name, module, t, what in roles:
        cols = linear_weight(module).shape[1]
        if t not in FLOATS and cols % block_size(t):
            raise UserError(f"{name} has rows of {cols} weights, not whole blocks of {block_size(t)} ({t}): use "
                            "--token-embedding-type/--output-tensor-type f16 or a type with smaller blocks")
        out[name] = (t, f"{what}: " + ("round-to-nearest, llama.cpp's rule" if t not in FLOATS else "float"))
    return out


def collect_imatrix(model: nn.Module, calib: torch.Tensor, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """llama.cpp's importance matrix from llmslim's calibration tokens: for every float linear (the
    output matrix included), the mean over all calibration tokens of each input column's squared
    activation (``llama-imatrix`` accumulates the same sums and counts per matmul)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in calib.split(batch_size or 8):
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / counts[n]).float().numpy() for n in sums}


def check_exportable(model: nn.Module, config: ExportConfig) -> list[dict]:
    """The export stage's report: one entry per tensor llmslim writes (``UserError`` if impossible)."""
    return [{"name": n, "type": t, "how": how} for n, (t, how) in plan(model, config).items()]


# --- llama.cpp's conversion code -----------------------------------------------------------------

def llama_cpp_dir() -> Path:
    """The llama.cpp tree whose conversion code writes the metadata: ``$LLMSLIM_LLAMA_CPP`` (any
    llama.cpp checkout), else the copy ``make setup`` unpacks into the virtual environment."""
    env = os.environ.get(LLAMA_CPP_ENV)
    path = Path(env).expanduser() if env else Path(sys.prefix) / "llama.cpp"
    if (path / "gguf-py" / "gguf").is_dir() and ((path / "conversion").is_dir() or (path / "convert_hf_to_gguf.py").is_file()):
        return path
    where = f"{LLAMA_CPP_ENV}={env} has" if env else f"{path} has"
    raise UserError(
        f"GGUF export runs llama.cpp's own conversion code, and {where} no llama.cpp tree (convert_hf_to_gguf.py, "
        f"conversion/, gguf-py/): run `make llama-cpp` (unpacks it from the llama-cpp-python=={LLAMA_CPP_VERSION} "
        f"sdist into {Path(sys.prefix) / 'llama.cpp'}) or set {LLAMA_CPP_ENV} to a llama.cpp checkout; "
        "it also needs `pip install sentencepiece`")


def gguf_origin(source: str | None) -> Path | None:
    """The GGUF file a model came from (an alias or a .gguf path), whose tokenizer is carried over."""
    if not source:
        return None
    if source in ALIASES:
        return alias_file(source)
    path = Path(source).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


# --- writing --------------------------------------------------------------------------------------

def save_gguf(
    model: nn.Module,
    tokenizer,
    path: Path,
    config: ExportConfig,
    source: str | None = None,
    recipe_yaml: str | None = None,
    tokenizer_dirs: tuple[str | Path, ...] = (),
) -> dict:
    """Write ``model`` to the GGUF file ``path`` (the caller makes the write atomic). ``source`` is
    the model it came from: a GGUF origin gives its tokenizer metadata unchanged. llama.cpp's
    converter reads the tokenizer's original files, taken from the first of ``tokenizer_dirs`` that
    has them (else ``tokenizer`` is saved). Returns a summary (tensor types, bytes)."""
    plan_ = plan(model, config)
    root = llama_cpp_dir()
    warning = sliding_window_lost(model)
    if warning:
        print(warning, file=sys.stderr)
    names = _names(model)
    emb = model.get_input_embeddings()
    # The importance matrix (``--imatrix``: the export stage collected it), by module name; a tied
    # embedding is quantized with its output matmul's, as llama.cpp's imatrix names it.
    importance = dict(getattr(model, "gguf_imatrix", None) or {}) if config.imatrix else {}
    _, head, tied = _embeddings(model)
    if tied and names.get(id(head)) in importance:
        importance[names[id(emb)]] = importance[names[id(head)]]
    raw: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    floats: dict[str, torch.Tensor] = {}
    float_types = {"other": "F32" if config.type == "f32" else "F16"}  # by HF name; "other": the rest
    for name, (t, _) in plan_.items():
        module = model.get_submodule(name)
        key = f"{name}.weight"
        if isinstance(module, GGUFLinear):
            raw[key] = module.quantized().encode()
            types[key] = t.upper()
            floats[key] = torch.arange(raw[key].shape[0], dtype=torch.float32)[:, None]  # the row probe
        elif t not in FLOATS:
            if isinstance(module, GPTQLinear):
                d, k = layer_blocks(module, t)
                raw[key] = encode_blocks(t, d, k)
            else:  # llama.cpp's own rounding (ggml_quants: byte-identical to its quantizer)
                W = emb.weight if module is emb else linear_weight(module)
                raw[key] = ggml_quantize(W.detach().float().numpy(), t, importance.get(name)).encode()
            types[key] = t.upper()
            floats[key] = torch.arange(raw[key].shape[0], dtype=torch.float32)[:, None]  # the row probe
        else:
            float_types[key] = t.upper()
            if isinstance(module, GPTQLinear):
                floats[key] = module.dequantized_weight(torch.float32)
        if isinstance(module, GPTQLinear | GGUFLinear) and module.bias is not None:
            floats[f"{name}.bias"] = module.bias.float()
    # Every other float tensor as it is (norms, biases, float linears), each tied copy once:
    # llama.cpp reads token_embd for a tied output.
    gptq_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, GPTQLinear | GGUFLinear))
    seen = {emb.weight.data_ptr()} if f"{names[id(emb)]}.weight" in floats else set()
    for key, t in model.state_dict().items():
        if key in floats or key.startswith(gptq_prefixes) or not t.is_floating_point() or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        floats[key] = t.detach().float().contiguous()
    hf_config = model.config.to_dict()
    hf_config.pop("quantization_config", None)
    hf_config["architectures"] = [architecture(model)]
    origin = gguf_origin(source)
    with tempfile.TemporaryDirectory(prefix="llmslim-gguf-") as scratch:
        scratch = Path(scratch)
        hf = scratch / "hf"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(hf_config, indent=1, default=str))
        if not copy_tokenizer_files(tokenizer_dirs, hf) and tokenizer is not None:
            tokenizer.save_pretrained(hf)
        from safetensors.numpy import save_file as save_np
        from safetensors.torch import save_file

        save_file(floats, str(hf / "model.safetensors"), metadata={"format": "pt"})
        save_np(raw, str(scratch / "quantized.safetensors"))
        spec = {
            "model_dir": str(hf),
            "quantized": str(scratch / "quantized.safetensors"),
            "types": types,
            "float_types": float_types,
            "file_type": FILE_TYPES[config.type],
            "out": str(Path(path).absolute()),
            "model_name": _model_name(source, model),
            "tokenizer_from": str(origin) if origin else None,
            "kv": {"general.quantized_by": f"llmslim {__version__}",
                   **({"llmslim.recipe": recipe_yaml} if recipe_yaml else {}),
                   **({"llmslim.source": str(source)} if source else {})},
            "result": str(scratch / "result.json"),
        }
        (scratch / "spec.json").write_text(json.dumps(spec))
        run_worker(root, scratch / "spec.json", scratch)
        result = json.loads((scratch / "result.json").read_text())
    result["how"] = {n: how for n, (_, how) in plan_.items()}
    return result


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def copy_tokenizer_files(dirs: tuple[str | Path, ...], dest: Path) -> bool:
    import shutil

    for d in dirs:
        files = [Path(d) / f for f in TOKENIZER_FILES if (Path(d) / f).is_file()]
        if any(f.name.startswith("tokenizer") for f in files):
            for f in files:
                shutil.copy(f, dest / f.name)
            return True
    return False


def _model_name(source: str | None, model: nn.Module) -> str:
    origin = gguf_origin(source)
    if origin is not None:
        return origin.stem.split(".")[0]
    name = getattr(model.config, "_name_or_path", "") or (source or "model")
    return Path(str(name)).name or "model"


def run_worker(root: Path, spec: Path, cwd: Path) -> None:
    """Run ``llama_cpp_worker.py`` with llama.cpp's tree and its own ``gguf`` package first on the path."""
    boot = ("import runpy, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']; "
            "runpy.run_path(sys.argv[2], run_name='__main__')")
    env = {**os.environ, "NO_LOCAL_GGUF": "1", "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([sys.executable, "-c", boot, str(root), str(WORKER), str(spec)],
                          cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        if "No module named 'sentencepiece'" in last:
            last += " (pip install sentencepiece)"
        raise UserError(f"llama.cpp's conversion ({root}) failed: {last}")
