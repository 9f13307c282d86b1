"""The law tests can fail: each known trap (SPEC section 3) makes the very same checks reject.

``mutants.make(trap)`` is the reference step with one bug switched on. For every trap this
file runs the checks of ``test_jacobi_step_law`` that target it (same functions, same
cases, same sample sizes, same alpha = 1e-6) and asserts that at least one rejects, and
prints the p-values. ``make(None)`` must agree with the reference bit for bit, so the
mutants cannot silently drift from the code they perturb. The statistical helpers
themselves are checked for calibration and power on synthetic samplers.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import mutants  # noqa: E402
import stats  # noqa: E402
import test_jacobi_step_law as law  # noqa: E402

from sjd_kernels.reference import jacobi_step as ref  # noqa: E402

PEAKED_GROUP = [g for g in law.FIRST_TOKEN_GROUPS if g[0] == "peaked"]
PLAIN_GROUP = [g for g in law.FIRST_TOKEN_GROUPS if g[0] == "plain"]
DECOY_GROUP = [g for g in law.FIRST_TOKEN_GROUPS if g[0] == "decoy"]
W2_CASE = [c for c in law.SEQUENCE_CASES if c[0] == "table_W2"]
W3_CASE = [c for c in law.SEQUENCE_CASES if c[0] == "table_W3_topk2_left"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def _p(results):
    return [(r.label, r.p_value) for r in results]


def _oracle(label, mismatches):
    return [(label, 0.0 if mismatches else 1.0)]


# trap -> checks (functions of the step implementation returning (label, p-value) pairs) that must reject
CATCHERS = {
    "resid_fallback_p": [lambda f: _p(law.first_token_checks(f, "sjd", groups=PEAKED_GROUP))],
    "uniform_flag_ignored": [lambda f: _p(law.first_token_checks(f, "sjd", groups=PLAIN_GROUP))],
    "coupling_keeps_old_q": [lambda f: _p(law.sequence_checks(f, "coupling", cases=W2_CASE)),
                             lambda f: _oracle("coupling state", law.vp_state_mismatches(f, "coupling_vp_add_b0.5"))],
    "resid_noise_shared": [lambda f: _p(law.sequence_checks(f, "sjd", cases=W2_CASE))],
    "gumbel_slot_keyed": [lambda f: _p(law.sequence_checks(f, "gumbel", cases=W2_CASE)),
                          lambda f: _oracle("gumbel_jacobi == AR", law.gumbel_jacobi_mismatches(f))],
    "gumbel_noise_in_resid": [lambda f: _p(law.first_token_checks(f, "gumbel", groups=DECOY_GROUP + PLAIN_GROUP))],
    "vp_stores_p": [lambda f: _p(law.sequence_checks(f, "vp_log_b1", cases=W3_CASE)),
                    lambda f: _oracle("vp state", law.vp_state_mismatches(f, "vp_add_b0.5"))],
    "q_rounded_bf16": [lambda f: _p(law.bf16_sequence_checks(f))],
    "u_closed_one": [lambda f: _oracle("u edge", law.u_edge_failures(f))],
}


def test_every_trap_has_a_catcher():
    assert set(CATCHERS) == set(mutants.TRAPS)


@pytest.mark.parametrize("trap", mutants.TRAPS)
def test_law_checks_reject_mutant(trap):
    step = mutants.make(trap)
    found = []
    for check in CATCHERS[trap]:
        found += check(step)
    for label, p in found:
        print(f"{trap:24s} {label}: p = {p:.3g}")
    worst = min(p for _, p in found)
    assert worst < stats.ALPHA, f"no law check rejects the {trap} mutant (smallest p = {worst:.3g})"


@pytest.mark.parametrize("trap", mutants.TRAPS)
def test_catchers_accept_the_reference(trap):
    """The checks that reject a mutant, with the same cases and samples, accept the reference: the
    rejection is the trap's doing, not the check's."""
    for check in CATCHERS[trap]:
        for label, p in check(ref.jacobi_step):
            assert p >= stats.ALPHA, (label, p)


def _random_call(seed, mode, beta, form, vp, tail, forced, W=4, V=7, B=40):
    g = torch.Generator().manual_seed(seed)
    R = W + 2
    q_state = torch.rand(B, R, V, generator=g)
    q_state = q_state / q_state.sum(-1, keepdim=True)
    q_kind = torch.randint(0, 3, (B, R), generator=g).to(torch.int32)
    if vp:
        q_kind = q_kind | (torch.randint(0, 2, (B, R), generator=g).to(torch.int32) * ref.FLAG_PREV)
    p_prev = torch.softmax(torch.randn(B, R, V, generator=g), -1) if vp else torch.empty(0)
    pos = torch.randint(0, 20, (B,), generator=g)
    drafts = torch.randint(0, V, (B, W), generator=g)
    fc = None
    if forced:
        fc = torch.full((B, 40), -1, dtype=torch.int64)
        fc[:, 5::6] = 2
        drafts = torch.where(torch.gather(fc, 1, pos.view(B, 1) + torch.arange(W)) >= 0, 2, drafts)
    args = [torch.randn(B, W + 1, V, generator=g) * 2, None, None, drafts, torch.randint(0, W + 1, (B,), generator=g),
            pos, torch.arange(B) * 7919 + seed, torch.randint(0, 5, (B,), generator=g), fc, q_state, q_kind, p_prev,
            torch.zeros(4, dtype=torch.int32), 0.9, 5, 0.95, mode, beta, form, 1e-6, tail]
    return args


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("spec", list(law.MODE_SPECS))
@pytest.mark.parametrize("tail", [ref.TAIL_UNIFORM, ref.TAIL_LEFT])
def test_clean_mutant_copy_equals_reference(spec, tail):
    """``mutants.make(None)`` is the reference, bit for bit (outputs and every state tensor)."""
    mode, beta, form, vp = law.MODE_SPECS[spec]
    for s in range(3):
        args = _random_call(100 + s, mode, beta, form, vp, tail, forced=(s == 2))
        a, b = _clone(args), _clone(args)
        out_ref = ref.jacobi_step(*a)
        out_mut = mutants.make(None)(*b)
        for x, y in zip(out_ref, out_mut):
            assert torch.equal(x, y)
        for i in (9, 10, 11, 12):
            assert torch.equal(a[i], b[i])


# ----------------------------------------------------------------------------- the helpers themselves

def test_chisq_calibrated_under_null():
    """Exact sampling from the null: p-values roughly uniform (no excess of small ones)."""
    rs = np.random.RandomState(0)
    p = rs.dirichlet(np.ones(8))
    pv = [stats.chisq_gof(rs.multinomial(20000, p), p).p_value for _ in range(400)]
    assert 0.3 < np.mean(np.array(pv) < 0.5) < 0.7
    assert np.mean(np.array(pv) < 0.01) < 0.04
    s, df, pv2 = stats.two_sample(rs.multinomial(20000, p), rs.multinomial(30000, p))
    assert pv2 > stats.ALPHA


def test_chisq_detects_delta_with_required_n():
    """The least favourable sampler ``required_n`` is sized for: a cell of probability 1/2 off by 0.02,
    the others rescaled (noncentrality 4 n delta^2, the smallest any 0.02 error gives). At the documented
    sample size it is rejected at about the computed power 0.99; at half of it clearly less often
    (power 0.51), so the test would fail if ``required_n`` were too small. The TV bound and the
    two-sample test also see it."""
    rs = np.random.RandomState(1)
    k = 6
    n = stats.required_n(k)
    p = np.concatenate([[0.5], np.full(k - 1, 0.5 / (k - 1))])
    q = np.concatenate([[0.5 + stats.DELTA], p[1:] * (0.5 - stats.DELTA) / 0.5])
    lam = n * float(((q - p) ** 2 / p).sum())
    assert abs(lam - 4 * n * stats.DELTA ** 2) < 1e-6 * lam            # the worst case, exactly

    def rate(m):
        return np.mean([stats.chisq_gof(rs.multinomial(m, q), p).p_value < stats.ALPHA for _ in range(400)])
    rej, rej_half = rate(n), rate(n // 2)
    print(f"k={k} n={n}: rejection rate {rej:.3f} (computed power {stats.chisq_power(n, k):.4f}), "
          f"at n/2 {rej_half:.3f} (computed {stats.chisq_power(n // 2, k):.4f})")
    assert rej >= 0.97                      # power 0.99: 400 draws put the rate below 0.97 with p < 1e-3
    assert rej_half <= 0.7                  # power 0.51 at n/2
    big = 4 * n
    l1, eps, ok = stats.tv_test(rs.multinomial(big, q), p)
    assert not ok and l1 > eps
    assert stats.tv_test(rs.multinomial(big, p), p)[2]
    assert stats.two_sample(rs.multinomial(big, q), rs.multinomial(big, p))[2] < stats.ALPHA


def test_chisq_zero_probability_cell_fails():
    r = stats.chisq_gof([10, 0, 1], [0.5, 0.5, 0.0])
    assert r.p_value == 0.0
