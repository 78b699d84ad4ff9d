"""llmslim's own CPU kernel (``csrc/int4_bf16.cpp``): int4 weights x bf16 activations with AVX512-BF16.

At batch 1 torch's int4 kernel is bound by the instructions that dequantize each weight to fp32;
this one turns 64 weights into two ``vdpbf16ps`` with nine instructions (the file says how) and is
2-3x faster on a decoder's projections, with the numerics of a bf16 matmul (exact weights, bf16
activations, fp32 sums). It is built once per machine with torch's C++ extension loader (gcc and
ninja; ``make setup`` builds it, else the first use does, ~1 min) into ``$LLMSLIM_CACHE/native``.

``available()`` is False -- and ``runtime.kernels`` keeps torch's kernel -- when the CPU lacks
AVX512-BF16, when the build fails (one warning says why), or when ``LLMSLIM_NATIVE=0``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "int4_bf16.cpp"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]


def cpu_supported() -> bool:
    """Whether this CPU runs the kernel's instructions (Linux: /proc/cpuinfo's flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in CPU_FLAGS)


def build_dir() -> Path:
    """One folder per source and torch version: a new torch or an edited kernel builds again."""
    from ..models import cache_root

    tag = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(CFLAGS).encode())
    return cache_root() / "native" / tag.hexdigest()[:16]


@functools.cache
def module():
    """The built extension, or None (with one warning) when it cannot run here."""
    if os.environ.get("LLMSLIM_NATIVE", "1") == "0" or not cpu_supported():
        return None
    try:
        import ninja  # the build tool torch's loader runs; the pip package puts its binary here

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn("llmslim's int4 kernel needs ninja and a C++ compiler to build (pip install ninja; "
                      "apt-get install g++); using torch's int4 kernel", stacklevel=2)
        return None
    from torch.utils.cpp_extension import load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return load(name="llmslim_int4_bf16", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                    extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
    except Exception as e:  # a compiler error: the fallback works everywhere, say why once
        warnings.warn(f"llmslim's int4 kernel did not build ({str(e).splitlines()[0][:200]}); using torch's",
                      stacklevel=2)
        return None


def available() -> bool:
    return module() is not None


def int4_bf16_mm(x: torch.Tensor, packed: torch.Tensor, kg: int, scale_zeros: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` bf16 times the weight of ``pack`` -> ``[M, N]`` bf16 (torch's scale_zeros as is)."""
    return module().int4_bf16_mm(x, packed, kg, scale_zeros)


def pack(q4: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[N, K]`` (N % 16 == 0, K % 4 == 0) -> the kernel's bytes: per block of 16 rows and
    step of 4 columns, byte ``2r + j`` = ``q[r, 4t + j] | q[r, 4t + 2 + j] << 4``."""
    N, K = q4.shape
    q = q4.to(torch.uint8).view(N // 16, 16, K // 4, 4)
    byte = q[..., 0:2] | (q[..., 2:4] << 4)  # [blocks, 16 rows, steps, 2]
    return byte.permute(0, 2, 1, 3).contiguous().view(-1)
