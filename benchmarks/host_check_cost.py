"""Host time of the kernel wrappers' argument checks (CPU time per call, no GPU needed).

    PYTHONPATH=. python benchmarks/host_check_cost.py [--calls 2000]

``check_kernel_args`` (every tensor a jacobi_step kernel receives) and ``check_kernel_knobs`` (its
scalar arguments), on CPU tensors of B 32, W 32, V 1024 with CFG. A public ``jacobi_step`` call runs
``check_kernel_args`` twice (the op's validation and the wrapper's) and the Triton wrapper runs
``check_kernel_knobs`` once. Only eager timings can show this cost: a replayed CUDA graph runs no Python.
"""
from __future__ import annotations

import argparse
import time

import torch

import sjd_kernels as sk
from sjd_kernels.ops.jacobi_step import check_kernel_args, check_kernel_knobs


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(100, calls)):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per check (default 2000)")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error("argument --calls: must be >= 1")
    B, W, V = 32, 32, 1024
    st = sk.JacobiState.create(B, W, V, list(range(B)))
    lg, un, cs = torch.randn(B, W + 1, V), torch.randn(B, W + 1, V), torch.ones(B)
    d, wl, pos = torch.zeros(B, W, dtype=torch.int64), torch.full((B,), W), torch.zeros(B, dtype=torch.int64)
    args_ = (lg, un, cs, d, wl, pos, st.seed, st.step, None, st.q_state, st.q_kind, st.p_prev, st.status, st.q_idx)
    print(f"check_kernel_args  {per_call_us(lambda: check_kernel_args(*args_), args.calls):.1f} us per call")
    print(f"check_kernel_knobs {per_call_us(lambda: check_kernel_knobs(V, 1.0, 0, 1.0, 0, 0.0, 0, 1e-6, 0), args.calls):.1f}"
          f" us per call")


if __name__ == "__main__":
    main()
