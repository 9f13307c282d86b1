"""Each public op's ``backend=`` reaches that backend's kernel wrapper, and only it.

Many parity tests compare ``op(..., backend="triton")`` or ``backend="cuda"`` (the CUDA kernels in the
CPU simulator) with ``backend="torch"``: they test the kernels only if the dispatch really hands the
call to the kernel. A dispatch table that sent every backend to the reference would pass them all.
Here every entry point (reference function, Triton wrapper, CUDA wrapper) of each op is wrapped with a
recorder that calls through, and one small call per backend must record exactly its own entry point.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import sim_module, triton_interpreting  # noqa: E402

import sjd_kernels as sk  # noqa: E402

INTERP_WHY = "runs the Triton kernels on CPU tensors (Triton installed, TRITON_INTERPRET=1 before it is imported)"

# op: (module of the ops layer, reference function name, Triton wrapper, CUDA wrapper) as module:attribute
ENTRY = {
    "jacobi_step": ("sjd_kernels.ops.jacobi_step", "jacobi_step", "sjd_kernels.triton.jacobi_step:jacobi_step_triton",
                    "sjd_kernels.cuda.jacobi_step:jacobi_step_cuda"),
    "verify_chain": ("sjd_kernels.ops.verify_chain", "verify_chain",
                     "sjd_kernels.triton.verify_chain:verify_chain_triton",
                     "sjd_kernels.cuda.verify_chain:verify_chain_cuda"),
    "tree_verify": ("sjd_kernels.ops.tree", "tree_verify", "sjd_kernels.triton.tree_verify:tree_verify_triton",
                    "sjd_kernels.cuda.tree_verify:tree_verify_cuda"),
    "tree_kv_update": ("sjd_kernels.ops.tree", "tree_kv_update",
                       "sjd_kernels.triton.tree_kv_update:tree_kv_update_triton",
                       "sjd_kernels.cuda.tree_kv_update:tree_kv_update_cuda"),
    "tree_kv_update_list": ("sjd_kernels.ops.tree", "tree_kv_update_list",
                            "sjd_kernels.triton.tree_kv_update:tree_kv_update_list_triton",
                            "sjd_kernels.cuda.tree_kv_update:tree_kv_update_list_cuda"),
    "sjd2_prepare": ("sjd_kernels.ops.sjd2_prepare", "sjd2_prepare",
                     "sjd_kernels.triton.sjd2_prepare:sjd2_prepare_triton",
                     "sjd_kernels.cuda.sjd2_prepare:sjd2_prepare_cuda"),
}


def _record(monkeypatch, op):
    """Wrap the op's three entry points; returns the list each call appends its backend name to."""
    ops_mod, ref_name, tri, cu = ENTRY[op]
    calls = []

    def wrap(module, name, tag):
        fn = getattr(module, name)

        def recorded(*a, **k):
            calls.append(tag)
            return fn(*a, **k)
        monkeypatch.setattr(module, name, recorded)
    wrap(importlib.import_module(ops_mod).ref, ref_name, "torch")    # the ops layer calls ref.<name>
    for spec, tag in ((tri, "triton"), (cu, "cuda")):
        mod, name = spec.split(":")
        try:
            wrap(importlib.import_module(mod), name, tag)
        except ImportError:                  # no Triton: its backend is not parametrised below
            pass
    return calls


def _call(op, backend):
    """One small call of the public op with ``backend``."""
    g = torch.Generator().manual_seed(1)
    if op == "jacobi_step":
        B, W, V = 2, 3, 11
        st = sk.JacobiState.create(B, W, V, [1, 2])
        pos = torch.tensor([0, 4])
        o = sk.jacobi_step(torch.randn(B, W + 1, V, generator=g), sk.init_window(st, pos, W), torch.full((B,), W),
                           pos, st, backend=backend)
        return o.num_accepted, st.status
    if op == "verify_chain":
        B, W, V = 2, 3, 11
        t = torch.softmax(torch.randn(B, W + 1, V, generator=g), -1)
        d = torch.softmax(torch.randn(B, W, V, generator=g), -1)
        o = sk.verify_chain(t, d, torch.randint(0, V, (B, W), generator=g), seed=torch.tensor([1, 2]), backend=backend)
        return o.num_accepted, o.status
    if op == "tree_verify":
        import test_tree_verify as ttv
        o, st = ttv._run_public(ttv.random_batch(B=3, seed=5), backend, device="cpu")
        return o.num_accepted, st.status
    if op in ("tree_kv_update", "tree_kv_update_list"):
        kv = torch.randn(2, 2, 2, 2, 10, 8, generator=g)
        path, cl = torch.tensor([[0, 2, 4], [0, -1, -1]]), torch.tensor([1, 2])
        st = torch.zeros(4, dtype=torch.int32)
        if op == "tree_kv_update":
            sk.tree_kv_update(kv, path, cl, status=st, backend=backend)
        else:
            keys, values = [kv[l, 0].clone() for l in range(2)], [kv[l, 1].clone() for l in range(2)]
            sk.tree_kv_update((keys, values), path, cl, status=st, ptr_table=sk.kv_pointer_table(keys, values),
                              backend=backend)
        return cl, st
    import test_sjd2 as t2
    c = t2._prepare_case(seed=2)
    st = torch.zeros(4, dtype=torch.int32)
    return t2.sjd2_prepare(**c, status=st, backend=backend), st


BACKENDS = ["torch", "cuda",
            pytest.param("triton", marks=pytest.mark.skipif(not triton_interpreting(), reason=INTERP_WHY))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(ENTRY))
def test_backend_reaches_its_kernel(op, backend, monkeypatch):
    calls = _record(monkeypatch, op)
    if backend == "cuda":
        sim_module()
        from sjd_kernels.cuda import sim
        with sim.simulate():
            _, status = _call(op, backend)
    else:
        _, status = _call(op, backend)
    assert calls == [backend], calls
    assert status.tolist() == [0, 0, 0, 0]
