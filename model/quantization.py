"""Weights at load: the compute dtype, int8 weight-only quantization, and the kernel per batch size.

Checkpoints on disk stay float32 (or bf16) safetensors in HF's layout; everything here happens to a
model already filled from them (model/checkpoint.py):

    float32    the weights as trained; projections stored (in, out) and applied as x @ w, which
               streams fastest for one token in f32 (bench/engine.py's kernel table).
    bfloat16   every weight, activation and (by default) the KV cache in bf16; projections stored
               (out, in) in memory (a transposed view keeps the (in, out) shape the code uses), the
               layout oneDNN's bf16 GEMM reads without a copy. Norms and softmax accumulate in f32.
    int8       weight-only, per output channel: w ≈ scale[o] · q[o, i], q in [-127, 127], for every
               projection and the LM head (a tied head gets its own int8 copy; the embedding stays
               dense). Rows up to `int8_max_rows` run the int8 kernel (model/native, else
               `torch._weight_int8pack_mm`; bf16 activations); larger batches run the dense GEMM of
               the compute dtype over the *dequantised* weights, so both kernels compute the same
               function of the same numbers. `int8_max_rows` is measured at load: the largest batch
               size for which the int8 kernel beats the dense one over this model's own matrices.

Every choice is measured at load, on this machine, with the model's own weights (`_race`): the
Python path's kernels per batch size (int8, the bf16 matrix-vector kernel, the library GEMM), then
the fused decode step (model/decode_step.py: bf16 and float32 models) against that path, and for
int8 models the int8 weights inside it against the dense ones.

Attention probabilities returned to users are float32 whatever the compute dtype (see
model/attention.py), and logits leave the model as float32 for sampling.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from model import native
from model.decode_step import FusedDecode
from model.native import bf16_gemv

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
QUANTIZATIONS = ("none", "int8")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")
MEASURED_ROWS = (1, 2, 4, 8, 16, 32, 64)   # batch sizes the int8-vs-dense choice is timed at

DtypeName = Literal["auto", "float32", "bfloat16"]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def cpu_has_native_bf16() -> bool | None:
    """True where the CPU has bf16 instructions (AVX512_BF16 or AMX), False where it lacks them,
    None where this OS does not say (no /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str | torch.dtype, *, device: str | torch.device) -> torch.dtype:
    """`auto` → bfloat16 where the device computes it natively (CUDA, a CPU with AVX512_BF16/AMX),
    else float32. An explicit bfloat16 on a CPU without bf16 instructions runs, emulated and slower
    than float32, with a warning saying so."""
    device = torch.device(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype}")
        dtype = dtype_name(dtype)
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    if dtype == "auto":
        return torch.bfloat16 if native else torch.float32
    if dtype == "bfloat16" and not native:
        warnings.warn("dtype=bfloat16 on a CPU without bf16 instructions (no avx512_bf16/amx_bf16 in "
                      "/proc/cpuinfo): PyTorch emulates it, slower than float32; use dtype=float32",
                      RuntimeWarning, stacklevel=3)
    return DTYPES[dtype]


def resolve_kv_cache_dtype(kv_cache_dtype: str | torch.dtype | None, compute: torch.dtype) -> torch.dtype:
    """`auto` (or None) → the compute dtype."""
    if isinstance(kv_cache_dtype, torch.dtype):
        return kv_cache_dtype
    if kv_cache_dtype in (None, "auto"):
        return compute
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    return DTYPES[kv_cache_dtype]


@dataclass
class KernelChoice:
    """Shared by every projection of a model: on the Python path, batches of up to `int8_max_rows`
    rows use the int8 kernel, then up to `gemv_max_rows` the hand-written bf16 kernel
    (model/native.py), larger ones the library GEMM; decode steps of up to `fused_max_rows` rows
    run as one native call (model/decode_step.py), on the int8 weights up to `fused_int8_max_rows`.
    `measured` holds what each choice was made from: ms by rows, (contender, baseline)."""

    int8_max_rows: int = 0
    gemv_max_rows: int = 0
    fused_max_rows: int = 0
    fused_int8_max_rows: int = 0
    measured: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    native_unavailable: str = ""     # why the hand-written kernels are not used, where they could be
    native_attention: bool = False   # decode steps' attention on model/native/attention.c (bf16)


class Int8Weight(nn.Module):
    """One projection's int8 weights (out, in) and per-output-channel scales (out,), bf16."""

    def __init__(self, weight: Tensor, scales: Tensor, choice: KernelChoice):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)      # (out, in) int8
        self.register_buffer("scales", scales, persistent=False)      # (out,) bf16
        self.choice = choice

    def _apply(self, fn, recurse=True):  # model.to(dtype=...) must not change the kernel's bf16 scales
        super()._apply(fn, recurse)
        self.scales = self.scales.to(torch.bfloat16)
        return self

    @classmethod
    def from_dense(cls, w_out_in: Tensor, choice: KernelChoice) -> Int8Weight:
        """Symmetric per-output-channel quantization of an (out, in) float weight."""
        w = w_out_in.float()
        # The scale is rounded to bf16 (the kernel's) before quantising, so q fits the stored scale.
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-30).to(torch.bfloat16)      # (out,)
        q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
        return cls(q.contiguous(), scales, choice)

    def dequantised(self, dtype: torch.dtype) -> Tensor:
        """scale · q as (out, in) in `dtype`: the numbers the int8 kernel multiplies by."""
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)

    def mm(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x (N, in) → x @ dequantised.T [+ residual] (N, out) on the int8 kernel (bf16 activations,
        output in x's dtype): the hand-written one (model/native/gemv.c, the residual added before
        its one rounding) where it builds, else PyTorch's."""
        if native.available() and x.dtype == torch.bfloat16 and (residual is None or residual.is_contiguous()):
            return native.int8_gemv(x.contiguous(), self.weight, self.scales, residual)
        if x.dtype == torch.bfloat16:       # (no .to() calls: each costs ~2 µs even as a no-op)
            y = torch._weight_int8pack_mm(x, self.weight, self.scales)
        else:
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales).to(x.dtype)
        return y if residual is None else y.add_(residual)


def dense_mm(x: Tensor, w: Tensor, choice: KernelChoice | None, residual: Tensor | None = None) -> Tensor:
    """x (N, in) @ w (in, out) [+ residual]: the bf16 matrix-vector kernel for up to
    `choice.gemv_max_rows` rows, else the library GEMM (one addmm with the residual)."""
    if choice is not None and x.shape[0] <= choice.gemv_max_rows:
        return bf16_gemv(x.contiguous(), w, residual)
    return x @ w if residual is None else torch.addmm(residual, x, w)


def int8_mm(x: Tensor, w: Tensor, q: Int8Weight, residual: Tensor | None = None) -> Tensor:
    """x (N, in) @ w (in, out) [+ residual]: the int8 kernel for small N, else the dense path over
    `w`, which holds the dequantised weights in the compute dtype."""
    if x.shape[0] <= q.choice.int8_max_rows:
        return q.mm(x, residual)
    return dense_mm(x, w, q.choice, residual)


# -- making a model's weights -------------------------------------------------------------------
def _projections(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every (in, out) projection matrix."""
    out = []
    for block in model.layers:
        out += [(block.self_attn, "w_qkv"), (block.self_attn, "w_o"), (block.mlp, "w_gate_up"), (block.mlp, "w_down")]
    return out


def apply_weights(model: nn.Module, *, dtype: torch.dtype, quantization: str = "none",
                  int8_max_rows: int | None = None, gemv_max_rows: int | None = None,
                  fused_max_rows: int | None = None) -> None:
    """Turn a float32 model (filled from its checkpoint) into `dtype` with `quantization`, in place.
    int8_max_rows / gemv_max_rows / fused_max_rows: force a kernel's boundary instead of measuring
    it (tests)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    device = model.embed_tokens.weight.device
    if quantization == "int8" and device.type != "cpu":
        raise ValueError(f"quantization='int8' runs on the CPU only (torch._weight_int8pack_mm); on "
                         f"{device.type} use quantization='none' with dtype='bfloat16'")
    choice = KernelChoice()
    with torch.no_grad():
        if quantization == "int8":
            # Quantise from the f32 weights, then make the dense copies the dequantised values.
            for module, name in _projections(model):
                w = getattr(module, name)                                            # (in, out)
                q = Int8Weight.from_dense(w.t(), choice)
                setattr(module, name + "_int8", q)
                w.copy_(q.dequantised(torch.float32).t())
            head = Int8Weight.from_dense(model.lm_head.weight, choice)              # (V, C)
            if model.config.tie_embeddings:                     # the embedding keeps its own dense rows
                model.lm_head.weight = nn.Parameter(head.dequantised(torch.float32))
            else:
                model.lm_head.weight.copy_(head.dequantised(torch.float32))
            model.lm_head_int8 = head
        model.to(dtype=dtype)
        if dtype == torch.bfloat16:
            for module, name in _projections(model):       # (out, in) in memory, (in, out) in shape
                p = getattr(module, name)
                p.data = p.data.t().contiguous().t()
    model.weights_dtype, model.quantization = dtype, quantization
    for module in {m for m, _ in _projections(model)}:
        module.kernels = choice
    model.kernel_choice = choice
    if dtype == torch.bfloat16 and device.type == "cpu":
        choice.native_attention = native.available()    # measured 2.5–14× faster than bf16 SDPA, 1–32 rows
        if not native.available():
            choice.native_unavailable = native.unavailable_reason()
        elif gemv_max_rows is not None:
            choice.gemv_max_rows = gemv_max_rows
        else:
            choice.gemv_max_rows, choice.measured["gemv"] = measure_rows(model, "gemv")
    if quantization == "int8":
        choice.int8_max_rows = int8_max_rows if int8_max_rows is not None else -1
        if int8_max_rows is None:
            choice.int8_max_rows, choice.measured["int8"] = measure_rows(model, "int8")
    if FusedDecode.supports(model):
        model.fused_decode = FusedDecode(model)
        if quantization == "int8":          # int8 inside the fused step: measured there (fewer calls, other ratio)
            if int8_max_rows is not None:
                choice.fused_int8_max_rows = int8_max_rows
            else:
                choice.fused_int8_max_rows, choice.measured["decode_step_int8"] = measure_fused_rows(model, "int8")
        if fused_max_rows is not None:
            choice.fused_max_rows = fused_max_rows
        else:
            choice.fused_max_rows, choice.measured["decode_step"] = measure_fused_rows(model, "python")
        if choice.fused_max_rows <= 0:
            model.fused_decode = None


def _race(passes_at: Callable[[int], tuple[Callable[[], object], Callable[[], object]]], *, reps: int
          ) -> tuple[int, dict[int, tuple[float, float]]]:
    """Time (contender, baseline) = passes_at(rows) at each batch size in MEASURED_ROWS; return the
    largest size below the first one where the contender loses (0: never use it), and the timings
    (medians, ms). The two run back to back `reps` times after a warm-up round and the median of
    the paired ratios decides: a burst of other load on a shared machine slows the pair alike, or
    one of them in a single pair only."""
    timings, best_rows = {}, 0
    for rows in MEASURED_ROWS:
        passes = passes_at(rows)
        seconds: list[list[float]] = [[], []]
        for rep in range(reps + 1):
            for i, fn in enumerate(passes):
                start = time.perf_counter()
                fn()
                if rep:
                    seconds[i].append(time.perf_counter() - start)
        ratio = statistics.median(a / b for a, b in zip(*seconds))
        timings[rows] = (statistics.median(seconds[0]) * 1e3, statistics.median(seconds[1]) * 1e3)
        if ratio >= 1:
            break
        best_rows = rows
    return best_rows, timings


@torch.inference_mode()
def measure_rows(model: nn.Module, kernel: Literal["int8", "gemv"], *, reps: int = 7
                 ) -> tuple[int, dict[int, tuple[float, float]]]:
    """One pass over every projection and the head, `kernel` (the int8 kernel, or the bf16
    matrix-vector kernel) against the path it would replace (the dense path as already chosen, or
    the library GEMM): see `_race`."""
    mats = [(getattr(m, n), getattr(m, n + "_int8", None)) for m, n in _projections(model)]
    mats.append((model.lm_head.weight.t(), getattr(model, "lm_head_int8", None)))
    dtype, choice = model.weights_dtype, model.kernel_choice
    if kernel == "int8":
        contender = lambda x, w, q: q.mm(x)
        baseline = lambda x, w, q: dense_mm(x, w, choice)
    else:
        contender = lambda x, w, q: bf16_gemv(x, w)
        baseline = lambda x, w, q: x @ w

    def passes_at(rows: int):
        xs = [torch.randn(rows, w.shape[0], dtype=dtype) for w, _ in mats]
        return tuple(lambda fn=fn: [fn(x, w, q) for x, (w, q) in zip(xs, mats)] for fn in (contender, baseline))

    return _race(passes_at, reps=reps)


@torch.inference_mode()
def measure_fused_rows(model: nn.Module, against: Literal["python", "int8"], *, reps: int = 5, context: int = 64
                       ) -> tuple[int, dict[int, tuple[float, float]]]:
    """Whole decode steps (see `_race`): the fused native step against the Python path (its
    kernels as chosen before), or, for int8 models, the fused step on the int8 weights against it
    on the dense ones. Each step writes and reads a scratch cache at position context - 1."""
    fused, choice = model.fused_decode, model.kernel_choice
    context = min(context, model.config.max_context)

    def passes_at(rows: int):
        cache = model.new_cache(rows, context)
        tokens, positions = torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), context - 1)
        step = lambda: fused(tokens, positions, cache, slice(0, rows), (), ())

        def python_step() -> None:
            model.fused_decode = None
            try:
                model(tokens, positions=positions, cache=cache, slots=slice(0, rows))
            finally:
                model.fused_decode = fused

        def with_int8(on: bool):
            def run() -> None:
                choice.fused_int8_max_rows = rows if on else 0
                step()
            return run

        return (step, python_step) if against == "python" else (with_int8(True), with_int8(False))

    return _race(passes_at, reps=reps)           # (the int8 passes leave fused_int8_max_rows for the caller to set)


def weights_info(model: nn.Module) -> dict:
    """A JSON-able description of the model's weights and kernels (for logs and /v1/models)."""
    dtype = dtype_name(getattr(model, "weights_dtype", torch.float32))
    quantization = getattr(model, "quantization", "none")
    choice = getattr(model, "kernel_choice", KernelChoice())
    dense = f"{dtype} GEMM, weights {'(in, out)' if dtype == 'float32' else '(out, in)'}"
    if quantization == "int8":
        dense += " (dequantised int8)"
    # Batch-size ranges, smallest first: the int8 kernel, then the bf16 kernel, then the library GEMM.
    int8_kernel = ("hand-written (model/native/gemv.c)" if native.available() else "_weight_int8pack_mm")
    ranges = [(choice.int8_max_rows if quantization == "int8" else 0, f"int8 {int8_kernel} (bf16 activations)"),
              (choice.gemv_max_rows, "bf16 matrix-vector, hand-written (model/native/gemv.c, AVX512-BF16)")]
    kernels, low = {}, 1
    for high, name in ranges:
        if high >= low:
            kernels[f"rows <= {high}" if low == 1 else f"rows {low}-{high}"] = name
            low = high + 1
    kernels["all rows" if low == 1 else f"rows > {low - 1}"] = dense
    info = {"dtype": dtype, "quantization": quantization, "weight_bytes_per_token": weight_bytes_per_token(model),
            "kernels": kernels}
    names = {"int8": ("int8", "dense"), "gemv": ("gemv", "dense"), "decode_step": ("fused", "python"),
             "decode_step_int8": ("int8", "dense")}
    info["measured_ms"] = {kernel: {str(r): dict(zip(names[kernel], (round(a, 3), round(b, 3))))
                                    for r, (a, b) in t.items()} for kernel, t in choice.measured.items()}
    fused = choice.fused_max_rows if getattr(model, "fused_decode", None) is not None else 0
    info["decode_step"] = (f"rows <= {fused}: one native call (model/native/decode.c), larger: the layers in PyTorch"
                           if fused else "the layers in PyTorch")
    if fused and quantization == "int8":
        info["decode_step"] += f"; int8 weights inside it for rows <= {choice.fused_int8_max_rows}"
    info["decode_attention"] = ("hand-written bf16 (model/native/attention.c)" if choice.native_attention
                                else "PyTorch SDPA")
    if choice.native_unavailable:
        info["native_unavailable"] = choice.native_unavailable
    return info


def weight_bytes_per_token(model: nn.Module, rows: int = 1) -> int:
    """Bytes of weights one decode step at `rows` rows reads: every projection and the head, in
    the kernel's format (int8 + scales, or the dense dtype), plus one embedding row."""
    mats = [getattr(m, n) for m, n in _projections(model)] + [model.lm_head.weight]
    choice = model.kernel_choice
    fused = getattr(model, "fused_decode", None) is not None and rows <= choice.fused_max_rows
    int8 = getattr(model, "quantization", "none") == "int8" and \
        rows <= (choice.fused_int8_max_rows if fused else choice.int8_max_rows)
    total = 0
    for w in mats:
        out = w.shape[1] if w is not model.lm_head.weight else w.shape[0]
        total += w.numel() + 2 * out if int8 else w.numel() * w.element_size()
    emb = model.embed_tokens.weight
    return total + emb.shape[1] * emb.element_size()
