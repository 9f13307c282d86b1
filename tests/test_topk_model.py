"""The host model of the CUDA kernel's top-k threshold searches (sjd_kernels/bench/topk_model.py).

The model follows csrc/target.cuh step by step; these tests check the bracket selection's logic
(every branch) against a sort on rows built to reach each branch. The CUDA kernel itself is
compared with the reference on a GPU (tests/test_cuda_jacobi_step.py, both selections).
"""
import numpy as np
import pytest

from sjd_kernels.bench import topk_model as tm


def _rows(rng):
    for V in (130, 300, 1000, 4096):
        yield from tm.families(V, rng).items()
        yield "few-values", rng.integers(0, 5, V).astype(np.float32)
        yield "all-equal", np.full(V, 1.5, np.float32)
        x = rng.standard_normal(V).astype(np.float32)
        x[rng.random(V) < 0.7] = -np.inf
        yield "mostly-masked", x
        yield "huge-range", np.concatenate([[3e38, -3e38], rng.standard_normal(V - 2)]).astype(np.float32)
        yield "subnormal", (rng.standard_normal(V) * 1e-40).astype(np.float32)
        z = rng.standard_normal(V).astype(np.float32)
        z[: V // 3] = -0.0
        z[V // 3: V // 2] = 0.0
        yield "signed-zeros", z
        yield "clusters", (np.repeat(rng.standard_normal(8), V // 8 + 1)[:V] +
                           1e-6 * rng.standard_normal(V)).astype(np.float32)


def test_bracket_and_pivots_find_the_kth_largest_key_and_reach_every_branch():
    rng = np.random.default_rng(1234)
    seen = {"value_rounds": 0, "key_rounds": 0, "shrink": 0, "candidates": 0, "exact_bracket": 0}
    n = 0
    for name, y in _rows(rng):
        V = y.size
        for k in sorted({1, 2, V // 3, V // 2, V - 1, V, int(rng.integers(1, V + 1))}):
            want = tm.kth_key_exact(y, k)
            got, passes, info = tm.kth_key_bracket(y, k)
            assert got == want, (name, V, k)
            assert passes <= 40, (name, V, k, passes)
            kp, _ = tm.kth_key_pivots(y, k)
            assert kp == want, (name, V, k)
            kh, red = tm.kth_key_halving(y, k)
            assert kh == want and red <= 80, (name, V, k, red)
            for b in ("value_rounds", "key_rounds", "shrink"):
                seen[b] += info[b] > 0
            seen["candidates"] += info["candidates"] > 0
            seen["exact_bracket"] += info["candidates"] == 0
            n += 1
    assert n > 300
    assert all(v > 0 for v in seen.values()), seen      # each branch of the device code was exercised


def test_hist_path_finds_the_kth_largest_key_and_reaches_every_branch():
    """``kth_key_hist`` (the CUDA feature "hist_topk") returns the k-th largest key whenever it keeps
    the row on its list path, and each of its branches occurs: the list with an exact rank, the
    key-histogram refinement of a crowded bin, a bin split into sub-bins, tied candidates, fewer
    finite lanes than k, and the fallbacks (flat rows, lists over capacity)."""
    rng = np.random.default_rng(4321)
    seen = {"list": 0, "keep_all": 0, "flat": 0, "overflow": 0, "split": 0, "levels": 0, "ranked": 0, "tied": 0}
    rows = list(_rows(rng))
    for V in (3000, 8192):   # a far outlier and a crowded band (the kernel tests' topk-low-outlier, topk-band)
        x = (0.01 * rng.standard_normal(V)).astype(np.float32)
        x[0] = -80
        rows.append(("low-outlier", x))
        z = rng.standard_normal(V).astype(np.float32)
        z[: V // 6] = np.float32(12) + (rng.integers(0, 400, V // 6) * 2.0 ** -20).astype(np.float32)
        rows.append(("band", z))
    n = 0
    for name, y in rows:
        V = y.size
        for k in sorted({1, 2, V // 20, V // 3, V - 1, int(rng.integers(1, V))} - {0}):
            got, info = tm.kth_key_hist(y, k)
            seen[info["path"]] += 1
            if got is None:
                assert info["path"] in ("flat", "overflow"), (name, V, k, info)
                continue
            assert got == tm.kth_key_exact(y, k), (name, V, k, info)
            seen["split"] += info["split"]
            seen["levels"] += info["levels"] > 0
            seen["ranked"] += info["ranked"] > 0
            seen["tied"] += info["tied"]
            n += 1
    assert n > 200
    assert all(v > 0 for v in seen.values()), seen


def test_two_stage_search_finds_the_same_key_with_the_same_rounds():
    """The rows kernel's search through a candidate list (row rounds until at most ``cap`` keys lie
    at or above the bracket, then the same rounds over those keys) is the one-stage search split in
    two: same key, same reductions in all. Both outcomes occur (the candidates fit; ties make them
    overflow and the search stays on the row)."""
    rng = np.random.default_rng(99)
    seen = {"fit": 0, "overflow": 0, "split": 0}
    n = 0
    for name, y in _rows(rng):
        V = y.size
        for k in sorted({1, 2, V // 3, V - 1, int(rng.integers(1, V + 1))}):
            want = tm.kth_key_exact(y, k)
            _, red = tm.kth_key_halving(y, k)
            for cap in (max(1, k), 2 * k + 32, V):
                got, r_row, r_cand, n_c = tm.kth_key_two_stage(y, k, cap)
                assert got == want and r_row + r_cand == red, (name, V, k, cap)
                assert n_c == 0 or k <= n_c <= cap, (name, V, k, cap, n_c)
                seen["fit"] += n_c > 0
                seen["overflow"] += n_c == 0
                seen["split"] += r_cand > 0 and r_row > 4
                n += 1
    assert n > 500
    assert all(v > 0 for v in seen.values()), seen


@pytest.mark.parametrize("V,k", [(16384, 1000), (32768, 1000)])
def test_two_stage_search_leaves_fewer_rounds_on_the_row(V, k):
    # the reason it exists: about half the reductions of a smooth row run on at most 2048 lanes
    rng = np.random.default_rng(7)
    fam = tm.families(V, rng)
    cap = tm.cand_cap(V, k)
    assert cap == 2048
    tot, on_list = 0, 0
    for name in ("gaussian", "cfg-4", "gumbel", "bf16-grid"):
        _, red = tm.kth_key_halving(fam[name], k)
        _, r_row, r_cand, n_c = tm.kth_key_two_stage(fam[name], k, cap)
        assert n_c > 0 and r_row <= 10, (name, red, r_row, r_cand)
        tot, on_list = tot + red, on_list + r_cand
    assert on_list >= tot // 3, (tot, on_list)


def test_topp_halving_model_equals_bisection():
    rng = np.random.default_rng(3)
    n = 0
    for name, y in _rows(rng):
        e = np.exp(np.nan_to_num(y.astype(np.float64), neginf=-1e300, posinf=1e300) -
                   np.max(np.nan_to_num(y.astype(np.float64), neginf=-1e300, posinf=1e300)))
        p = (e / e.sum()).astype(np.float32)
        for top_p in (0.2, 0.9, 0.999, 1.0):
            t, red = tm.topp_key_halving(p, top_p)
            assert t == tm.topp_key_bisect(p, top_p) and red <= 80, (name, y.size, top_p, red)
            n += 1
    assert n > 150


def test_keys_order_like_floats():
    x = np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, np.inf], np.float32)
    k = tm.order_key(x).astype(np.int64)
    assert (np.diff(k) >= 0).all() and k[4] == k[5]
    assert all(tm.key_to_float(int(kk)) == xx for kk, xx in zip(tm.order_key(x), x))


@pytest.mark.parametrize("V,k", [(16384, 1000), (32768, 1000), (16384, 50)])
def test_bracket_makes_fewer_passes_on_smooth_rows(V, k):
    # the reason the selection exists: on smooth rows a handful of passes instead of about 11
    rng = np.random.default_rng(7)
    fam = tm.families(V, rng)
    for name in ("gaussian", "cfg-4", "gumbel", "bf16-grid"):
        _, pb, _ = tm.kth_key_bracket(fam[name], k)
        _, pp = tm.kth_key_pivots(fam[name], k)
        _, rh = tm.kth_key_halving(fam[name], k)
        assert pb <= 4 and pp >= 10 and rh <= 24, (name, pb, pp, rh)


def test_cli_prints_the_table(capsys):
    assert tm.main(["--shapes", "2048:100"]) == 0
    out = capsys.readouterr().out
    nf = len(tm.families(16, np.random.default_rng(0)))
    assert "| 2048 | 100 | gaussian |" in out and "| 2048 | 0.95 | gaussian |" in out
    assert out.count("\n") == 2 + nf + 1 + 2 + 2 * nf
