"""The random-configuration comparison of ``benchmarks/fuzz_parity.py``: a few of its drawn
jacobi_step and tree_verify cases pass on the Triton kernels (interpreter) and the CUDA kernels
(CPU simulator), and its comparison fails on backends that are wrong in a token, a stored law, an
error bit or an accepted path. On a GPU, more drawn cases run on the CUDA kernels themselves."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from _util import gpu, requires_cuda_ext, sim_module  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import fuzz_parity as fz  # noqa: E402

from sjd_kernels.triton.jacobi_step import is_interpreted, jacobi_step_triton  # noqa: E402

# the CPU tests run the Triton kernel on CPU tensors; the GPU test runs with TRITON_INTERPRET=0
interpreted = pytest.mark.skipif(not is_interpreted(),
                                 reason="runs the Triton kernel on CPU tensors (TRITON_INTERPRET=1 before triton "
                                        "is imported)")

# Drawn cases (seed 0) of both kinds: 0 coupling, top-k 1, hist_topk + list races; 7 gumbel on the
# 'band' rows with VP state; 29 a heavy-tailed coupling chain; 35 'flat' rows; 39 a sparse
# gumbel_jacobi chain (capacity 14 over top-k 1); 41 gumbel_jacobi with the bracket selection.
CASES = (0, 7, 29, 35, 39, 41)


def _run(i: int, backend: str, fn=None):
    c, how = fz.draw(i, 0)
    if backend == "triton":
        return c, fz.run_case(c, i, fn or jacobi_step_triton)
    sim_module()
    return c, fz.run_cuda_case(c, i, how, fn=fn)


def test_the_listed_cases_cover_both_kinds_and_the_sparse_state():
    drawn = [fz.draw(i, 0)[0] for i in CASES]
    assert {c["kind"] for c in drawn} == {"single", "chain"}
    assert any(c.get("capacity") for c in drawn)


def test_draws_stay_inside_what_the_op_accepts():
    """The comparison calls the reference and the kernels below the op's validation, so the draw itself
    must not produce what ``sjd_kernels.jacobi_step`` refuses: a sparse state with additive VP at
    beta < 0 (mass outside the stored support: the reference then stores a truncated law, which
    seed 5's case 23 showed) or top-k above V."""
    n = 0
    for seed in range(6):
        for i in range(400):
            c, _ = fz.draw(i, seed)
            assert 0 <= c["top_k"] <= c["V"], c
            if c.get("capacity"):
                n += 1
                assert not (c["vp"] and c["vp_form"] == 0 and c["beta"] < 0), (seed, i, c)
    assert n > 100                       # the sparse state is drawn often enough to matter


@interpreted
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("i", CASES)
def test_drawn_case_matches_reference(i, backend):
    c, (rows, ndiff) = _run(i, backend)
    assert rows > 0
    # the fuzzer's allowance (one request in 200 rows, for a rounding at a sampling boundary) without
    # its floor of one: these cases hold at most 108 rows, so no request may differ (one broken
    # request of a batch of 1 or 2 would pass a floor of one)
    assert ndiff <= rows // 200, f"{ndiff} requests differ over {rows} rows: {c}"


def _wrong_token(fn):
    def f(*a, **k):
        num, tokens, drafts = fn(*a, **k)
        drafts = drafts.clone()
        drafts[-1, :1] = (drafts[-1, :1] + 1) % a[0].shape[-1]       # the last request's first next draft
        return num, tokens, drafts
    return f


def _wrong_law(fn):
    def f(*a, **k):
        out = fn(*a, **k)
        a[9][-1].mul_(1.001)                                         # q_state of the last request
        return out
    return f


def _wrong_status(fn):
    def f(*a, **k):
        out = fn(*a, **k)
        a[12][0] |= 1                                                # an error bit nobody set
        return out
    return f


@interpreted
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_comparison_fails_on_wrong_backends(backend):
    """Case 0 (one request, V 1000, W 16) on wrapped kernels: a wrong next draft and a law off by
    0.1 % each count as a differing request; a spurious error bit raises."""
    import sjd_kernels.cuda.jacobi_step as cj
    base = jacobi_step_triton if backend == "triton" else cj.jacobi_step_cuda
    assert _run(0, backend)[1][1] == 0
    assert _run(0, backend, _wrong_token(base))[1][1] == 1
    assert _run(0, backend, _wrong_law(base))[1][1] == 1
    with pytest.raises(AssertionError, match="status differs"):
        _run(0, backend, _wrong_status(base))


# tree_verify (``--op tree_verify``), seed 0: 0 a bad draft id, 1 coupled and forced with
# hist_topk, 2 top-k 168 at V 2048, 20 a NaN root row, 26 top-k = V with a chain after the tree.
TREE_CASES = (0, 1, 2, 20, 26)


def _run_tree(i: int, backend: str, fn=None):
    from sjd_kernels.triton.tree_verify import tree_verify_triton
    c, how = fz.draw_tree(i, 0)
    if backend == "triton":
        return fz.run_tree_case(c, fn or tree_verify_triton)
    sim_module()
    return fz.run_cuda_tree_case(c, how, fn=fn)


@interpreted
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("i", TREE_CASES)
def test_drawn_tree_case_matches_reference(i, backend):
    n, ndiff = _run_tree(i, backend)
    assert n > 0 and ndiff <= n // 50                  # a few requests each: none may differ


@interpreted
def test_tree_comparison_fails_on_a_wrong_path():
    """Case 2 on a kernel whose last request reports one more accepted node: counted as differing."""
    from sjd_kernels.triton.tree_verify import tree_verify_triton

    def wrong(*a):
        num, path, tokens = tree_verify_triton(*a)
        num = num.clone()
        num[-1] += 1
        return num, path, tokens
    assert _run_tree(2, "triton") == (3, 0)
    assert _run_tree(2, "triton", wrong) == (3, 1)


# verify_chain (``--op verify_chain``), seed 0: 0 unnormalised drafts, W 144 over 32 CUDA threads and
# a NaN in a row never read; 2 a bad draft id; 10 a target row without mass; 19 a NaN entry that is
# read; 27 W 110 with one-hot drafts; 33 row-strided views and an unread NaN.
VERIFY_CASES = (0, 2, 10, 19, 27, 33)


def _run_verify(i: int, backend: str, fn=None):
    from sjd_kernels.triton.verify_chain import verify_chain_triton
    c, how = fz.draw_verify(i, 0)
    if backend == "triton":
        return fz.run_verify_case(c, fn or verify_chain_triton)
    sim_module()
    return fz.run_cuda_verify_case(c, how, fn=fn)


def test_the_listed_verify_chain_cases_cover_the_error_paths():
    drawn = [fz.draw_verify(i, 0) for i in VERIFY_CASES]
    assert {c.get("nan") for c, _ in drawn} >= {"gathered", "unread"}
    assert any(c.get("bad_id") for c, _ in drawn) and any(c.get("zero_row") for c, _ in drawn)
    assert any(c["W"] > how["threads"] > 0 for c, how in drawn)       # more rows than CUDA threads


@interpreted
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("i", VERIFY_CASES)
def test_drawn_verify_chain_case_matches_reference(i, backend):
    n, ndiff = _run_verify(i, backend)
    assert n > 0 and ndiff <= n // 50                  # a few requests each: none may differ


@interpreted
def test_verify_chain_comparison_fails_on_wrong_backends():
    """Case 27 on a kernel whose last request commits one token differently (a differing request),
    and on one that sets an error bit nobody set (raises)."""
    from sjd_kernels.triton.verify_chain import verify_chain_triton

    def wrong_token(*a):
        num, tokens = verify_chain_triton(*a)
        tokens = tokens.clone()
        tokens[-1, 0] += 1
        return num, tokens

    def wrong_status(*a):
        out = verify_chain_triton(*a)
        a[7][0] |= 2
        return out
    n = fz.draw_verify(27, 0)[0]["B"]
    assert _run_verify(27, "triton") == (n, 0)
    assert _run_verify(27, "triton", wrong_token) == (n, 1)
    with pytest.raises(AssertionError, match="status differs"):
        _run_verify(27, "triton", wrong_status)


# ----------------------------------------------------------------------------- on a GPU
GPU_CASES = 80          # drawn cases of each op (seed 4): milliseconds each on the GPU's kernels


@gpu
@requires_cuda_ext
@pytest.mark.parametrize("op", ["jacobi_step", "tree_verify", "verify_chain"])
def test_drawn_cases_on_the_gpu_cuda_kernels(op):
    """GPU_CASES drawn cases on the CUDA kernels themselves (the real memory model, atomics and
    thread order), each configuration's optional paths and row placement as drawn, against the
    reference on the GPU. Every failing case is listed, with its index to rerun it alone
    (``fuzz_parity.py --device cuda --backends cuda --seed 4 --start I --cases 1``)."""
    bad = []
    for i in range(GPU_CASES):
        if op == "tree_verify":
            c, how = fz.draw_tree(i, 4)
            run, per = (lambda: fz.run_cuda_tree_case(c, how, "cuda")), 50
        elif op == "verify_chain":
            c, how = fz.draw_verify(i, 4)
            run, per = (lambda: fz.run_cuda_verify_case(c, how, "cuda")), 50
        else:
            c, how = fz.draw(i, 4)
            run, per = (lambda: fz.run_cuda_case(c, 4000 + i, how, "cuda")), 200
        try:
            rows, nd = run()
        except AssertionError as e:            # error bits or overflow counts differ
            bad.append((i, str(e)))
            continue
        if not (rows > 0 and nd <= max(1, rows // per)):
            bad.append((i, f"{nd} requests differ over {rows} rows: {c} {how}"))
    assert not bad, f"{len(bad)} of {GPU_CASES} drawn {op} cases fail: {bad}"
