"""CUDA backend of ``verify_chain`` (kernel: ``csrc/verify_chain.cu``; spec: ``sjd_kernels.reference.verify_chain``).

``verify_chain_cuda`` takes the reference's positional arguments, allocates the outputs with torch on
the laws' device and launches one block per request on the current stream: the window's gathered
entries and acceptance draws, then one pass over rows ``m`` of both laws for the residual and target
races. No host synchronisation and fixed output shapes, so a call can be captured in a CUDA graph.
The laws may be views whose last dimension is contiguous; when their dtypes differ both are read as
float32 (exact for every input dtype).
"""
from __future__ import annotations

import contextlib

import torch

from .._ext import device_index, ext, kernel_device, stream_of
from ..ops._common import SJDInputError, lane_contiguous
from .jacobi_step import _DTYPE_CODE, _check

# Threads per block (0: the kernel's choice, about 16 lanes of the row per thread, 64 to 1024);
# set with ``block_threads`` (the bench's ``chain_cuda_t512`` times 512 beside the default).
THREADS = 0


@contextlib.contextmanager
def block_threads(n: int):
    """Launch ``verify_chain``'s kernel with ``n`` threads per block inside the block (0 = default)."""
    global THREADS
    old, THREADS = THREADS, int(n)
    try:
        yield
    finally:
        THREADS = old


def verify_chain_cuda(target, draft, ids, win_len, pos, seed, step, status):
    """Same arguments, results and status updates as ``reference.verify_chain.verify_chain``."""
    from ..ops.verify_chain import check_args
    C = ext()
    dev = target.device
    if not kernel_device(dev):
        raise SJDInputError(f"the CUDA backend needs CUDA tensors, got target_probs on {dev}")
    B, W, V = check_args(target, draft, ids, win_len, pos, seed, step, status)
    W1 = W + 1
    if draft.dtype != target.dtype:
        target, draft = target.float(), draft.float()
    if target.dtype not in _DTYPE_CODE:
        raise SJDInputError(f"target_probs must be float32, float16 or bfloat16, got {target.dtype}")
    target, draft = lane_contiguous(target), lane_contiguous(draft)
    if W > 0:
        _check("draft_ids", ids, torch.int64, dev, B * W)
    for name, t in (("win_len", win_len), ("pos", pos), ("seed", seed), ("step", step)):
        _check(name, t, torch.int64, dev, B)
    _check("status", status, torch.int32, dev, 4)
    num = torch.empty((B,), dtype=torch.int64, device=dev)
    tokens = torch.empty((B, W1), dtype=torch.int64, device=dev)
    C.verify_chain(dtype=_DTYPE_CODE[target.dtype], target=target.data_ptr(), target_sb=target.stride(0),
                   target_sj=target.stride(1), draft=draft.data_ptr() if W > 0 else 0,
                   draft_sb=draft.stride(0) if W > 0 else 0, draft_sj=draft.stride(1) if W > 0 else 0,
                   ids=ids.data_ptr() if W > 0 else 0, win_len=win_len.data_ptr(), pos=pos.data_ptr(),
                   seed=seed.data_ptr(), step=step.data_ptr(), status=status.data_ptr(), B=B, W=W, V=V,
                   num_accepted=num.data_ptr(), tokens=tokens.data_ptr(), device=device_index(dev),
                   stream=stream_of(dev), threads=THREADS)
    return num, tokens
