"""Rotary position embeddings (RoPE), in the HF Llama "rotate half" layout.

Each head's vector is split into two halves (x1, x2); the pair (x1[i], x2[i]) is rotated by the
angle pos · θ^(-2i/hs). Rotating q and k this way makes q·k depend only on their distance.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(max_positions: int, head_dim: int, theta: float = 10000.0,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (max_positions, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (P, hs): both halves share the angle of pair i
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, nh, T, hs) by per-position tables cos/sin (B, 1, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
