"""A static, pre-allocated key/value cache with batch slots.

Each layer keeps keys and values for `max_batch` independent sequences ("slots"), each up to
`max_context` positions: (max_batch, n_kv_heads, max_context, head_dim). A continuous-batching
engine prefills a prompt into one slot and then decodes one token for many slots at once, each
slot at its own position. Nothing is allocated after construction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

Slots = slice | Tensor  # a contiguous range of slots (a view) or a LongTensor of slot indices (B,)


class KVCache(nn.Module):
    def __init__(self, n_layers: int, max_batch: int, n_kv_heads: int, max_context: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.max_batch, self.max_context = max_batch, max_context
        shape = (n_layers, max_batch, n_kv_heads, max_context, head_dim)
        # persistent=False: a cache is working memory, never part of a checkpoint.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Slot numbers as a column, so a slice of slots becomes row indices without an arange.
        self.register_buffer("_slot_ids", torch.arange(max_batch, device=device)[:, None], persistent=False)

    def update(self, layer: int, slots: Slots, positions: Tensor, k: Tensor, v: Tensor,
               kv_len: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, T, nkv, hs) at `positions` (B, T) of `slots`; return the slots' cached
        keys and values for positions 0 … kv_len-1, each (B, nkv, kv_len, hs)."""
        k_layer, v_layer = self.k[layer], self.v[layer]             # (max_batch, nkv, C, hs)
        rows = self._slot_ids[slots] if isinstance(slots, slice) else slots[:, None]  # (B, 1)
        # Advanced indices on dims 0 and 2 put the broadcast (B, T) first: (B, T, nkv, hs).
        k_layer[rows, :, positions] = k
        v_layer[rows, :, positions] = v
        # A slice of slots is a view (no copy); an index tensor gathers its rows.
        return k_layer[slots, :, :kv_len], v_layer[slots, :, :kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` to slot `dst` (all layers)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
