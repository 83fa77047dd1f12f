"""A decoder-only, Llama-style transformer.

token ids → embedding → n_layers × [RMSNorm → attention (RoPE, causal) → +residual,
RMSNorm → SwiGLU MLP → +residual] → RMSNorm → LM head → next-token logits.

Module names follow HF's LlamaForCausalLM (minus its "model." prefix), so checkpoints map
one-to-one (see model/checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import Attention
from model.config import ModelConfig
from model.kv_cache import KVCache, Slots
from model.rope import rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, **attn_kwargs) -> tuple[Tensor, Tensor | None]:
        h, weights = self.self_attn(self.input_layernorm(x), cos, sin, **attn_kwargs)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, weights


@dataclass
class ModelOutput:
    logits: Tensor                                          # (B, T, V), or (B, 1, V) with last_only
    attentions: dict[int, Tensor] = field(default_factory=dict)  # layer → (B, nh, T, S) weights


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.max_context, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (P, hs)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, *, seed: int | None = None, std: float = 0.02) -> None:
        """Normal(0, std) linears and embeddings; output projections scaled by depth (GPT-2)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
                continue
            scale = std
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                scale = std / (2 * self.config.n_layers) ** 0.5
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)

    def new_cache(self, max_batch: int, max_context: int | None = None) -> KVCache:
        c = self.config
        return KVCache(c.n_layers, max_batch, c.n_kv_heads, max_context or c.max_context, c.head_dim,
                       dtype=self.embed_tokens.weight.dtype, device=self.embed_tokens.weight.device)

    def forward(self, tokens: Tensor, *, positions: Tensor | None = None,
                cache: KVCache | None = None, slots: Slots | None = None,
                attn_layers: Collection[int] = (), last_only: bool = False) -> ModelOutput:
        """tokens (B, T) → logits.

        Without a cache: a full causal forward over positions 0 … T-1 (training, recompute).
        With a cache: `positions` (B, T) are each row's absolute positions; their keys/values are
        written into `slots` (B rows) and each query attends to its slot's keys 0 … its position.
        `attn_layers`: layers whose post-softmax weights to return (explicit path there).
        """
        B, T = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("the cache path needs explicit positions")
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos = self.rope_cos[positions].unsqueeze(1)               # (B, 1, T, hs)
        sin = self.rope_sin[positions].unsqueeze(1)
        kv_len, mask = 0, None
        if cache is not None:
            kv_len = int(positions.max()) + 1
            if kv_len > cache.max_context:
                raise ValueError(f"position {kv_len - 1} is beyond the cache's max_context={cache.max_context}")
            keys = torch.arange(kv_len, device=tokens.device)
            mask = (keys <= positions.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, S): causal per row
        x = self.embed_tokens(tokens)                             # (B, T, C)
        attentions = {}
        for i, block in enumerate(self.layers):
            x, weights = block(x, cos, sin, mask=mask, cache=cache, slots=slots, positions=positions,
                               kv_len=kv_len, need_weights=i in attn_layers)
            if weights is not None:
                attentions[i] = weights
        if last_only:
            x = x[:, -1:]
        return ModelOutput(self.lm_head(self.norm(x)), attentions)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
