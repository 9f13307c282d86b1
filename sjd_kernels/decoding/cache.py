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

from ..ops._common import (ANY_FLOAT_DTYPES, INT_DTYPES, SJDInputError, as_int, check_int, check_tensor,
                           check_tensor_size, host_checks)


class StaticKVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype=torch.float32, device="cpu"):
        layers, rows, kv_heads, max_len, head_dim = (
            check_int(name, v, 1) for name, v in (("layers", layers), ("rows", rows), ("kv_heads", kv_heads),
                                                  ("max_len", max_len), ("head_dim", head_dim)))
        if dtype not in ANY_FLOAT_DTYPES:
            raise SJDInputError(f"dtype must be a floating dtype (float16, bfloat16, float32, float64), got {dtype!r}")
        self.check_size(layers, rows, kv_heads, max_len, head_dim, dtype)
        self.kv = torch.zeros((layers, 2, rows, kv_heads, max_len, head_dim), dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int64, device=device)
        self.max_len = max_len
        self._slots = torch.arange(max_len, device=device)

    @staticmethod
    def check_size(layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype,
                   name: str = "max_len") -> None:
        """The cache's tensors must fit in torch's int64 byte count (else an SJDInputError naming ``name``)."""
        check_tensor_size(f"{name}={max_len}", (layers, 2, rows, kv_heads, max_len, head_dim), dtype)
        check_tensor_size(f"{name}={max_len}", (max_len,), torch.int64)

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
    def _layer(self, layer) -> int:
        i = as_int(layer)
        if i is None or not 0 <= i < self.kv.shape[0]:
            raise SJDInputError(f"layer must be an int in [0, {self.kv.shape[0]}) (the cache's layers), got {layer!r}")
        return i

    def check_slots(self, slots, T: int, name: str = "slots") -> None:
        """``slots`` must be integer ``[rows, T]`` on the cache's device, every value in ``[0, max_len)``
        (values checked on the host for CPU tensors only)."""
        check_tensor(name, slots, dtypes=INT_DTYPES, dim=2, shape=(self.rows, T), device=self.kv.device,
                     last_contiguous=False)
        if host_checks(slots) and slots.numel() and bool(((slots < 0) | (slots >= self.max_len)).any()):
            raise SJDInputError(f"{name} must lie in [0, max_len={self.max_len}) (the cache's capacity), got "
                                f"values in [{int(slots.min())}, {int(slots.max())}]")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store ``k, v [R, H_kv, T, D]`` at per-row ``slots [R, T]`` (everything is checked before
        anything is written)."""
        layer = self._layer(layer)
        _, _, R, H, _, D = self.kv.shape
        check_tensor("k", k, dtypes=ANY_FLOAT_DTYPES, dim=4, shape=(R, H, None, D), device=self.kv.device,
                     last_contiguous=False)
        T = k.shape[2]
        check_tensor("v", v, dtypes=ANY_FLOAT_DTYPES, dim=4, shape=(R, H, T, D), device=self.kv.device,
                     last_contiguous=False)
        self.check_slots(slots, T)
        idx = slots.reshape(R, 1, T, 1).expand(R, H, T, D)
        self.kv[layer, 0].scatter_(2, idx, k.to(self.kv.dtype))
        self.kv[layer, 1].scatter_(2, idx, v.to(self.kv.dtype))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self._layer(layer)
        return self.kv[layer, 0], self.kv[layer, 1]

    # -- the loop side
    def window(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write slots ``[R, T]`` = ``len + t`` and the chain mask ``[R, T, S]`` (prefix + window, causal).

        The caller sizes the cache so that ``len + T <= S`` for every row (checked by ``generate``
        before any work; here on the host for a CPU cache only, no synchronisation on a GPU).
        """
        T = check_int("T", T, 0)
        if host_checks(self.lengths) and bool((self.lengths > self.max_len - T).any()):
            raise SJDInputError(f"T={T} runs past the cache's max_len {self.max_len} for rows of lengths "
                                f"{self.lengths.tolist()} (the slots and the mask would be cut short)")
        return self._window(T)

    def _window(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.lengths.view(-1, 1) + torch.arange(T, device=self.lengths.device)
        mask = self._slots.view(1, 1, -1) <= slots.unsqueeze(-1)
        return slots, mask

    def window_mask(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``window(T)`` with write slots clamped to the last slot (the earlier name, kept for callers).

        Rows whose window would run past the cache write their overflow into the last slot,
        which is only safe when those rows' outputs are discarded.
        """
        slots, mask = self._window(check_int("T", T, 0))
        return slots.clamp(max=self.max_len - 1), mask

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Commit or rewind every row at once (no copy): integer ``lengths [rows]`` in ``[0, max_len]``
        (values checked on the host for CPU tensors only)."""
        check_tensor("lengths", lengths, dtypes=INT_DTYPES, dim=1, shape=(self.rows,), last_contiguous=False)
        if host_checks(lengths) and bool(((lengths < 0) | (lengths > self.max_len)).any()):
            raise SJDInputError(f"lengths must lie in [0, max_len={self.max_len}], got {lengths.tolist()}")
        self.lengths.copy_(lengths)

    def reset(self) -> None:
        self.lengths.zero_()
