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

The mask: True = may attend. None means causal with the T queries at the last T of the S key
positions: T == S is the plain causal triangle, T == 1 (one new token against a cache) sees
every key. Rows of a batch at different positions need an explicit (B, 1, T, S) mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import native
from model.config import ModelConfig
from model.kv_cache import CacheIndex, KVCache
from model.quantization import Int8Weight, KernelChoice, dense_mm, int8_mm
from model.rope import apply_rope


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """q (B, nh, T, hs), k/v (B, nkv, S, hs), mask (B, 1, T, S) bool or None (see the module
    docstring). Returns the output (B, nh, T, hs) in q's dtype and weights (B, nh, T, S) in float32:
    whatever the compute dtype, scores and softmax are float32, and so are the probabilities users see."""
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    if mask is None and T > 1:  # causal, the queries being the last T positions
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    dtype = q.dtype                          # scores, softmax and mix in float32 (no-ops for f32)
    q, k, v = q.float(), k.float(), v.float()
    q = q.reshape(B, nkv, nh // nkv, T, hs)                    # (B, nkv, g, T, hs): heads by kv group
    scores = q @ k.unsqueeze(2).transpose(-2, -1) / math.sqrt(hs)  # (B, nkv, g, T, S)
    if mask is not None:        # (None with T == 1: one query after all S keys sees every key)
        scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    weights = scores.softmax(dim=-1)                           # (B, nkv, g, T, S)
    out = weights @ v.unsqueeze(2)                             # (B, nkv, g, T, hs)
    return out.view(B, nh, T, hs).to(dtype), weights.view(B, nh, T, S)


def fast_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The same result as `explicit_attention`, without materialising the weights."""
    if torch.is_autocast_enabled(q.device.type):
        # Training under bf16 autocast: attention runs in float32, whose backward on CPU measured
        # ~6× faster than bf16's flash-attention backward (the projections keep their bf16 speed-up).
        with torch.autocast(q.device.type, enabled=False):
            return fast_attention(q.float(), k.float(), v.float(), mask).to(q.dtype)
    if mask is None:
        T, S = q.shape[2], k.shape[2]
        if T == S:    # is_causal's top-left alignment is the causal mask only when T == S
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if T == 1:    # one query after all S keys: nothing to mask
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class Attention(nn.Module):
    """Self-attention over x (B·T, C): the B·T token rows of a (B, T) batch, one row per token.

    Weights are stored (in, out) and applied as x @ w: for one token (a matrix-vector product,
    memory-bound) MKL streams that layout ~1.3× faster than nn.Linear's (out, in) x @ wᵀ on the
    CPUs measured; for batches and on CUDA the two are equal. q, k and v are stacked into one
    matrix: one matmul instead of three. Checkpoints keep HF's separate (out, in) q_proj /
    k_proj / v_proj / o_proj tensors (see `hf_weights`).
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        self.w_qkv = nn.Parameter(torch.empty(config.dim, (nh + 2 * nkv) * hs))  # (C, (nh+2nkv)·hs)
        self.w_o = nn.Parameter(torch.empty(nh * hs, config.dim))                  # (nh·hs = C, C)
        # int8 copies made at load (model/quantization.py); None: the dense weights above only.
        self.w_qkv_int8: Int8Weight | None = None
        self.w_o_int8: Int8Weight | None = None
        self.kernels: KernelChoice | None = None    # the model's kernel choice, set at load

    def hf_weights(self) -> dict[str, Tensor]:
        """HF's (out, in) q_proj / k_proj / v_proj / o_proj weights, as views into ours."""
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.w_qkv.split([nh * hs, nkv * hs, nkv * hs], dim=1)
        return {"q_proj.weight": q.t(), "k_proj.weight": k.t(), "v_proj.weight": v.t(),
                "o_proj.weight": self.w_o.t()}

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, *, residual: Tensor, mask: Tensor | None = None,
                cache: KVCache | None = None, at: CacheIndex | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """x (B·T, C) and cos/sin (B, T, 1, hs) → residual + attention(x) (B·T, C), and the
        weights (B, nh, T, S) if asked for. With a cache, this call's keys and values are stored
        `at` their slots and positions first."""
        B, T = cos.shape[:2]
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        q8 = self.w_qkv_int8
        qkv = dense_mm(x, self.w_qkv, self.kernels) if q8 is None else int8_mm(x, self.w_qkv, q8)
        qkv = qkv.view(B, T, nh + 2 * nkv, hs)                  # (B, T, nh+2nkv, hs)
        qk = qkv[:, :, : nh + nkv]                              # (B, T, nh+nkv, hs): q and k heads,
        qk.copy_(apply_rope(qk, cos, sin))                      # rotated together, in place
        q, kv = qkv.split_with_sizes([nh, 2 * nkv], dim=2)     # (B, T, nh, hs), (B, T, 2·nkv, hs)
        q = q.transpose(1, 2)                                   # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, at, kv)             # (B, nkv, S, hs) each
            if k.dtype != q.dtype:                              # a KV cache in another dtype
                k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            k, v = kv.transpose(1, 2).chunk(2, dim=1)           # (B, nkv, T, hs) each
        if need_weights:
            out, weights = explicit_attention(q, k, v, mask)
        elif at is not None and T == 1 and self.kernels is not None and self.kernels.native_attention \
                and native.decode_attention_fits(q, k, v):
            # one decode step: each row attends to its keys 0 … its position (model/native/attention.c)
            out, weights = native.bf16_decode_attention(q, k, v, at.lengths), None
        else:
            out, weights = fast_attention(q, k, v, mask), None
        out = out.transpose(1, 2).reshape(B * T, nh * hs)      # (B·T, C): heads side by side again
        if (o8 := self.w_o_int8) is not None:
            return int8_mm(out, self.w_o, o8, residual), weights
        return dense_mm(out, self.w_o, self.kernels, residual), weights   # residual + out @ w_o, one kernel
