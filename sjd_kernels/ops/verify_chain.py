"""``verify_chain`` op: verification alone, for drafts whose laws the caller gives.

Declared once as ``sjd::verify_chain`` (the PyTorch reference as the implementation for every
device, the Triton and CUDA kernels selected by ``backend``, a fake kernel for ``torch.compile``). It
mutates only ``status``, has fixed output shapes and no host synchronisation on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import verify_chain as ref
from ..reference.jacobi_step import ERR_POS, ERR_WIN_LEN
from ._common import (BACKEND_CODE, CODE_BACKEND, FLOAT_DTYPES, check_tensor, check_window_rows, guard_pos,
                      guard_win_len, mark_request_errors, new_status, resolve_backend, triton_device)

I64 = (torch.int64,)


@torch.library.custom_op("sjd::verify_chain", mutates_args=("status",))
def _verify_chain_op(target: torch.Tensor, draft: torch.Tensor, ids: torch.Tensor, win_len: torch.Tensor,
                     pos: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, status: torch.Tensor,
                     backend: int) -> tuple[torch.Tensor, torch.Tensor]:
    args = (target, draft, ids, win_len, pos, seed, step, status)
    name = CODE_BACKEND[backend]
    if name == "triton":
        from ..triton.verify_chain import verify_chain_triton
        with triton_device(args[0]):
            return verify_chain_triton(*args)
    if name == "cuda":
        from ..cuda.verify_chain import verify_chain_cuda
        return verify_chain_cuda(*args)
    return ref.verify_chain(*args)


def check_args(target, draft, ids, win_len, pos, seed, step, status) -> tuple[int, int, int]:
    """Shapes, dtypes and devices of the op's tensors: ``verify_chain`` checks them, and so do the
    kernel wrappers before they hand pointers to a kernel (``torch.ops.sjd.verify_chain`` and the
    wrappers called directly skip the public function). Returns ``(B, W, V)``; no value is read."""
    B, W1, V = check_window_rows("target_probs", target)
    W = W1 - 1
    dev = target.device
    check_tensor("draft_probs", draft, dtypes=FLOAT_DTYPES, dim=3, shape=(B, W, V), device=dev)
    check_tensor("draft_ids", ids, dtypes=I64, dim=2, shape=(B, W), device=dev, contiguous=True)
    for name, t in (("seed", seed), ("step", step), ("pos", pos), ("win_len", win_len)):
        check_tensor(name, t, dtypes=I64, dim=1, shape=(B,), device=dev, contiguous=True)
    check_tensor("status", status, dtypes=(torch.int32,), dim=1, shape=(4,), device=dev, contiguous=True)
    return B, W, V


@_verify_chain_op.register_fake
def _(target, draft, ids, win_len, pos, seed, step, status, backend):
    B, W1, _ = target.shape
    return target.new_empty((B,), dtype=torch.int64), target.new_empty((B, W1), dtype=torch.int64)


@dataclass
class VerifyOutput:
    num_accepted: torch.Tensor   # [B] i64, drafts accepted (m); -1 for a request in error
    tokens: torch.Tensor         # [B, W+1] i64, the m accepted drafts and one sampled token, then -1
    status: torch.Tensor         # [4] i32 device status (check with sjd_kernels.check_status)


def verify_chain(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_ids: torch.Tensor, *,
                 seed: torch.Tensor, step: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                 win_len: torch.Tensor | None = None, status: torch.Tensor | None = None,
                 backend: str = "auto") -> VerifyOutput:
    """Verify a ragged batch of draft windows against given target laws (SPEC section 3).

    ``target_probs [B, W+1, V]`` (row W is the bonus row) and ``draft_probs [B, W, V]``: float
    probability rows (fp32/bf16/fp16, contiguous last dimension), used as given, not renormalised:
    the committed tokens follow the target law when every row sums to 1 and draft j was drawn
    from ``draft_probs[:, j]`` (``draft_ids [B, W]`` i64). ``seed [B]`` i64 keys the randomness with ``step [B]``
    (default 0) and the absolute position ``pos + j`` (``pos [B]`` in ``[0, 2^62]``, default 0), as in
    ``jacobi_step``: for the same laws both ops commit the same tokens. ``win_len [B]`` (default
    W): rows in use per request. ``status`` (default: a new one, returned) collects device errors:
    ``sjd_kernels.check_status(out.status)`` raises them.

    Backends as for ``jacobi_step``: ``torch`` (the reference, any device), ``triton``, ``cuda``
    (the extension's kernel, ``csrc/verify_chain.cu``); ``auto`` picks cuda, then triton, for CUDA
    tensors and torch otherwise.
    """
    B, W1, V = check_window_rows("target_probs", target_probs)
    W = W1 - 1
    dev = target_probs.device
    if step is None or pos is None:
        zeros = torch.zeros(B, dtype=torch.int64, device=dev)
        step = zeros if step is None else step
        pos = zeros if pos is None else pos
    win_len = torch.full((B,), W, dtype=torch.int64, device=dev) if win_len is None else win_len
    status = new_status(dev) if status is None else status
    check_args(target_probs, draft_probs, draft_ids, win_len, pos, seed, step, status)
    be = resolve_backend(backend, dev)
    # no host sync on a GPU: out-of-range requests run with win_len 0 (and pos 0), return -1 and set
    # status bit 8 (win_len) or 16 (pos); on the CPU they are SJDInputErrors
    win_len, win_bad = guard_win_len(win_len, W)
    pos, pos_bad = guard_pos(pos)
    if pos_bad is not None:
        win_len = torch.where(pos_bad, torch.zeros_like(win_len), win_len)
    out = torch.ops.sjd.verify_chain(target_probs, draft_probs, draft_ids, win_len, pos, seed, step, status,
                                     BACKEND_CODE[be])
    return VerifyOutput(*mark_request_errors(status, out, (win_bad, ERR_WIN_LEN), (pos_bad, ERR_POS)), status)
