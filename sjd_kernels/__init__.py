"""sjd_kernels: speculative Jacobi decoding for autoregressive image generation.

Public names: the fused ops (``jacobi_step``; tree drafting: ``build_tree``, ``tree_verify``,
``tree_kv_update``; verification alone for given laws: ``verify_chain``), their state (``JacobiState``), the decoding
loop (``generate``, ``available_methods``), ``backends()``, ``check_status`` and the error types.
"""
from .ops import (JacobiOutput, JacobiState, SJDDeviceError, SJDInputError, TreeLayout, TreeOutput, backends,
                  build_tree, check_status, init_window, jacobi_step, kv_pointer_table, tree_kv_update, tree_verify,
                  VerifyOutput, verify_chain)
from .decoding import available_methods, generate

__version__ = "0.1.0"
__all__ = ["JacobiOutput", "JacobiState", "SJDDeviceError", "SJDInputError", "backends", "check_status",
           "init_window", "jacobi_step", "TreeLayout", "TreeOutput", "build_tree", "tree_verify", "tree_kv_update",
           "kv_pointer_table", "VerifyOutput", "verify_chain", "generate", "available_methods", "__version__"]
