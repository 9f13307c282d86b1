"""The counter-based generator (SPEC section 7, ``sjd_kernels.rng``): bits, layout, laws, batch invariance.

Law checks use ``stats`` (chi-square, false-alarm rate 1e-6 per check, sample sizes with power
>= 0.99 against an absolute error of 0.02 in any cell).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import stats  # noqa: E402

from sjd_kernels import rng  # noqa: E402

I64 = torch.int64
M32 = 0xFFFFFFFF

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _philox_py(ctr, key, rounds=10):
    """Philox4x32 with Python integers (an independent implementation for cross-checks)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    got = rng.philox4x32(*ctr, *key)
    assert tuple(int(x) for x in got) == want
    assert _philox_py(ctr, key) == want


def test_philox_matches_python_ints_on_random_counters():
    rs = np.random.RandomState(0)
    c = rs.randint(0, 2 ** 32, size=(6, 300), dtype=np.uint64).astype(np.int64)
    got = torch.stack(rng.philox4x32(*[torch.from_numpy(x) for x in c]), 1).tolist()
    for i in range(c.shape[1]):
        col = [int(x) for x in c[:, i]]
        assert tuple(got[i]) == _philox_py(tuple(col[:4]), tuple(col[4:]))


def test_mulhilo_exact():
    vals = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, M32, 0xDEADBEEF]
    a = torch.tensor(vals, dtype=I64)
    for m in (0xD2511F53, 0xCD9E8D57):
        hi, lo = rng._mulhilo(a, m)
        for v, h, l in zip(vals, hi.tolist(), lo.tolist()):
            assert (h, l) == ((v * m) >> 32, (v * m) & M32)


@pytest.mark.parametrize("seed", [0, 12345, 2 ** 32 + 7, 2 ** 62 + 2 ** 40 + 3, -1, -(2 ** 40)])
def test_lane_words_layout(seed):
    """counter = (lane // 4, position, step, stream), key = (seed lo, seed hi), word = lane % 4."""
    pos, step, stream, n = 1234567, 42, rng.STREAM_RESID, 11
    w = rng.lane_words(torch.tensor(seed), pos, step, stream, n).tolist()
    key = (seed & M32, (seed >> 32) & M32)
    for lane in range(n):
        assert w[lane] == _philox_py((lane // 4, pos, step, stream), key)[lane % 4]
    assert rng.four_words(torch.tensor(seed), pos, step, stream).tolist() == w[:4]


def test_counters_wrap_mod_2_32():
    a = rng.lane_words(torch.tensor(5), 2 ** 32 + 3, 2 ** 32 + 1, rng.STREAM_DRAFT, 4)
    b = rng.lane_words(torch.tensor(5), 3, 1, rng.STREAM_DRAFT, 4)
    assert torch.equal(a, b)


def test_same_seed_same_numbers_whatever_the_batch():
    """Broadcast shapes and batch membership do not change a request's numbers (SPEC section 7)."""
    seeds = torch.tensor([3, 2 ** 33 + 1, 99, 3], dtype=I64)
    pos = torch.tensor([[0, 1, 2], [10, 11, 12], [5, 6, 7], [0, 1, 2]], dtype=I64)
    step = torch.tensor([0, 3, 1, 0], dtype=I64)
    full = rng.lane_words(seeds.view(4, 1), pos, step.view(4, 1), rng.STREAM_GUMBEL, 9)
    assert full.shape == (4, 3, 9)
    for b in range(4):
        alone = rng.lane_words(seeds[b], pos[b], step[b], rng.STREAM_GUMBEL, 9)
        assert torch.equal(full[b], alone)
        for j in range(3):
            one = rng.lane_words(int(seeds[b]), int(pos[b, j]), int(step[b]), rng.STREAM_GUMBEL, 9)
            assert torch.equal(full[b, j], one)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = rng.lane_words(seeds[perm].view(4, 1), pos[perm], step[perm].view(4, 1), rng.STREAM_GUMBEL, 9)
    assert torch.equal(shuffled, full[perm])
    assert torch.equal(full[0], full[3])                      # same seed, same counters: same numbers
    tok = rng.uniform_token(seeds.view(4, 1), pos, step.view(4, 1), rng.STREAM_TAIL, 1000)
    for b in range(4):
        assert torch.equal(tok[b], rng.uniform_token(seeds[b], pos[b], step[b], rng.STREAM_TAIL, 1000))


# ----------------------------------------------------------------------------- independence

N_IND = stats.required_n(16) + 2000


def _top2(words):
    return (words >> 30).numpy()                                 # the two highest bits: 4 cells


@pytest.mark.parametrize("what", ["stream", "position", "step", "seed", "lane_group", "word"])
def test_independence_of_neighbouring_counters(what):
    """Joint law of the top 2 bits of two numbers whose counters differ in one coordinate: uniform on 16 cells."""
    n = N_IND
    seed = torch.arange(n, dtype=I64) * 2654435761 + 17
    pos = torch.arange(n, dtype=I64) % 997
    step = torch.arange(n, dtype=I64) % 13
    a = rng.lane_words(seed, pos, step, rng.STREAM_ACCEPT, 8)
    if what == "stream":
        x, y = a[:, 0], rng.lane_words(seed, pos, step, rng.STREAM_RESID, 1)[:, 0]
    elif what == "position":
        x, y = a[:, 0], rng.lane_words(seed, pos + 1, step, rng.STREAM_ACCEPT, 1)[:, 0]
    elif what == "step":
        x, y = a[:, 0], rng.lane_words(seed, pos, step + 1, rng.STREAM_ACCEPT, 1)[:, 0]
    elif what == "seed":
        x, y = a[:, 0], rng.lane_words(seed + 1, pos, step, rng.STREAM_ACCEPT, 1)[:, 0]
    elif what == "lane_group":
        x, y = a[:, 3], a[:, 4]
    else:
        x, y = a[:, 0], a[:, 1]
    cells = _top2(x) * 4 + _top2(y)
    r = stats.assert_law(cells, np.full(16, 1 / 16), f"independence/{what}")
    print(r)
    assert float(((x & 0xFFFF) == (y & 0xFFFF)).double().mean()) < 1e-3     # no copied low bits


def test_streams_are_distinct_numbers():
    seed = torch.arange(4096, dtype=I64)
    ws = [rng.four_words(seed, 5, 2, s) for s in range(1, 11)]
    for i in range(len(ws)):
        for k in range(i + 1, len(ws)):
            assert float((ws[i] == ws[k]).double().mean()) < 1e-3


# ----------------------------------------------------------------------------- derived numbers

EXTREME_WORDS = torch.tensor([0, 1, 0xFF, 0x100, 0x7FFFFFFF, 0xFFFFFE00, 0xFFFFFEFF, 0xFFFFFF00, M32], dtype=I64)


def test_uniform24_range_and_law():
    u = rng.uniform24(EXTREME_WORDS)
    assert u.dtype == torch.float32
    assert (u >= 0).all() and (u < 1).all(), u.tolist()
    assert float(u[0]) == 0.0 and float(u[-1]) == 1.0 - 2.0 ** -24
    n = stats.required_n(64) + 2000
    w = rng.lane_words(torch.arange(n, dtype=I64), 3, 0, rng.STREAM_ACCEPT, 1)[:, 0]
    u = rng.uniform24(w)
    assert (u >= 0).all() and (u < 1).all()
    print(stats.assert_law((u * 64).floor().long().numpy(), np.full(64, 1 / 64), "uniform24/64 bins"))


def test_exponential_finite_positive_on_every_word():
    """Exp(1) noise must be finite and > 0 for every possible word, including the largest ones.

    ``(k + 0.5) * 2^-24`` is not representable in float32 for k = 2^24 - 1 and rounds to 1, so
    ``-log`` gives 0 (a lane whose race key becomes -inf instead of +inf).
    """
    e = rng.exponential(EXTREME_WORDS)
    assert torch.isfinite(e).all(), e.tolist()
    assert (e > 0).all(), f"exponential noise not positive for words {EXTREME_WORDS[e <= 0].tolist()}: {e.tolist()}"


def test_exponential_law():
    n = stats.required_n(10) + 2000
    e = rng.exponential(rng.lane_words(torch.arange(n, dtype=I64), 0, 0, rng.STREAM_RESID, 1)[:, 0]).double()
    edges = -np.log(1 - np.arange(1, 10) / 10)                   # deciles of Exp(1)
    cells = np.searchsorted(edges, e.numpy())
    print(stats.assert_law(cells, np.full(10, 0.1), "exponential/deciles"))


RACE_WEIGHTS = [
    ("plain", [0.1, 0.2, 0.3, 0.4]),
    ("zeros_unnormalised", [0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.5]),
    ("ties", [1.0, 1.0, 1.0, 2.0, 0.0]),
    ("tiny_and_big", [1e-3, 0.999 - 1e-3, 1e-3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("label,w", RACE_WEIGHTS, ids=[r[0] for r in RACE_WEIGHTS])
def test_race_law(label, w):
    """``race(w, E)`` picks lane i with probability w_i / sum(w); zero-weight lanes never win."""
    w = torch.tensor(w, dtype=torch.float32)
    V = w.numel()
    p = (w.double() / w.double().sum()).numpy()
    n = stats.required_n(int((p > 0).sum())) + 2000
    E = rng.exponential(rng.lane_words(torch.arange(n, dtype=I64) + 7, 11, 0, rng.STREAM_GUMBEL, V))
    idx = rng.race(w.expand(n, V), E)
    print(stats.assert_law(idx.numpy(), p, f"race/{label}"))


def test_race_zero_mass_and_ties():
    E = torch.ones(3, 4)
    assert rng.race(torch.zeros(3, 4), E).tolist() == [-1, -1, -1]
    assert rng.race(torch.tensor([[0.0, 1.0, 1.0, 0.0]]), torch.ones(1, 4)).tolist() == [1]   # lowest lane on ties
    assert rng.race(torch.tensor([[-1.0, 0.0, 2.0, 0.0]]), torch.ones(1, 4)).tolist() == [2]  # negatives ignored


def test_race_never_picks_zero_weight_lane_with_extreme_noise():
    """The only positive lane must win whatever its noise, the largest word included (greedy and forced
    rows are one-hot; a zero-probability token must never be emitted)."""
    V = 5
    for word in EXTREME_WORDS.tolist():
        for lane in range(V):
            w = torch.zeros(1, V)
            w[0, lane] = 1.0
            words = torch.full((1, V), 12345, dtype=I64)
            words[0, lane] = word
            got = int(rng.race(w, rng.exponential(words))[0])
            assert got == lane, f"race picked zero-weight lane {got} (positive lane {lane} has word {word:#x})"


@pytest.mark.parametrize("V", [3, 5, 7, 1000, 3 * 2 ** 30])
def test_uniform_token_law(V):
    """Uniform on [0, V) for V not a power of two. With V = 3 * 2^30, a modulo without the rejection
    would put half of the mass on the first third."""
    cells = min(V, 10)
    n = stats.required_n(cells) + 2000
    t = rng.uniform_token(torch.arange(n, dtype=I64) * 3 + 1, torch.arange(n, dtype=I64) % 50, 2,
                          rng.STREAM_TAIL, V)
    assert int(t.min()) >= 0 and int(t.max()) < V
    if V <= 10:
        p = np.full(V, 1.0 / V)
        binned = t.numpy()
    else:
        edges = np.floor(np.arange(cells + 1) * V / cells).astype(np.int64)
        p = np.diff(edges) / V
        binned = np.searchsorted(edges, t.numpy(), side="right") - 1
    print(stats.assert_law(binned, p, f"uniform_token/V={V}"))


def test_uniform_token_rejection_rule(monkeypatch):
    """The first word below ``2^32 - 2^32 mod V`` is used, modulo V; the last word if none is."""
    V = 3 * 2 ** 30
    lim = 2 ** 32 - (2 ** 32) % V
    words = torch.tensor([[lim, lim + 5, 7, 9], [1, lim, 2, 3], [lim + 1, lim + 2, lim + 3, lim + 4]], dtype=I64)
    monkeypatch.setattr(rng, "four_words", lambda *a, **k: words)
    t = rng.uniform_token(torch.zeros(3, dtype=I64), 0, 0, rng.STREAM_TAIL, V)
    assert t.tolist() == [7, 1, (lim + 4) % V]


def test_uniform_token_v1():
    assert rng.uniform_token(torch.arange(100, dtype=I64), 0, 0, rng.STREAM_TAIL, 1).eq(0).all()
