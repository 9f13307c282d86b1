"""Loads the compiled CUDA extension ``sjd_kernels._C`` and says why when it cannot."""
from __future__ import annotations

_C = None
_ERR = None
try:
    from . import _C as _C  # type: ignore[attr-defined]
except Exception as e:  # ImportError, or a loader error naming the missing library
    _ERR = f"{type(e).__name__}: {e}"


def ext():
    """The extension module, or raise RuntimeError saying why it is unavailable."""
    if _C is None:
        raise RuntimeError("sjd_kernels CUDA extension is not available: " + str(_ERR) +
                           " (reinstall with SJD_BUILD_CUDA=1 pip install . to build it, or use backend='triton'/'torch')")
    return _C


def cuda_status() -> tuple[bool, str]:
    """(usable, why) for the CUDA backend on this machine."""
    if _C is None:
        return False, f"cuda: extension not built or not importable ({_ERR})"
    archs = "/".join(f"sm_{a}" for a in _C.built_archs())
    n = _C.device_count()
    if n <= 0:
        return False, f"cuda: extension built for {archs}, but no CUDA device is visible ({_C.device_error()})"
    return True, f"cuda: extension built for {archs}, {n} device(s) visible"
