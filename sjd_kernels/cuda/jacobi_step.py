"""CUDA backend of ``jacobi_step`` (kernels: ``csrc/jacobi_step.cu``; spec: ``sjd_kernels.reference.jacobi_step``).

``jacobi_step_cuda`` takes the reference's positional arguments, allocates the outputs and a small
scratch with torch on the logits' device and launches two kernels on the current stream:
one block per used target row ``(j, b)`` (target law in shared memory, every race of the row in one
pass over the vocabulary, state write), then one block per request (first rejection, tokens, next
drafts, tail initialisation). No host synchronisation and fixed output shapes, so a call can be
captured in a CUDA graph. The state of a request that reports an error is undefined afterwards
(rows are written before the request's other rows are known to be fine); re-initialise it.

``logits`` / ``uncond`` may be views whose last dimension is contiguous (``full[..., 4:8196]``): the
row strides are passed and unaligned rows are read with a scalar head. Rows with more lanes than
fit in shared memory (about 54k fp32 on H100: 227 KiB less the kernel's 16 KiB of static buffers)
go through a ``[B, W+1, V]`` float32 buffer instead.
"""
from __future__ import annotations

import torch

from .._ext import device_index, ext, kernel_device, stream_of
from ..ops._common import SJDInputError, lane_contiguous

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Tests set this to run the global-memory row path (used for large V) with a small V.
FORCE_GLOBAL_ROWS = False

# Optional code paths of the rows kernel, each with the same results as the default one; they are
# timed against it (``bench ops`` backends cuda_bracket, cuda_lists and cuda_hist, benchmarks/NOTES.md):
#   "bracket_topk": the top-k threshold by value-spaced pivots and an exact rank among at most 128
#       candidates (about 4 passes over a smooth row: 3 rounds and a collecting pass) instead of the
#       7-pivot search over the 32-bit key range (11-12 passes); csrc/target.cuh, host model
#       sjd_kernels/bench/topk_model.py. tree_verify's CUDA kernel takes it too.
#   "list_races": the exponential races over a list of the lanes with P > 0 (one Philox call per
#       listed lane) instead of every group of 4 lanes of the row; csrc/jacobi_step.cu.
#   "hist_topk": the top-k threshold from one histogram pass over the row (2048 bins spaced in
#       value) and a list of the lanes in the bins at or above the k-th largest value's, built by a
#       second pass; the exact threshold is ranked among the lanes of that bin, and the softmax,
#       top-p, VP normaliser, list races and state writes run over the list (sums in list order: the
#       same law, probabilities may differ in the last bit from the default path's). Rows in shared memory with top-k, V <= 65536; other calls,
#       and rows whose list would exceed 2048 lanes, take the default path. csrc/target.cuh.
# Read at each call, so a CUDA graph keeps the paths it was captured with; ``kernel_features`` sets
# them for a block of code.
FEATURES: frozenset = frozenset()
_FEATURE_BITS = {"bracket_topk": 1, "list_races": 2, "hist_topk": 4}


class kernel_features:
    """Context manager: ``with kernel_features("bracket_topk", "list_races"): ...`` runs the CUDA
    jacobi_step (and tree_verify) calls inside with exactly these optional paths (none: the
    default kernels)."""

    def __init__(self, *names: str):
        bad = [n for n in names if n not in _FEATURE_BITS]
        if bad:
            raise ValueError(f"unknown kernel feature(s) {bad}; known: {sorted(_FEATURE_BITS)}")
        self.names = frozenset(names)

    def __enter__(self):
        global FEATURES
        self.old, FEATURES = FEATURES, self.names
        return self

    def __exit__(self, *exc):
        global FEATURES
        FEATURES = self.old
        return False


def _feature_mask() -> int:
    return sum(_FEATURE_BITS[n] for n in FEATURES)


_smem_lanes: dict[tuple[str, int], int] = {}


def _needs_rowbuf(query, V: int, index: int, force: bool) -> bool:
    """Shared by the CUDA wrappers: True when a float32 row of V lanes does not fit in shared memory
    on device ``index`` (``query``: the extension's ``*_max_smem_lanes``, asked once per device)
    or when the tests force the global-memory row path."""
    key = (getattr(query, "__module__", ""), query.__name__, index)
    if key not in _smem_lanes:
        _smem_lanes[key] = int(query(index))
    return force or V > _smem_lanes[key]


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, dev: torch.device, numel: int | None = None,
           contiguous: bool = True) -> None:
    """Guard the raw-pointer boundary (the op's validate() has already checked shapes and names)."""
    if t.device != dev or t.dtype != dtype or (contiguous and not t.is_contiguous()):
        raise SJDInputError(f"{name} must be a contiguous {str(dtype).replace('torch.', '')} tensor on {dev}, "
                            f"got {t.device} {str(t.dtype).replace('torch.', '')} strides {t.stride()}")
    if numel is not None and t.numel() != numel:
        raise SJDInputError(f"{name} must have {numel} elements, got shape {list(t.shape)}")


def _check_forced(forced, B: int, dev: torch.device) -> bool:
    """Shared by the CUDA wrappers: True when ``forced [B, L]`` is given (and valid), False for None/empty."""
    if forced is None or forced.numel() == 0:
        return False
    _check("forced", forced, torch.int64, dev)
    if forced.dim() != 2 or forced.shape[0] != B:
        raise SJDInputError(f"forced must be [B={B}, L], got {list(forced.shape)}")
    return True


def _prepare_logits(logits: torch.Tensor, uncond, cfg_scale):
    """Shared by the CUDA wrappers: one kernel dtype for logits and uncond (float32 when they
    differ; exact for both), a unit vocabulary stride, and the CFG arguments checked."""
    dev, B = logits.device, logits.shape[0]
    if uncond is not None and uncond.dtype != logits.dtype:
        logits, uncond = logits.float(), uncond.float()
    if logits.dtype not in _DTYPE_CODE:
        raise SJDInputError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    logits = lane_contiguous(logits)
    if uncond is not None:
        if uncond.shape != logits.shape or uncond.device != dev:
            raise SJDInputError(f"uncond must match logits {list(logits.shape)} on {dev}, got {list(uncond.shape)} "
                                f"on {uncond.device}")
        uncond = lane_contiguous(uncond)
        if cfg_scale is None:
            raise SJDInputError("cfg_scale is required with uncond")
        _check("cfg_scale", cfg_scale, torch.float32, dev, B)
    return logits, uncond


def jacobi_step_cuda(logits, uncond, cfg_scale, drafts, win_len, pos, seed, step, forced,
                     q_state, q_kind, p_prev, status,
                     temperature: float, top_k: int, top_p: float, mode: int,
                     beta: float, vp_form: int, vp_eps: float, tail_init: int, q_idx=None):
    """Same arguments, results and in-place updates as ``reference.jacobi_step.jacobi_step``.

    Returns ``num_accepted [B] i64``, ``tokens [B, W+1] i64``, ``next_drafts [B, W] i64``.
    """
    C = ext()
    dev = logits.device
    if not kernel_device(dev):
        raise SJDInputError(f"the CUDA backend needs CUDA tensors, got logits on {dev}")
    from ..ops.jacobi_step import check_kernel_args
    B, W, V = check_kernel_args(logits, uncond, cfg_scale, drafts, win_len, pos, seed, step, forced, q_state, q_kind,
                                p_prev, status, q_idx)
    W1 = W + 1
    sparse = q_idx is not None and q_idx.numel() > 0
    R = q_state.shape[1] if q_state.dim() == 3 else -1
    logits, uncond = _prepare_logits(logits, uncond, cfg_scale)
    if W > 0:
        _check("drafts", drafts, torch.int64, dev, B * W)
    for name, t in (("win_len", win_len), ("pos", pos), ("seed", seed), ("step", step)):
        _check(name, t, torch.int64, dev, B)
    _check("q_state", q_state, torch.float32, dev)
    _check("q_kind", q_kind, torch.int32, dev, B * R)
    width = q_idx.shape[2] if sparse and q_idx.dim() == 3 else V
    if q_state.shape[0] != B or q_state.shape[2] != width or R < W1:
        raise SJDInputError(f"q_state must be [B={B}, R>={W1}, {'C' if sparse else 'V'}={width}], "
                            f"got {list(q_state.shape)}")
    if sparse:
        _check("q_idx", q_idx, torch.int32, dev, q_state.numel())
        if q_idx.dim() != 3 or q_idx.shape[:2] != q_state.shape[:2]:
            raise SJDInputError(f"q_idx must be [B, R, C] like q_state, got {list(q_idx.shape)}")
    has_prev = p_prev is not None and p_prev.numel() > 0
    if has_prev:
        _check("p_prev", p_prev, torch.float32, dev, q_state.numel())
    _check("status", status, torch.int32, dev, 4)
    has_forced = _check_forced(forced, B, dev)

    index = device_index(dev)
    num_accepted = torch.empty((B,), dtype=torch.int64, device=dev)
    tokens = torch.empty((B, W1), dtype=torch.int64, device=dev)
    next_drafts = torch.empty((B, W), dtype=torch.int64, device=dev)
    scratch = torch.empty((B, W1, 4), dtype=torch.int64, device=dev)
    rowbuf = None
    if _needs_rowbuf(C.jacobi_step_max_smem_lanes, V, index, FORCE_GLOBAL_ROWS):
        rowbuf = torch.empty((B, W1, V), dtype=torch.float32, device=dev)
    stream = stream_of(dev)

    C.jacobi_step(
        dtype=_DTYPE_CODE[logits.dtype],
        logits=logits.data_ptr(), logits_sb=logits.stride(0), logits_sj=logits.stride(1),
        uncond=uncond.data_ptr() if uncond is not None else 0,
        uncond_sb=uncond.stride(0) if uncond is not None else 0,
        uncond_sj=uncond.stride(1) if uncond is not None else 0,
        cfg_scale=cfg_scale.data_ptr() if uncond is not None else 0,
        drafts=drafts.data_ptr() if W > 0 else 0, win_len=win_len.data_ptr(), pos=pos.data_ptr(),
        seed=seed.data_ptr(), step=step.data_ptr(),
        forced=forced.data_ptr() if has_forced else 0, forced_len=forced.shape[1] if has_forced else 0,
        q_state=q_state.data_ptr(), q_kind=q_kind.data_ptr(), p_prev=p_prev.data_ptr() if has_prev else 0,
        status=status.data_ptr(), B=B, W=W, V=V, R=R,
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), mode=int(mode), beta=float(beta),
        vp_form=int(vp_form), vp_eps=float(vp_eps), tail_init=int(tail_init),
        num_accepted=num_accepted.data_ptr(), tokens=tokens.data_ptr(),
        next_drafts=next_drafts.data_ptr() if W > 0 else 0, scratch=scratch.data_ptr(),
        rowbuf=rowbuf.data_ptr() if rowbuf is not None else 0, device=index, stream=stream,
        q_idx=q_idx.data_ptr() if sparse else 0, C=width if sparse else 0,
        features=_feature_mask())
    return num_accepted, tokens, next_drafts
