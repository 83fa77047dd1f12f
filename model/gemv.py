"""The hand-written bf16 matrix-vector kernel (model/gemv.c): y = x @ w (+ residual) for a few rows.

Compiled on first use with the system C compiler (`cc -O3 -march=native -fopenmp`) into a cache
directory ($ATTNSERVE_CACHE, else ~/.cache/attnserve), keyed by the source and the CPU's flags, and
called through ctypes. It needs AVX512-BF16; where the CPU lacks it, or no compiler is installed, or
the build fails, `available()` is False and says why in `unavailable_reason()`, and callers keep the
library GEMM. Whether it is used at all is measured per model at load (model/quantization.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _cache_dir() -> Path:
    return Path(os.environ.get("ATTNSERVE_CACHE") or Path.home() / ".cache" / "attnserve")


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not)."""
    flags = _cpu_flags()
    if "avx512_bf16" not in flags.split():
        return None, "the CPU has no AVX512-BF16 (no avx512_bf16 in /proc/cpuinfo)"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, "no C compiler (cc) on PATH"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + flags.encode()).hexdigest()[:16]
    path = _cache_dir() / f"gemv-{key}.so"
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # build aside, then rename: atomic
                built = Path(tmp) / path.name
                run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)],
                                     capture_output=True, text=True, timeout=120)
                if run.returncode != 0:
                    return None, f"{compiler} failed on {SOURCE.name}: {run.stderr.strip()[-300:]}"
                built.replace(path)
        lib = ctypes.CDLL(str(path))  # after torch: its libgomp is the one already loaded
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not build or load {path}: {e}"
    lib.bf16_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    lib.bf16_gemv.restype = None
    return lib, ""


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


def fits(w: Tensor) -> bool:
    """Whether `w`, an (in, out) projection, is laid out for the kernel: bf16 on the CPU, (out, in)
    contiguous in memory (a transposed view, as model/quantization.py stores bf16 weights)."""
    return w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.t().is_contiguous()


def bf16_gemv(x: Tensor, w: Tensor, residual: Tensor | None = None) -> Tensor:
    """x (M, in) @ w (in, out) [+ residual (M, out)] → (M, out), all bf16; `w` must fit (see
    `fits`), x and residual contiguous."""
    lib = _load()[0]
    M, K = x.shape
    N = w.shape[1]
    y = torch.empty(M, N, dtype=torch.bfloat16)
    lib.bf16_gemv(x.data_ptr(), w.data_ptr(), None if residual is None else residual.data_ptr(), y.data_ptr(), M, N, K)
    return y
