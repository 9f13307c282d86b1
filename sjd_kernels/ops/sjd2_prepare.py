"""``sjd2_prepare`` op: validation, ``torch.library`` registration and backend dispatch.

Declared once as ``sjd::sjd2_prepare`` (mutates the latent and level rings); the PyTorch
reference serves every device, the Triton and CUDA kernels are chosen by ``backend``. See
``sjd_kernels.reference.sjd2_prepare`` for the contract.
"""
from __future__ import annotations

import torch

from ..reference import sjd2_prepare as ref
from ._common import (BACKEND_CODE, CODE_BACKEND, FLOAT_DTYPES, LANES_MAX, ROWS_MAX, SJDInputError, check_sizes,
                      check_tensor, host_checks, may_sync, new_status, resolve_backend, triton_available,
                      triton_device)

I64 = (torch.int64,)
F32 = (torch.float32,)


@torch.library.custom_op("sjd::sjd2_prepare", mutates_args=("latent", "level", "status"))
def _sjd2_prepare_op(embed_weight: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, level_table: torch.Tensor,
                     alpha: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                     seed: torch.Tensor, commit_end: torch.Tensor, fresh_start: torch.Tensor, row_end: torch.Tensor,
                     latent: torch.Tensor, level: torch.Tensor, status: torch.Tensor, backend: int) -> torch.Tensor:
    args = (embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed,
            commit_end, fresh_start, row_end, latent, level, status)
    name = CODE_BACKEND[backend]
    if name == "triton":
        from ..triton.sjd2_prepare import sjd2_prepare_triton
        with triton_device(args[0]):
            return sjd2_prepare_triton(*args)
    if name == "cuda":
        from ..cuda.sjd2_prepare import sjd2_prepare_cuda
        return sjd2_prepare_cuda(*args)
    return ref.sjd2_prepare(*args)


@_sjd2_prepare_op.register_fake
def _(embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed, commit_end, fresh_start,
      row_end, latent, level, status, backend):
    B, N = tokens.shape
    return embed_weight.new_empty((B, N, embed_weight.shape[1]))


def check_kernel_args(embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed, commit_end,
                      fresh_start, row_end, latent, level, status) -> tuple[int, int, int, int, int]:
    """Shapes, dtypes, devices and contiguity of every tensor ``sjd2_prepare`` hands to a kernel
    (``status`` may be None); returns ``(Vt, d, B, N, K + 1)``. The public op checks them (and values
    on the host where it may), and so do the kernel wrappers, which ``torch.ops.sjd.sjd2_prepare`` and
    direct calls reach without it. No value is read (no sync)."""
    check_tensor("embed_weight", embed_weight, dtypes=FLOAT_DTYPES + (torch.float64,), dim=2, contiguous=True)
    Vt, d = embed_weight.shape
    if Vt < 1 or d < 1:
        raise SJDInputError(f"embed_weight must be [Vt >= 1, d >= 1], got {list(embed_weight.shape)}")
    check_sizes("embed_weight", embed_weight, d=(1, LANES_MAX))
    dev = embed_weight.device
    check_tensor("tokens", tokens, dtypes=I64, dim=2, device=dev, contiguous=True)
    B, N = tokens.shape
    check_tensor("positions", positions, dtypes=I64, shape=(B, N), dim=2, device=dev, contiguous=True)
    for name, t in (("mean", mean), ("std", std)):
        check_tensor(name, t, dtypes=F32, shape=(d,), dim=1, device=dev, contiguous=True)
    check_tensor("alpha", alpha, dtypes=F32, dim=1, device=dev, contiguous=True)
    K1 = alpha.shape[0]
    if K1 < 1:
        raise SJDInputError("alpha must have K + 1 >= 1 entries (levels 0..K)")
    check_sizes("alpha", alpha, **{"K + 1": (0, ROWS_MAX)})
    check_tensor("sigma", sigma, dtypes=F32, shape=(K1,), dim=1, device=dev, contiguous=True)
    check_tensor("level_table", level_table, dtypes=F32, shape=(K1, d), dim=2, device=dev, contiguous=True)
    for name, t in (("seed", seed), ("commit_end", commit_end), ("fresh_start", fresh_start), ("row_end", row_end)):
        check_tensor(name, t, dtypes=I64, shape=(B,), dim=1, device=dev, contiguous=True)
    check_tensor("latent", latent, dtypes=F32, shape=(B, None, d), dim=3, device=dev, contiguous=True)
    if latent.shape[1] < 1:
        raise SJDInputError(f"latent must be [B, R >= 1, d] (a ring of R slots), got {list(latent.shape)}")
    check_tensor("level", level, dtypes=(torch.int32,), shape=(B, latent.shape[1]), dim=2, device=dev,
                 contiguous=True)
    if status is not None:
        check_tensor("status", status, dtypes=(torch.int32,), shape=(4,), dim=1, device=dev, contiguous=True)
    return Vt, d, B, N, K1


def _check_ring_on_host(positions, commit_end, fresh_start, level, K: int) -> None:
    """On the host (this synchronises): the window positions of a request occupy distinct ring slots,
    and the levels they read from the ring lie in 0..K (without the host check the kernels clamp their
    table reads and set a status bit instead, so a bad ring cannot read out of bounds)."""
    B, R = level.shape
    win = (positions >= 0) & (positions >= commit_end.view(B, 1))
    slot = torch.where(win, positions % R, torch.full_like(positions, -1))
    srt = slot.sort(1).values
    dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(1)
    if bool(dup.any()):
        b = int(dup.nonzero()[0])
        raise SJDInputError(f"positions: request {b}'s window positions share ring slots (two positions equal "
                            f"modulo R = {R}, or one listed twice): {positions[b][win[b]].tolist()}")
    reads = win & (positions < fresh_start.view(B, 1))
    lv = torch.gather(level.to(torch.int64), 1, torch.where(reads, positions % R, torch.zeros_like(positions)))
    bad = reads & ((lv < 0) | (lv > K))
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        raise SJDInputError(f"level: request {b}'s ring slot {int(positions[b, i]) % R} (position "
                            f"{int(positions[b, i])}) holds level {int(lv[b, i])}, outside 0..K = 0..{K}")


def table_problem(mean, std, level_table, alpha, sigma,
                  names=("mean", "std", "level_table", "alpha", "sigma")) -> str | None:
    """Why these tables cannot drive the op (None: they can): every value finite, ``std > 0`` (the
    noise is unnormalised by it) and ``sigma > 0`` at levels ``1..K`` (a DDIM step from level k
    divides by ``sigma_k``). Any of them wrong fills the model inputs and the latent ring with NaN or
    inf, which no status bit reports. ``names``: how the caller calls the five. Reads values (on a
    GPU this synchronises)."""
    for name, t in zip(names, (mean, std, level_table, alpha, sigma)):
        if not bool(torch.isfinite(t).all()):
            return f"{name} holds NaN or infinite values"
    if not bool((std > 0).all()):
        return (f"{names[1]} must be > 0 in every dimension (the noise is unnormalised by it), got a minimum of "
                f"{float(std.min())}")
    if sigma.numel() > 1 and not bool((sigma[1:] > 0).all()):
        k = int((sigma[1:] <= 0).nonzero()[0, 0]) + 1
        return (f"{names[4]} must be > 0 at levels 1..K (a DDIM step from level k divides by sigma_k), got "
                f"{float(sigma[k])} at level {k}")
    return None


def _check_tokens_on_host(tokens, positions, commit_end, fresh_start, row_end, level, K: int, Vt: int) -> None:
    """On the host: every token the op reads is an id in ``[0, Vt)``. A slot reads its token when it is
    committed, takes a DDIM step towards it, or leaves the window at level 0 (``ref.slot_levels``);
    other slots' tokens are ignored (the kernels clamp them)."""
    levels = ref.slot_levels(positions, commit_end, fresh_start, row_end, level, K)
    committed = levels[0]
    p = positions
    bad = ref.bad_slots(tokens, positions, commit_end, fresh_start, row_end, level, K, Vt, levels)[0]
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        what = "a committed slot" if bool(committed[b, i]) else "a window slot that reads its token"
        raise SJDInputError(f"tokens: request {b}'s slot {i} (position {int(p[b, i])}, {what}) holds token "
                            f"{int(tokens[b, i])}, outside [0, {Vt}) (the rows of embed_weight)")


def sjd2_prepare(embed_weight: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, level_table: torch.Tensor,
                 alpha: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                 seed: torch.Tensor, commit_end: torch.Tensor, fresh_start: torch.Tensor, row_end: torch.Tensor,
                 latent: torch.Tensor, level: torch.Tensor, *, status: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """Model inputs ``[B, N, d]`` of one SJD2 forward, with the DDIM update of the window fused in.

    Window positions of one request (``positions >= commit_end``) must span at most ``R``
    (ring size) positions, so no two of them share a ring slot; the ring levels the op reads must
    lie in ``0..K``; every token the op reads (see ``_check_tokens_on_host``) must be a row of
    ``embed_weight``; the tables must be finite, with ``std > 0`` and ``sigma[1..K] > 0``
    (``table_problem``). For CPU tensors, and for GPU tensors without ``status``, these are checked on
    the host before anything runs (``SJDInputError``, nothing changed; on a GPU this synchronises).
    With ``status`` (an ``int32 [4]`` device status such as ``JacobiState.status``) GPU tensors are
    not checked on the host: the kernels clamp a bad id or level into range (never an out-of-bounds
    read, but wrong embeddings and ring contents) and set bit 32 of ``status[0]``, which
    ``check_status`` reports as an ``SJDDeviceError``; nothing synchronises (every backend, the torch
    one included), so the call can be captured in a CUDA graph. Ring slots shared by two window positions are found only on the host.
    Under ``torch.compile`` or a CUDA graph capture without ``status`` nothing is checked or reported.

    ``backend``: auto, torch, triton, cuda (the extension's kernel, ``csrc/sjd2_prepare.cu``; float32,
    float16 and bfloat16 tables); ``auto`` picks cuda, then triton, for CUDA tensors (triton for a
    float64 table).
    """
    Vt, d, B, N, K1 = check_kernel_args(embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed,
                                        commit_end, fresh_start, row_end, latent, level, status)
    dev = embed_weight.device
    if host_checks(positions) or (status is None and may_sync(positions)):
        why = table_problem(mean, std, level_table, alpha, sigma)
        if why:
            raise SJDInputError(why)
        _check_ring_on_host(positions, commit_end, fresh_start, level, K1 - 1)
        _check_tokens_on_host(tokens, positions, commit_end, fresh_start, row_end, level, K1 - 1, Vt)
    if backend == "cuda" and embed_weight.dtype == torch.float64:
        raise SJDInputError("the CUDA kernel of sjd2_prepare takes float32, float16 or bfloat16 embed_weight, "
                            "got torch.float64: use backend='triton' or 'torch'")
    be = resolve_backend(backend, dev)
    if backend == "auto" and be == "cuda" and embed_weight.dtype == torch.float64:
        be = "triton" if triton_available()[0] else "torch"
    return torch.ops.sjd.sjd2_prepare(embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed,
                                      commit_end, fresh_start, row_end, latent, level,
                                      status if status is not None else new_status(dev), BACKEND_CODE[be])
