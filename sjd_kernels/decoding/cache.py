"""A static KV cache with one length per model row.

``k, v: [layers, rows, H_kv, S, D]`` preallocated. A row's visible prefix is its length; a
window step writes its W+1 inputs at slots ``len .. len+W`` of each row and attends under a
mask built from the lengths, so requests with different acceptance share one batch with no
padding copies and no per-request Python loop. A chain step commits by advancing the length
(stale slots past it are masked and later overwritten): nothing is copied.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype=torch.float32, device="cpu"):
        shape = (layers, rows, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)
        self.max_len = max_len

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        """Store ``k, v [R, H_kv, T, D]`` at per-row ``slots [R, T]``."""
        R, H, T, D = k.shape
        idx = slots.view(R, 1, T, 1).expand(R, H, T, D)
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))

    def layer(self, layer: int):
        return self.k[layer], self.v[layer]

    def window_mask(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write slots ``[R, T]`` = ``len + t`` and the causal mask ``[R, T, S]`` over prefix + window."""
        t = torch.arange(T, device=self.lengths.device)
        slots = self.lengths.view(-1, 1) + t
        if int(slots.max()) >= self.max_len if slots.device.type == "cpu" else False:
            raise ValueError(f"KV cache of {self.max_len} slots is too small for a window reaching slot "
                             f"{int(slots.max())}")
        s = torch.arange(self.max_len, device=self.lengths.device)
        mask = s.view(1, 1, -1) <= slots.unsqueeze(-1)
        return slots.clamp(max=self.max_len - 1), mask

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
