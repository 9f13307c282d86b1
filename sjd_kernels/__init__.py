"""sjd_kernels: speculative Jacobi decoding for autoregressive image generation.

Public names: the fused ops (``jacobi_step``), their state (``JacobiState``), the decoding
loop (``generate``, ``available_methods``), ``backends()``, ``check_status`` and the error types.
"""
from .ops import (JacobiOutput, JacobiState, SJDDeviceError, SJDInputError, backends, check_status,
                  init_window, jacobi_step)
from .decoding import available_methods, generate

__version__ = "0.1.0"
__all__ = ["JacobiOutput", "JacobiState", "SJDDeviceError", "SJDInputError", "backends", "check_status",
           "init_window", "jacobi_step", "generate", "available_methods", "__version__"]
