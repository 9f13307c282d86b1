"""``target_probs`` / ``combine_logits`` (SPEC section 2) against an independent float64 implementation.

The oracle ``stats.target_law64`` is written separately (numpy, float64, a level-set top-p
rather than sort + cumsum). Random cases are chosen with margins far above float32 rounding
(asserted), so the supports must agree exactly and the probabilities to 2e-6.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import stats  # noqa: E402

from sjd_kernels.reference.target import combine_logits, target_probs  # noqa: E402

TOL = 2e-6


def _ref(c, T, k, p, u=None, s=None):
    x = combine_logits(c, u, s)
    return target_probs(x, T, k, p)


def _assert_close(got, want, label=""):
    got = got.double().numpy()
    assert got.shape == want.shape
    assert ((got > 0) == (want > 0)).all(), f"{label}: support differs\n{got}\n{want}"
    err = np.abs(got - want).max()
    assert err < TOL, f"{label}: max error {err}"
    assert np.allclose(got.sum(-1), 1.0, atol=1e-5)


def _topp_margin(P64, p):
    """Distance of the top-p decision from a float tie: min over rows of |cumulative mass - p|."""
    out = np.inf
    for row in P64.reshape(-1, P64.shape[-1]):
        cum = np.cumsum(np.sort(row)[::-1])
        out = min(out, np.abs(cum - p).min())
    return out


CASES = [  # (T, top_k, top_p, cfg)
    (1.0, 0, 1.0, None), (0.7, 0, 1.0, None), (1.5, 5, 1.0, None), (1.0, 1, 1.0, None), (1.0, 12, 1.0, None),
    (1.0, 0, 0.9, None), (0.8, 6, 0.7, None), (1.0, 0, 1.0, 3.0), (1.2, 4, 0.8, 5.0), (1.0, 0, 1e-4, None),
    (0.0, 0, 1.0, None), (0.0, 3, 0.5, 2.0),
]


@pytest.mark.parametrize("T,k,p,cfg", CASES)
def test_random_rows_match_float64(T, k, p, cfg):
    V = 12
    g = torch.Generator().manual_seed(int(T * 100) + k * 7 + int(p * 1000) + int(cfg or 0))
    c = torch.randn(64, 3, V, generator=g) * 2
    u = torch.randn(64, 3, V, generator=g) * 2 if cfg else None
    s = torch.full((64,), cfg, dtype=torch.float32) if cfg else None
    x64 = combine_logits(c, u, s).double().numpy()              # the float32 CFG, then the float64 oracle
    want = stats.target_law64(x64, T, k, p)
    want_direct = stats.target_law64(c.numpy(), T, k, p, None if u is None else u.numpy(), cfg)
    assert np.abs(want - want_direct).max() < 1e-5               # CFG in float32 vs float64: same law
    if 0 < p < 1 and T > 0:
        assert _topp_margin(want, p) > 1e-5
    _assert_close(_ref(c, T, k, p, u, s), want, f"T={T} k={k} p={p} cfg={cfg}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    g = torch.Generator().manual_seed(3)
    c = (torch.randn(16, 2, 9, generator=g) * 3).to(dtype)
    u = (torch.randn(16, 2, 9, generator=g) * 3).to(dtype)
    s = torch.full((16,), 2.5)
    want = stats.target_law64(c.float().numpy(), 0.9, 5, 1.0, u.float().numpy(), 2.5)
    _assert_close(_ref(c, 0.9, 5, 1.0, u, s), want, str(dtype))


def test_cfg_scale_endpoints():
    g = torch.Generator().manual_seed(4)
    c, u = torch.randn(5, 1, 6, generator=g), torch.randn(5, 1, 6, generator=g)
    assert torch.allclose(combine_logits(c, u, torch.zeros(5)), u)
    assert torch.allclose(combine_logits(c, u, torch.ones(5)), c)
    assert torch.equal(combine_logits(c, None, None), c)
    s = torch.tensor([0.0, 1.0, 2.0, 3.0, 7.5])                 # per request
    assert torch.allclose(combine_logits(c, u, s), u + s.view(5, 1, 1) * (c - u))


def test_topk_keeps_ties_at_the_boundary():
    x = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0, 0.0]])
    P = _ref(x, 1.0, 2, 1.0)
    assert (P[0] > 0).tolist() == [True, True, True, False, True, False]
    _assert_close(P, stats.target_law64(x.numpy(), 1.0, 2, 1.0))
    P1 = _ref(torch.tensor([[1.0, 4.0, 4.0, 0.0]]), 1.0, 1, 1.0)   # k = 1 with a tied maximum: both kept
    assert P1[0].tolist() == [0.0, 0.5, 0.5, 0.0]


def test_topk_edges():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 10, generator=g)
    assert torch.equal(_ref(x, 1.0, 10, 1.0), _ref(x, 1.0, 0, 1.0))            # k = V: no truncation
    P = _ref(x, 1.0, 1, 1.0)                                                  # k = 1: the argmax only
    assert torch.equal(P, torch.nn.functional.one_hot(x.argmax(-1), 10).float())


def test_topp_threshold_keeps_ties():
    # probabilities 0.4, 0.2, 0.2, 0.2: p = 0.5 reaches its mass inside the tie, so all three 0.2 stay
    x = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    P = _ref(x, 1.0, 0, 0.5)
    assert (P[0] > 0).all()
    _assert_close(P, stats.target_law64(x.numpy(), 1.0, 0, 0.5))
    P = _ref(x, 1.0, 0, 0.4)                                   # mass reached by the first token alone
    assert P[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_topp_tiny_keeps_the_maximum_and_its_ties():
    x = torch.tensor([[0.5, 2.0, -1.0, 2.0, 1.0]])
    P = _ref(x, 1.0, 0, 1e-9)
    assert P[0].tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]
    x = torch.tensor([[0.5, 2.0, -1.0, 1.9, 1.0]])
    assert _ref(x, 1.0, 0, 1e-9)[0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_topp_compares_in_float32():
    """top_p is a float32, as the kernels take it, and the mass it is compared with is rounded to
    float32: a top probability of exactly float32(0.7) (below the double 0.7) reaches top_p = 0.7,
    and a top_p that rounds to 1 is off (every lane kept, however small)."""
    x = torch.tensor([[0.8472979068756104, 0.0]])               # P = [float32(0.7), 0.3]
    P = _ref(x, 1.0, 0, 1.0)
    assert P[0, 0].item() == float(np.float32(0.7)) and P[0, 0].item() < 0.7
    assert _ref(x, 1.0, 0, 0.7)[0].tolist() == [1.0, 0.0]
    assert (_ref(x, 1.0, 0, float(np.nextafter(np.float32(0.7), np.float32(1.0))))[0] > 0).all()
    x = torch.randn(4, 2048, generator=torch.Generator().manual_seed(0)) * 3     # tails below 1e-8
    assert np.float32(0.99999999) == 1.0
    assert torch.equal(_ref(x, 1.0, 0, 0.99999999), _ref(x, 1.0, 0, 1.0))
    assert not torch.equal(_ref(x, 1.0, 0, 0.9999), _ref(x, 1.0, 0, 1.0))


def test_greedy_lowest_id_on_ties():
    x = torch.tensor([[1.0, 5.0, 5.0, 2.0], [7.0, 7.0, 7.0, 7.0], [-1.0, -3.0, -1.0, -2.0]])
    P = _ref(x, 0.0, 0, 1.0)
    assert P.argmax(-1).tolist() == [1, 0, 0]
    assert torch.equal(P.sum(-1), torch.ones(3))
    _assert_close(P, stats.target_law64(x.numpy(), 0.0, 0, 1.0))


def test_masked_lanes_and_bad_rows():
    ninf, nan, inf = float("-inf"), float("nan"), float("inf")
    x = torch.tensor([[0.0, ninf, 1.0, ninf], [0.0, nan, 1.0, 2.0], [0.0, inf, 1.0, 2.0], [ninf] * 4])
    P = _ref(x, 1.0, 0, 1.0)
    _assert_close(P[:1], stats.target_law64(x[:1].numpy(), 1.0, 0, 1.0))
    assert P[0, 1] == 0 and P[0, 3] == 0
    assert torch.isnan(P[1:]).all(dim=-1).all(), "NaN, +inf and all -inf rows must come back as NaN rows"
    assert torch.isnan(_ref(x, 0.0, 0, 1.0)[1:]).all(-1).all()
    assert torch.isnan(_ref(x, 1.0, 2, 0.5)[1:]).all(-1).all()


def test_temperature_scales_before_topk_and_topp():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 15, generator=g) * 2
    for T in (0.25, 0.5, 2.0, 4.0):
        want = stats.target_law64(x.numpy(), T, 6, 0.85)
        assert _topp_margin(stats.target_law64(x.numpy(), T, 6, 1.0), 0.85) > 1e-5
        _assert_close(_ref(x, T, 6, 0.85), want, f"T={T}")


def test_v1():
    assert _ref(torch.tensor([[[3.0]]]), 1.0, 0, 1.0).tolist() == [[[1.0]]]
    assert _ref(torch.tensor([[[3.0]]]), 0.0, 1, 0.5).tolist() == [[[1.0]]]
