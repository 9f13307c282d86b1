"""Shared plumbing of every op: backend choice, input validation, device status."""
from __future__ import annotations

import numbers
import operator
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SJDInputError(ValueError):
    """An op was called with arguments it cannot use; the message names the argument."""


class SJDDeviceError(RuntimeError):
    """A kernel recorded an error in the device status tensor (found at the next check)."""


def _fmt(t: torch.Tensor) -> str:
    return f"{t.device.type} {str(t.dtype).replace('torch.', '')} {list(t.shape)}"


def check_tensor(name: str, t, *, dtypes=None, dim=None, shape=None, device=None, last_contiguous=True, contiguous=False):
    """Validate one tensor argument; raise SJDInputError naming ``name`` and what was expected."""
    if not isinstance(t, torch.Tensor):
        raise SJDInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise SJDInputError(f"{name} must have dtype {want}, got {_fmt(t)}")
    if dim is not None and t.dim() != dim:
        raise SJDInputError(f"{name} must be {dim}-D, got {_fmt(t)}")
    if shape is not None:
        for i, s in enumerate(shape):
            if s is not None and t.shape[i] != s:
                raise SJDInputError(f"{name} must have shape {list(shape)} (None = any), got {_fmt(t)}")
    if device is not None and t.device != device:
        raise SJDInputError(f"{name} must be on {device} like the op's other tensors, got {_fmt(t)}")
    if contiguous and not t.is_contiguous():
        raise SJDInputError(f"{name} must be contiguous, got strides {t.stride()}")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise SJDInputError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
    return t


def check_window_rows(name: str, t) -> tuple[int, int, int]:
    """A float ``[B, W+1, V]`` window tensor with B >= 1, V >= 1 and W + 1 <= 65535 (the kernels'
    row grid); returns ``(B, W + 1, V)``."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES, dim=3)
    B, W1, V = t.shape
    if B < 1 or V < 1:
        raise SJDInputError(f"{name} must have B >= 1 requests and V >= 1 lanes, got {list(t.shape)}")
    if W1 > 65535:
        raise SJDInputError(f"{name} has W + 1 = {W1} window rows; at most 65535 are supported")
    return B, W1, V


def lane_contiguous(t):
    """``t`` with a unit stride over its last (vocabulary) dimension, copied only when it has none;
    None stays None. The kernels take any row strides but contiguous lanes."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def triton_available() -> tuple[bool, str]:
    try:
        import triton
    except Exception as e:
        return False, f"triton: not importable ({type(e).__name__}: {e})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, f"triton {triton.__version__}: interpreter (TRITON_INTERPRET=1), runs on CPU tensors"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__}: compiled kernels on {torch.cuda.get_device_name()}"
    return False, f"triton {triton.__version__}: no CUDA device visible (set TRITON_INTERPRET=1 before import to run on CPU)"


def backends() -> dict:
    """For each backend, ``{"available": bool, "why": str}``."""
    from .._ext import cuda_status
    out = {"torch": {"available": True, "why": f"torch {torch.__version__}: the PyTorch reference, any device"}}
    ok, why = triton_available()
    out["triton"] = {"available": ok, "why": why}
    ok, why = cuda_status()
    out["cuda"] = {"available": ok, "why": why}
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick a concrete backend for tensors on ``device``; raise a clear error when the request cannot run."""
    if backend not in ("auto",) + BACKENDS:
        raise SJDInputError(f"backend must be one of auto, torch, triton, cuda, got {backend!r}")
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "auto":
        if device.type == "cuda":
            if backends()["cuda"]["available"]:
                return "cuda"
            if triton_available()[0]:
                return "triton"
        return "torch"
    if backend == "cuda":
        from .. import _ext
        if device.type == "cpu" and _ext._SIM is not None:
            return backend               # the CUDA kernels in the CPU simulator (sjd_kernels.cuda.sim)
        if device.type != "cuda":
            raise SJDInputError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        info = backends()["cuda"]
        if not info["available"]:
            raise RuntimeError(info["why"])
    if backend == "triton":
        ok, why = triton_available()
        if not ok:
            raise RuntimeError(why)
        if device.type != "cuda" and not interp:
            raise SJDInputError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}")
    return backend


BACKEND_CODE = {"torch": 1, "triton": 2, "cuda": 3}
CODE_BACKEND = {v: k for k, v in BACKEND_CODE.items()}


def new_status(device) -> torch.Tensor:
    """A device status tensor ``int32 [4]``: [error bits, zero-mass residuals, zero-mass coupling redraws,
    sparse-state overflows]."""
    return torch.zeros(4, dtype=torch.int32, device=device)


# Largest accepted position: positions plus window offsets stay far from int64 overflow.
POS_MAX = 2 ** 62

ERROR_TEXT = {
    1: "non-finite logits (NaN or +inf, or a row with no finite logit) at a non-forced row, after CFG and "
       "temperature scaling (a tiny temperature can overflow finite logits), or (verify_chain) a NaN, infinite "
       "or negative probability it read, or a target row without positive mass",
    2: "a draft id outside [0, V) that is not the forced token of its position",
    4: "a tree node index out of range",
    8: "win_len outside [0, W]",
    16: "pos outside [0, 2^62]",
}


def check_status(status: torch.Tensor, clear: bool = True) -> dict:
    """Synchronise, raise SJDDeviceError if a kernel recorded an error, else return the counters.

    ``status`` is a state's (or an op output's) ``int32 [4]`` status tensor."""
    if not isinstance(status, torch.Tensor):
        hint = " (pass state.status)" if hasattr(status, "status") else ""
        raise SJDInputError(f"check_status takes the int32 [4] status tensor{hint}, got {type(status).__name__}")
    if status.dtype != torch.int32 or tuple(status.shape) != (4,):
        raise SJDInputError(f"check_status takes an int32 [4] status tensor, got {status.dtype} "
                            f"{list(status.shape)}")
    vals = status.tolist()
    err = int(vals[0])
    if clear:
        status.zero_()
    if err:
        msgs = [t for bit, t in ERROR_TEXT.items() if err & bit]
        unknown = err & ~sum(ERROR_TEXT)
        if unknown:
            msgs.append(f"unknown error bits {unknown:#x} (status[0] = {err}; not written by this library's ops)")
        raise SJDDeviceError("device status reports: " + "; ".join(msgs) +
                             " (the affected requests returned -1 and their state must be re-initialised)")
    return {"zero_mass_residuals": int(vals[1]), "zero_mass_coupling": int(vals[2]), "state_overflows": int(vals[3])}


def check_cfg(uncond, cfg_scale, logits) -> None:
    """Optional unconditional logits shaped like ``logits`` and, with them, a float32 ``cfg_scale [B]``
    (a scale without unconditional logits would silently sample without guidance: refused)."""
    if uncond is None:
        if cfg_scale is not None:
            raise SJDInputError("cfg_scale was given without uncond_logits: pass both for classifier-free "
                                "guidance, or neither")
        return
    B = logits.shape[0]
    check_tensor("uncond_logits", uncond, dtypes=FLOAT_DTYPES, shape=tuple(logits.shape), dim=3, device=logits.device)
    if cfg_scale is None:
        raise SJDInputError("cfg_scale is required with uncond_logits")
    check_tensor("cfg_scale", cfg_scale, dtypes=(torch.float32,), shape=(B,), dim=1, device=logits.device)


def _temperature_range() -> tuple[float, float]:
    """The positive temperatures T for which float32(T) and float32(1) / float32(T) are finite."""
    import numpy as np
    f32 = np.float32
    t = f32(1.0) / np.finfo(np.float32).max
    with np.errstate(over="ignore", divide="ignore"):
        while not np.isfinite(f32(1.0) / t):
            t = np.nextafter(t, f32(1.0))
    return float(t), float(np.finfo(np.float32).max)


_T_MIN, _T_MAX = _temperature_range()


def check_temperature(temperature) -> None:
    """0 (greedy) or a positive number whose float32 value and float32 reciprocal are finite (the
    rows are scaled by that reciprocal); anything else is an SJDInputError."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            temperature == 0.0 or _T_MIN <= temperature <= _T_MAX):
        raise SJDInputError(f"temperature must be 0 (greedy) or a number in [{_T_MIN:.4g}, {_T_MAX:.4g}] (a float32 "
                            f"with a finite float32 reciprocal), got {temperature!r}")


def check_state_and_sampling(state, B: int, V: int, dev, forced, temperature, top_k, top_p) -> None:
    """Checks shared by every sampling op: the state's seed/step/status, ``forced`` and the
    temperature / top-k / top-p knobs (messages name the argument and what was expected)."""
    i64 = (torch.int64,)
    check_tensor("state.seed", state.seed, dtypes=i64, shape=(B,), dim=1, device=dev, contiguous=True)
    check_tensor("state.step", state.step, dtypes=i64, shape=(B,), dim=1, device=dev, contiguous=True)
    check_tensor("state.status", state.status, dtypes=(torch.int32,), shape=(4,), dim=1, device=dev, contiguous=True)
    if forced is not None:
        check_tensor("forced", forced, dtypes=i64, dim=2, shape=(B, None), device=dev, contiguous=True)
    check_temperature(temperature)
    k = as_int(top_k)
    if k is None or k < 0 or k > V:
        raise SJDInputError(f"top_k must be an int in [0, V={V}] (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not (0.0 < top_p <= 1.0):
        raise SJDInputError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")


def as_int(x):
    """``x`` as a Python int when it is an integer (int, NumPy integer, 0-d integer tensor; not a bool), else None."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and (x.dim() != 0 or x.dtype == torch.bool)):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def compiling() -> bool:
    """True while torch.compile traces (no host checks then: they would break the graph)."""
    f = getattr(torch.compiler, "is_compiling", None)
    return bool(f()) if f is not None else False


def guard_win_len(win_len: torch.Tensor, W: int):
    """``win_len`` must lie in ``[0, W]``. On the CPU (eager) that is checked here (SJDInputError);
    elsewhere there is no host sync: returns ``(win_len with bad entries set to 0, bad mask)`` for
    ``mark_win_len_errors``, else ``(win_len, None)``."""
    if win_len.device.type == "cpu" and not compiling():
        if bool(((win_len < 0) | (win_len > W)).any()):
            raise SJDInputError(f"win_len must be in [0, W={W}], got {win_len.tolist()}")
        return win_len, None
    bad = (win_len < 0) | (win_len > W)
    return torch.where(bad, torch.zeros_like(win_len), win_len), bad


def mark_win_len_errors(bad, status: torch.Tensor, outputs: tuple, bit: int = 8) -> tuple:
    """Requests with ``bad`` win_len (``guard_win_len``; or pos, ``guard_pos`` with bit 16) return -1
    in every output ([B] or [B, n]) and set status bit ``bit``."""
    if bad is None:
        return outputs
    out = tuple(torch.where(bad.view(-1, *([1] * (o.dim() - 1))), torch.full_like(o, -1), o) for o in outputs)
    status[0:1].bitwise_or_((bad.any().to(torch.int32) * bit).view(1))
    return out


def guard_pos(pos: torch.Tensor, name: str = "pos"):
    """``pos`` must lie in ``[0, POS_MAX]``. On the CPU (eager) that is checked here (SJDInputError);
    elsewhere there is no host sync: returns ``(pos with bad entries set to 0, bad mask)`` (the caller
    runs those requests with nothing to verify and marks them with ``mark_win_len_errors(..., bit=16)``),
    else ``(pos, None)``."""
    bad = (pos < 0) | (pos > POS_MAX)
    if pos.device.type == "cpu" and not compiling():
        if bool(bad.any()):
            raise SJDInputError(f"{name} must be in [0, 2^62] (absolute image positions), got {pos.tolist()}")
        return pos, None
    return torch.where(bad, torch.zeros_like(pos), pos), bad
