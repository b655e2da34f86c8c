"""A pre-allocated key/value cache with one row ("slot") per sequence being decoded.

Layout ``[layers, slots, kv_heads, max_len, head_dim]`` so that the first ``n`` slots of a
layer, cut at the longest live length, are a strided view that SDPA reads without a copy.
The fast engine keeps its live sequences in slots ``0..n-1``: a finished slot is refilled
with the next prompt, or else the last live slot is moved into it (:meth:`SlotCache.move`),
so a decode step never computes a finished sequence.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.max_len = max_len

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def save(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of a slot (a shared prompt prefix), copied out."""
        k, v = self.k[:, slot, :, :length], self.v[:, slot, :, :length]
        fmt = torch.contiguous_format  # the C decode kernel reads it as one block per layer
        return k.clone(memory_format=fmt), v.clone(memory_format=fmt)

    def load(self, slot: int, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        k, v = saved
        self.k[:, slot, :, : k.shape[2]] = k
        self.v[:, slot, :, : v.shape[2]] = v


def split_by_length(lengths: list[int], max_groups: int = 4) -> list[tuple[int, int]]:
    """Cut slots ``0..n-1`` into at most ``max_groups`` contiguous ranges minimising the
    keys attention reads, sum over ranges of (slots in it) x (its longest length).

    Exact dynamic programme, O(max_groups * n^2). Every live length grows by one per
    step, which adds n to every cut's cost, so the best cut only changes when slots are
    refilled or moved: callers recompute it then, not every step."""
    n = len(lengths)
    if n == 0:
        return []
    inf = float("inf")
    # best[g][j]: cost of slots 0..j-1 in g ranges; cut[g][j]: start of the last range.
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            longest = 0
            for i in range(j - 1, -1, -1):  # last range is i..j-1
                longest = max(longest, lengths[i])
                c = best[g - 1][i] + (j - i) * longest
                if c < best[g][j]:
                    best[g][j], cut[g][j] = c, i
    g = min(range(1, max_groups + 1), key=lambda k: best[k][n])
    ranges, j = [], n
    while j > 0:
        i = cut[g][j]
        ranges.append((i, j))
        j, g = i, g - 1
    return ranges[::-1]
