"""A static, pre-allocated key/value cache with batch slots.

Each layer keeps keys and values for `max_batch` independent sequences ("slots"), each up to
`max_context` positions. A continuous-batching engine prefills a prompt into one slot and then
decodes one token for many slots at once, each slot at its own position. Nothing is allocated
after construction.

Layout, per layer: (max_batch, 2, nkv, max_context, hs), keys at [:, 0] and values at [:, 1], so
one indexed write stores a step's keys and values together and one slice reads both back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

Slots = slice | Tensor  # a contiguous range of slots (a view) or a LongTensor of slot indices (B,)


@dataclass(frozen=True)
class CacheIndex:
    """Where one forward call writes and what it reads back: worked out once, used by every layer."""

    slots: Slots        # the B rows' slots
    rows: Tensor        # (B, 1) slot numbers, broadcast against positions
    positions: Tensor   # (B, T) positions the new keys/values go to
    kv_len: int         # every row reads back its slot's positions 0 … kv_len-1
    lengths: Tensor     # (B,) keys each row's last query sees: its last position + 1


class KVCache(nn.Module):
    def __init__(self, n_layers: int, max_batch: int, n_kv_heads: int, max_context: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.max_batch, self.max_context = max_batch, max_context
        shape = (n_layers, max_batch, 2, n_kv_heads, max_context, head_dim)
        # persistent=False: a cache is working memory, never part of a checkpoint.
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Slot numbers as a column, so a slice of slots becomes row indices without an arange.
        self.register_buffer("_slot_ids", torch.arange(max_batch, device=device)[:, None], persistent=False)
        self._layers = self.kv.unbind(0)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half() replace the buffer: re-take the views
        super()._apply(fn, recurse)
        self._layers = self.kv.unbind(0)
        return self

    def index(self, slots: Slots, positions: Tensor, kv_len: int) -> CacheIndex:
        rows = self._slot_ids[slots] if isinstance(slots, slice) else slots[:, None]
        return CacheIndex(slots, rows, positions, kv_len, positions[:, -1] + 1)

    def update(self, layer: int, at: CacheIndex, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Write kv (B, T, 2·nkv, hs), the new keys then values, at `at.positions` of `at.slots`
        (cast to the cache's dtype); return the slots' cached keys and values for positions
        0 … kv_len-1, each (B, nkv, S, hs), in the cache's dtype."""
        cache = self._layers[layer]                                  # (max_batch, 2, nkv, C, hs)
        B, T = at.positions.shape
        # Advanced indices on dims 0 and 3 put the broadcast (B, T) first: (B, T, 2, nkv, hs).
        cache[at.rows, :, :, at.positions] = kv.view(B, T, 2, -1, kv.shape[-1]).to(cache.dtype)
        # A slice of slots is a view (no copy); an index tensor gathers its rows.
        return cache[at.slots, :, :, : at.kv_len].unbind(1)          # 2 × (B, nkv, S, hs)
