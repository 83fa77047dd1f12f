"""Model configuration: a dataclass that round-trips through HF `LlamaConfig`'s config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_FILE = "config.json"


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int = 128                  # hidden size (d_model)
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None   # grouped-query attention; None ⇒ n_heads (plain multi-head)
    intermediate_size: int | None = None  # SwiGLU hidden size; None ⇒ ~8/3·dim rounded up to 32
    max_context: int = 1024         # max_position_embeddings
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.intermediate_size is None:
            self.intermediate_size = 32 * -(-(8 * self.dim // 3) // 32)
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    # -- HF LlamaConfig ⇄ ModelConfig ---------------------------------------------------------
    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_context,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "head_dim": self.head_dim,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, hf: dict) -> ModelConfig:
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"unsupported model_type {model_type!r}: only Llama-format checkpoints load")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: expected 'silu'")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("checkpoints with attention or MLP biases are not supported")
        rope_scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
        if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported rope_scaling {rope_scaling!r}: only plain RoPE")
        theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        n_heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads):
            raise ValueError(f"head_dim={hf['head_dim']} ≠ hidden_size/num_attention_heads")
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            intermediate_size=hf["intermediate_size"],
            max_context=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        return cls.from_hf_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))

    def as_dict(self) -> dict:
        return asdict(self)


# Named presets. vocab_size is a placeholder where a trained tokenizer decides it.
PRESETS: dict[str, dict] = {
    # ~0.9M parameters: the shipped word calculator.
    "calculator": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=384,
                       max_context=512),
    # ~6M parameters: a small general-text model, and the engine benchmarks' mid size.
    "small": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, intermediate_size=688,
                  max_context=1024),
    # ~30M parameters: memory-bound on CPU, the engine's larger benchmark.
    "bench": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, intermediate_size=1376,
                  max_context=2048, tie_embeddings=False),
}


def preset(name: str, *, vocab_size: int, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(vocab_size=vocab_size, **(PRESETS[name] | overrides))
