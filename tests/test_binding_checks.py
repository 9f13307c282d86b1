"""The raw-pointer boundary: what the CUDA bindings and the kernel wrappers refuse when they are called
without the public ops' checks (``torch.ops.sjd.*``, the wrappers, or the ``_C`` functions directly).

The CUDA sources run in the CPU simulator (``sjd_kernels.cuda.sim``), built from the same files as the
extension; the Triton wrapper under the interpreter.
"""
from __future__ import annotations

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import sjd_kernels as sk  # noqa: E402
from _util import sim_module  # noqa: E402
from sjd_kernels.ops._common import SJDInputError  # noqa: E402


@pytest.fixture(scope="module")
def C():
    return sim_module()


def test_device_minus_one_is_the_current_device(C):
    """-1 (the runtime's current device) indexed the per-device cache at [-1], before its array."""
    for fn in (C.jacobi_step_max_smem_lanes, C.tree_verify_max_smem_lanes):
        assert fn(-1) == fn(0) > 0, fn.__name__


@pytest.mark.parametrize("T", [1e-300, 1e300, float("inf"), float("nan"), -1.0])
def test_binding_refuses_a_temperature_the_op_refuses(C, T):
    """The binding took any T >= 0: 1e-300 scaled every row by an infinite reciprocal (a NaN error),
    1e300 and inf sampled uniformly. Now the op's rule: 0 or a float32 with a finite float32 reciprocal."""
    from sjd_kernels.cuda import sim
    from sjd_kernels.cuda.jacobi_step import jacobi_step_cuda
    with pytest.raises(SJDInputError, match="temperature must be 0"):
        sk.ops._common.check_temperature(T)
    B, W, V = 1, 2, 8
    st = sk.JacobiState.create(B, W, V, seed=[1])
    logits = torch.randn(B, W + 1, V, generator=torch.Generator().manual_seed(0))
    drafts = torch.zeros(B, W, dtype=torch.int64)
    wl, pos = torch.full((B,), W), torch.zeros(B, dtype=torch.int64)
    got = "got " + re.escape("%.9g" % T) + "$"            # as %.9g (it printed 1e-300 as 0.000000)
    with sim.simulate(), pytest.raises(ValueError, match="jacobi_step: temperature must be 0.* " + got):
        jacobi_step_cuda(logits, None, None, drafts, wl, pos, st.seed, st.step, None, st.q_state, st.q_kind,
                         st.p_prev, st.status, T, 0, 1.0, 0, 0.0, 0, 1e-6, 0)
    assert st.status.tolist() == [0, 0, 0, 0]


def test_tree_verify_binding_refuses_the_same_temperatures(C):
    import test_tree_verify_kernels as ttv
    from sjd_kernels.cuda import sim
    from sjd_kernels.cuda.tree_verify import tree_verify_cuda
    kw = ttv.make_case(**ttv.CASES["K3-depth2"])
    for T in (1e-300, float("inf")):
        got = "got " + re.escape("%.9g" % T) + "$"
        with sim.simulate(), pytest.raises(ValueError, match="tree_verify: temperature must be 0.* " + got):
            ttv.run(tree_verify_cuda, dict(kw, temperature=T))
    with sim.simulate():
        (num, _, _), status = ttv.run(tree_verify_cuda, kw)              # the case's own temperature runs
    assert (num >= 0).all() and status.tolist() == [0, 0, 0, 0]


KNOBS = dict(temperature=1.0, top_k=0, top_p=1.0, mode=0, beta=0.0, vp_form=0, vp_eps=1e-6, tail_init=0)
BAD_KNOBS = [("temperature", 1e-300, "temperature must be 0"), ("temperature", float("inf"), "temperature must be 0"),
             ("top_p", 2.0, "top_p must be a number in"), ("top_p", 0.0, "top_p must be a number in"),
             ("top_k", 9, "top_k must be an int in"), ("mode", 4, "mode code must be one of"),
             ("vp_form", 2, "vp_form code must be one of"), ("tail_init", -1, "tail_init code must be one of"),
             ("vp_eps", 0.0, "vp_eps must be"), ("beta", float("nan"), "beta must be"),
             ("mode", 1.0, "mode code must be one of"), ("tail_init", True, "tail_init code must be one of")]


@pytest.mark.parametrize("name,value,match", BAD_KNOBS, ids=[f"{n}={v}" for n, v, _ in BAD_KNOBS])
def test_triton_wrapper_refuses_the_knobs_the_op_refuses(name, value, match):
    """The Triton wrapper took any temperature (1e-300: an infinite reciprocal, every row NaN; inf: uniform
    sampling), top_p above 1 (off) and unknown mode codes, which the op and the CUDA binding refuse. Nothing is
    written."""
    pytest.importorskip("triton")
    from sjd_kernels.triton.jacobi_step import jacobi_step_triton
    B, W, V = 1, 2, 8
    st = sk.JacobiState.create(B, W, V, seed=[1])
    q0 = st.q_state.clone()
    logits = torch.randn(B, W + 1, V, generator=torch.Generator().manual_seed(0))
    drafts = torch.zeros(B, W, dtype=torch.int64)
    wl, pos = torch.full((B,), W), torch.zeros(B, dtype=torch.int64)
    kn = dict(KNOBS, **{name: value})
    with pytest.raises(SJDInputError, match=match):
        jacobi_step_triton(logits, None, None, drafts, wl, pos, st.seed, st.step, None, st.q_state, st.q_kind,
                           st.p_prev, st.status, *kn.values())
    assert st.status.tolist() == [0, 0, 0, 0] and torch.equal(st.q_state, q0)
    out = jacobi_step_triton(logits, None, None, drafts, wl, pos, st.seed, st.step, None, st.q_state, st.q_kind,
                             st.p_prev, st.status, *KNOBS.values())           # the defaults run
    assert (out[0] >= 0).all() and st.status.tolist() == [0, 0, 0, 0]


def test_tree_verify_triton_wrapper_refuses_the_same_sampling_knobs():
    pytest.importorskip("triton")
    import test_tree_verify_kernels as ttv
    from sjd_kernels.triton.tree_verify import tree_verify_triton
    kw = ttv.make_case(**ttv.CASES["K3-depth2"])
    V = kw["logits"].shape[-1]
    for bad, match in ((dict(temperature=1e-300), "temperature must be 0"), (dict(top_p=1.5), "top_p must be"),
                       (dict(top_k=V + 1), "top_k must be an int in")):
        with pytest.raises(SJDInputError, match=match):
            ttv.run(tree_verify_triton, dict(kw, **bad))
    (num, _, _), status = ttv.run(tree_verify_triton, kw)
    assert (num >= 0).all() and status.tolist() == [0, 0, 0, 0]


def test_sjd2_prepare_size_check_does_not_wrap(C):
    """``B * N < 2^31`` was checked as an int64 product: B = 2^62, N = 4 wrapped to 0 (returned having
    done nothing), B = 2^32 + 1, N = 2^32 - 1 to -1 (past the check). No pointer is read before it."""
    base = dict(dtype=0, embed=16, mean=16, std=16, level_table=16, alpha=16, sigma=16, tokens=16, positions=16,
                seed=16, commit_end=16, fresh_start=16, row_end=16, latent=16, level=16, out=16, status=16,
                R=1, Vt=1, d=1, K=0, device=0, stream=0)
    for B, N in [(2 ** 31, 2), (2 ** 62, 4), (2 ** 32 + 1, 2 ** 32 - 1), (2 ** 16, 2 ** 15)]:
        with pytest.raises(ValueError, match=r"need 0 <= B \* N < 2\^31"):
            C.sjd2_prepare(B=B, N=N, **base)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_verify_chain_wrappers_check_the_draft_laws(C, backend):
    """The CUDA wrapper passed draft_probs' pointer and strides unchecked: a [B, W, 2] law for V = 64
    was read past its end (the reference raises on it)."""
    from sjd_kernels.cuda import sim
    from sjd_kernels.cuda.verify_chain import verify_chain_cuda
    from sjd_kernels.triton.verify_chain import verify_chain_triton
    fn = verify_chain_cuda if backend == "cuda" else verify_chain_triton
    B, W, V = 2, 4, 64
    g = torch.Generator().manual_seed(0)
    target = torch.rand(B, W + 1, V, generator=g).softmax(-1)
    ids = torch.randint(0, V, (B, W), generator=g)

    def call(draft, ids=ids, status=None):
        status = torch.zeros(4, dtype=torch.int32) if status is None else status
        with sim.simulate():
            return fn(target, draft, ids, torch.full((B,), W), torch.zeros(B, dtype=torch.int64), torch.arange(B),
                      torch.zeros(B, dtype=torch.int64), status)
    good = torch.rand(B, W, V, generator=g).softmax(-1)
    for bad, what in ((good[..., :2], "draft_probs must have shape"), (good.double(), "draft_probs must have dtype"),
                      (good.to(torch.int64), "draft_probs must have dtype")):
        with pytest.raises(SJDInputError, match=what):
            call(bad)
    with pytest.raises(SJDInputError, match="draft_ids must have shape"):
        call(good, ids=ids[:, :2])
    with pytest.raises(SJDInputError, match="status must"):
        call(good, status=torch.zeros(3, dtype=torch.int32))
    num, tok = call(good)                                      # the checks pass good inputs
    assert num.shape == (B,) and tok.shape == (B, W + 1) and ((num >= 0) & (num <= W)).all()


# ------------------------------------------------- every kernel wrapper checks its tensors (direct calls)
def _wrappers(name):
    """(backend, wrapper) pairs of one op; the CUDA ones run in the simulator."""
    if name == "jacobi_step":
        from sjd_kernels.cuda.jacobi_step import jacobi_step_cuda as c
        from sjd_kernels.triton.jacobi_step import jacobi_step_triton as t
    elif name == "tree_verify":
        from sjd_kernels.cuda.tree_verify import tree_verify_cuda as c
        from sjd_kernels.triton.tree_verify import tree_verify_triton as t
    elif name == "sjd2_prepare":
        from sjd_kernels.cuda.sjd2_prepare import sjd2_prepare_cuda as c
        from sjd_kernels.triton.sjd2_prepare import sjd2_prepare_triton as t
    return [("cuda", c), ("triton", t)]


def _refused(fn, args, kwargs, match):
    from sjd_kernels.cuda import sim
    with sim.simulate(), pytest.raises(SJDInputError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("bad", ["q_state_width", "forced_batch", "status_size", "q_kind_rows"])
def test_jacobi_step_wrappers_check_every_tensor(C, bad):
    """The Triton wrapper read and wrote past a [B, R, 4] q_state for V = 16 (32 floats past its end),
    and read ids past a [1, L] forced for B = 2; both wrappers now refuse what the reference refuses."""
    B, W, V = 2, 2, 16
    st = sk.JacobiState.create(B, W, V, seed=[1, 2])
    R = st.q_state.shape[1]
    t = dict(logits=torch.randn(B, W + 1, V, generator=torch.Generator().manual_seed(0)), uncond=None, cfg_scale=None,
             drafts=torch.zeros(B, W, dtype=torch.int64), win_len=torch.full((B,), W),
             pos=torch.zeros(B, dtype=torch.int64), seed=st.seed, step=st.step, forced=None, q_state=st.q_state,
             q_kind=st.q_kind, p_prev=st.p_prev, status=st.status)
    bad_t, match = {"q_state_width": ({"q_state": torch.zeros(B, R, 4)}, "state.q_state must have shape"),
                    "forced_batch": ({"forced": torch.full((1, 8), 3)}, "forced must have shape"),
                    "status_size": ({"status": torch.zeros(1, dtype=torch.int32)}, "state.status must have shape"),
                    "q_kind_rows": ({"q_kind": torch.zeros(B, R - 1, dtype=torch.int32)}, "state.q_kind must have shape"),
                    }[bad]
    t.update(bad_t)
    args = list(t.values()) + [1.0, 0, 1.0, 0, 0.0, 0, 1e-6, 0]
    for backend, fn in _wrappers("jacobi_step"):
        _refused(fn, args, {}, match)
    from sjd_kernels.ops._common import BACKEND_CODE
    for backend in ("cuda", "triton"):                      # the registered op reaches the same checks
        from sjd_kernels.cuda import sim
        with sim.simulate(), pytest.raises(SJDInputError, match=match):
            torch.ops.sjd.jacobi_step(*list(t.values())[:12], torch.empty(0, dtype=torch.int32), t["status"],
                                      1.0, 0, 1.0, 0, 0.0, 0, 1e-6, 0, BACKEND_CODE[backend])


@pytest.mark.parametrize("bad", ["parent_rows", "q_state_width", "forced_batch"])
def test_tree_verify_wrappers_check_every_tensor(C, bad):
    """The Triton wrapper walked a tree read past a [B-1, N] parent array and verified against a
    [B, R, 8] q_state for V = 37, returning results with a clean status."""
    import test_tree_verify_kernels as ttv
    kw = ttv.make_case(**ttv.CASES["K3-depth2"])
    B, N, V = kw["logits"].shape
    R = kw["q_state"].shape[1]
    change, match = {"parent_rows": (dict(parent=kw["parent"][:B - 1].clone()), "tree.parent must have shape"),
                     "q_state_width": (dict(q_state=torch.zeros(B, R, 8)), "state.q_state must have shape"),
                     "forced_batch": (dict(forced=torch.full((1, 64), -1)), "forced must have shape")}[bad]
    kw = dict(kw, **change)
    for backend, fn in _wrappers("tree_verify"):
        _refused(ttv.run, (fn, kw), {}, match)


@pytest.mark.parametrize("bad", ["latent_width", "positions_short", "tokens_int32"])
def test_sjd2_prepare_wrappers_check_every_tensor(C, bad):
    """Neither wrapper checked anything: a [B, R, d/2] latent ring was written 216 floats past its end,
    a [B, 2] positions array read past its end, int32 tokens read as int64."""
    import test_sjd2 as ts
    c = ts._prepare_case()
    B, R, d = c["latent"].shape
    change, match = {"latent_width": (dict(latent=torch.zeros(B, R, d // 2)), "latent must have shape"),
                     "positions_short": (dict(positions=c["positions"][:, :2].clone()), "positions must have shape"),
                     "tokens_int32": (dict(tokens=c["tokens"].to(torch.int32)), "tokens must have dtype")}[bad]
    c = dict(ts._clone(c), **change)
    order = ("embed_weight", "mean", "std", "level_table", "alpha", "sigma", "tokens", "positions", "seed",
             "commit_end", "fresh_start", "row_end", "latent", "level")
    args = [c[k] for k in order] + [torch.zeros(4, dtype=torch.int32)]
    for backend, fn in _wrappers("sjd2_prepare"):
        _refused(fn, args, {}, match)


def test_tree_kv_update_triton_wrappers_check_every_tensor(C):
    """The list wrapper looked at keys[0] only (a [1, 1, 4, 4] layer beside S = 8 was written 8 floats
    past its end); the stacked one read path and cache_len rows past a [1, P] path for R = 2."""
    from sjd_kernels.triton.tree_kv_update import tree_kv_update_list_triton, tree_kv_update_triton
    st = torch.zeros(4, dtype=torch.int32)
    path, cl = torch.tensor([[0, 2, 3]]), torch.tensor([4])
    k0 = torch.zeros(1, 1, 8, 4)
    with pytest.raises(SJDInputError, match="every K/V tensor must match keys"):
        tree_kv_update_list_triton([k0, torch.zeros(1, 1, 4, 4)], [k0.clone(), k0.clone()], path, cl, None, st)
    with pytest.raises(SJDInputError, match=r"need path \[R=2, P\]"):
        tree_kv_update_triton(torch.zeros(1, 2, 2, 1, 8, 4), path, cl, st)
    with pytest.raises(SJDInputError, match="status must be a contiguous int32"):
        tree_kv_update_triton(torch.zeros(1, 2, 1, 1, 8, 4), path, cl, st.to(torch.int64))
    assert st.tolist() == [0, 0, 0, 0]
