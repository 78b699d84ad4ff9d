"""llmslim's C++ kernels (``csrc/``): built with torch's own ``cpp_extension`` (gcc + ninja) by
``make setup`` or on first use, then loaded from the build cache.

- ``decode_attention``: the decode step's attention over ragged rows (``csrc/decode_attention.cpp``).
- ``rms_norm`` (with an optional residual add), ``rope``, ``silu_mul``: the lean forward's small
  steps, one call each instead of several torch ops; ``argmax_rows``: greedy picks (``csrc/fused.cpp``);
  ``DecodeStep``: every layer of a decode step in one call, over those same kernels (``csrc/decode_step.cpp``).
- ``int4_matmul`` / ``bf16_matmul``: small-M products with int4 (GPTQ) and bf16 weights on CPUs
  with AVX512-BF16 (``csrc/int4_matmul.cpp``), and ``q8_matmul``, the output head in 8-bit blocks
  of 32 (``csrc/q8_matmul.cpp``); elsewhere ``matmuls()`` is None and torch's own kernels run.

    python -m llmslim.runtime.ext        # build now (``make setup`` runs this); prints where

The kernel is built for the CPU it runs on (``-march=native``), so the build directory is keyed
by torch's version and the CPU's feature flags: a home directory shared between machines never
loads a binary built for another CPU. Where it cannot be built (no compiler, no ninja) or
``LLMSLIM_NO_EXT=1`` is set, ``decode_attention()`` is None and the lean forward attends with
torch's SDPA instead, one row at a time (same results to rounding, slower under load); ``why_not``
says why. ``LLMSLIM_NO_EXT_MATMUL=1`` turns off the matrix products alone (to compare them with
torch's).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "module.cpp", CSRC / "decode_attention.cpp", CSRC / "int4_matmul.cpp", CSRC / "q8_matmul.cpp",
           CSRC / "fused.cpp", CSRC / "decode_step.cpp"]
NAME = "llmslim_kernels"
why_not: str | None = None


def _cpu_key() -> str:
    """A short hash of what the compiler targets with ``-march=native``: the CPU's flags."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:12]


def build_dir() -> Path:
    import torch

    from ..models import cache_root

    return cache_root() / "ext" / f"torch-{torch.__version__}-cpu-{_cpu_key()}"


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the PyPI ``ninja`` package may be the only one."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _module(verbose: bool = False):
    global why_not
    if os.environ.get("LLMSLIM_NO_EXT"):
        why_not = "LLMSLIM_NO_EXT is set"
        return None
    if sys.platform != "linux":
        why_not = f"built on Linux only (this is {sys.platform})"
        return None
    try:
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        if not any(out.glob(f"{NAME}*.so")):
            print(f"llmslim: building its C++ kernels once for this CPU (~1 min) in {out}",
                  file=sys.stderr, flush=True)
        # -fopenmp: at::parallel_for runs on torch's own OpenMP pool (torch ships libgomp.so.1,
        # already loaded, so the extension binds to the same runtime).
        return load(NAME, [str(s) for s in SOURCES], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], build_directory=str(out), verbose=verbose)
    except Exception as e:  # any build or load failure: the SDPA path is still correct
        why_not = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return None


def module():
    """The compiled module, or None where it is unavailable (``why_not``)."""
    return _module()


def decode_attention():
    """The compiled ``decode_attention(q [B, H, D], k, v [B, KV, C, D], lengths [B], window, scale,
    softcap) -> [B, H, D]``, or None where it is unavailable (``why_not``)."""
    module = _module()
    return None if module is None else module.decode_attention


def matmuls():
    """The compiled module if its ``int4_matmul(x [M, K] bf16, w [N/16, K/2, 16] uint8, scale_zeros
    [K/group, N, 2] bf16, group)``, ``bf16_matmul(x, weight [N, K])`` and ``q8_matmul(x, w [N/16,
    K/2, 16, 2] int8, scales [N/16, K/32, 16] fp32)`` were built for this CPU (AVX512-BF16), else None. ``runtime.kernels`` packs weights for them."""
    module = _module()
    if module is None or os.environ.get("LLMSLIM_NO_EXT_MATMUL") or not module.int4_matmul_available():
        return None
    return module


def main() -> None:
    module = _module(verbose=True)
    if module is None:
        raise SystemExit(f"llmslim: the C++ kernels were not built ({why_not}); the SDPA path will be used")
    fast = "with" if module.int4_matmul_available() else "without (this CPU has no AVX512-BF16)"
    print(f"llmslim: C++ kernels ready in {build_dir()}, {fast} the int4/bf16/q8 matrix products")


if __name__ == "__main__":
    main()
