"""Checkpoint directories: config.json + model.safetensors + tokenizer.json, in HF Llama layout.

The same directory opens with `transformers.LlamaForCausalLM.from_pretrained(dir)`, and an HF
Llama-format directory opens here. Weights are read only from safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.quantization import apply_weights, resolve_dtype
from model.tokenizer import Tokenizer
from model.transformer import Transformer

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot (or must not) be loaded."""


def hf_name(name: str) -> str:
    """A name from `Transformer.hf_weights` → HF LlamaForCausalLM's state-dict name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def save_checkpoint(model: Transformer, tokenizer: Tokenizer | None, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    # HF's tensors, one per projection: our fused q/k/v and gate/up matrices are split here.
    tensors = {hf_name(n): w.detach().to("cpu", torch.float32).contiguous()
               for n, w in model.hf_weights().items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = torch.float32, quantization: str = "none",
                    int8_max_rows: int | None = None, gemv_max_rows: int | None = None,
                    fused_max_rows: int | None = None) -> tuple[Transformer, Tokenizer]:
    """The model in `dtype` ("auto", "float32", "bfloat16" or a torch dtype; float32 by default,
    for exact comparisons) with `quantization` ("none" or "int8", weight-only, made here from the
    checkpoint's float weights) — see model/quantization.py. int8_max_rows / gemv_max_rows /
    fused_max_rows fix the batch size up to which the int8 / bf16 matrix-vector kernel / the fused
    decode step (model/decode_step.py) runs instead of measuring it."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is not a checkpoint directory: no config.json")
    compute = resolve_dtype(dtype, device=device)
    config = ModelConfig.load(directory)
    model = Transformer(config)
    load_weights(model, directory)
    tokenizer = Tokenizer.from_dir(directory)
    model.to(device=device)
    apply_weights(model, dtype=compute, quantization=quantization, int8_max_rows=int8_max_rows,
                  gemv_max_rows=gemv_max_rows, fused_max_rows=fused_max_rows)
    return model.eval(), tokenizer


def load_weights(model: Transformer, directory: Path) -> None:
    """Fill `model` from the directory's safetensors file(s); every parameter must be present.
    HF's separate projections are copied into their slices of our fused matrices."""
    files = _weight_files(directory)
    targets = {hf_name(n): w for n, w in model.hf_weights().items()}
    seen = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key not in targets:
                    if key.endswith("rotary_emb.inv_freq") or key == "lm_head.weight":
                        continue  # derived buffers / a tied head saved anyway
                    raise CheckpointError(f"unexpected tensor {key!r} in {path.name}")
                tensor, target = f.get_tensor(key), targets[key]
                if tensor.shape != target.shape:
                    raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} in {path.name}, "
                                          f"config expects {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(tensor.to(target.dtype))
                seen.add(key)
    if missing := sorted(set(targets) - seen):
        raise CheckpointError(f"{directory}: missing tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")


def _weight_files(directory: Path) -> list[Path]:
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    if (index := directory / WEIGHTS_INDEX_FILE).is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} has weights only as pickle files ({', '.join(pickles)}); attnserve loads "
            f"weights only from safetensors, because unpickling can run arbitrary code. Convert "
            f"them (e.g. save_pretrained(dir, safe_serialization=True)) and try again.")
    raise CheckpointError(f"no {WEIGHTS_FILE} in {directory}")
