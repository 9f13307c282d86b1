"""The registration pattern: one torch.library op, fake kernel for torch.compile, backend choice, status."""
import pytest
import torch

import sjd_kernels as sk
from sjd_kernels.ops._common import SJDInputError, resolve_backend


def _case(B=3, W=4, V=11, seed0=7, vp=False):
    g = torch.Generator().manual_seed(seed0)
    st = sk.JacobiState.create(B, W, V, seed=[seed0 + i for i in range(B)], vp=vp)
    pos = torch.tensor([0, 3, 9][:B])
    drafts = sk.init_window(st, pos, W)
    logits = torch.randn(B, W + 1, V, generator=g)
    win = torch.tensor([W, 2, 0][:B])
    return st, pos, drafts, logits, win


def test_schema_registered_with_mutations():
    op = torch.ops.sjd.jacobi_step.default
    names = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert names == ["q_state", "q_kind", "p_prev", "q_idx", "status"]


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    st, pos, drafts, logits, win = _case()
    with FakeTensorMode(allow_non_fake_inputs=True):
        fl = torch.empty_like(logits)
        out = torch.ops.sjd.jacobi_step(fl, None, None, drafts, win, pos, st.seed, st.step, None, st.q_state,
                                        st.q_kind, st.p_prev, st.q_idx, st.status, 1.0, 0, 1.0, 0, 0.0, 0, 1e-6, 0, 1)
    assert [tuple(t.shape) for t in out] == [(3,), (3, 5), (3, 4)]
    assert all(t.dtype == torch.int64 for t in out)


@pytest.mark.parametrize("mode", ["sjd", "coupling", "gumbel"])
def test_torch_compile_matches_eager(mode):
    st_a, pos, drafts, logits, win = _case()
    st_b, *_ = _case()

    def step(lg, d, w, p, q_state, q_kind, p_prev, status, seed, stp):
        s = sk.JacobiState(q_state, q_kind, p_prev, seed, stp, status)
        o = sk.jacobi_step(lg, d, w, p, s, mode=mode, top_k=5, backend="torch", advance=False)
        return o.num_accepted, o.tokens, o.next_drafts

    eager = step(logits, drafts, win, pos, st_a.q_state, st_a.q_kind, st_a.p_prev, st_a.status, st_a.seed, st_a.step)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(logits, drafts, win, pos, st_b.q_state, st_b.q_kind, st_b.p_prev, st_b.status, st_b.seed, st_b.step)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    assert torch.equal(st_a.q_state, st_b.q_state) and torch.equal(st_a.q_kind, st_b.q_kind)


def test_step_counter_advances_and_changes_draws():
    st, pos, drafts, logits, win = _case(B=1, W=6, V=50)
    a = sk.jacobi_step(logits[:1], drafts, torch.tensor([6]), pos[:1], st)
    assert st.step.tolist() == [1]
    st2 = sk.JacobiState.create(1, 6, 50, seed=[7])
    st2.step.fill_(1)
    d2 = drafts.clone()
    st2.q_kind.copy_(st.q_kind)
    b = sk.jacobi_step(logits[:1], d2, torch.tensor([6]), pos[:1], st2)
    assert not torch.equal(a.next_drafts, b.next_drafts)   # a fresh step draws fresh numbers


def test_backends_report():
    info = sk.backends()
    assert set(info) == {"torch", "triton", "cuda"}
    for k, v in info.items():
        assert isinstance(v["available"], bool) and v["why"].startswith(k)
    assert info["torch"]["available"]


def test_resolve_backend_errors():
    with pytest.raises(SJDInputError, match="backend must be one of"):
        resolve_backend("fast", torch.device("cpu"))
    with pytest.raises(SJDInputError, match="needs CUDA tensors"):
        resolve_backend("cuda", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_check_status_raises_and_clears():
    st = sk.JacobiState.create(1, 2, 5, seed=[1])
    st.status[0] = 1
    with pytest.raises(sk.SJDDeviceError, match="non-finite logits"):
        sk.check_status(st.status)
    assert int(st.status[0]) == 0
    assert sk.check_status(st.status) == {"zero_mass_residuals": 0, "zero_mass_coupling": 0, "state_overflows": 0}


def test_seed_must_be_per_request():
    with pytest.raises(SJDInputError, match="one value per request"):
        sk.JacobiState.create(4, 2, 5, seed=3)


@pytest.mark.parametrize("mode", ["sjd", "coupling"])
def test_torch_compile_sparse_state_matches_eager(mode):
    """The sparse state (q_idx, a mutated argument) traces under torch.compile with the same results."""
    def make():
        st = sk.JacobiState.create(3, 4, 11, seed=[7, 8, 9], capacity=6, vp=True)
        pos = torch.tensor([0, 3, 9])
        return st, pos, sk.init_window(st, pos, 4)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=g)
    win = torch.tensor([4, 2, 0])
    (st_a, pos, drafts), (st_b, _, _) = make(), make()

    def step(lg, d, w, p, q_state, q_kind, p_prev, q_idx, status, seed, stp):
        s = sk.JacobiState(q_state, q_kind, p_prev, seed, stp, status, q_idx=q_idx, vocab_size=11)
        o = sk.jacobi_step(lg, d, w, p, s, mode=mode, top_k=5, beta=0.5, backend="torch", advance=False)
        return o.num_accepted, o.tokens, o.next_drafts

    args = lambda st: (st.q_state, st.q_kind, st.p_prev, st.q_idx, st.status, st.seed, st.step)  # noqa: E731
    eager = step(logits, drafts, win, pos, *args(st_a))
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(logits, drafts, win, pos, *args(st_b))
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    for a, b in zip(args(st_a), args(st_b)):
        assert torch.equal(a, b)
    assert (st_a.q_idx != 2**31 - 1).any()            # entries were written


def test_inductor_compiles_a_step_with_its_counter():
    """The default compiler (Inductor, C++ on CPU) with surrounding ops and ``advance=True``: the
    step counter's in-place increment and the op's mutated state come out as in eager mode, two
    steps in a row (the second reads the state and counter the first wrote)."""
    st_a, pos, drafts, logits, win = _case()
    st_b, *_ = _case()

    def step(lg, d, w, p, q_state, q_kind, p_prev, status, seed, stp):
        s = sk.JacobiState(q_state, q_kind, p_prev, seed, stp, status)
        o = sk.jacobi_step(lg * 1.5, d, w, p, s, mode="coupling", top_k=5, backend="torch")
        return o.num_accepted + 1, o.tokens, o.next_drafts

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for _ in range(2):
        a = step(logits, drafts, win, pos, st_a.q_state, st_a.q_kind, st_a.p_prev, st_a.status, st_a.seed, st_a.step)
        b = compiled(logits, drafts, win, pos, st_b.q_state, st_b.q_kind, st_b.p_prev, st_b.status, st_b.seed,
                     st_b.step)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        for x, y in zip((st_a.q_state, st_a.q_kind, st_a.step, st_a.status), (st_b.q_state, st_b.q_kind, st_b.step,
                                                                                st_b.status)):
            assert torch.equal(x, y)
        logits = logits.roll(1, -1)
    assert st_b.step.tolist() == [2, 2, 2]
