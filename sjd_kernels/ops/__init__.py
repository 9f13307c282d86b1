from ._common import SJDDeviceError, SJDInputError, backends, check_status
from .jacobi_step import JacobiOutput, JacobiState, init_window, jacobi_step

__all__ = ["SJDDeviceError", "SJDInputError", "backends", "check_status", "JacobiOutput", "JacobiState",
           "init_window", "jacobi_step"]
