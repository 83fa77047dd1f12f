"""Multi-head causal self-attention with grouped-query support and an optional KV cache.

Notation (nanoGPT's):
    B   batch rows (sequences)          T   query positions in this call
    S   key positions (cache length)    nh  query heads, nkv key/value heads, g = nh // nkv
    hs  head size, C = nh · hs = model dim

Attention in three lines, as the explicit path below computes it:
    scores  = q · kᵀ / √hs           how well each query matches each key      (B, nh, T, S)
    weights = softmax(mask(scores))  causal: a query never sees a later key    (B, nh, T, S)
    out     = weights · v            each query's mix of the values            (B, nh, T, hs)
With grouped-query attention, g query heads share one key/value head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.kv_cache import KVCache, Slots
from model.rope import apply_rope


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """q (B, nh, T, hs), k/v (B, nkv, S, hs), mask (B, 1, T, S) bool, True = may attend
    (None ⇒ causal with T == S). Returns the output (B, nh, T, hs) and weights (B, nh, T, S)."""
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    q = q.view(B, nkv, nh // nkv, T, hs)                       # (B, nkv, g, T, hs): heads by kv group
    scores = q @ k.unsqueeze(2).transpose(-2, -1) / math.sqrt(hs)  # (B, nkv, g, T, S)
    scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    weights = scores.softmax(dim=-1)                           # (B, nkv, g, T, S)
    out = weights @ v.unsqueeze(2)                             # (B, nkv, g, T, hs)
    return out.view(B, nh, T, hs), weights.view(B, nh, T, S)


def fast_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The same result as `explicit_attention`, without materialising the weights."""
    if mask is None:  # T == S: is_causal's top-left alignment is the causal mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, *, mask: Tensor | None = None,
                cache: KVCache | None = None, slots: Slots | None = None,
                positions: Tensor | None = None, kv_len: int = 0,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """x (B, T, C) → (B, T, C), plus the attention weights (B, nh, T, S) if asked for."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, slots, positions, k, v, kv_len)             # (B, nkv, S, hs)
        if need_weights:
            out, weights = explicit_attention(q, k, v, mask)
        else:
            out, weights = fast_attention(q, k, v, mask), None
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)          # (B, T, C)
        return self.o_proj(out), weights
