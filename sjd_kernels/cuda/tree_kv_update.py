"""CUDA backend of ``tree_kv_update`` (kernel: ``csrc/tree_kv_update.cu``; spec: ``sjd_kernels.reference.tree``).

``tree_kv_update_cuda`` (stacked cache ``[layers, 2, R, H_kv, S, D]``) and ``tree_kv_update_list_cuda``
(per-layer ``keys[l], values[l] [R, H_kv, S, D]`` and a device pointer table) take the reference's
arguments and launch one kernel on the current stream that moves the accepted path's K/V in place
for every layer, K and V, row and head. No host synchronisation: a malformed row is left untouched
and sets bit 4 of ``status[0]`` on the device. Accesses are 16 bytes wide when D x element size,
every stride and every base address allow it (else 8, 4 or 2 bytes).

The list layout reads its base addresses from ``ptr_table`` (``ops.tree.kv_pointer_table``); without
one, a table is built here, which costs a host-to-device copy per call and is not CUDA-graph
capturable: build it once per cache allocation and pass it.
"""
from __future__ import annotations

import torch

from .._ext import device_index, ext, kernel_device, stream_of
from ..ops._common import SJDInputError

_ELEM = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _align(addrs) -> int:
    """Largest power of two <= 16 dividing every address."""
    a = 16
    while a > 1 and any(x % a for x in addrs):
        a //= 2
    return a


def _check_index(path: torch.Tensor, cache_len: torch.Tensor, status: torch.Tensor, dev: torch.device, R: int):
    from ..ops.tree import check_kv_index
    if not kernel_device(dev):
        raise SJDInputError(f"the CUDA backend needs CUDA tensors, got the cache on {dev}")
    check_kv_index(path, cache_len, status, dev, R)


def tree_kv_update_cuda(kv: torch.Tensor, path: torch.Tensor, cache_len: torch.Tensor, status: torch.Tensor) -> None:
    """``reference.tree.tree_kv_update`` on a stacked cache ``kv [layers, 2, R, H_kv, S, D]`` (last dim contiguous)."""
    from ..ops.tree import check_kv_stacked
    C = ext()
    L, _, R, H, S, D = check_kv_stacked(kv)
    _check_index(path, cache_len, status, kv.device, R)
    if kv.numel() == 0 or R == 0:
        from ..reference.tree import tree_kv_update
        return tree_kv_update(kv, path, cache_len, status)
    if D > 1 and kv.stride(5) != 1:
        raise SJDInputError(f"the cache's last dimension must be contiguous, got strides {kv.stride()}")
    C.tree_kv_update(cache=kv.data_ptr(), ptr_table=0, ptr_align=0, stride_layer=kv.stride(0),
                     stride_kv=kv.stride(1), stride_row=kv.stride(2), stride_head=kv.stride(3),
                     stride_slot=kv.stride(4), path=path.data_ptr(), cache_len=cache_len.data_ptr(),
                     status=status.data_ptr(), layers=L, R=R, H=H, P=path.shape[1], S=S, D=D,
                     elem_size=_ELEM[kv.dtype], device=device_index(kv.device),
                     stream=stream_of(kv.device))


def tree_kv_update_list_cuda(keys, values, path: torch.Tensor, cache_len: torch.Tensor, ptr_table,
                             status: torch.Tensor) -> None:
    """``reference.tree.tree_kv_update_list`` for per-layer ``keys[l], values[l] [R, H_kv, S, D]`` (common
    dtype, shape and strides). ``ptr_table``: ``ops.tree.kv_pointer_table(keys, values)`` (int64
    ``[2 * layers]``: ``k0, v0, k1, v1, ...`` on the device), or None to build one here."""
    from ..ops.tree import check_kv_list
    C = ext()
    keys, values = check_kv_list(keys, values)
    k0 = keys[0]
    R, H, S, D = k0.shape
    dev = k0.device
    _check_index(path, cache_len, status, dev, R)
    tensors = keys + values
    if k0.numel() == 0 or R == 0:
        from ..reference.tree import tree_kv_update_list
        return tree_kv_update_list(keys, values, path, cache_len, status)
    if D > 1 and k0.stride(3) != 1:
        raise SJDInputError(f"the caches' last dimension must be contiguous, got strides {k0.stride()}")
    L = len(keys)
    if ptr_table is None:
        ptr_table = torch.tensor([t.data_ptr() for kv in zip(keys, values) for t in kv], dtype=torch.int64).to(dev)
    if ptr_table.dtype != torch.int64 or ptr_table.numel() != 2 * L or ptr_table.device != dev \
            or not ptr_table.is_contiguous():
        raise SJDInputError(f"ptr_table must be a contiguous [2 * layers = {2 * L}] int64 tensor on {dev}, got "
                            f"{list(ptr_table.shape)} {ptr_table.dtype} on {ptr_table.device}")
    C.tree_kv_update(cache=0, ptr_table=ptr_table.data_ptr(), ptr_align=_align([t.data_ptr() for t in tensors]),
                     stride_layer=0, stride_kv=0, stride_row=k0.stride(0), stride_head=k0.stride(1),
                     stride_slot=k0.stride(2), path=path.data_ptr(), cache_len=cache_len.data_ptr(),
                     status=status.data_ptr(), layers=L, R=R, H=H, P=path.shape[1], S=S, D=D,
                     elem_size=_ELEM[k0.dtype], device=device_index(dev), stream=stream_of(dev))
