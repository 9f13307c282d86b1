"""A static KV cache with one length per model row.

``kv [layers, 2, rows, H_kv, S, D]`` is allocated once (``k = kv[:, 0]``, ``v = kv[:, 1]``). A
row's valid prefix is ``kv[..., :lengths[row], :]``; slot ``s`` holds model position ``s``.

- A window step writes its T inputs at slots ``len .. len+T-1`` of each row (one scatter per
  layer with per-row slots) and attends under a mask built from the lengths, so requests with
  different acceptance, and CFG rows with prefixes of different lengths, share one batch with
  no padding copies and no per-request Python loop.
- A chain step commits by setting the lengths (``rewind``/``advance``): slots past a row's
  length are stale, masked, and overwritten by the next window. Nothing is copied.

The model reaches it through ``write(layer, k, v, slots)`` and ``layer(layer)`` (see
``sjd_kernels.models.protocol``).
"""
from __future__ import annotations

import torch

from ..ops import SJDInputError


class StaticKVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype=torch.float32, device="cpu"):
        if min(layers, rows, kv_heads, max_len, head_dim) < 1:
            raise SJDInputError(f"cache dimensions must be positive, got layers {layers}, rows {rows}, "
                                f"kv_heads {kv_heads}, max_len {max_len}, head_dim {head_dim}")
        self.kv = torch.zeros((layers, 2, rows, kv_heads, max_len, head_dim), dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)
        self.max_len = max_len
        self._slots = torch.arange(max_len, device=device)

    # -- geometry
    @property
    def k(self) -> torch.Tensor:
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, 1]

    @property
    def rows(self) -> int:
        return self.kv.shape[2]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # -- the model side
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store ``k, v [R, H_kv, T, D]`` at per-row ``slots [R, T]``."""
        R, H, T, D = k.shape
        idx = slots.view(R, 1, T, 1).expand(R, H, T, D)
        self.kv[layer, 0].scatter_(2, idx, k.to(self.kv.dtype))
        self.kv[layer, 1].scatter_(2, idx, v.to(self.kv.dtype))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer, 0], self.kv[layer, 1]

    # -- the loop side
    def window(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write slots ``[R, T]`` = ``len + t`` and the chain mask ``[R, T, S]`` (prefix + window, causal).

        The caller sizes the cache so that ``len + T <= S`` for every row (checked by ``generate``
        before any work; no host synchronisation here).
        """
        slots = self.lengths.view(-1, 1) + torch.arange(T, device=self.lengths.device)
        mask = self._slots.view(1, 1, -1) <= slots.unsqueeze(-1)
        return slots, mask

    def window_mask(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``window(T)`` with write slots clamped to the last slot (the earlier name, kept for callers).

        Rows whose window would run past the cache write their overflow into the last slot,
        which is only safe when those rows' outputs are discarded.
        """
        slots, mask = self.window(T)
        return slots.clamp(max=self.max_len - 1), mask

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Commit or rewind every row at once (no copy)."""
        self.lengths.copy_(lengths)

    def reset(self) -> None:
        self.lengths.zero_()
