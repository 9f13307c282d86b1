"""CUDA backend of ``sjd2_prepare`` (kernel: ``csrc/sjd2_prepare.cu``; spec: ``sjd_kernels.reference.sjd2_prepare``).

``sjd2_prepare_cuda`` takes the reference's positional arguments (validated by the op; ``status`` gets
bit 32 on a clamped id or level), allocates the output with torch on the table's device and launches
one block per input slot on the current stream. No host synchronisation and a fixed output shape,
so a call can be captured in a CUDA graph.
Outputs that draw no position noise are bit-identical to the reference; the noise's ``logf`` and
``cosf`` may differ from PyTorch's by an ulp or so.
"""
from __future__ import annotations

import torch

from .._ext import device_index, ext, kernel_device, stream_of
from ..ops._common import SJDInputError
from .jacobi_step import _DTYPE_CODE


def sjd2_prepare_cuda(embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed,
                      commit_end, fresh_start, row_end, latent, level, status):
    """Same arguments, result and ring updates as ``reference.sjd2_prepare.sjd2_prepare``."""
    from ..ops.sjd2_prepare import check_kernel_args
    C = ext()
    dev = embed_weight.device
    if not kernel_device(dev):
        raise SJDInputError(f"the CUDA backend needs CUDA tensors, got embed_weight on {dev}")
    if embed_weight.dtype not in _DTYPE_CODE:
        raise SJDInputError(f"the CUDA kernel takes float32, float16 or bfloat16 embed_weight, got {embed_weight.dtype}")
    Vt, d, B, N, _ = check_kernel_args(embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed,
                                       commit_end, fresh_start, row_end, latent, level, status)
    out = torch.empty((B, N, d), dtype=embed_weight.dtype, device=dev)
    if B * N == 0:
        return out
    C.sjd2_prepare(dtype=_DTYPE_CODE[embed_weight.dtype], embed=embed_weight.data_ptr(), mean=mean.data_ptr(),
                   std=std.data_ptr(), level_table=level_table.data_ptr(), alpha=alpha.data_ptr(),
                   sigma=sigma.data_ptr(), tokens=tokens.data_ptr(), positions=positions.data_ptr(),
                   seed=seed.data_ptr(), commit_end=commit_end.data_ptr(), fresh_start=fresh_start.data_ptr(),
                   row_end=row_end.data_ptr(), latent=latent.data_ptr(), level=level.data_ptr(),
                   out=out.data_ptr(), status=status.data_ptr(), B=B, N=N, R=latent.shape[1], Vt=Vt, d=d,
                   K=alpha.shape[0] - 1,
                   device=device_index(dev), stream=stream_of(dev))
    return out
