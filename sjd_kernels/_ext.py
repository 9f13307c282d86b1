"""Loads the compiled CUDA extension ``sjd_kernels._C`` and says why when it cannot."""
from __future__ import annotations

_C = None
_ERR = None
try:
    from . import _C as _C  # type: ignore[attr-defined]
except Exception as e:  # ImportError, or a loader error naming the missing library
    _ERR = f"{type(e).__name__}: {e}"


# The CPU simulator's module while ``sjd_kernels.cuda.sim.simulate()`` is in effect: the CUDA
# wrappers then launch through it and take CPU tensors.
_SIM = None


def ext():
    """The extension module (the simulator's inside ``cuda.sim.simulate()``), or raise RuntimeError
    saying why it is unavailable."""
    if _SIM is not None:
        return _SIM
    if _C is None:
        raise RuntimeError("sjd_kernels CUDA extension is not available: " + str(_ERR) +
                           " (reinstall with SJD_BUILD_CUDA=1 pip install . to build it, or use backend='triton'/'torch')")
    return _C


def cuda_status() -> tuple[bool, str]:
    """(usable, why) for the CUDA backend on this machine."""
    if _SIM is not None:
        return True, "cuda: the CPU simulator of the CUDA kernels (sjd_kernels.cuda.sim), on CPU tensors"
    if _C is None:
        return False, f"cuda: extension not built or not importable ({_ERR})"
    archs = "/".join(f"sm_{a}" for a in _C.built_archs())
    n = _C.device_count()
    if n <= 0:
        return False, f"cuda: extension built for {archs}, but no CUDA device is visible ({_C.device_error()})"
    return True, f"cuda: extension built for {archs}, {n} device(s) visible"


def kernel_device(dev) -> bool:
    """True when the CUDA wrappers can launch on tensors of ``dev``: CUDA tensors, or CPU tensors
    inside ``cuda.sim.simulate()``."""
    return dev.type == "cuda" or (_SIM is not None and dev.type == "cpu")


def device_index(dev) -> int:
    """The device ordinal passed to the kernels (0 for the simulator's CPU tensors)."""
    import torch
    if dev.type != "cuda":
        return 0
    return dev.index if dev.index is not None else torch.cuda.current_device()


def stream_of(dev) -> int:
    """The current stream of ``dev`` as an integer (0 for the simulator's CPU tensors)."""
    import torch
    return torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
