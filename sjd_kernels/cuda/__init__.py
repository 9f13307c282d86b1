"""CUDA backend: Python wrappers over the compiled, torch-free kernels in ``sjd_kernels._C``.

One module per op (``jacobi_step``, ``tree_verify``, ``tree_kv_update``). Importing this package
never loads the extension; the wrappers call ``sjd_kernels._ext.ext()``, which raises a RuntimeError saying why when it is
missing. ``philox_words`` exposes the CUDA generator for bit-for-bit tests against ``sjd_kernels.rng``.
"""
from __future__ import annotations

import torch


def philox_words(seed: int, position: int, step: int, stream: int, n_lanes: int, device="cuda") -> torch.Tensor:
    """Words of lanes ``0..n_lanes-1`` from the CUDA Philox, as int64 in [0, 2**32) on ``device``.

    Equals ``sjd_kernels.rng.lane_words(seed, position, step, stream, n_lanes)`` bit for bit.
    """
    from .._ext import device_index, ext, kernel_device, stream_of
    C = ext()
    dev = torch.device(device)
    if not kernel_device(dev):
        raise ValueError(f"philox_words needs a CUDA device, got {dev}")
    out = torch.empty((n_lanes,), dtype=torch.int32, device=dev)
    C.philox_fill(out.data_ptr(), n_lanes, int(seed), int(position), int(step), int(stream),
                  stream_of(dev), device_index(dev))
    return out.to(torch.int64) & 0xFFFFFFFF
