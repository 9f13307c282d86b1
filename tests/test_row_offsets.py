"""Logits and law rows past element 2**31 of their storage.

The ops take row-strided views (``[W+1, B, V].permute(1, 0, 2)``, an image slice of a larger
vocabulary): a row's offset ``j * row stride`` then passes 2**31 elements while each stride still
fits 32 bits. A kernel that multiplies in 32 bits reads before its input (the Triton jacobi_step and
verify_chain kernels did; under the interpreter that is a segmentation fault, on a GPU garbage or an
illegal address). Each test runs one op on such a view and on a contiguous copy of the same values:
tokens, counts and the written state must be identical. With W = 16 the row stride is 2**31 / 15
(rounded up): the last draft row (j = 15) and the last row (j = 16) lie past element 2**31. The
views' storage is about 4.3 GiB of bf16 (W * stride elements); only the pages of their few rows are
written, so the tests take little memory on the CPU (the address space must still be granted: a
refused allocation skips); on a GPU the allocation is real.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import gpu, requires_cuda, requires_cuda_ext, sim_module, triton_interpreting  # noqa: E402

import sjd_kernels as sk  # noqa: E402

INTERP_WHY = "runs the Triton kernels on CPU tensors (Triton installed, TRITON_INTERPRET=1 before it is imported)"

B, W, V = 2, 16, 1000
S_ROW = -(-2 ** 31 // (W - 1) // 64) * 64      # an int32 row stride, a multiple of 64: row W - 1 passes 2**31


def _two_views(device, generator):
    """Two ``[B, W + 1, V]`` bf16 views of one buffer, row stride S_ROW (request b's row j at
    ``b * V + j * S_ROW``, the second view ``B * V`` further on), random values, and contiguous copies."""
    J = W + 1
    try:
        buf = torch.empty((J - 1) * S_ROW + 2 * B * V, dtype=torch.bfloat16, device=device)
    except RuntimeError as e:                        # an address space limit (ulimit -v, overcommit) or a small GPU
        pytest.skip(f"cannot allocate the {(J - 1) * S_ROW * 2 / 2 ** 30:.1f} GiB buffer: {str(e)[:200]}")
    views, copies = [], []
    for k in range(2):
        v = buf.as_strided((B, J, V), (V, S_ROW, 1), storage_offset=k * B * V)
        c = torch.randn((B, J, V), generator=generator, device=device).to(torch.bfloat16)
        v.copy_(c)
        views.append(v)
        copies.append(c)
    assert views[0].stride() == views[1].stride() == (V, S_ROW, 1) and S_ROW < 2 ** 31 <= (W - 1) * S_ROW
    assert not views[0].is_contiguous() and copies[0].is_contiguous()
    return views, copies


def _run(backend, fn):
    """``backend`` torch / triton / cuda, or cuda_sim: the CUDA kernel in the CPU simulator."""
    if backend != "cuda_sim":
        return fn(backend)
    sim_module()
    from sjd_kernels.cuda import sim
    with sim.simulate(order="reverse"):
        return fn("cuda")


def jacobi_step_on_view_and_copy(backend, device):
    g = torch.Generator(device=device).manual_seed(5)
    views, copies = _two_views(device, g)
    got = []
    for logits, uncond in (views, copies):

        def step(be, logits=logits, uncond=uncond):
            st = sk.JacobiState.create(B, W, V, [7, 8], device=device, vp=True)
            pos = torch.tensor([0, 5], device=device)
            drafts = sk.init_window(st, pos, W)
            o = sk.jacobi_step(logits, drafts, torch.full((B,), W, device=device), pos, st, uncond_logits=uncond,
                               cfg_scale=torch.full((B,), 2.0, device=device), top_k=50, mode="vp", beta=0.5,
                               backend=be)
            sk.check_status(st.status)
            return [o.num_accepted, o.tokens, o.next_drafts, st.q_state, st.p_prev, st.q_kind]
        got.append(_run(backend, step))
    assert (got[1][0] >= 0).all()
    for name, a, b in zip(["num_accepted", "tokens", "next_drafts", "q_state", "p_prev", "q_kind"], *got):
        assert torch.equal(a, b), name


def verify_chain_on_view_and_copy(backend, device):
    """Request 0's draft laws equal its target laws, so it accepts all W drafts and races on target row W
    (past 2**31); request 1's laws differ (it stops early). Every draft row is read (rows 15 past 2**31)."""
    g = torch.Generator(device=device).manual_seed(6)
    views, copies = _two_views(device, g)
    laws = [torch.softmax(c.float(), -1).to(torch.bfloat16) for c in copies]
    laws[1][0, :W] = laws[0][0, :W]
    for v, p in zip(views, laws):
        v.copy_(p)
    target, draft = (views[0], laws[0]), (views[1][:, :W], laws[1][:, :W])
    ids = torch.multinomial(draft[1].float().reshape(B * W, V), 1, generator=g).view(B, W)
    got = []
    for t, d in zip(target, draft):

        def verify(be, t=t, d=d):
            o = sk.verify_chain(t, d, ids, seed=torch.tensor([3, 4], device=device), backend=be)
            sk.check_status(o.status)
            return [o.num_accepted, o.tokens]
        got.append(_run(backend, verify))
    assert got[1][0].tolist()[0] == W and 0 <= got[1][0].tolist()[1] < W, got[1][0]
    for name, a, b in zip(["num_accepted", "tokens"], *got):
        assert torch.equal(a, b), name


OPS = {"jacobi_step": jacobi_step_on_view_and_copy, "verify_chain": verify_chain_on_view_and_copy}


@pytest.mark.parametrize("backend", [
    "torch", "cuda_sim",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_interpreting(), reason=INTERP_WHY))])
@pytest.mark.parametrize("op", list(OPS))
def test_rows_past_2_31_elements(op, backend):
    OPS[op](backend, "cpu")


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=requires_cuda_ext)])
@pytest.mark.parametrize("op", list(OPS))
def test_rows_past_2_31_elements_on_the_gpu(op, backend):
    """As above on the GPU, where the 4.3 GiB buffer is allocated."""
    if backend == "triton":
        pytest.importorskip("triton")
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2 ** 30:
        pytest.skip("needs a GPU with 16 GiB of memory")
    OPS[op](backend, "cuda")
