"""Shared plumbing of every op: backend choice, input validation, device status."""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os

import torch

from ..reference.jacobi_step import ERR_PREPARE

BACKENDS = ("torch", "triton", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ANY_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)     # models, KV caches and the torch backend also take float64
INT_DTYPES = (torch.int32, torch.int64)                # index arguments of the model side


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


# Largest batch and vocabulary (lane) counts of every op: the kernels take them as 32-bit ints, and
# walk lanes in 32-bit steps (a vocabulary slice of 2^30 lanes is far beyond any image tokenizer).
ROWS_MAX = 2 ** 31 - 1
LANES_MAX = 2 ** 30


def check_sizes(name: str, t, **limits) -> None:
    """Each named dimension ``dim=(index, limit)`` of ``t`` is at most ``limit``, else an SJDInputError."""
    for what, (i, lim) in limits.items():
        if t.shape[i] > lim:
            raise SJDInputError(f"{name} has {what} = {t.shape[i]} (dimension {i} of {list(t.shape)}); at most "
                                f"{lim} are supported")


def check_window_rows(name: str, t) -> tuple[int, int, int]:
    """A float ``[B, W+1, V]`` window tensor with 1 <= B <= ROWS_MAX, 1 <= V <= LANES_MAX and
    W + 1 <= 65535 (the kernels' row grid); returns ``(B, W + 1, V)``."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES, dim=3)
    B, W1, V = t.shape
    if B < 1 or V < 1:
        raise SJDInputError(f"{name} must have B >= 1 requests and V >= 1 lanes, got {list(t.shape)}")
    if W1 > 65535:
        raise SJDInputError(f"{name} has W + 1 = {W1} window rows; at most 65535 are supported")
    check_sizes(name, t, B=(0, ROWS_MAX), V=(2, LANES_MAX))
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
    32: "(sjd2_prepare) a token id it reads outside the rows of embed_weight, or a ring level it reads outside "
        "0..K",
}
ERR_CLAMPED = ERR_PREPARE   # the one error bit whose op did not return -1 but computed with clamped ids or levels


def check_status(status: torch.Tensor, clear: bool = True) -> dict:
    """Synchronise, raise SJDDeviceError if a kernel recorded an error, else return the counters.

    ``status`` is a state's (or an op output's) ``int32 [4]`` status tensor."""
    if not isinstance(status, torch.Tensor):
        hint = " (pass state.status)" if hasattr(status, "status") else ""
        raise SJDInputError(f"check_status takes the int32 [4] status tensor{hint}, got {type(status).__name__}")
    if status.dtype != torch.int32 or tuple(status.shape) != (4,):
        raise SJDInputError(f"check_status takes an int32 [4] status tensor, got {status.dtype} "
                            f"{list(status.shape)}")
    if status.is_meta:
        raise SJDInputError("check_status takes a status tensor with values, got a meta tensor (shape only)")
    vals = status.tolist()
    err = int(vals[0])
    if clear:
        status.zero_()
    if err:
        msgs = [t for bit, t in ERROR_TEXT.items() if err & bit]
        unknown = err & ~sum(ERROR_TEXT)
        if unknown:
            msgs.append(f"unknown error bits {unknown:#x} (status[0] = {err}; not written by this library's ops)")
        after = []
        if err & ~ERR_CLAMPED:
            after.append("the affected requests returned -1 and their state must be re-initialised")
        if err & ERR_CLAMPED:
            after.append("sjd2_prepare clamped the ids and levels into range: its output and the latent and "
                         "level rings it wrote are wrong and must be rebuilt")
        raise SJDDeviceError("device status reports: " + "; ".join(msgs) + " (" + "; ".join(after) + ")")
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


def check_state_counters(state, B: int, dev) -> None:
    """The state's ``seed`` and ``step`` (contiguous int64 ``[B]``) and ``status`` (int32 ``[4]``) on ``dev``."""
    i64 = (torch.int64,)
    check_tensor("state.seed", state.seed, dtypes=i64, shape=(B,), dim=1, device=dev, contiguous=True)
    check_tensor("state.step", state.step, dtypes=i64, shape=(B,), dim=1, device=dev, contiguous=True)
    check_tensor("state.status", state.status, dtypes=(torch.int32,), shape=(4,), dim=1, device=dev, contiguous=True)


def check_state_and_sampling(state, B: int, V: int, dev, forced, temperature, top_k, top_p) -> None:
    """Checks shared by every sampling op: the state's seed/step/status, ``forced`` and the
    temperature / top-k / top-p knobs (messages name the argument and what was expected)."""
    check_state_counters(state, B, dev)
    if forced is not None:
        check_tensor("forced", forced, dtypes=(torch.int64,), dim=2, shape=(B, None), device=dev, contiguous=True)
    check_sampling(temperature, top_k, top_p, V)


def check_sampling(temperature, top_k, top_p, V: int) -> tuple[int, float]:
    """The target law's knobs (every op, ``generate``, SJD2 and the CLIs): ``temperature`` as
    ``check_temperature``, ``top_k`` an int in [0, V] (0 = off), ``top_p`` in (0, 1] (used as a
    float32: off when it rounds to 1). Messages start with the argument's name. Returns
    ``(top_k, top_p)`` as int and float."""
    check_temperature(temperature)
    k = as_int(top_k)
    if k is None or k < 0 or k > V:
        raise SJDInputError(f"top_k must be an int in [0, V={V}] (0 = off; V = the vocabulary size), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not (0.0 < top_p <= 1.0):
        raise SJDInputError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")
    return k, float(top_p)


def check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    """``v`` as an int >= ``lo`` (and <= ``hi`` when given; Python or NumPy integer; not a bool), else an
    SJDInputError naming it."""
    i = as_int(v)
    if i is None or i < lo:
        raise SJDInputError(f"{name} must be an int >= {lo}, got {v!r}")
    if hi is not None and i > hi:
        raise SJDInputError(f"{name} must be at most {hi}, got {i}")
    return i


def check_finite(name: str, v, what: str = "") -> float:
    """``v`` as a finite float (Python, NumPy or 0-d tensor; not a bool), else an SJDInputError naming it."""
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype != torch.bool and not v.is_complex():
        v = v.item()
    f = None
    if not isinstance(v, bool) and isinstance(v, numbers.Real):
        try:
            f = float(v)
        except OverflowError:                     # an int or fraction beyond the float range
            pass
    if f is None or not math.isfinite(f):
        raise SJDInputError(f"{name} must be a finite real number{what}, got {v!r}")
    return f


TENSOR_BYTES_MAX = 2 ** 63 - 1


def check_tensor_size(what: str, shape, dtype) -> None:
    """A ``dtype`` tensor of ``shape`` (ints >= 0) must fit in torch's int64 byte count, else an
    SJDInputError starting with ``what`` (the arguments that set the shape)."""
    n = dtype.itemsize
    for s in shape:
        n *= s
    if n > TENSOR_BYTES_MAX:
        raise SJDInputError(f"{what} out of range: a {str(dtype).replace('torch.', '')} tensor of shape "
                            f"{list(shape)} would take at least 2^{n.bit_length() - 1} bytes; a tensor holds at "
                            f"most 2^63 - 1")


def seed_tensor(seed, device) -> torch.Tensor:
    """Per-request seeds as a 1-D int64 tensor. Integers only (Python or NumPy integers, a list or
    tuple of them, a 1-D integer tensor or array): anything else (None, strings, floats, bools, values
    outside int64, a meta tensor for a real device) is an SJDInputError naming ``seed``; a float seed is
    never truncated silently."""
    what = "seed must be an int or integers that fit in int64 (one per request)"
    if not isinstance(seed, (torch.Tensor, list, tuple)) and hasattr(seed, "__array__"):   # NumPy arrays, scalars
        import numpy as np
        seed = torch.as_tensor(np.asarray(seed))
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise SJDInputError(f"{what}, got a {seed.dtype} tensor")
        if seed.is_meta and torch.device(device).type != "meta":
            raise SJDInputError(f"{what}, got a meta tensor (shape only, no values)")
        if seed.dim() > 1:
            raise SJDInputError(f"seed must be a [B] tensor or list (one per request), got shape {list(seed.shape)}")
        return seed.to(device=device, dtype=torch.int64).reshape(-1)
    ints = [as_int(v) for v in (seed if isinstance(seed, (list, tuple)) else [seed])]
    if any(i is None or not -2 ** 63 <= i < 2 ** 63 for i in ints):
        raise SJDInputError(f"{what}, got {seed!r}")
    return torch.tensor(ints, dtype=torch.int64, device=device)


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


def may_sync(t: torch.Tensor) -> bool:
    """A helper off the hot path may check its arguments on the host: not while torch.compile traces,
    not while a CUDA graph captures (a synchronisation would break either), and not for meta tensors
    (shapes without values)."""
    if compiling() or t.is_meta:
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def host_checks(t: torch.Tensor) -> bool:
    """Host-side checks (they synchronise) run for CPU tensors only, never while tracing."""
    return t.device.type == "cpu" and not compiling()


def _bad_law_values(t: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` bool: slots holding a value that is no probability (NaN, infinite or negative)."""
    return ~((t >= 0) & (t < float("inf"))).all(-1)


def check_state_contents(state, V: int) -> None:
    """The stored laws of a state on the CPU (eager): every value of ``q_state`` and ``p_prev`` a
    probability (finite, >= 0), every ``q_kind`` a known kind, sparse lane ids in ``[0, V)`` or the
    padding id. The ops write only such states; one a caller edited gives garbage draws, so on the
    CPU it is an SJDInputError naming the first bad (request, slot) pairs. On a GPU (no host sync)
    the contents are not checked: only the ops should write a state."""
    if not host_checks(state.q_state):
        return
    from ..reference.jacobi_step import FLAG_PREV, IDX_PAD, KIND_MASK
    problems = []
    for name, t in (("q_state", state.q_state), ("p_prev", state.p_prev)):
        if t.numel() and t.dim() == 3:
            bad = _bad_law_values(t)
            if bool(bad.any()):
                problems.append(f"state.{name} holds NaN, infinite or negative values at (request, slot) "
                                f"{bad.nonzero().tolist()[:8]}")
    kind = state.q_kind.to(torch.int64)
    bad = (kind < 0) | (kind > (KIND_MASK | FLAG_PREV)) | ((kind & KIND_MASK) == KIND_MASK)
    if bool(bad.any()):
        problems.append(f"state.q_kind holds unknown kinds {sorted(set(kind[bad].tolist()))[:8]} at (request, slot) "
                        f"{bad.nonzero().tolist()[:8]} (kinds: 0 dense, 1 uniform, 2 one-hot, plus flag 4)")
    if state.q_idx.numel() and state.q_idx.dim() == 3:
        ids = state.q_idx.to(torch.int64)
        bad = (((ids < 0) | (ids >= V)) & (ids != IDX_PAD)).any(-1)
        if bool(bad.any()):
            problems.append(f"state.q_idx holds lane ids outside [0, V={V}) at (request, slot) "
                            f"{bad.nonzero().tolist()[:8]}")
    if problems:
        raise SJDInputError("; ".join(problems) + ": the state holds what the ops write (laws of probabilities); "
                            "create it with JacobiState.create and let the ops update it")


def _guard(t: torch.Tensor, bad: torch.Tensor, message):
    """On the CPU (eager) an entry marked ``bad`` is an SJDInputError (``message()``); elsewhere there
    is no host sync: returns ``(t with bad entries set to 0, bad)`` for ``mark_request_errors``, else
    ``(t, None)``."""
    if host_checks(t):
        if bool(bad.any()):
            raise SJDInputError(message())
        return t, None
    return torch.where(bad, torch.zeros_like(t), t), bad


def guard_win_len(win_len: torch.Tensor, W: int):
    """``win_len`` must lie in ``[0, W]`` (``_guard``; the caller marks bad requests with bit 8)."""
    return _guard(win_len, (win_len < 0) | (win_len > W),
                  lambda: f"win_len must be in [0, W={W}], got {win_len.tolist()}")


def guard_pos(pos: torch.Tensor, name: str = "pos"):
    """``pos`` must lie in ``[0, POS_MAX]`` (``_guard``; the caller runs bad requests with nothing to
    verify and marks them with bit 16)."""
    return _guard(pos, (pos < 0) | (pos > POS_MAX),
                  lambda: f"{name} must be in [0, 2^62] (absolute image positions), got {pos.tolist()}")


def mark_request_errors(status: torch.Tensor, outputs: tuple, *flags) -> tuple:
    """``flags``: ``(bad [B] or None, bit)`` pairs from the guards. Requests marked in any of them return
    -1 in every output ([B] or [B, n]); each bit is set in ``status[0]`` when its mask holds a request."""
    flags = [(bad, bit) for bad, bit in flags if bad is not None]
    if not flags:
        return outputs
    any_bad = flags[0][0]
    for bad, _ in flags[1:]:
        any_bad = any_bad | bad
    out = tuple(torch.where(any_bad.view(-1, *([1] * (o.dim() - 1))), torch.full_like(o, -1), o) for o in outputs)
    for bad, bit in flags:
        status[0:1].bitwise_or_((bad.any().to(torch.int32) * bit).view(1))
    return out


def triton_device(t: torch.Tensor):
    """Context for a Triton launch on ``t``'s device: Triton launches on the current CUDA device, so a
    tensor on another GPU (a model on ``cuda:1``) makes it the current one for the call; nothing to do
    for the current GPU or CPU tensors (the interpreter)."""
    dev = t.device
    if dev.type == "cuda" and dev.index is not None and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev)
    return contextlib.nullcontext()
