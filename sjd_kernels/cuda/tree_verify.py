"""CUDA backend of ``tree_verify`` (kernels: ``csrc/tree_verify.cu``; spec: ``sjd_kernels.reference.tree``).

``tree_verify_cuda`` takes the reference's positional arguments, allocates the outputs and a small
scratch with torch on the logits' device and launches two kernels on the current stream: one block
per node row (non-finite target rows of every node, as the reference flags them), then one block
per request (structure and draft checks, the walk from the root with the target row in shared
memory, sibling laws, residuals and the final race). No host synchronisation and fixed output
shapes, so a call can be captured in a CUDA graph.

Of the rows kernel's optional paths (``sjd_kernels.cuda.jacobi_step.kernel_features``) the
top-k ones, "bracket_topk" and "hist_topk", apply here too (the target row is built by the same
code); "list_races" is ignored.

``logits`` / ``uncond`` may be views whose last dimension is contiguous. Rows with more lanes than
fit in shared memory (about 54k fp32 on H100: 227 KiB less the kernel's 13 KiB of static
buffers) go through a ``[B, V]`` float32 buffer instead.
"""
from __future__ import annotations

import torch

from .._ext import device_index, ext, kernel_device, stream_of
from ..ops._common import SJDInputError
from .jacobi_step import (_DTYPE_CODE, _FEATURE_BITS, _check, _check_forced, _feature_mask, _needs_rowbuf,
                          _prepare_logits)

# Tests set this to run the global-memory row path (used for large V) with a small V.
FORCE_GLOBAL_ROWS = False


def tree_verify_cuda(logits, uncond, cfg_scale, tokens, parent, depth, sib, q_slot, pos, seed, step, forced,
                     q_state, q_kind, status, temperature: float, top_k: int, top_p: float, max_depth: int):
    """Same arguments, results and status updates as ``reference.tree.tree_verify``.

    Returns ``num_accepted [B] i64``, ``path [B, max_depth+1] i64``, ``tokens [B, max_depth+1] i64``.
    """
    C = ext()
    dev = logits.device
    if not kernel_device(dev):
        raise SJDInputError(f"the CUDA backend needs CUDA tensors, got logits on {dev}")
    from ..ops.tree import check_verify_kernel_args
    B, N, V = check_verify_kernel_args(logits, uncond, cfg_scale, tokens, parent, depth, sib, q_slot, pos, seed, step,
                                       forced, q_state, q_kind, status, max_depth)
    L1 = int(max_depth) + 1
    logits, uncond = _prepare_logits(logits, uncond, cfg_scale)
    for name, t in (("tokens", tokens), ("parent", parent), ("depth", depth), ("sib", sib), ("q_slot", q_slot)):
        _check(f"tree.{name}", t, torch.int64, dev, B * N)
    for name, t in (("pos", pos), ("seed", seed), ("step", step)):
        _check(name, t, torch.int64, dev, B)
    _check("q_state", q_state, torch.float32, dev)
    if q_state.dim() != 3 or q_state.shape[0] != B or q_state.shape[2] != V:
        raise SJDInputError(f"q_state must be [B={B}, R, V={V}], got {list(q_state.shape)}")
    R = q_state.shape[1]
    _check("q_kind", q_kind, torch.int32, dev, B * R)
    _check("status", status, torch.int32, dev, 4)
    has_forced = _check_forced(forced, B, dev)

    index = device_index(dev)
    num_accepted = torch.empty((B,), dtype=torch.int64, device=dev)
    path = torch.empty((B, L1), dtype=torch.int64, device=dev)
    out = torch.empty((B, L1), dtype=torch.int64, device=dev)
    rowflag = torch.empty((B, N), dtype=torch.int32, device=dev)
    rowbuf = None
    if _needs_rowbuf(C.tree_verify_max_smem_lanes, V, index, FORCE_GLOBAL_ROWS):
        rowbuf = torch.empty((B, V), dtype=torch.float32, device=dev)
    stream = stream_of(dev)

    C.tree_verify(
        dtype=_DTYPE_CODE[logits.dtype],
        logits=logits.data_ptr(), logits_sb=logits.stride(0), logits_sn=logits.stride(1),
        uncond=uncond.data_ptr() if uncond is not None else 0,
        uncond_sb=uncond.stride(0) if uncond is not None else 0,
        uncond_sn=uncond.stride(1) if uncond is not None else 0,
        cfg_scale=cfg_scale.data_ptr() if uncond is not None else 0,
        tokens=tokens.data_ptr(), parent=parent.data_ptr(), depth=depth.data_ptr(), sib=sib.data_ptr(),
        q_slot=q_slot.data_ptr(), pos=pos.data_ptr(), seed=seed.data_ptr(), step=step.data_ptr(),
        forced=forced.data_ptr() if has_forced else 0, forced_len=forced.shape[1] if has_forced else 0,
        q_state=q_state.data_ptr(), q_kind=q_kind.data_ptr(), status=status.data_ptr(),
        B=B, N=N, V=V, R=R, max_depth=int(max_depth),
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
        num_accepted=num_accepted.data_ptr(), path=path.data_ptr(), out_tokens=out.data_ptr(),
        rowflag=rowflag.data_ptr(), rowbuf=rowbuf.data_ptr() if rowbuf is not None else 0, device=index,
        stream=stream, features=_feature_mask() & (_FEATURE_BITS["bracket_topk"] | _FEATURE_BITS["hist_topk"]))
    return num_accepted, path, out
