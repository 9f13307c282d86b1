"""The sparse form of the Jacobi state (``JacobiState.create(..., capacity=C)``).

- Same numbers as the dense state: with room for every support (C >= the rows' support), a
  multi-step run gives the same tokens, counts and drafts as the dense run, token for token, and
  the stored laws densify to the dense state's rows exactly.
- Exact law when rows overflow: with C smaller than the supports, overflowing positions draft
  uniformly; the whole-sequence law still equals the enumerated AR law (chi-square, false-alarm
  rate ``stats.ALPHA``), and the overflow counter is positive (the path was exercised). Backends
  as in ``test_jacobi_step_law`` (``SJD_LAW_BACKENDS``, default torch).
- A mutation that keeps the C largest entries of an overflowing row (mass dropped, SPEC section
  3 condition 2) fails the same test.
- Errors: additive VP with beta < 0, a tree op with a sparse state, a state of the wrong vocab.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import stats  # noqa: E402
import test_jacobi_step_law as law  # noqa: E402

import sjd_kernels as sk  # noqa: E402
from sjd_kernels.reference import jacobi_step as ref  # noqa: E402

SPECS = ["sjd", "vp_add_b0.5", "vp_log_b1", "coupling", "coupling_vp_add_b0.5", "gumbel", "gumbel_jacobi"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def record_steps(impl):
    """Wrap a raw step (reference signature) so that every call appends, after the step,
    ``(q_state, q_kind, p_prev, q_idx or None, status, num_accepted, tokens, next_drafts)``."""
    rec = []

    def step(*a, **kw):
        out = impl(*a, **kw)
        qi = kw["q_idx"].clone() if "q_idx" in kw else None
        rec.append((a[9].clone(), a[10].clone(), a[11].clone(), qi, a[12].clone(), *(o.clone() for o in out)))
        return out
    return step, rec


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("k,cap", [(0, 5), (2, 2), (3, 4)], ids=["full-C5", "topk2-C2", "topk3-C4"])
def test_sparse_equals_dense_token_for_token(spec, k, cap):
    """V 5, L 6, W 3: the sparse run reproduces the dense run exactly whenever nothing overflows."""
    model = law.TableModel(5, 6, 21, 2.0)
    d_impl, d_rec = record_steps(ref.jacobi_step)
    s_impl, s_rec = record_steps(ref.jacobi_step)
    Xd, info_d = law.run_sequences(d_impl, spec, model, 400, 3, 77, 1.0, k)
    Xs, info_s = law.run_sequences(s_impl, spec, model, 400, 3, 77, 1.0, k, capacity=cap)
    if info_s["status"][3] == 0:
        assert torch.equal(Xd, Xs), f"{spec}: sparse state changed the tokens"
        assert info_d["steps"] == info_s["steps"]
        for (qd, kd, pd, *_), (qs, ks, ps, qi, *_) in zip(d_rec, s_rec):
            assert torch.equal(kd, ks)
            dense = (kd & ref.KIND_MASK) == ref.KIND_DENSE
            assert torch.equal(ref.densify(qi, qs, 5)[dense], qd[dense])
            if pd.numel():
                assert torch.equal(ref.densify(qi, ps, 5)[dense], pd[dense])
            used = qi[dense] != ref.IDX_PAD           # ids ascending, then padding
            ids = torch.where(used, qi[dense].long(), torch.full_like(qi[dense].long(), 1 << 40))
            assert (ids[:, 1:] > ids[:, :-1]).all()
    else:
        pytest.fail(f"{spec}: {info_s['status'][3]} overflows with capacity {cap} >= support")


NSEQ = stats.required_n(law.VS ** law.LS) + 1500


def _sparse_sequence_checks(impl, spec, capacity, min_overflows=100):
    results = []
    for label, tseed, scale, T, k, W, tail, forced in law.SEQUENCE_CASES:
        model = law.TableModel(law.VS, law.LS, tseed, scale)
        X, info = law.run_sequences(impl, spec, model, NSEQ, W, 4000 + law._label_seed(label), T, k, 1.0, tail,
                                    forced, capacity=capacity)
        assert info["status"][3] >= min_overflows, f"{label}: only {info['status'][3]} overflows"
        cells = stats.sequence_codes(X.numpy(), law.VS)
        results.append(stats.chisq_gof(np.bincount(cells, minlength=law.VS ** law.LS), model.law(T, k, 1.0, forced),
                                       f"{spec}/{label}/sparse C{capacity}"))
    return results


@pytest.mark.parametrize("spec", ["sjd", "vp_log_b1", "coupling", "coupling_vp_add_b0.5", "gumbel"])
@pytest.mark.parametrize("impl", law.IMPLS)
def test_sparse_overflow_law(impl, spec):
    """Capacity 1 on V 3: most rows overflow and draft uniformly; the law is still AR's. Through the
    public op; ``SJD_LAW_BACKENDS=torch,triton,cuda`` runs it on the kernels too (as the law tests)."""
    law._assert_all(_sparse_sequence_checks(impl, spec, capacity=1))


def truncating_step(C):
    """Trap: an overflowing row keeps its C largest entries as its law (mass dropped) although the
    draft was drawn from the full row. Built on the reference with room for the full support."""
    def step(*a, q_idx, **kw):
        V = a[0].shape[2]
        q_state, p_prev = a[9], a[11]
        a = list(a)
        a[9] = ref.densify(q_idx, q_state, V)
        a[11] = ref.densify(q_idx, p_prev, V) if p_prev.numel() else p_prev
        out = ref.jacobi_step(*a, **kw)                      # dense step on the densified state
        top = a[9].topk(min(C, V), -1)                       # keep the C largest entries per slot
        keep = torch.zeros_like(a[9], dtype=torch.bool).scatter_(-1, top.indices, True) & (a[9] > 0)
        idx, vals = ref.sparsify(keep, [a[9]] + ([a[11]] if p_prev.numel() else []), C)
        q_idx.copy_(idx)
        q_state.copy_(vals[0])
        if p_prev.numel():
            p_prev.copy_(vals[1])
        return out
    return step


def test_truncated_sparse_state_fails_the_law():
    results = _sparse_sequence_checks(truncating_step(1), "sjd", capacity=1, min_overflows=0)
    for r in results:
        print(r)
    worst = min(r.p_value for r in results)
    assert worst < stats.ALPHA, f"the law test did not catch a state that drops mass (smallest p = {worst:.3g})"


def test_sparse_state_errors():
    V, W, B = 16, 3, 2
    st = sk.JacobiState.create(B, W, V, [1, 2], capacity=4, vp=True)
    logits = torch.randn(B, W + 1, V)
    drafts = sk.init_window(st, torch.zeros(B, dtype=torch.int64), W)
    args = (logits, drafts, torch.full((B,), W), torch.zeros(B, dtype=torch.int64), st)
    before = [t.clone() for t in (st.q_state, st.q_kind, st.p_prev, st.q_idx)]
    with pytest.raises(sk.SJDInputError, match="beta < 0"):
        sk.jacobi_step(*args, beta=-0.5, top_k=4)
    wrong = sk.JacobiState.create(B, W, V + 1, [1, 2], capacity=4)
    with pytest.raises(sk.SJDInputError, match="vocab"):
        sk.jacobi_step(logits, drafts, torch.full((B,), W), torch.zeros(B, dtype=torch.int64), wrong)
    for a, b in zip(before, (st.q_state, st.q_kind, st.p_prev, st.q_idx)):
        assert torch.equal(a, b)
    with pytest.raises(sk.SJDInputError, match="capacity"):
        sk.JacobiState.create(B, W, V, [1, 2], capacity=0)
    with pytest.raises(sk.SJDInputError, match="dense state"):
        sk.build_tree(st, torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64), 2, 1, W)
    assert st.state_bytes() < sk.JacobiState.create(B, W, V, [1, 2], vp=True).state_bytes()


@pytest.mark.parametrize("mode,beta", [("sjd", 0.0), ("coupling", 0.5), ("gumbel", 0.0)])
def test_sparse_large_window_and_batch_equals_dense(mode, beta):
    """B 64, W 128, ragged windows, bf16 logits with CFG, top-k 20 (C 40): two steps, sparse == dense."""
    B, W, V = 64, 128, 300
    g = torch.Generator().manual_seed(5)
    seeds = [1000 + i for i in range(B)]
    dense = sk.JacobiState.create(B, W, V, seeds, vp=beta != 0.0)
    sparse = sk.JacobiState.create(B, W, V, seeds, vp=beta != 0.0, capacity=40)
    pos = torch.randint(0, 50, (B,), generator=g)
    d_d = sk.init_window(dense, pos, W)
    d_s = sk.init_window(sparse, pos, W)
    assert torch.equal(d_d, d_s)
    for _ in range(2):
        logits = (2.0 * torch.randn(B, W + 1, V, generator=g)).to(torch.bfloat16)
        uncond = (2.0 * torch.randn(B, W + 1, V, generator=g)).to(torch.bfloat16)
        win = torch.randint(0, W + 1, (B,), generator=g)
        kw = dict(uncond_logits=uncond, cfg_scale=torch.full((B,), 3.0), top_k=20, mode=mode, beta=beta)
        a = sk.jacobi_step(logits, d_d, win, pos, dense, **kw)
        b = sk.jacobi_step(logits, d_s, win, pos, sparse, **kw)
        for x, y in zip((a.num_accepted, a.tokens, a.next_drafts), (b.num_accepted, b.tokens, b.next_drafts)):
            assert torch.equal(x, y)
        assert torch.equal(dense.q_kind, sparse.q_kind)
        written = (dense.q_kind & ref.KIND_MASK) == ref.KIND_DENSE
        assert torch.equal(dense.q_state[written], sparse.dense_laws()[written])
        assert sk.check_status(sparse.status)["state_overflows"] == 0
        pos = pos + a.num_accepted + 1
        d_d, d_s = a.next_drafts, b.next_drafts
