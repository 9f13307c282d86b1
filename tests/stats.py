"""Statistical helpers shared by the law tests, and the float64 target law they compare against.

Every law test compares observed counts with an exactly computed law (never with the
pipeline under test) using a hypothesis test with a stated false-alarm rate:

- ``chisq_gof``: Pearson chi-square goodness of fit. Cells whose expected count is below
  ``MIN_EXPECTED`` are pooled into one cell (so the chi-square approximation holds); a count
  in a zero-probability cell is an immediate failure (p-value 0). Default false-alarm rate
  ``ALPHA = 1e-6`` per check.
- ``required_n`` / ``chisq_power``: the sample size needed for the chi-square test to detect an
  absolute error of ``DELTA = 0.02`` in any single cell's probability with power ``POWER = 0.99``.
  For a null ``p`` and an alternative that moves cell i by d (the rest rescaled proportionally,
  which minimises the discrepancy) the noncentrality is ``N d^2 / (p_i (1 - p_i))``, at least
  ``4 N d^2``; the power is ``P(ncx2(k - 1, lambda) > chi2_{k-1}(1 - alpha))``. ``assert_law``
  checks the power before it tests, so a test cannot silently run with too few samples.
- ``tv_test``: a distribution-free alternative, from the L1 concentration bound
  ``P(||p_hat - p||_1 >= eps) <= (2^k - 2) exp(-N eps^2 / 2)`` (Weissman et al. 2003).
- ``two_sample``: chi-square test of homogeneity of two count vectors (2 x k table).

Numbers (alpha 1e-6, delta 0.02, power 0.99, worst case over nulls, ``required_n``): 3 cells
need N = 35 188; 6 cells 40 286; 16 cells 50 510; 27 cells 58 222; 81 cells 82 476.

The tests use fixed seeds, so each run is deterministic; alpha is the chance that a seed choice
makes a correct implementation fail one check. About 240 chi-square checks run in the whole suite
(torch backend), so the chance of any false alarm is below 2.4e-4 (Bonferroni).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ALPHA = 1e-6          # false-alarm rate of one law check
DELTA = 0.02          # absolute error in one cell's probability the tests must detect
POWER = 0.99          # power against that error
MIN_EXPECTED = 5.0    # cells expected below this are pooled


# ----------------------------------------------------------------------------- chi-square

@dataclass
class LawResult:
    label: str
    n: int
    cells: int          # cells after pooling
    stat: float
    df: int
    p_value: float
    power: float        # power of this check against DELTA in any cell
    worst: str          # the cells with the largest standardised residuals

    def __str__(self):
        return (f"{self.label}: n={self.n} cells={self.cells} chi2={self.stat:.1f} df={self.df} "
                f"p={self.p_value:.3g} power(d={DELTA})={self.power:.4f}  worst: {self.worst}")


def _pool(expected: np.ndarray, min_expected: float):
    """Index groups: cells with expected >= min_expected alone, the rest in one pooled cell."""
    big = np.flatnonzero(expected >= min_expected)
    small = np.flatnonzero(expected < min_expected)
    groups = [np.array([i]) for i in big]
    if small.size:
        if expected[small].sum() >= min_expected or not groups:
            groups.append(small)
        else:                                    # too little even pooled: merge into the smallest big cell
            j = int(np.argmin([expected[g].sum() for g in groups]))
            groups[j] = np.concatenate([groups[j], small])
    return groups


def chisq_power(n: int, cells: int, delta: float = DELTA, alpha: float = ALPHA, p=None) -> float:
    """Power of the chi-square test (df = cells - 1) against an absolute error ``delta`` in one cell.

    With ``p`` (the null cell probabilities) the least favourable cell is used, else the
    worst case over all nulls (``p_i (1 - p_i) <= 1/4``).
    """
    if cells < 2:
        return 0.0
    if p is None:
        var = 0.25
    else:
        p = np.asarray(p, dtype=np.float64)
        var = float(np.max(p * (1 - p)))
    lam = n * delta ** 2 / var
    crit = stats.chi2.isf(alpha, cells - 1)
    return float(stats.ncx2.sf(crit, cells - 1, lam))


def required_n(cells: int, delta: float = DELTA, alpha: float = ALPHA, power: float = POWER) -> int:
    """Smallest N with ``chisq_power(N, cells) >= power`` in the worst case over nulls."""
    crit = stats.chi2.isf(alpha, cells - 1)
    lam = optimize.brentq(lambda l: stats.ncx2.sf(crit, cells - 1, l) - power, 1e-6, 1e6)
    return int(math.ceil(lam * 0.25 / delta ** 2))


def chisq_gof(counts, p, label: str = "", alpha: float = ALPHA, min_expected: float = MIN_EXPECTED) -> LawResult:
    """Pearson chi-square of ``counts [k]`` against the exact law ``p [k]`` (float64, sums to 1)."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    assert counts.shape == p.shape, (counts.shape, p.shape)
    assert abs(p.sum() - 1.0) < 1e-9, f"null law sums to {p.sum()}"
    n = int(counts.sum())
    exp = n * p
    zero = p <= 0
    if (counts[zero] > 0).any():
        bad = np.flatnonzero(zero & (counts > 0))
        return LawResult(label, n, int((~zero).sum()), float("inf"), 0, 0.0, 1.0,
                         f"{int(counts[bad].sum())} samples in zero-probability cells {bad[:8].tolist()}")
    keep = ~zero
    groups = _pool(exp[keep], min_expected)
    idx = np.flatnonzero(keep)
    o = np.array([counts[idx[g]].sum() for g in groups])
    e = np.array([exp[idx[g]].sum() for g in groups])
    df = len(groups) - 1
    if df < 1:      # a deterministic law: any sample off its one cell already failed above
        return LawResult(label, n, len(groups), 0.0, 0, 1.0, 1.0 - (1.0 - DELTA) ** n, "one cell")
    stat = float(((o - e) ** 2 / e).sum())
    pv = float(stats.chi2.sf(stat, df))
    z = (o - e) / np.sqrt(e)
    order = np.argsort(-np.abs(z))[:3]
    worst = ", ".join(f"cell{idx[groups[i]].tolist() if len(groups[i]) < 4 else '(pooled)'} "
                      f"obs {o[i] / n:.4f} exp {e[i] / n:.4f}" for i in order)
    pw = chisq_power(n, len(groups), DELTA, alpha, e / n)
    return LawResult(label, n, len(groups), stat, df, pv, pw, worst)


def assert_law(samples_or_counts, p, label: str = "", alpha: float = ALPHA, power: float = POWER,
               counts: bool = False) -> LawResult:
    """Test integer ``samples`` (values in ``[0, len(p))``) against ``p``; assert power, then the law."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if counts:
        c = np.asarray(samples_or_counts).reshape(-1)
    else:
        s = np.asarray(samples_or_counts).reshape(-1)
        assert s.min() >= 0 and s.max() < p.size, f"{label}: sample values outside [0, {p.size})"
        c = np.bincount(s, minlength=p.size)
    r = chisq_gof(c, p, label, alpha)
    assert r.power >= power, f"{label}: only {r.n} samples, power {r.power:.4f} < {power} ({r})"
    assert r.p_value >= alpha, f"law rejected at alpha={alpha}: {r}"
    return r


# ----------------------------------------------------------------------------- alternatives

def tv_test(counts, p, alpha: float = ALPHA):
    """Distribution-free L1 test: returns ``(l1, eps, passed)``; rejects when ``||p_hat - p||_1 >= eps``.

    ``eps = sqrt(2 (ln(2^k - 2) + ln(1/alpha)) / N)`` makes the false-alarm rate at most alpha
    for any null. An error ``d`` in one cell moves the L1 distance by at least ``2 d`` - hence
    ``N >= 2 (k ln 2 + ln(1/alpha)) / d^2`` (k = 6: 90 000) detects DELTA about half the time;
    it needs more samples than the chi-square test but no asymptotics.
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    n = counts.sum()
    k = p.size
    l1 = float(np.abs(counts / n - p).sum())
    log_terms = (k * math.log(2.0) if k > 60 else math.log(max(2.0 ** k - 2.0, 1.0))) + math.log(1.0 / alpha)
    eps = math.sqrt(2.0 * log_terms / n)
    return l1, eps, l1 < eps


def two_sample(counts_a, counts_b, alpha: float = ALPHA, min_expected: float = MIN_EXPECTED):
    """Chi-square homogeneity test of two count vectors over the same cells: ``(stat, df, p_value)``.

    Cells whose pooled expectation is small are merged, as in ``chisq_gof``.
    """
    a = np.asarray(counts_a, dtype=np.float64).reshape(-1)
    b = np.asarray(counts_b, dtype=np.float64).reshape(-1)
    na, nb = a.sum(), b.sum()
    tot = a + b
    keep = tot > 0
    share = tot[keep] / (na + nb)
    groups = _pool(min(na, nb) * share, min_expected)
    ia = np.flatnonzero(keep)
    A = np.array([a[ia[g]].sum() for g in groups])
    Bc = np.array([b[ia[g]].sum() for g in groups])
    T = A + Bc
    ea, eb = na * T / (na + nb), nb * T / (na + nb)
    stat = float(((A - ea) ** 2 / ea).sum() + ((Bc - eb) ** 2 / eb).sum())
    df = len(groups) - 1
    return stat, df, float(stats.chi2.sf(stat, df)) if df > 0 else 1.0


# ----------------------------------------------------------------------------- exact laws

def target_law64(cond, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, uncond=None, cfg=None):
    """The SPEC section 2 target law in float64 numpy, written independently of the package.

    ``cond`` (and ``uncond``) ``[..., V]`` logits (any array-like; cast to float64), ``cfg`` a scalar
    or an array broadcasting against ``[...]``. Returns float64 probabilities ``[..., V]``.
    top-k keeps every logit >= the k-th largest (ties kept); top-p keeps the probabilities >= the
    largest threshold t whose superlevel set ``{P >= t}`` has mass >= p (ties kept); T = 0 is
    one-hot at the lowest-id maximum.
    """
    c = np.asarray(cond, dtype=np.float64)
    if uncond is not None:
        u = np.asarray(uncond, dtype=np.float64)
        s = np.asarray(cfg, dtype=np.float64)[..., None]
        x = u + s * (c - u)
    else:
        x = c
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        out[r] = _row64(x[r], temperature, top_k, top_p)
    return out.reshape(shape)


def _row64(x, T, k, p):
    V = x.size
    if T == 0.0:
        out = np.zeros(V)
        best = 0
        for i in range(1, V):                # strict > keeps the lowest id among equal maxima
            if x[i] > x[best]:
                best = i
        out[best] = 1.0
        return out
    y = x / T
    finite = np.isfinite(y)
    if 0 < k < V:
        kth = np.sort(y[finite])[::-1][k - 1] if finite.sum() >= k else -np.inf
        finite = finite & (y >= kth)
    w = np.where(finite, np.exp(np.where(finite, y, 0.0) - y[finite].max()), 0.0)
    P = w / w.sum()
    if p < 1.0:
        levels = np.unique(P[P > 0])[::-1]     # distinct probabilities, descending
        thr = levels[-1]
        for t in levels:
            if P[P >= t].sum() >= p:
                thr = t
                break
        P = np.where(P >= thr, P, 0.0)
        P = P / P.sum()
    return P


def sequence_codes(x: np.ndarray, V: int) -> np.ndarray:
    """Mixed-radix code ``sum_i x[..., i] V^i`` of token sequences ``[..., L]`` (cells of a joint law)."""
    x = np.asarray(x, dtype=np.int64)
    return (x * (V ** np.arange(x.shape[-1]))).sum(-1)
