"""Shared Triton sampling primitives (twins of ``sjd_kernels.rng`` and ``sjd_kernels.reference.target``).

- ``uniform24`` / ``exponential``: the derived numbers of a Philox word, same formulas as the reference;
  ``uniform_token``: the 4-word rejection rule of ``rng.uniform_token``.
- ``race``: the exponential race ``argmax_i w_i / E_i`` over lanes with ``w_i > 0``, lowest lane
  on ties, padded lanes masked, -1 on zero mass.
- ``kth_largest_key``: the k-th largest value (ties kept) by a bracket search over the
  order-preserving int32 image of float32 values (value-halving pivots), in two halves
  (``kth_init``, or ``kth_init_row`` from a known row maximum; ``kth_rounds``) that a kernel can
  run over different tiles; ``top_p_key``: the top-p probability threshold by a bracket search
  over probability bits.
- ``softmax_top_p``: softmax of top-k-masked scaled logits and the top-p cut; ``target_row``: the
  whole target law of a row; ``prefix_count(_total)``: ordered compaction slots.

Every function works on one 1-D tile ``[BLOCK]`` held in registers. Exactness choices: the race key
uses IEEE division (``div_rn``; Triton's ``/`` is approximate on NVIDIA), ties are broken by a
``min`` over the lanes reaching the maximum (never by an argmax over a reordered reduction), and
the log of the noise is the accurate one. ``INTERP`` (constexpr) selects numpy-backed math under
the Triton interpreter, where libdevice calls do not exist.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

TWO_M24: tl.constexpr = tl.constexpr(5.9604644775390625e-08)   # 2**-24
INT32_MAX: tl.constexpr = tl.constexpr(2147483647)
BINADE: tl.constexpr = tl.constexpr(1 << 23)     # float32 bit patterns in one binade
KEY_NEG_INF: tl.constexpr = tl.constexpr(-2139095041)   # float_key(-inf): 0xFF800000 ^ 0x7FFFFFFF as int32


@triton.jit
def uniform24(w):
    """Acceptance uniform ``(w >> 8) * 2**-24`` in [0, 1) from a uint32 word, float32 (exact)."""
    return (w >> 8).to(tl.float32) * TWO_M24


@triton.jit
def exponential(w):
    """Exp(1) noise ``-log(((w >> 8) + 0.5) * 2**-24)`` from a uint32 word, float32, as ``rng.exponential``.

    ``(w >> 8) + 0.5`` rounds to float32 as in the reference (25 bits do not fit for
    ``w >> 8 >= 2**23``; both round to nearest even), so ``w >> 8 == 2**24 - 1`` gives ``u = 1``
    and ``-log(u) = -0.0`` there too; both floor E at ``2**-25`` so that lane can still win. ``tl.log`` on NVIDIA lowers to the
    libdevice ``logf`` polynomial (within an ulp), not ``lg2.approx``.
    """
    u = ((w >> 8).to(tl.float32) + 0.5) * TWO_M24
    return tl.maximum(tl.log(u) * -1.0, 2.98023223876953125e-08)   # floor 2**-25, as rng.E_FLOOR


@triton.jit
def exp_accurate(x, INTERP: tl.constexpr):
    """``exp`` in float32 close to the reference's (``tl.exp`` lowers to ``ex2.approx`` on NVIDIA)."""
    if INTERP:
        r = tl.exp(x)
    else:
        r = libdevice.exp(x)
    return r


@triton.jit
def pow_accurate(x, y, INTERP: tl.constexpr):
    """``x ** y`` for float32 ``x > 0`` (libdevice ``powf``; float64 under the interpreter)."""
    if INTERP:
        r = tl.exp(y * tl.log(x.to(tl.float64))).to(tl.float32)
    else:
        r = libdevice.pow(x, y)
    return r


@triton.jit
def uniform_token(w0, w1, w2, w3, V):
    """An exactly uniform id in [0, V) from 4 uint32 words, as ``rng.uniform_token`` (int64).

    The first word below ``2**32 - 2**32 % V`` is taken mod V; if all four are rejected the last is used.
    """
    v64 = tl.zeros_like(w0.to(tl.int64)) + V
    lim = 4294967296 - 4294967296 % v64
    a0 = w0.to(tl.int64)
    a1 = w1.to(tl.int64)
    a2 = w2.to(tl.int64)
    a3 = w3.to(tl.int64)
    pick = tl.where(a0 < lim, a0, tl.where(a1 < lim, a1, tl.where(a2 < lim, a2, a3)))
    return pick % v64


@triton.jit
def race(w, E, lanes, valid):
    """Exponential race over one tile, lane for lane ``rng.race``: ``argmax`` of ``w/E`` over valid lanes
    with ``w > 0`` (key -1 elsewhere), lowest lane on ties, -1 when no valid lane has ``w > 0``.

    ``w``, ``E`` float32 ``[BLOCK]``, ``lanes`` int32 lane ids, ``valid`` lanes < V (padded lanes
    never win). Like the reference, the maximum is taken over every valid lane, so a lane with
    ``E = -0.0`` (key ``-inf``) loses even to a zero-weight lane. Returns an int32 scalar.
    """
    ok = valid & (w > 0.0)
    key = tl.where(ok, tl.math.div_rn(w, E), -1.0)
    key = tl.where(valid, key, float("-inf"))
    best = tl.max(key, 0)
    idx = tl.min(tl.where(valid & (key == best), lanes, INT32_MAX), 0)
    any_ok = tl.max(ok.to(tl.int32), 0) > 0
    return tl.where(any_ok, idx, -1)


@triton.jit
def prefix_count_total(keep, BLOCK: tl.constexpr):
    """``(at, total)``: the exclusive prefix count of a 1-D boolean tile (lane ``i`` gets
    ``sum(keep[:i])``, int32: its slot in an ordered compaction of the kept lanes) and the number
    of kept lanes.

    Same values as ``tl.cumsum(keep) - keep``. For tiles of 64 lanes and more the scan runs on a
    ``[BLOCK // 32, 32]`` view (a scan along each run of 32 lanes, then over the run totals): for a
    16384-lane tile over 16 warps the sm_90 code is 1208 instructions per thread instead of 2528
    for ``tl.cumsum`` over the tile (Triton 3.6, ``python -m sjd_kernels.bench.sass --only scan``).
    """
    k = keep.to(tl.int32)
    if BLOCK >= 64:
        k2 = tl.reshape(k, [BLOCK // 32, 32])
        tot = tl.sum(k2, 1)
        at = tl.cumsum(k2, 1) - k2 + (tl.cumsum(tot, 0) - tot)[:, None]
        at = tl.reshape(at, [BLOCK])
        total = tl.sum(tot, 0)
    else:
        at = tl.cumsum(k, 0) - k
        total = tl.sum(k, 0)
    return at, total


@triton.jit
def prefix_count(keep, BLOCK: tl.constexpr):
    """The exclusive prefix count of ``prefix_count_total`` alone."""
    at, _total = prefix_count_total(keep, BLOCK)
    return at


@triton.jit
def argmax_first(x, lanes, valid):
    """Index of the maximum over valid lanes, lowest lane on ties (x has no NaN), int32 scalar."""
    xm = tl.where(valid, x, float("-inf"))
    best = tl.max(xm, 0)
    return tl.min(tl.where(valid & (xm == best), lanes, INT32_MAX), 0)


@triton.jit
def gather_lane(x, lanes, idx):
    """``x[idx]`` of a non-negative float tile (0 when idx is not a lane); exact, one term is nonzero."""
    return tl.sum(tl.where(lanes == idx, x, 0.0), 0)


@triton.jit
def float_key(x):
    """Order-preserving int32 image of float32 ``x`` (no NaN): ``a <= b`` iff ``key(a) <= key(b)``.

    Negative floats have their magnitude bits flipped; -0.0 maps to the key of +0.0 so that
    comparisons on keys and on floats agree everywhere.
    """
    i = x.to(tl.int32, bitcast=True)
    k = tl.where(i < 0, i ^ 0x7FFFFFFF, i)
    return tl.where(x == 0.0, 0, k)


@triton.jit
def key_value(kk):
    """The float32 whose ``float_key`` is ``kk`` (the inverse map; key 0 gives +0.0)."""
    return tl.where(kk < 0, kk ^ 0x7FFFFFFF, kk).to(tl.float32, bitcast=True)


@triton.jit
def _bracket_step(ok, piv, m, lo, hi, m_lo, m_hi):
    """One update of the bracket searches below: keep ``[piv, hi]`` when the predicate holds at the
    pivot, else ``[lo, piv - 1]``. ``m`` is the measure at or above the pivot (a count or a mass),
    ``m_lo`` / ``m_hi`` those at or above ``lo`` / above ``hi``; ``gap``: the half given up held
    nothing (the measure did not change), so the next round shrinks the bracket to its data."""
    gap = tl.where(ok, m == m_lo, m == m_hi)
    return (tl.where(ok, piv, lo), tl.where(ok, hi, piv - 1), tl.where(ok, m, m_lo), tl.where(ok, m_hi, m), gap)


@triton.jit
def kth_init(key, valid):
    """Start of the ``kth_largest_key`` search: ``(key, lo, hi, kmin, cge, cgt, gap)``.

    The returned key tile gives padded lanes the key -2**31, below every valid key (clamped to
    -2**31 + 1, which only a NaN could reach), so no round needs the mask: every bracket lies above
    the padding. ``kmin`` is the smallest key above -inf (value pivots start there; lanes at -inf
    sit below every pivot); ``cge`` / ``cgt`` count the keys at or above ``lo`` / above ``hi``.
    """
    key = tl.where(valid, tl.maximum(key, -INT32_MAX), -INT32_MAX - 1)
    lo = tl.min(tl.where(valid, key, INT32_MAX), 0)
    hi = tl.max(key, 0)
    kmin = tl.min(tl.where(key > KEY_NEG_INF, key, INT32_MAX), 0)
    cge = tl.sum(valid.to(tl.int32), 0)
    cgt = cge * 0
    gap = cge < 0
    return key, lo, hi, kmin, cge, cgt, gap


@triton.jit
def kth_init_row(key, valid, hi, n_valid):
    """``kth_init`` when the largest valid key ``hi`` and the number of valid lanes are known (the
    row maximum of the target row, V): the same state from one reduction, or two when a lane is
    at -inf (then ``kmin`` needs its own). ``key`` must hold no NaN."""
    key = tl.where(valid, key, -INT32_MAX - 1)
    lo = tl.min(tl.where(valid, key, INT32_MAX), 0)
    kmin = lo
    if lo <= KEY_NEG_INF:
        kmin = tl.min(tl.where(key > KEY_NEG_INF, key, INT32_MAX), 0)
    cge = tl.zeros_like(lo) + n_valid
    cgt = cge * 0
    gap = cge < 0
    return key, lo, hi, kmin, cge, cgt, gap


@triton.jit
def kth_rounds(key, k, lo, hi, kmin, cge, cgt, gap, cap):
    """Rounds of the ``kth_largest_key`` search from a bracket state; returns the new state
    ``(lo, hi, cge, cgt, gap)``.

    With ``cap = 0`` it runs to the answer (``lo == hi``). With ``cap > 0`` it also stops as soon
    as at most ``cap`` keys lie at or above ``lo`` (``cge <= cap``): the lanes with ``key >= lo``
    then hold the answer, and the search can go on over just those lanes (a tile with the other
    lanes at the padding key), from the same state, with the same rounds and the same answer,
    since every count, minimum and maximum a round takes is over keys at or above ``lo``.
    ``cge`` is exact while the loop runs; a max finish (``lo = hi``) leaves it an upper bound.
    """
    while (lo < hi) & (cge > cap):
        n = cge - cgt
        r = k - cgt
        # the bracket holds cge - cgt >= 1 keys, so the largest key <= hi and the smallest >= lo
        # lie in it: one comparison per lane (no bracket mask kept across two reductions)
        if (r == 1) | (r == n):
            if r == 1:
                m = tl.max(tl.where(key <= hi, key, -INT32_MAX - 1), 0)
            else:
                m = tl.min(tl.where(key >= lo, key, INT32_MAX), 0)
            lo = m
            hi = m
        elif gap:
            lo = tl.min(tl.where(key >= lo, key, INT32_MAX), 0)
            hi = tl.max(tl.where(key <= hi, key, -INT32_MAX - 1), 0)
            gap = cge < 0
        else:
            a = key_value(tl.maximum(lo, kmin))
            d = key_value(hi) - a
            span = hi.to(tl.int64) - lo.to(tl.int64)
            piv = (lo.to(tl.int64) + (span + 1) // 2).to(tl.int32)
            if (d > 0.0) & (d < float("inf")):
                piv = float_key(a + d * 0.5)
            piv = tl.minimum(tl.maximum(piv, lo + 1), hi)
            c = tl.sum((key >= piv).to(tl.int32), 0)
            lo, hi, cge, cgt, gap = _bracket_step(c >= k, piv, c, lo, hi, cge, cgt)
    return lo, hi, cge, cgt, gap


@triton.jit
def kth_largest_key(key, valid, k):
    """Key of the k-th largest valid element (1 <= k <= number of valid lanes), int32 scalar.

    The answer is the largest t with ``count(key >= t) >= k``: a key present in the tile, the k-th
    largest, and every element tied with it passes ``key >= t`` (ties kept, as top-k of the
    reference keeps every value ``>=`` the k-th largest). The search keeps a bracket ``[lo, hi]``
    of keys holding it, with ``cge = count(key >= lo)`` and ``cgt = count(key > hi)``:

    - a round counts the lanes at or above the pivot halfway in value between the bracket's ends
      (halfway in key when the value gap is not a positive finite float) and keeps one half;
    - a round whose half held no element (the pivot fell in a gap of the data, or values walk down
      through empty binades) is followed by one that shrinks the bracket to the smallest and
      largest key inside it;
    - when the answer is the largest (or smallest) candidate of the bracket, one max (min) ends it.

    Every round shrinks the bracket, so it ends. The host model's rows of 16384 lanes take 11-21
    reductions in all at top-k 1000 where the bisection over the key range this replaces took 34;
    ``target_row`` starts from the row maximum (``kth_init_row``: 1-2 reductions instead of 4) and
    takes 8-18 (``python -m sjd_kernels.bench.topk_model`` counts both; the CPU tests run this
    function on rows built for every branch). ``kth_init`` and ``kth_rounds`` are its two halves;
    the rows kernel of ``jacobi_step`` runs the rounds over the row until a candidate list fits,
    then over the list.
    """
    key, lo, hi, kmin, cge, cgt, gap = kth_init(key, valid)
    lo, hi, cge, cgt, gap = kth_rounds(key, k, lo, hi, kmin, cge, cgt, gap, 0)
    return lo


@triton.jit
def top_p_key(p, valid, top_p):
    """Bits of the top-p threshold ``t*`` of probabilities ``p >= 0``: the largest ``t`` among the
    values with ``sum(p[p >= t]) >= top_p`` (0 when even the whole row falls short: keep all).
    Keep ``p`` where ``bits(p) >= t*``.

    The bits of non-negative floats order like the floats. The search keeps a bracket
    ``[lo, hi]`` of bits holding ``t*``, with the mass at or above ``lo`` reaching ``top_p`` and
    the mass above ``hi`` short of it. While the bracket spans more than a binade its middle in
    bits halves it (probabilities spread over binades: this finds the exponent), then its middle
    in value; a round whose half held no mass is followed by one that shrinks the bracket to the
    smallest and largest bits inside it, which ends the search when one value is left. Smooth
    rows take 5-27 reductions where bisection over the bits took 32
    (``sjd_kernels.bench.topk_model.topp_key_halving`` counts them).

    The sums are accumulated in float64 and rounded to float32 before the comparison with float32
    ``top_p``, as the reference's ``topp_keep`` does: for large V the boundary token has a tiny
    probability, and float32 sums in another order would move it often.
    """
    # padded lanes: key -1, below every bracket (lo >= 0), so no round needs the mask
    key = tl.where(valid, p.to(tl.int32, bitcast=True), -1)
    pd = tl.where(valid, p.to(tl.float64), 0.0)
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.max(key, 0)
    s_lo = tl.sum(pd, 0)                     # mass at or above lo
    s_hi = s_lo * 0.0                        # mass above hi
    if s_lo.to(tl.float32) < top_p:          # the whole row falls short: keep all
        hi = lo
    gap = hi < 0
    while lo < hi:
        if gap:
            # the bracket holds mass (the sums at its ends differ), so the smallest key >= lo and
            # the largest <= hi lie in it: one comparison per lane
            lo = tl.min(tl.where(key >= lo, key, INT32_MAX), 0)
            hi = tl.max(tl.where(key <= hi, key, -1), 0)
            gap = hi < 0
        else:
            piv = (lo.to(tl.int64) + (hi.to(tl.int64) - lo.to(tl.int64) + 1) // 2).to(tl.int32)
            if hi - lo <= BINADE:
                a = lo.to(tl.float32, bitcast=True)
                piv = (a + (hi.to(tl.float32, bitcast=True) - a) * 0.5).to(tl.int32, bitcast=True)
            piv = tl.minimum(tl.maximum(piv, lo + 1), hi)
            s = tl.sum(tl.where(key >= piv, pd, 0.0), 0)
            lo, hi, s_lo, s_hi, gap = _bracket_step(s.to(tl.float32) >= top_p, piv, s, lo, hi, s_lo, s_hi)
    return lo


@triton.jit
def row_max(x, valid, inv_t, GREEDY: tl.constexpr):
    """``(bad, ym)`` of combined float32 logits ``x`` in one reduction.

    ``ym`` is the maximum over valid lanes of ``x * inv_t`` (of ``x`` when GREEDY) with NaN and
    +inf lanes read as +inf. The row is bad (the reference's target row is NaN) exactly when
    ``ym`` is infinite: +inf when a lane is NaN or +inf, or when the scaled maximum overflows;
    -inf when no lane is above -inf (or the scaled maximum underflows to -inf).
    """
    nonfin = (x != x) | (x == float("inf"))
    if GREEDY:
        y = x
    else:
        y = x * inv_t
    ym = tl.max(tl.where(valid, tl.where(nonfin, float("inf"), y), float("-inf")), 0)
    # through an int: the Triton 3.6 interpreter cannot broadcast a boolean scalar made by a float
    # comparison (``valid & ~bad`` fails there)
    bad = tl.where((ym == float("inf")) | (ym == float("-inf")), 1, 0) != 0
    return bad, ym


@triton.jit
def row_nonfinite(x, valid, inv_t, GREEDY: tl.constexpr):
    """True where the reference's target row of combined float32 logits ``x`` is NaN (a bad row).

    NaN or +inf anywhere, or no logit above -inf; for sampling (not greedy) also ``max(x / T)``
    overflowing to +-inf (the reference's softmax is then NaN). Padded lanes are not read.
    """
    bad, _ym = row_max(x, valid, inv_t, GREEDY)
    return bad


@triton.jit
def target_row(x, lanes, valid, n_valid, inv_t, top_k, top_p, GREEDY: tl.constexpr, DO_TOPK: tl.constexpr,
               DO_TOPP: tl.constexpr, INTERP: tl.constexpr):
    """The target law of ``reference.target.target_probs`` on one tile of combined float32 logits.

    ``valid`` marks the ``n_valid`` lanes of the row (V); ``inv_t`` is the float32 reciprocal of
    the temperature (unused when GREEDY). Returns ``(P, bad)``: P float32 with padded lanes 0, and
    all zeros when ``bad`` (see ``row_nonfinite``), as after the callers' ``nan_to_num``.
    """
    bad, ym = row_max(x, valid, inv_t, GREEDY)
    x = tl.where(bad, 0.0, x)
    x = tl.where(valid, x, float("-inf"))
    if GREEDY:
        a = argmax_first(x, lanes, valid)
        P = tl.where(lanes == a, 1.0, 0.0)
    else:
        y = x * inv_t
        if DO_TOPK:
            # the search starts from the row maximum (a bad row's lanes are all 0 here: key 0)
            key, lo, hi, kmin, cge, cgt, gap = kth_init_row(float_key(y), valid,
                                                            tl.where(bad, 0, float_key(ym)), n_valid)
            thr, hi, cge, cgt, gap = kth_rounds(key, top_k, lo, hi, kmin, cge, cgt, gap, 0)
            # y >= value(thr) is key >= thr (keys order like the floats, -0 with +0)
            y = tl.where(y >= key_value(thr), y, float("-inf"))
        # the row maximum, which top-k keeps (0 on a bad row, whose lanes are all 0 here)
        P = softmax_top_p(y, valid, tl.where(bad, 0.0, ym), top_p, DO_TOPP, INTERP)
    P = tl.where(valid & (~bad), P, 0.0)
    return P, bad


@triton.jit
def softmax_top_p(y, valid, mx, top_p, DO_TOPP: tl.constexpr, INTERP: tl.constexpr):
    """Softmax of scaled logits ``y`` (top-k already applied: -inf outside it) whose maximum is
    ``mx``, then the top-p cut and renormalisation when DO_TOPP, as ``reference.target``."""
    e = tl.where(valid, exp_accurate(y - mx, INTERP), 0.0)
    P = tl.math.div_rn(e, tl.zeros_like(e) + tl.sum(e, 0))
    if DO_TOPP:
        t = top_p_key(P, valid, top_p)
        P = tl.where(P.to(tl.int32, bitcast=True) >= t, P, 0.0)
        P = tl.math.div_rn(P, tl.zeros_like(P) + tl.sum(P, 0))
    return P
