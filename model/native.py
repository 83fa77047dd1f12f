"""Hand-written CPU kernels for the decode step (model/native/*.c), compiled on first use.

    kernels.h     the arithmetic they share (dot products, the int8 block, one query's attention)
    gemv.c        y = x @ w (+ residual) for a few rows of bf16 activations; bf16 or int8 weights
    attention.c   one query per row and head against its cached bf16 keys and values
    decode.c      a whole decode step, embedding to logits (model/decode_step.py)
    amx.h         its bf16 projections on AMX tiles, where the CPU has them

Built with the system C compiler (`cc -O3 -march=native -fopenmp`) into one shared library in a
cache directory ($ATTNSERVE_CACHE, else ~/.cache/attnserve), keyed by the sources and the CPU's
flags, and called through ctypes. They need AVX512-BF16 and AVX512-VNNI; where the CPU lacks
them, or no compiler is installed, or the build fails, `available()` is False and
`unavailable_reason()` says why, and callers keep PyTorch's kernels. Whether they are used at
all is measured per model at load (model/quantization.py).
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

SOURCES = sorted((Path(__file__).parent / "native").glob("*.c"))
HEADERS = sorted((Path(__file__).parent / "native").glob("*.h"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")


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
    missing = [flag for flag in ("avx512_bf16", "avx512_vnni") if flag not in flags.split()]
    if missing:
        return None, f"the CPU lacks {' and '.join(missing)} (/proc/cpuinfo)"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, "no C compiler (cc) on PATH"
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(FLAGS).encode()
                         + flags.encode()).hexdigest()[:16]
    path = _cache_dir() / f"kernels-{key}.so"
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # build aside, then rename: atomic
                built = Path(tmp) / path.name
                run = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"],
                                     capture_output=True, text=True, timeout=120)
                if run.returncode != 0:
                    return None, f"{compiler} failed on model/native: {run.stderr.strip()[-300:]}"
                built.replace(path)
        lib = ctypes.CDLL(str(path))  # after torch: its libgomp is the one already loaded
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not build or load {path}: {e}"
    lib.bf16_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    lib.bf16_gemv.restype = None
    lib.bf16_decode_attention.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 9
    lib.bf16_decode_attention.restype = None
    lib.int8_gemv.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 3
    lib.int8_gemv.restype = None
    lib.decode_step.argtypes = [ctypes.c_void_p] * 2
    lib.decode_step.restype = None
    lib.amx_init.restype = ctypes.c_int
    return lib, ""


def available() -> bool:
    return _load()[0] is not None


@functools.cache
def amx_available() -> bool:
    """Whether the fused decode step may put its bf16 projections on AMX tiles: the CPU has them
    (amx_bf16 in /proc/cpuinfo, so -march=native compiled them in) and Linux grants this process
    their state (arch_prctl ARCH_REQ_XCOMP_PERM)."""
    return available() and "amx_bf16" in _cpu_flags().split() and _load()[0].amx_init() == 0


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


def int8_gemv(x: Tensor, q: Tensor, scales: Tensor, residual: Tensor | None = None) -> Tensor:
    """x (M, in) bf16 @ (scales[:, None] · q)ᵀ [+ residual (M, out)] → (M, out) bf16, with q (out, in)
    int8 and scales (out,) bf16, contiguous: weight-only int8, x as 16-bit fixed point per row (kernels.h)."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N, dtype=torch.bfloat16)
    xq, xs = torch.empty(M, K, dtype=torch.int16), torch.empty(M)
    r = None if residual is None else residual.data_ptr()
    _load()[0].int8_gemv(q.data_ptr(), scales.data_ptr(), x.data_ptr(), r, y.data_ptr(), xq.data_ptr(), xs.data_ptr(),
                         M, N, K)
    return y


def decode_step(model_struct, step_struct) -> None:
    """model/native/decode.c's decode_step on ctypes structures (model/decode_step.py)."""
    _load()[0].decode_step(ctypes.addressof(model_struct), ctypes.addressof(step_struct))


def decode_attention_fits(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether one decode step's q (B, nh, 1, hs) and cached k/v (B, nkv, S, hs) suit the kernel:
    bf16 on the CPU, each head's vector contiguous, cached positions hs apart, hs % 32 == 0."""
    hs = q.shape[-1]
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu" and q.shape[2] == 1
            and hs % 32 == 0 and q.stride(-1) == 1 and k.stride() == v.stride()
            and k.stride(-1) == 1 and k.stride(-2) == hs)


def bf16_decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    """q (B, nh, 1, hs), k/v (B, nkv, S, hs) bf16 (see `decode_attention_fits`), lengths (B,)
    int64: row b attends to keys 0 … lengths[b]-1 → out (B, nh, 1, hs) bf16."""
    B, nh, _, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    out = torch.empty(B, 1, nh, hs, dtype=torch.bfloat16)       # (B, T, nh, hs): heads side by side
    work = torch.empty(B * nh * S, dtype=torch.float32)
    lengths = lengths.contiguous()
    _load()[0].bf16_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), lengths.data_ptr(), out.data_ptr(),
                                     work.data_ptr(), B, nh, nkv, S, hs, q.stride(0), q.stride(1),
                                     k.stride(0), k.stride(1))
    return out.transpose(1, 2)
