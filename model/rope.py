"""Rotary position embeddings (RoPE), in the HF Llama "rotate half" layout.

Each head's vector is split into two halves (x1, x2); the pair (x1[i], x2[i]) is rotated by the
angle pos · θ^(-2i/hs). Rotating q and k this way makes q·k depend only on their distance:

    (x1, x2) → (x1·cos − x2·sin,  x2·cos + x1·sin)
             = x · (cos, cos)  +  (x2, x1) · (−sin, +sin)

(x2, x1) is x rolled by half its size, so with the sine table stored with its first half
negated ("signed sine") the rotation is one roll, one multiply and one multiply-add.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(max_positions: int, head_dim: int, theta: float = 10000.0,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The cos and signed-sin tables, each (max_positions, head_dim): (cos, cos) and (−sin, sin)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    cos, sin = angles.cos(), angles.sin()                    # (P, hs/2): the angle of pair i
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., hs) by tables cos / signed sin that broadcast against it (from `rope_tables`)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
