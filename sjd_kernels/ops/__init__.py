from ._common import SJDDeviceError, SJDInputError, backends, check_status
from .jacobi_step import JacobiOutput, JacobiState, init_window, jacobi_step
from .tree import TreeLayout, TreeOutput, build_tree, kv_pointer_table, tree_kv_update, tree_verify

__all__ = ["SJDDeviceError", "SJDInputError", "backends", "check_status", "JacobiOutput", "JacobiState",
           "init_window", "jacobi_step", "TreeLayout", "TreeOutput", "build_tree", "tree_verify", "tree_kv_update",
           "kv_pointer_table", "VerifyOutput", "verify_chain"]
from .verify_chain import VerifyOutput, verify_chain
