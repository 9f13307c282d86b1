"""Host models of the kernels' top-k threshold searches.

Each finds the key of the k-th largest value of a row; they differ in how many passes over the
row (and block-wide reductions) they make, which is what an instruction-bound kernel pays for
(``benchmarks/NOTES.md``):

- ``pivots`` (CUDA default, ``csrc/target.cuh``): ``search_last_true`` over the 32-bit key
  range, 7 pivots per pass.
- ``bracket`` (CUDA feature "bracket_topk"): ``kth_key_bracket``, 7 value-spaced pivots per pass
  until at most 128 candidates remain, then one collecting pass and an exact rank among them.
- ``halving`` (Triton, ``sjd_kernels/triton/sampling.py``): ``kth_init_row`` and ``kth_rounds`` as
  ``target_row`` runs them (the search of ``kth_largest_key`` started from the row maximum), one
  pivot per reduction halfway in value, a shrink to the data after a round in a gap, a max/min
  finish.
  (Before it, the Triton kernel made 34 reductions on every row: 2 for the range, 32 bisections.)
- ``two_stage`` (the Triton rows kernel of ``jacobi_step`` when its races run over a list):
  ``kth_key_two_stage``, the same rounds, over the row until at most CAND_K keys lie at or above
  the bracket's lower end, then over those keys only (a tile of CAND_K lanes).
- ``hist`` (CUDA feature "hist_topk"): ``topk_softmax_list``, one histogram pass over the row
  (2048 bins spaced in value), a second pass that lists the lanes in the bins at or above the k-th
  largest value's, then an exact rank among that bin's lanes (after key-histogram refinements of
  the list when more than 128 share it); rows whose list would exceed 2048 lanes, or whose finite
  values are all equal, take the dense path.
- the Triton top-p threshold ``top_p_key``: halving in bits while the bracket spans more than a
  binade, then in value, with the same shrink (``topp_key_halving``; before: 32 reductions).

The functions below follow the device code step by step in float32 / uint32 arithmetic, so the
counts they report are the kernels' for the same row, and the CPU tests check the logic (every
branch) against a sort. They are models: the CUDA kernel itself is checked against the reference
on a GPU (``tests/test_cuda_jacobi_step.py``), the Triton one also under the interpreter.

``python -m sjd_kernels.bench.topk_model`` prints the counts on synthetic row families.
"""
from __future__ import annotations

import argparse

import numpy as np

PIVOTS = 7
CAND_MAX = 128


def order_key(x) -> np.ndarray:
    """``order_key`` of sampling.cuh: float32 -> uint32, order-preserving, -0 as +0."""
    f = np.array(x, dtype=np.float32, ndmin=1)
    f = np.where(f == 0, np.float32(0), f).astype(np.float32)
    b = f.view(np.uint32)
    return np.where(b & np.uint32(0x80000000), ~b, b | np.uint32(0x80000000)).astype(np.uint32)


def key_to_float(k: int) -> np.float32:
    k = np.uint32(k)
    b = np.uint32(k & 0x7FFFFFFF) if k & 0x80000000 else np.uint32(~k)
    return np.array([b], dtype=np.uint32).view(np.float32)[0]


def kth_key_exact(y: np.ndarray, k: int) -> int:
    """The answer both searches must give: the key of the k-th largest value."""
    return int(np.sort(order_key(y))[::-1][k - 1])


def _update(piv, keys, k, lo, hi, cge, cgt):
    cnt = [int((keys >= p).sum()) for p in piv]
    for m in range(PIVOTS - 1, -1, -1):
        if cnt[m] >= k:
            return int(piv[m]), hi, cnt[m], cgt
        hi, cgt = int(piv[m]) - 1, cnt[m]
    return lo, hi, cge, cgt


def kth_key_pivots(y: np.ndarray, k: int) -> tuple[int, int]:
    """(key, passes) of ``search_last_true(0, order_key(ymax), ...)`` counting keys >= pivot."""
    keys = order_key(y)
    lo, hi = 0, int(order_key(np.max(y))[0])
    passes = 0
    while lo < hi:
        span = hi - lo
        piv = [lo + 1 + ((span - 1) * (m + 1)) // PIVOTS for m in range(PIVOTS)]
        passes += 1
        lo, hi, _, _ = _update(piv, keys, k, lo, hi, 0, 0)
    return lo, passes


def kth_key_bracket(y: np.ndarray, k: int) -> tuple[int, int, dict]:
    """(key, passes, info) of ``kth_key_bracket``; passes counts the passes over the row (rounds,
    the shrink pass and the collecting pass; the first pass that computes ymin / ymax is shared
    with the target law and not counted). ``info`` says which branches ran."""
    y = np.asarray(y, dtype=np.float32)
    V = y.size
    keys = order_key(y)
    fin = y[y > -np.inf]
    ymin, ymax = np.float32(fin.min()), np.float32(y.max())
    lo, hi = 0, int(order_key(ymax)[0])
    cge, cgt = V, 0
    kmin = int(order_key(ymin)[0])
    last, fresh, shrunk = V, True, False
    passes = 0
    info = {"value_rounds": 0, "key_rounds": 0, "shrink": 0, "candidates": 0}
    while lo < hi and cge - cgt > CAND_MAX:
        ncand = cge - cgt
        stalled = (not fresh) and 2 * ncand > last
        if stalled and not shrunk:
            inb = keys[(keys >= lo) & (keys <= hi)]
            lo, hi = int(inb.min()), int(inb.max())
            shrunk, fresh = True, True
            passes += 1
            info["shrink"] += 1
            continue
        by_key = stalled
        piv = None
        if not by_key:
            a = ymin if lo < kmin else key_to_float(lo)
            with np.errstate(over="ignore", invalid="ignore"):
                d = np.float32(key_to_float(hi) - a)
            if np.isfinite(d) and d > 0:
                piv = []
                for m in range(PIVOTS):
                    with np.errstate(over="ignore"):
                        v = np.float32(a + np.float32(d * np.float32(np.float32(0.125) * np.float32(m + 1))))
                    kk = int(order_key(v)[0])
                    piv.append(min(max(kk, lo + 1), hi))
            else:
                by_key = True
        if by_key:
            span = hi - lo
            piv = [lo + 1 + ((span - 1) * (m + 1)) // PIVOTS for m in range(PIVOTS)]
            info["key_rounds"] += 1
        else:
            info["value_rounds"] += 1
        passes += 1
        lo, hi, cge, cgt = _update(piv, keys, k, lo, hi, cge, cgt)
        last, fresh = ncand, False
    if lo >= hi:
        return lo, passes, info
    r = k - cgt
    cand = keys[(keys >= lo) & (keys <= hi)]
    passes += 1
    info["candidates"] = int(cand.size)
    assert 1 <= r <= cand.size <= CAND_MAX, (r, cand.size)
    for kc in cand:                     # the exact rank: #{> kc} < r <= #{>= kc}
        if int((cand > kc).sum()) < r <= int((cand >= kc).sum()):
            return int(kc), passes, info
    raise AssertionError("no candidate has rank r")


def _signed(keys: np.ndarray) -> np.ndarray:
    """Triton's ``float_key`` (signed int32 order) from the uint32 keys: the same order, shifted."""
    return keys.astype(np.int64) - (1 << 31)


def _halving_rounds(keys: np.ndarray, k: int, st: dict, kmin: int, cap: int) -> int:
    """Rounds of ``kth_rounds`` on signed keys from state ``st`` (updated in place) until the answer,
    or until at most ``cap`` keys lie at or above ``lo`` (``cap > 0``); returns the reductions made."""
    red = 0

    def value(kk):                               # key_value: the float of a signed key
        u = np.array([kk + (1 << 31)], dtype=np.uint64).astype(np.uint32)[0]
        return key_to_float(int(u))

    while st["lo"] < st["hi"] and st["cge"] > cap:
        lo, hi, cge, cgt = st["lo"], st["hi"], st["cge"], st["cgt"]
        n, r = cge - cgt, k - cgt
        inb = keys[(keys >= lo) & (keys <= hi)]
        red += 1
        if r == 1 or r == n:
            st["lo"] = st["hi"] = int(inb.max() if r == 1 else inb.min())
        elif st["gap"]:
            st["lo"], st["hi"], st["gap"] = int(inb.min()), int(inb.max()), False
            red += 1
        else:
            a = value(max(lo, kmin))
            with np.errstate(over="ignore", invalid="ignore"):
                d = np.float32(value(hi) - a)
            piv = lo + (hi - lo + 1) // 2
            if d > 0 and d < np.inf:
                piv = int(_signed(order_key(np.float32(a + np.float32(d * np.float32(0.5)))))[0])
            piv = min(max(piv, lo + 1), hi)
            c = int((keys >= piv).sum())
            if c >= k:
                st.update(gap=c == cge, lo=piv, cge=c)
            else:
                st.update(gap=c == cgt, hi=piv - 1, cgt=c)
    return red


def _halving_start(keys: np.ndarray, row_start: bool = True) -> tuple[dict, int, int]:
    """``kth_init_row``: the bracket state, ``kmin`` (the smallest key above -inf) and the
    reductions it takes: one (the minimum), two when a lane is at -inf (kmin too); the maximum and
    the count come with the row (its maximum, V). ``row_start=False``: ``kth_init`` (the
    standalone ``kth_largest_key``), the same state from 4 reductions."""
    valid_fin = keys > _signed(order_key(np.float32(-np.inf)))[0]
    kmin = int(keys[valid_fin].min()) if valid_fin.any() else (1 << 31) - 1
    st = {"lo": int(keys.min()), "hi": int(keys.max()), "cge": keys.size, "cgt": 0, "gap": False}
    return st, kmin, (1 if valid_fin.all() else 2) if row_start else 4


def kth_key_halving(y: np.ndarray, k: int, row_start: bool = True) -> tuple[int, int]:
    """(key, reductions) of the Triton top-k search as ``target_row`` runs it (``kth_init_row``, then
    ``kth_rounds``; the key as ``order_key`` gives it); reductions counts every block-wide
    reduction, the 1-2 before the loop included (``row_start=False``: the standalone
    ``kth_largest_key``, 4 there)."""
    keys = _signed(order_key(np.asarray(y, dtype=np.float32)))
    st, kmin, red = _halving_start(keys, row_start)
    red += _halving_rounds(keys, k, st, kmin, 0)
    return st["lo"] + (1 << 31), red


def kth_key_two_stage(y: np.ndarray, k: int, cap: int) -> tuple[int, int, int, int]:
    """``(key, row reductions, candidate reductions, candidates)`` of the Triton rows kernel's search
    through a candidate list (``jacobi_step`` with CAND_K = cap): ``kth_rounds`` over the row until
    at most ``cap`` keys lie at or above ``lo``, then over those keys from the same state.
    ``candidates`` is 0 when they did not fit (the search went on over the row: all its rounds
    are row reductions). Same key as ``kth_key_halving`` and the same reductions in all."""
    keys = _signed(order_key(np.asarray(y, dtype=np.float32)))
    st, kmin, row = _halving_start(keys)
    row += _halving_rounds(keys, k, st, kmin, cap)
    cand = keys[keys >= st["lo"]]
    if cand.size > cap:
        row += _halving_rounds(keys, k, st, kmin, 0)
        return st["lo"] + (1 << 31), row, 0, 0
    red = _halving_rounds(cand, k, st, kmin, 0)
    return st["lo"] + (1 << 31), row, red, int(cand.size)


def _f32_bits(x) -> int:
    return int(np.array([x], dtype=np.float32).view(np.int32)[0])


def _bits_f32(b: int) -> np.float32:
    return np.array([b], dtype=np.int32).view(np.float32)[0]


def topp_key_bisect(p: np.ndarray, top_p: float) -> int:
    """Bits of the top-p threshold by 31 bisections over the bits (the Triton search before)."""
    key = p.astype(np.float32).view(np.int32).astype(np.int64)
    pd = p.astype(np.float64)
    lo, hi = 0, int(key.max())
    for _ in range(31):
        mid = lo + (hi - lo + 1) // 2
        if np.float32(pd[key >= mid].sum()) >= np.float32(top_p):
            lo = mid
        else:
            hi = mid - 1
    return lo


def topp_key_halving(p: np.ndarray, top_p: float) -> tuple[int, int]:
    """(bits, reductions) of the Triton ``top_p_key``; reductions include the 2 before the loop."""
    key = p.astype(np.float32).view(np.int32).astype(np.int64)
    pd = p.astype(np.float64)
    lo, hi, red = 0, int(key.max()), 2
    s_lo, s_hi = pd.sum(), 0.0
    if np.float32(s_lo) < np.float32(top_p):
        return 0, red
    gap = False
    while lo < hi:
        red += 1
        if gap:
            inb = key[(key >= lo) & (key <= hi)]
            lo, hi, gap = int(inb.min()), int(inb.max()), False
            red += 1
            continue
        piv = lo + (hi - lo + 1) // 2
        if hi - lo <= 1 << 23:
            a = _bits_f32(lo)
            piv = _f32_bits(np.float32(a + np.float32((_bits_f32(hi) - a) * np.float32(0.5))))
        piv = min(max(piv, lo + 1), hi)
        s = pd[key >= piv].sum()
        if np.float32(s) >= np.float32(top_p):
            gap, lo, s_lo = s == s_lo, piv, s
        else:
            gap, hi, s_hi = s == s_hi, piv - 1, s
    return lo, red


def families(V: int, rng: np.random.Generator):
    """Synthetic logit rows (float32): name -> row."""
    g = rng.standard_normal(V).astype(np.float32)
    c, u = 3 * rng.standard_normal(V), 3 * rng.standard_normal(V)
    masked = 3 * g
    masked[: V // 2] = -np.inf
    return {
        "gaussian": 3 * g,
        "cfg-4": (u + 4 * (c - u)).astype(np.float32),
        "student-t3": (2 * rng.standard_t(3, V)).astype(np.float32),
        "bf16-grid": (np.round(48 * g) / 16).astype(np.float32),
        "one-outlier": np.concatenate([g[:-1], [1e4]]).astype(np.float32),
        "gumbel": (-np.log(-np.log(rng.random(V)))).astype(np.float32),
        "log-uniform": (5 * np.log(rng.random(V) + 1e-12)).astype(np.float32),
        "half-masked": masked,
        "16-values": np.floor(2 * g).astype(np.float32),
    }


HIST_BINS = 2048
HIST_LIST_CAP = 2048


def _hist_find(counts: np.ndarray, r: int) -> tuple[int, int, int]:
    """``hist_find``: the largest bin b with #{counted in bins >= b} >= r, the count above it, its count."""
    above = np.concatenate([np.cumsum(counts[::-1])[::-1][1:], [0]])   # counted in bins > b
    b = int(np.nonzero(above + counts >= r)[0].max())
    return b, int(above[b]), int(counts[b])


def kth_key_hist(y: np.ndarray, k: int) -> tuple[int | None, dict]:
    """(key, info) of ``topk_softmax_list`` (1 <= k < V; a row that is not bad): the key of the k-th
    largest value, or None when the row takes the dense path. ``info``: ``path`` ("list",
    "keep_all": fewer finite lanes than k, "flat": the finite values all equal or their range not
    a float, "overflow": the list over its capacity), ``split`` (1 when b* was split into sub-bins
    first), ``nb`` (lanes in the k-th value's bin or sub-bin), ``list`` (listed lanes), ``levels``
    (key-histogram refinements), ``ranked`` (candidates of the exact rank, 0 when ties or a one-key
    bin ended it), ``tied`` (1 when the candidates were all equal)."""
    y = np.asarray(y, dtype=np.float32)
    info = {"path": "", "split": 0, "nb": 0, "list": 0, "levels": 0, "ranked": 0, "tied": 0}
    fin = y[y > -np.inf]
    ymin, ymax = np.float32(fin.min()), np.float32(y.max())
    with np.errstate(over="ignore", divide="ignore"):
        d = np.float32(ymax - ymin)
        scale = np.float32(np.float32(HIST_BINS) / d)
    if not (d > 0) or not np.isfinite(d) or not np.isfinite(scale):
        info["path"] = "flat"
        return None, info
    bins = np.minimum((((fin - ymin).astype(np.float32) * scale).astype(np.float32)).astype(np.int64),
                      HIST_BINS - 1)
    counts = np.bincount(bins, minlength=HIST_BINS)
    if fin.size < k:                              # the k-th largest is -inf: every finite lane is kept
        over = fin.size > HIST_LIST_CAP
        info.update(path="overflow" if over else "keep_all", list=int(fin.size))
        return (None if over else int(order_key(np.float32(-np.inf))[0])), info
    bstar, cgt, nb = _hist_find(counts, k)
    cand_y = fin[bins == bstar]
    if cgt + nb > HIST_LIST_CAP:                  # split b* into sub-bins (one more pass)
        with np.errstate(over="ignore", invalid="ignore"):
            lo1 = np.float32(ymin + np.float32(np.float32(bstar) / scale))
            scale1 = np.float32(scale * np.float32(HIST_BINS))
        if not np.isfinite(scale1) or not np.isfinite(lo1):
            info.update(path="overflow", nb=nb, list=cgt + nb)
            return None, info
        t = ((cand_y - lo1).astype(np.float32) * scale1).astype(np.float32)
        sub = np.where(t > 0, np.minimum(t, np.float32(HIST_BINS - 1)), 0).astype(np.int64)
        b1, above, nb = _hist_find(np.bincount(sub, minlength=HIST_BINS), k - cgt)
        cgt += above
        cand_y = cand_y[sub == b1]
        info["split"] = 1
    info.update(nb=nb, list=cgt + nb)
    if cgt + nb > HIST_LIST_CAP:
        info["path"] = "overflow"
        return None, info
    info["path"] = "list"
    keys = order_key(cand_y).astype(np.int64)
    r, klo, khi = k - cgt, 0, 2**32 - 1
    while True:
        cand = keys[(keys >= klo) & (keys <= khi)]
        if cand.size <= CAND_MAX:
            info["ranked"] = int(cand.size)
            return int(np.sort(cand)[::-1][r - 1]), info
        kmin, kmax = int(cand.min()), int(cand.max())
        if kmin == kmax:
            info["tied"] = 1
            return kmin, info
        shift = max(0, (kmax - kmin).bit_length() - 11)
        b2, above, _ = _hist_find(np.bincount((cand - kmin) >> shift, minlength=HIST_BINS), r)
        info["levels"] += 1
        r -= above
        klo = kmin + (b2 << shift)
        khi = min(klo + (1 << shift) - 1, kmax)
        if shift == 0:
            return klo, info


def cand_cap(V: int, k: int) -> int:
    """CAND_K of the Triton launcher for these shapes (``triton.jacobi_step.cand_size``, list on)."""
    block = max(16, 1 << (V - 1).bit_length())
    lk = 1 << (k + 16 - 1).bit_length()
    c = 1 << (2 * k + 32 - 1).bit_length()
    return c if 4 * lk <= block and 2 * c <= block else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="16384:1000,16384:50,32768:1000,8192:2",
                    help="comma-separated V:k pairs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print("| V | k | row family | CUDA pivots: passes | CUDA bracket: passes | bracket branches | "
          "CUDA hist: path, k-th bin, list, levels | "
          "Triton halving: reductions (kth_largest_key) | Triton rows kernel: row + candidate reductions "
          "(candidates) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for item in args.shapes.split(","):
        V, k = (int(x) for x in item.split(":"))
        for name, y in families(V, rng).items():
            want = kth_key_exact(y, k)
            kp, pp = kth_key_pivots(y, k)
            kb, pb, info = kth_key_bracket(y, k)
            kh, rh = kth_key_halving(y, k)
            _, rh4 = kth_key_halving(y, k, row_start=False)
            cap = cand_cap(V, k)
            k2, r_row, r_cand, n_c = kth_key_two_stage(y, k, cap) if cap else (want, rh, 0, 0)
            kt, hinfo = kth_key_hist(y, k)
            assert kp == want and kb == want and kh == want and k2 == want, (name, V, k)
            assert kt is None or kt == want, (name, V, k)
            br = ", ".join(f"{n} {v}" for n, v in info.items() if v)
            two = f"{r_row} + {r_cand} ({n_c} of cap {cap})" if n_c else f"{r_row} (row only)"
            split = " (split)" if hinfo["split"] else ""
            hist = f"{hinfo['path']}{split}, {hinfo['nb']}, {hinfo['list']}, {hinfo['levels']}"
            print(f"| {V} | {k} | {name} | {pp} | {pb} | {br} | {hist} | {rh} ({rh4}) | {two} |")
    print()
    print("| V | top-p | row family (softmax of the row) | Triton top-p: reductions (bisection: 32) |")
    print("|---|---|---|---|")
    for item in args.shapes.split(","):
        V = int(item.split(":")[0])
        for name, y in families(V, rng).items():
            e = np.exp(y.astype(np.float64) - np.max(y))
            pr = (e / e.sum()).astype(np.float32)
            for top_p in (0.8, 0.95):
                t, red = topp_key_halving(pr, top_p)
                assert t == topp_key_bisect(pr, top_p), (name, V, top_p)
                print(f"| {V} | {top_p} | {name} | {red} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
