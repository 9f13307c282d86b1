"""The Triton RNG and sampling primitives against their PyTorch twins (``sjd_kernels.rng``, ``reference.target``).

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1 is set before triton is imported)
and, marked ``gpu``, compiled on CUDA tensors when a GPU is visible.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sjd_kernels import rng  # noqa: E402
from sjd_kernels.reference.target import topk_threshold, topp_keep  # noqa: E402
from sjd_kernels.triton import rng as trng  # noqa: E402
from sjd_kernels.triton import sampling as ts  # noqa: E402
from sjd_kernels.triton.jacobi_step import is_interpreted  # noqa: E402

INTERP = is_interpreted()
if not INTERP and not torch.cuda.is_available():
    pytest.skip("triton kernels need TRITON_INTERPRET=1 (set before triton is imported) or a CUDA device",
                allow_module_level=True)
DEV = "cpu" if INTERP else "cuda"
# numpy warns when the interpreter divides by -0.0 or overflows on padded lanes; both are intended here
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

# Random123 known-answer vectors of philox4x32-10: (counter, key, output)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@triton.jit
def _philox_kernel(c_ptr, k_ptr, out_ptr, N, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < N
    c0 = tl.load(c_ptr + 4 * o, mask=m, other=0).to(tl.uint32)
    c1 = tl.load(c_ptr + 4 * o + 1, mask=m, other=0).to(tl.uint32)
    c2 = tl.load(c_ptr + 4 * o + 2, mask=m, other=0).to(tl.uint32)
    c3 = tl.load(c_ptr + 4 * o + 3, mask=m, other=0).to(tl.uint32)
    k0 = tl.load(k_ptr + 2 * o, mask=m, other=0).to(tl.uint32)
    k1 = tl.load(k_ptr + 2 * o + 1, mask=m, other=0).to(tl.uint32)
    w0, w1, w2, w3 = trng.philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * o, w0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * o + 1, w1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * o + 2, w2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * o + 3, w3.to(tl.int64), mask=m)


@triton.jit
def _lane_kernel(seed_ptr, pos_ptr, step_ptr, words_ptr, u_ptr, e_ptr, four_ptr, at_ptr,
                 STREAM: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    k0, k1 = trng.seed_key(tl.load(seed_ptr + r))
    c_pos = trng.counter_word(tl.load(pos_ptr + r))
    c_step = trng.counter_word(tl.load(step_ptr + r))
    w = trng.lane_words(k0, k1, c_pos, c_step, STREAM, BLOCK)
    lanes = tl.arange(0, BLOCK)
    tl.store(words_ptr + r * BLOCK + lanes, w.to(tl.int64))
    tl.store(u_ptr + r * BLOCK + lanes, ts.uniform24(w))
    tl.store(e_ptr + r * BLOCK + lanes, ts.exponential(w))
    f0, f1, f2, f3 = trng.four_words(k0, k1, c_pos, c_step, STREAM)
    # the same words at scattered lane ids (reversed, so every word position moves)
    at = trng.lane_words_at(k0, k1, c_pos, c_step, STREAM, BLOCK - 1 - lanes)
    tl.store(at_ptr + r * BLOCK + lanes, at.to(tl.int64))
    tl.store(four_ptr + r * 4, f0.to(tl.int64))
    tl.store(four_ptr + r * 4 + 1, f1.to(tl.int64))
    tl.store(four_ptr + r * 4 + 2, f2.to(tl.int64))
    tl.store(four_ptr + r * 4 + 3, f3.to(tl.int64))


@triton.jit
def _word_kernel(w_ptr, u_ptr, e_ptr, N, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < N
    w = tl.load(w_ptr + o, mask=m, other=0).to(tl.uint32)
    tl.store(u_ptr + o, ts.uniform24(w), mask=m)
    tl.store(e_ptr + o, ts.exponential(w), mask=m)


@triton.jit
def _uniform_token_kernel(seed_ptr, pos_ptr, step_ptr, out_ptr, N, V, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < N
    k0, k1 = trng.seed_key(tl.load(seed_ptr + o, mask=m, other=0))
    c_pos = trng.counter_word(tl.load(pos_ptr + o, mask=m, other=0))
    c_step = trng.counter_word(tl.load(step_ptr + o, mask=m, other=0))
    w0, w1, w2, w3 = trng.four_words(k0, k1, c_pos, c_step, STREAM)
    tl.store(out_ptr + o, ts.uniform_token(w0, w1, w2, w3, V), mask=m)


@triton.jit
def _race_kernel(w_ptr, e_ptr, out_ptr, V, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    # padded lanes get a large weight on purpose: the race must ignore them
    w = tl.load(w_ptr + r * V + lanes, mask=valid, other=1e30)
    e = tl.load(e_ptr + r * V + lanes, mask=valid, other=1e-30)
    tl.store(out_ptr + r, ts.race(w, e, lanes, valid))


@triton.jit
def _threshold_kernel(x_ptr, k_ptr, p_ptr, kth_ptr, kth2_ptr, keep_ptr, V, top_p, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    x = tl.load(x_ptr + r * V + lanes, mask=valid, other=float("-inf"))
    key = ts.float_key(x)
    t = ts.kth_largest_key(key, valid, tl.load(k_ptr + r))
    tl.store(kth_ptr + r, tl.max(tl.where(valid & (key == t), x, float("-inf")), 0))
    # the same search started from the row maximum and the count (target_row's start)
    kk, lo, hi, kmin, cge, cgt, gap = ts.kth_init_row(key, valid, tl.max(tl.where(valid, key, -2147483647), 0), V)
    t2, hi, cge, cgt, gap = ts.kth_rounds(kk, tl.load(k_ptr + r), lo, hi, kmin, cge, cgt, gap, 0)
    tl.store(kth2_ptr + r, t2)
    p = tl.load(p_ptr + r * V + lanes, mask=valid, other=0.0)
    tp = ts.top_p_key(p, valid, top_p)
    tl.store(keep_ptr + r * V + lanes, (p.to(tl.int32, bitcast=True) >= tp).to(tl.int8), mask=valid)


def _philox_triton(ctr, key):
    ctr = torch.as_tensor(ctr, dtype=torch.int64).reshape(-1, 4).to(DEV)
    key = torch.as_tensor(key, dtype=torch.int64).reshape(-1, 2).to(DEV)
    n = ctr.shape[0]
    out = torch.empty(n, 4, dtype=torch.int64, device=DEV)
    _philox_kernel[(1,)](ctr, key, out, n, BLOCK=triton.next_power_of_2(max(n, 2)))
    return out.cpu()


def test_philox_known_answers():
    got = _philox_triton([c for c, _, _ in KAT], [k for _, k, _ in KAT])
    want = torch.tensor([o for _, _, o in KAT], dtype=torch.int64)
    assert torch.equal(got, want)
    ref = torch.stack(rng.philox4x32(*torch.tensor([c for c, _, _ in KAT]).T, *torch.tensor([k for _, k, _ in KAT]).T), 1)
    assert torch.equal(ref, want)     # the PyTorch twin passes the same vectors


def test_philox_matches_reference_random():
    g = torch.Generator().manual_seed(0)
    n = 256
    ctr = torch.randint(0, 1 << 32, (n, 4), generator=g, dtype=torch.int64)
    key = torch.randint(0, 1 << 32, (n, 2), generator=g, dtype=torch.int64)
    ctr[:8] = 0xFFFFFFFF                       # edge words
    key[8:16] = 0
    got = _philox_triton(ctr, key)
    ref = torch.stack(rng.philox4x32(*ctr.T, *key.T), 1)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("stream", [rng.STREAM_ACCEPT, rng.STREAM_RESID, rng.STREAM_GUMBEL])
def test_lane_words_uniform_exponential(stream):
    block = 64
    # seeds with high bits and negative values, positions and steps beyond 2**32 (taken mod 2**32)
    seed = torch.tensor([0, 1, -1, 2 ** 40 + 7, -(2 ** 62) + 3, 123456789], dtype=torch.int64)
    pos = torch.tensor([0, 5, 1 << 33, 17, 4095, 2 ** 32 - 1], dtype=torch.int64)
    step = torch.tensor([0, 1, 2, (1 << 32) + 9, 77, 3], dtype=torch.int64)
    n = seed.numel()
    words = torch.empty(n, block, dtype=torch.int64, device=DEV)
    u = torch.empty(n, block, dtype=torch.float32, device=DEV)
    e = torch.empty(n, block, dtype=torch.float32, device=DEV)
    four = torch.empty(n, 4, dtype=torch.int64, device=DEV)
    at = torch.empty(n, block, dtype=torch.int64, device=DEV)
    _lane_kernel[(n,)](seed.to(DEV), pos.to(DEV), step.to(DEV), words, u, e, four, at, STREAM=stream, BLOCK=block)
    ref_w = rng.lane_words(seed.view(n, 1), pos.view(n, 1), step.view(n, 1), stream, block).reshape(n, block)
    assert torch.equal(words.cpu(), ref_w)
    assert torch.equal(at.cpu(), ref_w.flip(1))       # lane_words_at: the words of the ids it is given
    assert torch.equal(four.cpu(), ref_w[:, :4])
    assert torch.equal(u.cpu(), rng.uniform24(ref_w))
    # exponential: same formula; log implementations (Sleef on CPU, numpy in the interpreter,
    # libdevice on GPU) may differ in the last ulp, never by more
    ref_e = rng.exponential(ref_w)
    ulp = (e.cpu().view(torch.int32).to(torch.int64) - ref_e.view(torch.int32).to(torch.int64)).abs()
    assert int(ulp.max()) <= 2
    assert float((ulp == 0).float().mean()) > 0.5
    assert bool((e.cpu() > 0).all()) and bool(torch.isfinite(e.cpu()).all())


def test_uniform_exponential_extreme_words():
    words = torch.tensor([0, 1, 255, 256, 0x7FFFFF00, 0x7FFFFFFF, 0x80000000, 0x80000100, 0xFFFFFE00,
                          0xFFFFFF00, 0xFFFFFFFF], dtype=torch.int64)
    n = words.numel()
    u = torch.empty(n, dtype=torch.float32, device=DEV)
    e = torch.empty(n, dtype=torch.float32, device=DEV)
    _word_kernel[(1,)](words.to(DEV), u, e, n, BLOCK=16)
    assert torch.equal(u.cpu(), rng.uniform24(words))
    ref_e = rng.exponential(words)
    ulp = (e.cpu().view(torch.int32).to(torch.int64) - ref_e.view(torch.int32).to(torch.int64)).abs()
    assert int(ulp.max()) <= 2
    assert float(u.max()) < 1.0 and bool(torch.isfinite(e.cpu()).all())
    # float32 rounding makes u = 1 for the top 256 words; both floor E at 2**-25 there so that a
    # lane with positive weight can still win the race
    assert float(e.cpu()[-1]) == 2.0 ** -25 == float(ref_e[-1])
    assert bool((e.cpu() > 0).all())


@pytest.mark.parametrize("V", [1, 37, 16384, 1610612736, 2 ** 31 - 1])
def test_uniform_token_rejection_rule(V):
    """V = 1.5 * 2**30 rejects a quarter of the words: first, second, third, fourth and all-rejected
    (fall back to the last word) cases all occur among 4096 draws."""
    n = 4096
    g = torch.Generator().manual_seed(1)
    seed = torch.randint(-(2 ** 62), 2 ** 62, (n,), generator=g)
    pos = torch.randint(0, 1 << 20, (n,), generator=g)
    step = torch.randint(0, 100, (n,), generator=g)
    out = torch.empty(n, dtype=torch.int64, device=DEV)
    _uniform_token_kernel[(1,)](seed.to(DEV), pos.to(DEV), step.to(DEV), out, n, V, STREAM=rng.STREAM_TAIL,
                                BLOCK=n)
    want = rng.uniform_token(seed, pos, step, rng.STREAM_TAIL, V)
    assert torch.equal(out.cpu(), want)
    if V == 1610612736:
        w = rng.four_words(seed, pos, step, rng.STREAM_TAIL)
        ok = w < (1 << 32) - (1 << 32) % V
        first = torch.where(ok.any(-1), torch.argmax(ok.to(torch.int64), -1), torch.full((n,), 4))
        assert set(first.tolist()) == {0, 1, 2, 3, 4}


def _race_triton(w, e):
    n, V = w.shape
    out = torch.empty(n, dtype=torch.int32, device=DEV)
    _race_kernel[(n,)](w.contiguous().to(DEV), e.contiguous().to(DEV), out, V,
                       BLOCK=max(16, triton.next_power_of_2(V)))
    return out.cpu().to(torch.int64)


@pytest.mark.parametrize("V", [1, 7, 37, 100])
def test_race_matches_reference(V):
    g = torch.Generator().manual_seed(V)
    n = 24
    w = torch.rand(n, V, generator=g)
    w[w < 0.3] = 0.0                                       # zeros
    w[1] = 0.0                                             # zero mass -> -1
    w[2] = 0.25                                            # all tied weights
    w[3] = -torch.rand(V, generator=g)                     # negative weights are not lanes
    w[4, :] = 0.0
    w[4, V - 1] = 1e-30                                    # only the last lane
    e = rng.exponential(rng.lane_words(torch.arange(n), 3, 1, rng.STREAM_RESID, V))
    e[2] = e[2, 0].item()                                  # tied keys -> lowest lane
    e[5] = 1.0
    w[5] = torch.tensor([0.5, 0.0, 0.5] * V)[:V]           # tied keys with a zero between them
    # E = -0.0 (the word 0xFFFFFFxx gives u = 1 after float32 rounding): key -inf, the lane loses
    e[6, ::3] = -0.0
    w[7] = 0.0
    w[7, V - 1] = 0.5
    e[7, V - 1] = -0.0
    got = _race_triton(w, e)
    want = rng.race(w, e)
    assert torch.equal(got, want)
    assert int(got[1]) == -1 and int(got[2]) == 0
    if V > 1:
        assert int(got[4]) == V - 1
        assert int(got[7]) == 0          # as in the reference: a zero-weight lane beats key -inf


def test_race_never_picks_padded_lanes():
    V = 5                                   # BLOCK 16: lanes 5..15 are padded with huge weights
    w = torch.zeros(3, V)
    e = torch.ones(3, V)
    w[1, 2] = 1e-3
    got = _race_triton(w, e)
    assert got.tolist() == [-1, 2, -1]


def _thresholds(x, k, p, top_p):
    n, V = x.shape
    kth = torch.empty(n, dtype=torch.float32, device=DEV)
    kth2 = torch.empty(n, dtype=torch.int32, device=DEV)
    keep = torch.empty(n, V, dtype=torch.int8, device=DEV)
    _threshold_kernel[(n,)](x.contiguous().to(DEV), k.to(DEV), p.contiguous().to(DEV), kth, kth2, keep, V, top_p,
                            BLOCK=max(16, triton.next_power_of_2(V)))
    # kth_init_row + kth_rounds find the key of the same value (the keys of -0.0 and +0.0 agree)
    k2 = kth2.cpu()
    back = torch.where(k2 < 0, k2 ^ 0x7FFFFFFF, k2).view(torch.float32)
    assert torch.equal(back, kth.cpu()), (back, kth)
    return kth.cpu(), keep.cpu().bool()



def test_kth_largest_on_rows_built_for_every_search_branch():
    """The bracket search of ``kth_largest_key`` (value-halving rounds, the shrink after a round in
    a gap, the max/min finish, key-halving when the value gap is not a positive finite float) on
    the adversarial rows of the CUDA search's host model, k from 1 to V."""
    import numpy as np
    from test_topk_model import _rows
    rng_np = np.random.default_rng(5)
    rows = [(name, y) for name, y in _rows(rng_np) if y.size <= 1000]
    assert len(rows) >= 30
    for V in sorted({y.size for _, y in rows}):
        ys = [y for _, y in rows if y.size == V]
        x = torch.from_numpy(np.stack(ys))
        for ks in ([1] * len(ys), [2] * len(ys), [V // 3] * len(ys), [V - 1] * len(ys), [V] * len(ys),
                   rng_np.integers(1, V + 1, len(ys)).tolist()):
            k = torch.tensor(ks)
            kth, _ = _thresholds(x, k, torch.softmax(torch.nan_to_num(x, neginf=-1e30), -1), 0.9)
            want = torch.cat([topk_threshold(x[i:i + 1], int(k[i])) for i in range(len(ys))]).view(-1)
            assert torch.equal(kth, want), (V, ks)
        # the top-p search on the same rows' laws (ties, tiny and equal probabilities, masked lanes)
        p = torch.softmax(torch.nan_to_num(x, neginf=-1e30, posinf=1e30, nan=0.0).clamp(-1e30, 1e30), -1)
        for top_p in (0.3, 0.9, 0.999):
            _, keep = _thresholds(x, torch.ones(len(ys), dtype=torch.int64), p, top_p)
            assert torch.equal(keep, topp_keep(p, top_p)), (V, top_p)
    # values on consecutive float32 bit patterns: every pivot lands next to a value, so an off-by-one
    # in a bracket update shows
    V = 300

    def run(base):
        return (np.array([base], np.float32).view(np.int32)[0] + np.arange(V, dtype=np.int32)).view(np.float32)

    keys = np.stack([run(b) for b in (1e-3, 0.25, 3.0, 1e-30)] + [-run(1e-3), -run(5.0)])
    x = torch.from_numpy(rng_np.permuted(keys, axis=1).copy())
    for k in (1, 2, 77, 150, 299, 300):
        kk = torch.full((x.shape[0],), k)
        kth, _ = _thresholds(x, kk, torch.ones_like(x), 0.5)
        want = torch.cat([topk_threshold(x[i:i + 1], k) for i in range(x.shape[0])]).view(-1)
        assert torch.equal(kth, want), k
    # probabilities on consecutive bits (rows summing to about 1.03, 1.0 and 0.94)
    p = torch.from_numpy(rng_np.permuted(np.stack([run(1 / 290), run(1 / 300), run(1 / 320)]), axis=1).copy())
    for top_p in (0.2, 0.5, 0.77, 0.93):
        _, keep = _thresholds(p, torch.ones(3, dtype=torch.int64), p, top_p)
        assert torch.equal(keep, topp_keep(p, top_p)), top_p

@pytest.mark.parametrize("V", [5, 37, 100])
def test_kth_largest_and_top_p(V):
    g = torch.Generator().manual_seed(100 + V)
    n = 12
    x = torch.randn(n, V, generator=g) * 3
    x[0] = x[0].to(torch.bfloat16).float()                 # bf16: many ties
    x[1] = torch.round(x[1])                               # heavy ties
    x[2, : V // 2] = float("-inf")                         # masked lanes
    x[3] = -x[3].abs()                                     # all negative
    x[4, :3] = torch.tensor([0.0, -0.0, 0.0])              # signed zeros
    x[5] = 1.0                                             # all equal
    k = torch.randint(1, V + 1, (n,), generator=g)
    k[2] = V                                               # k-th largest is -inf
    k[5] = 1
    kth, _ = _thresholds(x, k, torch.softmax(x, -1), 0.9)
    want = torch.cat([topk_threshold(x[i:i + 1], int(k[i])) for i in range(n)]).view(n)
    assert torch.equal(kth, want)

    for top_p in (0.3, 0.75, 0.95):
        p = torch.softmax(torch.randn(n, V, generator=g) * 2, -1)
        p[0] = torch.softmax(torch.round(torch.randn(V, generator=g)), -1)    # ties in p
        p[1] = 1.0 / V                                                         # uniform
        p[2] = 0.0
        p[2, 1] = 1.0                                                          # one-hot
        _, keep = _thresholds(x, k, p, top_p)
        want_keep = topp_keep(p, top_p)
        # both are exact rules on float32 sums; they can only disagree where a partial sum sits
        # within rounding of top_p, which these draws avoid
        assert torch.equal(keep, want_keep), top_p


@triton.jit
def _prefix_kernel(m_ptr, out_ptr, V, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    keep = valid & (tl.load(m_ptr + r * V + lanes, mask=valid, other=1) != 0)
    tl.store(out_ptr + r * V + lanes, ts.prefix_count(keep, BLOCK), mask=valid)


@pytest.mark.parametrize("V", [1, 13, 64, 100, 1000])
def test_prefix_count_is_the_exclusive_count_of_kept_lanes(V):
    """``prefix_count`` (a scan on a [BLOCK // 32, 32] view from 64 lanes up) gives lane i the number
    of kept lanes before it, on rows with nothing, everything, runs and random masks kept; padded
    lanes (loaded as kept on purpose) never count."""
    g = torch.Generator().manual_seed(V)
    m = (torch.rand(6, V, generator=g) < torch.tensor([0.0, 1.0, 0.5, 0.05, 0.95, 0.5]).view(6, 1)).to(torch.int32)
    m[5] = (torch.arange(V) // 7) % 2                       # runs of 7 across the 32-lane rows
    out = torch.full((6, V), -5, dtype=torch.int32, device=DEV)
    _prefix_kernel[(6,)](m.to(DEV), out, V, BLOCK=max(16, triton.next_power_of_2(V)))
    want = torch.cumsum(m, 1, dtype=torch.int32) - m
    assert torch.equal(out.cpu(), want)


@triton.jit
def _target_kernel(x_ptr, p_ptr, bad_ptr, V, inv_t, top_k, GREEDY: tl.constexpr, DO_TOPK: tl.constexpr,
                   BLOCK: tl.constexpr):
    r = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    x = tl.load(x_ptr + r * V + lanes, mask=valid, other=float("nan"))   # padded lanes: NaN, never read
    P, bad = ts.target_row(x, lanes, valid, V, inv_t, top_k, 1.0, GREEDY, DO_TOPK, False, INTERP)
    tl.store(p_ptr + r * V + lanes, P, mask=valid)
    tl.store(bad_ptr + r, bad.to(tl.int32))


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.7, 4), (1e-37, 0)])
def test_target_row_bad_rows_as_the_reference(temperature, top_k):
    """``target_row`` flags exactly the rows the reference makes NaN (one reduction finds NaN / +inf
    lanes, rows without a finite logit and a scaled maximum that overflows) and gives the
    reference's law on the others."""
    import numpy as np
    from sjd_kernels.reference.target import target_probs
    V = 37
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, V, generator=g) * 3
    x[0, 5] = float("nan")
    x[1, 9] = float("inf")
    x[2] = float("-inf")                                   # no finite logit
    x[3, :30] = float("-inf")                              # masked lanes, finite rest
    x[4, 3] = 3e38                                         # finite; x / T overflows for tiny T
    x[5, 0] = float("-inf")
    x[5, 1] = float("nan")
    x[6] = -3e38                                           # x / T underflows to -inf for tiny T
    x[7] = 0.0
    P = torch.empty(9, V, device=DEV)
    bad = torch.empty(9, dtype=torch.int32, device=DEV)
    inv_t = float(np.float32(1.0) / np.float32(temperature)) if temperature > 0 else 1.0
    _target_kernel[(9,)](x.to(DEV), P, bad, V, inv_t, top_k, GREEDY=temperature == 0.0, DO_TOPK=top_k > 0,
                         BLOCK=64)
    want = target_probs(x, temperature, top_k, 1.0)
    want_bad = torch.isnan(want).any(-1)
    assert torch.equal(bad.cpu().bool(), want_bad)
    assert bool(want_bad[:3].all()) and not bool(want_bad[3])
    ok = ~want_bad
    assert torch.equal(P.cpu()[ok], want[ok]) if temperature == 0.0 else \
        torch.allclose(P.cpu()[ok], want[ok], rtol=1e-6, atol=1e-7)
    assert torch.equal(P.cpu()[want_bad], torch.zeros_like(P.cpu()[want_bad]))
