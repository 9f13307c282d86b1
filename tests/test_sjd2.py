"""SJD2: schedule, noising, level embedding, the fused input preparation (reference, float64, Triton, CUDA)."""
import contextlib
import math
import os

import pytest
import torch

import stats
from _util import gpu, requires_cuda, requires_cuda_ext

from sjd_kernels.ops._common import SJDInputError, triton_available
from sjd_kernels.sjd2 import (EmbedNorm, LevelEmbedding, NoiseSchedule, SJD2Embedding, position_noise,
                              sample_segment_levels, sjd2_prepare)

# Triton on CPU tensors runs under the interpreter only (TRITON_INTERPRET=1 set before import).
needs_triton = pytest.mark.skipif(not (triton_available()[0] and os.environ.get("TRITON_INTERPRET") == "1"),
                                  reason="needs TRITON_INTERPRET=1 (Triton kernels on CPU tensors)")


# ---------------------------------------------------------------- schedule

@pytest.mark.parametrize("K,s_min,rho", [(1, 0.3, 7.0), (8, 0.2, 7.0), (20, 0.05, 3.0)])
def test_schedule_karras_variance_preserving(K, s_min, rho):
    sch = NoiseSchedule(levels=K, s_min=s_min, rho=rho)
    s, a = sch.sigmas64(), sch.alphas64()
    assert s.shape == (K + 1,) and s[0] == 0 and a[0] == 1
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(s), atol=1e-12)
    assert s[-1] == 1.0 and a[-1] == 0.0                       # level K is pure noise
    assert bool((s[1:] - s[:-1] > 0).all())
    if K >= 2:
        assert abs(s[1].item() - s_min) < 1e-12
        r = s[1:] ** (1 / rho)                                   # Karras: equal steps in s^(1/rho)
        assert torch.allclose(r[1:] - r[:-1], torch.full((K - 1,), (r[-1] - r[0]).item() / (K - 1),
                                                          dtype=torch.float64), atol=1e-12)


def test_schedule_k0_and_errors():
    """K = 0 is plain SJD; each bound of the schedule is refused with its own message (levels >= 0, then
    0 < s_min <= s_max <= 1, checked only with noisy levels, then rho > 0)."""
    assert NoiseSchedule(levels=0).sigmas64().tolist() == [0.0]
    assert NoiseSchedule(levels=0, s_min=0.0, s_max=2.0).sigmas64().tolist() == [0.0]
    for kw, msg in ((dict(levels=-1), r"^levels must be an int >= 0, got -1$"),
                    (dict(levels=4, s_min=0.0), r"^need 0 < s_min <= s_max <= 1 .*got s_min=0.0, s_max=1.0$"),
                    (dict(levels=4, s_max=1.5), r"got s_min=0.2, s_max=1.5$"),
                    (dict(levels=4, s_min=0.9, s_max=0.5), r"got s_min=0.9, s_max=0.5$"),
                    (dict(levels=4, rho=0.0), r"^rho must be > 0, got 0.0$")):
        with pytest.raises(SJDInputError, match=msg):
            NoiseSchedule(**kw)


# ---------------------------------------------------------------- segment noising

def _runs(row):
    """(start, level) of each maximal run of a level row."""
    out, prev = [], None
    for i, v in enumerate(row.tolist()):
        if v != prev:
            out.append((i, v))
            prev = v
    return out


def test_segments_levels_and_counts():
    g = torch.Generator().manual_seed(0)
    K, T, S = 6, 30, 5
    lv = sample_segment_levels(4000, T, K, generator=g, max_segments=S, p_rising=0.0)
    assert lv.dtype == torch.int64 and lv.shape == (4000, T)
    assert int(lv.min()) == 0 and int(lv.max()) == K
    runs = [len(_runs(r)) for r in lv]
    assert max(runs) <= S                                       # at most S segments (equal neighbours merge)
    assert set(runs) == set(range(1, S + 1))                    # every segment count occurs
    # every level occurs at every position (segments cover the whole sequence, levels uniform)
    for k in range(K + 1):
        assert bool((lv == k).any(0).all()), k
    # level frequencies: uniform over 0..K; chi-square, false-alarm rate 1e-6 (df = K)
    from scipy.stats import chi2
    seg_levels = torch.tensor([v for r in lv[:2000] for _, v in _runs(r)])
    cnt = torch.bincount(seg_levels, minlength=K + 1).double()
    # merged runs bias nothing between levels: each run's level is still uniform by symmetry
    exp = cnt.sum() / (K + 1)
    stat = ((cnt - exp) ** 2 / exp).sum().item()
    assert stat < chi2.isf(1e-6, K)
    # every cut point is used
    cut = (lv[:, 1:] != lv[:, :-1]).any(0)
    assert bool(cut.all())


def test_segments_rising_suffixes_covered():
    g = torch.Generator().manual_seed(1)
    K, T = 5, 24
    lv = sample_segment_levels(3000, T, K, generator=g, max_segments=6, p_rising=1.0)
    assert bool((lv[:, 1:] >= lv[:, :-1]).all())                # rising along the sequence
    assert bool((lv[:, 0] == 0).all()) and bool((lv[:, -1] == K).all())   # clean prefix, pure-noise tail
    # suffixes of every length rise from clean to K (the tail is at K, the start clean)
    first_k = (lv == K).int().argmax(1)
    assert set(first_k.tolist()) == set(range(1, T))
    # in mixed mode both kinds occur, at the asked rate (binomial, 6 sigma)
    lv = sample_segment_levels(2000, T, K, generator=g, max_segments=6, p_rising=0.3)
    rising = ((lv[:, 1:] >= lv[:, :-1]).all(1) & (lv[:, 0] == 0) & (lv[:, -1] == K)).double().mean().item()
    assert rising >= 0.3 - 6 * math.sqrt(0.3 * 0.7 / 2000)
    assert rising < 0.6                                         # iid rows are rarely rising by chance


def test_segments_k0_is_clean():
    assert int(sample_segment_levels(3, 10, 0).abs().sum()) == 0


# ---------------------------------------------------------------- normalisation, level embedding, noise

def test_embed_norm_roundtrip_and_stats():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(40, 16, generator=g) * 3 + 5
    nm = EmbedNorm.from_embedding(W, slice(0, 32))
    x = nm.normalize(W[:32])
    assert torch.allclose(x.mean(0), torch.zeros(16), atol=1e-5)
    assert torch.allclose(x.std(0), torch.ones(16), atol=1e-5)
    assert torch.allclose(nm.unnormalize(x), W[:32], atol=1e-5)


def test_level_zero_embedding_fixed_at_zero():
    le = LevelEmbedding(4, 8)
    with torch.no_grad():
        le.weight.normal_()
    opt = torch.optim.SGD(le.parameters(), lr=1.0)
    le(torch.tensor([0, 1, 2, 4])).sum().backward()
    opt.step()
    assert le.table().shape == (5, 8)
    assert bool((le.table()[0] == 0).all())
    assert le(torch.tensor([0])).abs().sum().item() == 0.0


def test_position_noise_gaussian_and_keyed():
    from scipy.stats import kstest
    z = position_noise(torch.tensor([5]), torch.arange(2000).view(1, -1), 32)
    assert z.shape == (1, 2000, 32) and z.dtype == torch.float32
    assert kstest(z.flatten().double().numpy(), "norm").pvalue > 1e-6
    # keyed by (seed, position, dim): the same numbers alone or in any batch
    z2 = position_noise(torch.tensor([[5], [6]]), torch.tensor([[7, 3], [7, 3]]), 32)
    assert torch.equal(z2[0, 0], z[0, 7]) and torch.equal(z2[0, 1], z[0, 3])
    assert not torch.equal(z2[1, 0], z2[0, 0])


def test_sjd2_embedding_inputs_clean_exact():
    g = torch.Generator().manual_seed(3)
    E = torch.randn(10, 8, generator=g)
    emb = SJD2Embedding(NoiseSchedule(levels=3), EmbedNorm.from_embedding(E))
    with torch.no_grad():
        emb.level_embed.weight.normal_()
    tok = torch.randint(0, 10, (2, 6), generator=g)
    lv = torch.tensor([[0, 0, 1, 2, 3, 3], [0, 3, 0, 1, 0, 2]])
    e = E[tok]
    x = emb.noise(e, lv, torch.randn(2, 6, 8, generator=g))
    out = emb.inputs_embeds(e, x, lv)
    clean = lv == 0
    assert torch.equal(out[clean], e[clean])                    # bit-exact token embedding at level 0
    exp = emb.norm.unnormalize(x) + emb.level_embed(lv)
    assert torch.allclose(out[~clean], exp[~clean])
    # level K = pure noise (a_K = 0): the latent does not depend on the token
    xK = emb.noise(e, torch.full_like(lv, 3), torch.zeros(2, 6, 8))
    assert xK.abs().max().item() == 0.0


# ---------------------------------------------------------------- training pieces

def test_noisy_inputs_and_loss_train_the_right_parameters():
    from sjd_kernels.sjd2.train import next_clean_token_loss, noisy_image_inputs, param_groups
    g = torch.Generator().manual_seed(4)
    V, d, T = 10, 8, 12
    base = torch.nn.ModuleDict({"emb": torch.nn.Embedding(V, d), "head": torch.nn.Linear(d, V)})
    emb = SJD2Embedding(NoiseSchedule(levels=3), EmbedNorm.from_embedding(base["emb"].weight))
    tok = torch.randint(0, V, (4, T), generator=g)
    lv = sample_segment_levels(4, T, 3, generator=g, p_rising=1.0)
    x = noisy_image_inputs(emb, base["emb"](tok), lv, generator=g)
    logits = base["head"](x)
    loss = next_clean_token_loss(logits, tok)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, V), tok.reshape(-1)))
    loss.backward()
    assert base["emb"].weight.grad.abs().sum() > 0 and emb.level_embed.weight.grad.abs().sum() > 0
    assert emb.norm.mean.requires_grad is False                 # the normalisation is frozen
    # level-0 inputs are exactly the embeddings (no noise path)
    clean = lv == 0
    assert torch.equal(x[clean], base["emb"](tok)[clean])
    groups = param_groups(base, emb, lr=1e-4, new_lr=1e-2, weight_decay=0.1)
    by = {grp["name"]: grp for grp in groups}
    assert by["sjd2_new"]["lr"] == 1e-2 and by["sjd2_new"]["params"] == [emb.level_embed.weight]
    assert by["base"]["lr"] == 1e-4 and by["base"]["weight_decay"] == 0.1
    ids = [id(p) for grp in groups for p in grp["params"]]
    assert len(ids) == len(set(ids)) == len(list(base.parameters())) + 1


# ---------------------------------------------------------------- sjd2_prepare

def _prepare_case(B=3, N=7, R=9, d=24, Vt=19, K=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, s = NoiseSchedule(levels=K, s_min=0.1).coefficients()
    E = (torch.randn(Vt, d, generator=g) * 2 + 1).to(dtype)
    mean = torch.randn(d, generator=g)
    std = torch.rand(d, generator=g) + 0.5
    L = torch.randn(K + 1, d, generator=g)
    L[0] = 0
    tok = torch.randint(0, Vt, (B, N), generator=g)
    n = torch.tensor([0, 5, 11, 2][:B])
    pos = n.view(B, 1) - 1 + torch.arange(N)                    # slot 0: X[n-1], then the window
    pos[0, 0] = -1                                              # the condition token of request 0
    lat = torch.randn(B, R, d, generator=g)
    lev = torch.randint(0, K + 1, (B, R), generator=g).to(torch.int32)
    ce = n.clone()
    fs = n + torch.tensor([2, 0, 6, 3][:B])                     # positions >= fs enter now
    re_ = n + torch.tensor([4, 3, 6, 0][:B])                    # positions < re_ got a sample
    seeds = torch.tensor([11, -3, 2 ** 40 + 5, 7][:B])
    return dict(embed_weight=E, mean=mean, std=std, level_table=L, alpha=a, sigma=s, tokens=tok, positions=pos,
                seed=seeds, commit_end=ce, fresh_start=fs, row_end=re_, latent=lat, level=lev)


def _prepare_f64(c, with_clean=False):
    """Independent float64 oracle of the SPEC's rule, slot by slot. ``with_clean``: also the ``[B, N]`` bool
    mask of the slots whose output is their token's embedding row itself (committed, or at level 0)."""
    E = c["embed_weight"].double()
    mean, std = c["mean"].double(), c["std"].double()
    L = c["level_table"].double()
    a, s = c["alpha"].double(), c["sigma"].double()
    K = a.shape[0] - 1
    B, N = c["tokens"].shape
    R = c["latent"].shape[1]
    lat = c["latent"].double().clone()
    lev = c["level"].clone()
    out = torch.zeros(B, N, E.shape[1], dtype=torch.float64)
    clean = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            p = int(c["positions"][b, i])
            t = int(c["tokens"][b, i])
            if p < 0:
                continue
            if p < int(c["commit_end"][b]):
                out[b, i] = E[t]
                clean[b, i] = True
                continue
            r = p % R
            if p >= int(c["fresh_start"][b]):
                k = K
                x = position_noise(c["seed"][b], torch.tensor(p), E.shape[1]).double()
            else:
                k, x = int(lev[b, r]), lat[b, r]
            if p < int(c["row_end"][b]) and k > 0:
                eh = (E[t] - mean) / std
                eps = (x - a[k] * eh) / s[k]
                x = a[k - 1] * eh + s[k - 1] * eps
                k -= 1
            out[b, i] = E[t] if k == 0 else x * std + mean + L[k]
            clean[b, i] = k == 0
            lat[b, r], lev[b, r] = x, k
    return (out, lat, lev, clean) if with_clean else (out, lat, lev)


def _clone(c):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prepare_reference_matches_float64(seed):
    c = _prepare_case(seed=seed)
    want, lat64, lev64 = _prepare_f64(c)
    got_c = _clone(c)
    got = sjd2_prepare(**got_c, backend="torch")
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_c["level"], lev64)
    assert torch.allclose(got_c["latent"].double(), lat64, rtol=1e-5, atol=1e-5)
    # the case exercises every branch
    p, ce, fs, re_ = c["positions"], c["commit_end"].view(-1, 1), c["fresh_start"].view(-1, 1), c["row_end"].view(-1, 1)
    win = (p >= 0) & (p >= ce)
    assert bool((p < 0).any()) and bool(((p >= 0) & (p < ce)).any())
    assert bool((win & (p >= fs) & (p < re_)).any()) and bool((win & (p >= fs) & (p >= re_)).any())
    assert bool((win & (p < fs) & (p < re_)).any())


def test_prepare_clean_positions_are_exact_embeddings():
    c = _prepare_case()
    out = sjd2_prepare(**_clone(c), backend="torch")
    lv_after = _clone(c)
    sjd2_prepare(**lv_after, backend="torch")
    R = c["latent"].shape[1]
    E = c["embed_weight"]
    for b in range(3):
        for i in range(c["tokens"].shape[1]):
            p = int(c["positions"][b, i])
            if p < 0:
                assert out[b, i].abs().max() == 0
            elif p < int(c["commit_end"][b]) or int(lv_after["level"][b, p % R]) == 0:
                assert torch.equal(out[b, i], E[c["tokens"][b, i]])


def test_prepare_levels_zero_is_token_embedding():
    """K = 0: every slot is its token's embedding, bit for bit (SJD's inputs)."""
    c = _prepare_case(K=0)
    c["level"].zero_()
    out = sjd2_prepare(**c, backend="torch")
    E = c["embed_weight"][c["tokens"]]
    valid = c["positions"] >= 0
    assert torch.equal(out[valid], E[valid])


def test_prepare_ddim_endpoints():
    """Level 1 -> 0 lands exactly on e_hat; entering with a row at s_K = 1 gives a_{K-1} e_hat + s_{K-1} eps."""
    K, d = 3, 16
    c = _prepare_case(B=1, N=3, R=4, d=d, K=K)
    c["positions"] = torch.tensor([[4, 5, 6]])
    c["commit_end"] = torch.tensor([5])
    c["fresh_start"] = torch.tensor([6])
    c["row_end"] = torch.tensor([7])
    c["level"][0, 5 % 4] = 1
    out = sjd2_prepare(**c, backend="torch")
    E = c["embed_weight"]
    assert torch.equal(out[0, 1], E[c["tokens"][0, 1]])
    assert int(c["level"][0, 5 % 4]) == 0 and int(c["level"][0, 6 % 4]) == K - 1
    a, s = c["alpha"].double(), c["sigma"].double()
    eh = (E[c["tokens"][0, 2]].double() - c["mean"].double()) / c["std"].double()
    eps = position_noise(c["seed"][0], torch.tensor(6), d).double()
    assert torch.allclose(c["latent"][0, 6 % 4].double(), a[K - 1] * eh + s[K - 1] * eps, atol=1e-5)


def test_prepare_validation_names_argument():
    c = _prepare_case()
    c["tokens"] = c["tokens"].to(torch.int32)
    with pytest.raises(SJDInputError, match="tokens must have dtype int64"):
        sjd2_prepare(**c)
    c = _prepare_case()
    c["level_table"] = c["level_table"][:-1]
    with pytest.raises(SJDInputError, match="level_table"):
        sjd2_prepare(**c)
    c = _prepare_case()
    c["embed_weight"] = c["embed_weight"].double()
    with pytest.raises(SJDInputError, match="CUDA kernel of sjd2_prepare takes float32, float16 or bfloat16"):
        sjd2_prepare(**c, backend="cuda")


def test_prepare_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    c = _prepare_case()
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.sjd.sjd2_prepare(*c.values(), torch.zeros(4, dtype=torch.int32), 1)
    assert tuple(out.shape) == (3, 7, 24)


@needs_triton
@pytest.mark.parametrize("dtype,seed,d", [(torch.float32, 0, 24), (torch.float32, 1, 40), (torch.bfloat16, 2, 24),
                                          (torch.float32, 3, 1100)])
def test_prepare_triton_equals_reference(dtype, seed, d):
    c = _prepare_case(dtype=dtype, seed=seed, d=d, N=5 if d > 100 else 7)
    ref_c, tri_c = _clone(c), _clone(c)
    want = sjd2_prepare(**ref_c, backend="torch")
    got = sjd2_prepare(**tri_c, backend="triton")
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(tri_c["level"], ref_c["level"])
    assert torch.allclose(tri_c["latent"], ref_c["latent"], rtol=1e-5, atol=1e-5)
    # clean slots (the oracle's: committed, or at level 0) are copied, not recomputed: bit-exact in every backend
    clean = _prepare_f64(c, with_clean=True)[3]
    committed = (c["positions"] >= 0) & (c["positions"] < c["commit_end"].view(-1, 1))
    assert (clean & ~committed).any() and committed.any() and (~clean & (c["positions"] >= 0)).any()
    E_tok = c["embed_weight"][c["tokens"]]
    assert torch.equal(got[clean], E_tok[clean]) and torch.equal(want[clean], E_tok[clean])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton kernel)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepare_triton_cuda_equals_reference(dtype):
    """The compiled kernel on a GPU against the CPU reference (the interpreter is more lenient than the compiler)."""
    for seed, d in ((0, 24), (1, 1100), (2, 4096)):
        c = _prepare_case(dtype=dtype, seed=seed, d=d)
        ref_c = _clone(c)
        want = sjd2_prepare(**ref_c, backend="torch")
        gpu_c = {k: v.cuda() for k, v in _clone(c).items()}
        got = sjd2_prepare(**gpu_c, backend="auto").cpu()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
        assert torch.equal(gpu_c["level"].cpu(), ref_c["level"])
        assert torch.allclose(gpu_c["latent"].cpu(), ref_c["latent"], rtol=1e-5, atol=1e-5)


@needs_triton
def test_prepare_triton_noise_matches_position_noise():
    """A fresh position with no row outputs unnormalize(eps) + L[K]: the kernel's Philox equals rng's."""
    K, d = 4, 64
    c = _prepare_case(B=2, N=4, R=5, d=d, K=K)
    c["positions"] = torch.tensor([[10, 11, 12, 13], [0, 1, 2, 3]])
    c["commit_end"] = torch.tensor([0, 0])
    c["fresh_start"] = torch.tensor([0, 0])
    c["row_end"] = torch.tensor([0, 0])
    got = sjd2_prepare(**_clone(c), backend="triton")
    eps = position_noise(c["seed"].view(2, 1), c["positions"], d)
    want = eps * c["std"] + c["mean"] + c["level_table"][K]
    assert torch.allclose(got, want, atol=2e-6)


# ---------------------------------------------------------------- sjd2_prepare: the CUDA kernel
#
# Outputs and latents that draw no position noise must equal the reference bit for bit (the kernel
# rounds operation by operation as PyTorch does); the noise's logf / cosf (the host's in the
# simulator, CUDA's on a GPU) may differ from PyTorch's by an ulp or so, so slots that draw it are
# compared within 1e-5 relative.

def _noise_slots(c):
    """[B, N] slots that draw position noise (window positions entering now, K > 0)."""
    p = c["positions"]
    win = (p >= 0) & (p >= c["commit_end"].view(-1, 1))
    return win & (p >= c["fresh_start"].view(-1, 1)) & (c["alpha"].shape[0] > 1)


def _noise_ring(c):
    """[B, R] ring slots written by a slot that draws noise."""
    B, R = c["level"].shape
    mask = torch.zeros(B, R, dtype=torch.bool)
    ns = _noise_slots(c)
    for b, i in ns.nonzero().tolist():
        mask[b, int(c["positions"][b, i]) % R] = True
    return mask


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def _assert_cuda_prepare_matches(c, got, got_c, want, want_c):
    ns = _noise_slots(c).to(got.device)
    nr = _noise_ring(c).to(got.device)
    want, want_lat, want_lev = want.to(got.device), want_c["latent"].to(got.device), want_c["level"].to(got.device)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got_c["level"], want_lev)
    assert torch.equal(_bits(got)[~ns], _bits(want)[~ns])                   # no noise drawn: bit for bit
    assert torch.equal(_bits(got_c["latent"])[~nr], _bits(want_lat)[~nr])   # includes every untouched ring slot
    assert torch.allclose(got[ns].float(), want[ns].float(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_c["latent"][nr], want_lat[nr], rtol=1e-5, atol=1e-5)


def _prepare_cuda_sim(c, order="reverse", race=False):
    from _util import sim_module
    from sjd_kernels.cuda import sim
    sim_module(race=race)
    with sim.simulate(order=order, race=race):
        return sjd2_prepare(**c, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [24, 13, 2056])   # 16-byte path, one lane per access, several chunks per thread
def test_prepare_cuda_sim_equals_reference(dtype, d):
    c = _prepare_case(dtype=dtype, d=d, seed=d, N=5 if d > 100 else 7)
    assert bool(_noise_slots(c).any()) and bool((~_noise_slots(c) & (c["positions"] >= 0)).any())
    want_c, got_c = _clone(c), _clone(c)
    want = sjd2_prepare(**want_c, backend="torch")
    got = _prepare_cuda_sim(got_c)
    _assert_cuda_prepare_matches(c, got, got_c, want, want_c)
    # the same bits whatever order the threads run in
    for order in ("forward", "shuffle"):
        again_c = _clone(c)
        again = _prepare_cuda_sim(again_c, order=order)
        assert torch.equal(_bits(again), _bits(got)) and torch.equal(again_c["latent"], got_c["latent"])


def test_prepare_cuda_sim_unaligned_tables_and_k0():
    """Tables that start off a 16-byte boundary take the one-lane path with the same results; K = 0
    (plain SJD) copies every token embedding."""
    c = _prepare_case(dtype=torch.bfloat16, d=32, seed=5)
    for name in ("embed_weight", "mean", "latent"):
        t = c[name]
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        c[name] = buf[1:].view(t.shape).copy_(t)              # contiguous, data pointer 2 or 4 bytes off
        assert c[name].data_ptr() % 16 != 0
    want_c, got_c = _clone(c), _clone(c)
    got_c["latent"] = c["latent"]                             # keep the unaligned ring (clone would realign it)
    lat0 = c["latent"].clone()
    want = sjd2_prepare(**want_c, backend="torch")
    got = _prepare_cuda_sim(got_c)
    _assert_cuda_prepare_matches(c | {"latent": lat0}, got, got_c, want, want_c)

    c0 = _prepare_case(K=0, dtype=torch.float16, d=16, seed=6)
    c0["level"].zero_()
    got0 = _prepare_cuda_sim(c0)
    valid = c0["positions"] >= 0
    assert torch.equal(_bits(got0[valid]), _bits(c0["embed_weight"][c0["tokens"]][valid]))
    assert not bool(got0[~valid].any())


def test_prepare_cuda_sim_half_rounding_edges():
    """float16 outputs near overflow and in the subnormal range round as PyTorch's cast does (the
    simulator's __float2half_rn stands in for CUDA's; no noise is drawn, so every bit is compared)."""
    K, d = 3, 64
    c = _prepare_case(B=2, N=6, R=8, d=d, K=K, dtype=torch.float16, seed=7)
    c["fresh_start"] = torch.tensor([10 ** 6, 10 ** 6])          # nothing enters: no noise
    c["level"].fill_(K)
    g = torch.Generator().manual_seed(8)
    scale = torch.logspace(-9, 5, d, dtype=torch.float32)         # 1e-9 .. 1e5: subnormals to overflow
    c["std"] = scale * (1 + torch.rand(d, generator=g))
    c["mean"] = torch.zeros(d)
    c["level_table"] = c["level_table"] * scale
    c["latent"] = torch.randn(c["latent"].shape, generator=g)
    want_c, got_c = _clone(c), _clone(c)
    want = sjd2_prepare(**want_c, backend="torch")
    got = _prepare_cuda_sim(got_c)
    assert bool(torch.isinf(want).any()) and bool(((want != 0) & (want.abs() < 6.1e-5)).any())
    assert not bool(_noise_slots(c).any())
    _assert_cuda_prepare_matches(c, got, got_c, want, want_c)


def test_prepare_cuda_sim_race_checks():
    """The race-checking build: every thread reads the ring level before thread 0 writes it."""
    c = _prepare_case(dtype=torch.bfloat16, d=40, seed=9)
    want_c, got_c = _clone(c), _clone(c)
    want = sjd2_prepare(**want_c, backend="torch")
    got = _prepare_cuda_sim(got_c, order="shuffle", race=True)
    _assert_cuda_prepare_matches(c, got, got_c, want, want_c)


@gpu
@requires_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prepare_cuda_kernel_on_the_gpu(dtype):
    """The compiled CUDA kernel against the CPU reference, d up to 4096 (both access paths)."""
    for seed, d in ((0, 24), (1, 1100), (2, 4096), (3, 13)):
        c = _prepare_case(dtype=dtype, seed=seed, d=d)
        want_c = _clone(c)
        want = sjd2_prepare(**want_c, backend="torch")
        got_c = {k: v.cuda() for k, v in _clone(c).items()}
        got = sjd2_prepare(**got_c, backend="cuda")
        _assert_cuda_prepare_matches(c, got, got_c, want, want_c)


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=requires_cuda_ext), "triton"])
def test_prepare_output_past_2_31_elements_on_the_gpu(backend):
    """An output [B, N, d] of 2**31 elements and more: slot * d no longer fits 32 bits (the Triton kernel
    computed it in 32 bits and wrote before the output). Every position is committed, so each output row is
    exactly its token's embedding row."""
    if backend == "triton":
        pytest.importorskip("triton")
    B, N, d, Vt, R, K = 2, 2 ** 18 + 1, 4096, 64, 4, 3             # B * N * d = 2**31 + 8192
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    a, s = NoiseSchedule(levels=K, s_min=0.1).coefficients()
    c = dict(embed_weight=torch.randn(Vt, d, device=dev, generator=g).to(torch.bfloat16),
             mean=torch.zeros(d, device=dev), std=torch.ones(d, device=dev),
             level_table=torch.zeros(K + 1, d, device=dev), alpha=a.to(dev), sigma=s.to(dev),
             tokens=torch.randint(0, Vt, (B, N), device=dev, generator=g),
             positions=torch.arange(N, device=dev).repeat(B, 1), seed=torch.tensor([1, 2], device=dev),
             commit_end=torch.full((B,), N, device=dev), fresh_start=torch.full((B,), N, device=dev),
             row_end=torch.full((B,), N, device=dev), latent=torch.zeros(B, R, d, device=dev),
             level=torch.zeros(B, R, dtype=torch.int32, device=dev))
    out = sjd2_prepare(**c, backend=backend)
    torch.cuda.synchronize()
    ok = [bool(torch.equal(out[b], c["embed_weight"][c["tokens"][b]])) for b in range(B)]
    assert ok == [True, True], ok


@gpu
@requires_cuda_ext
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_prepare_graph_replay_equals_eager(backend):
    """Captured in a CUDA graph and replayed, each GPU kernel writes what its eager call writes."""
    if backend == "triton":
        pytest.importorskip("triton")
    c = _prepare_case(dtype=torch.bfloat16, d=1280, seed=4)
    eager_c = {k: v.cuda() for k, v in _clone(c).items()}
    want = sjd2_prepare(**eager_c, backend=backend)
    g_c = {k: v.cuda() for k, v in _clone(c).items()}
    lat0, lev0 = g_c["latent"].clone(), g_c["level"].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                              # warm-up off the capture (Triton compiles here)
        sjd2_prepare(**g_c, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sjd2_prepare(**g_c, backend=backend)
    g_c["latent"].copy_(lat0)
    g_c["level"].copy_(lev0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    assert torch.equal(g_c["latent"], eager_c["latent"]) and torch.equal(g_c["level"], eager_c["level"])


# ---------------------------------------------------------------- decoding

def _tiny_gpt(V=12, ncls=3, seed=0):
    """The in-package GPT, small, random and float64 (only the decoding logic is tested)."""
    from sjd_kernels.models.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=V, max_image_tokens=64, num_classes=ncls, n_layer=2, n_head=2, n_kv_head=2,
                      d_model=16)).double().eval()
    with torch.no_grad():                                       # sharper rows than the 0.02 init gives
        m.head.weight.normal_(0, 1.0)
    return m


def _tiny_forward(m, cls, T, W, cfg=False):
    from sjd_kernels.sjd2.checkpoint import gpt_forward_parts
    from sjd_kernels.sjd2.decode import SeqForward
    E, prompt, model_fn, lo = gpt_forward_parts(m, cls, cfg)
    return SeqForward(model_fn, prompt.detach(), cls.shape[0], T + 2 * W + 2, lo, E.shape[0])


def _emb_rows(m):
    return m.tok_emb.weight.detach()


def _plain_sjd(m, cls, T, W, seeds):
    """SJD written directly on the op (slot 0 = X[n-1], then the window), the oracle for levels = 0."""
    import sjd_kernels as sk
    B = cls.shape[0]
    fw = _tiny_forward(m, cls, T, W)
    st = sk.JacobiState.create(B, W, m.vocab_size, seeds)
    n = torch.zeros(B, dtype=torch.int64)
    D = sk.init_window(st, n, W)
    out = torch.full((B, T), -1, dtype=torch.int64)
    while bool((n < T).any()):
        live = n < T
        wl = torch.where(live, (T - n - 1).clamp(min=0, max=W), torch.zeros_like(n))
        pos = (n - 1).view(B, 1) + torch.arange(W + 1)
        tok = torch.cat([torch.gather(out, 1, (n - 1).clamp(0, T - 1).view(B, 1)), D], 1)
        lg, _ = fw(_emb_rows(m)[tok], pos, pos < 0)
        r = sk.jacobi_step(lg.float(), D, wl, n, st)
        for b in range(B):
            if live[b]:
                k = int(r.num_accepted[b]) + 1
                for i in range(k):
                    if n[b] + i < T:
                        out[b, n[b] + i] = r.tokens[b, i]
                n[b] += k
                D[b] = r.next_drafts[b]
    return out


@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_decode_levels0_is_sjd(kv):
    from sjd_kernels.sjd2.decode import sjd2_loop
    torch.manual_seed(0)
    m = _tiny_gpt()
    cls, T, W, seeds = torch.tensor([0, 1, 2]), 30, 6, [5, 6, 7]
    with torch.no_grad():
        want = _plain_sjd(m, cls, T, W, seeds)
    with torch.no_grad():
        got = sjd2_loop(_tiny_forward(m, cls, T, W), _emb_rows(m), None, T, seeds, window=W, kv=kv)
        emb0 = SJD2Embedding(NoiseSchedule(levels=0), EmbedNorm.from_embedding(_emb_rows(m)))
        got0 = sjd2_loop(_tiny_forward(m, cls, T, W), _emb_rows(m), emb0, T, seeds, window=W, kv=kv)
    assert torch.equal(got.tokens, want) and torch.equal(got0.tokens, want)
    assert int(got.noisy_kv.sum()) == 0 and int(got.refed.sum()) == 0
    assert got.steps.max().item() == got.nfe and got.nfe < T    # Jacobi actually compressed steps


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_sjd2_levels0_equals_loop_sjd(cfg):
    """``generate(method="sjd")`` of the decoding loop and SJD2 with 0 levels: the same tokens under the
    same seed (same op, drafting and verification randomness, KV cache); the loop's sjd2 dispatch too."""
    from sjd_kernels.decoding import generate
    from sjd_kernels.sjd2 import generate_sjd2
    m = _tiny_gpt(seed=3)
    cls, T, W = torch.tensor([0, 1, 2, 1]), 40, 8
    want = generate(m, cls, T, method="sjd", window=W, seed=11, cfg_scale=cfg, progress=False)
    emb0 = SJD2Embedding(NoiseSchedule(levels=0), EmbedNorm.from_embedding(_emb_rows(m)))
    for kv in ("keep", "recompute"):
        got = generate_sjd2(m, cls, T, sjd2=emb0, window=W, seed=11, cfg_scale=cfg, kv=kv)
        assert torch.equal(got.tokens, want.tokens), kv
        assert got.stats.nfe == want.stats.nfe
        # the stats the chain loop reports (they were left at [] and 0 for sjd2)
        assert got.stats.accepted_hist == want.stats.accepted_hist and got.stats.steps == want.stats.steps, kv
        assert got.stats.state_bytes == want.stats.state_bytes > 0 and got.stats.cache_bytes > 0, kv
    m.__dict__["sjd2"] = emb0
    via_loop = generate(m, cls, T, method="sjd2", window=W, seed=11, cfg_scale=cfg, progress=False)
    assert torch.equal(via_loop.tokens, want.tokens)
    # an explicit sjd2=None is SJD even when the model carries SJD2 parameters with noise levels
    m.__dict__["sjd2"] = SJD2Embedding(NoiseSchedule(levels=4), EmbedNorm.from_embedding(_emb_rows(m)))
    plain = generate_sjd2(m, cls, T, sjd2=None, window=W, seed=11, cfg_scale=cfg)
    assert torch.equal(plain.tokens, want.tokens)
    noisy = generate_sjd2(m, cls, T, window=W, seed=11, cfg_scale=cfg)      # default: the model's own levels
    assert not torch.equal(noisy.tokens, want.tokens)


@gpu
@requires_cuda
def test_sjd2_on_a_cuda_model():
    """``generate_sjd2`` on a model on the GPU: every earlier test ran it on CPU models, and the image
    embedding was built from CPU ids, which a CUDA embedding refuses. With 0 levels it equals the loop's SJD
    on the same GPU (reference op on float64); the bundled fine-tune decodes valid tokens with the kernels."""
    from sjd_kernels.decoding import generate
    from sjd_kernels.sjd2 import checkpoint, generate_sjd2
    m = _tiny_gpt(seed=3).cuda()
    cls, T, W = torch.tensor([0, 1, 2, 1], device="cuda"), 40, 8
    want = generate(m, cls, T, method="sjd", window=W, seed=11, cfg_scale=3.0, backend="torch", progress=False)
    emb0 = SJD2Embedding(NoiseSchedule(levels=0), EmbedNorm.from_embedding(_emb_rows(m).cpu()))
    for kv in ("keep", "recompute"):
        got = generate_sjd2(m, cls, T, sjd2=emb0, window=W, seed=11, cfg_scale=3.0, kv=kv, backend="torch")
        assert got.tokens.is_cuda and torch.equal(got.tokens, want.tokens), kv
    gpt, emb = checkpoint.load_finetuned("mnist", device="cuda")
    V = gpt.config.vocab_size
    for backend in ("auto", "triton"):
        out = generate_sjd2(gpt, torch.arange(8, device="cuda") % 10, 49, sjd2=emb, window=16, seed=3,
                            cfg_scale=3.0, backend=backend)
        tok = out.tokens
        assert tok.is_cuda and tok.shape == (8, 49) and bool(((tok >= 0) & (tok < V)).all()), backend
        assert out.stats.nfe < 49, backend                       # the window compressed steps


def test_sjd2_progress_bar(capsys):
    """``progress=True`` draws the same bar as the other methods (committed tokens of the batch);
    ``progress=False`` draws none; the tokens do not depend on it."""
    from sjd_kernels.decoding import generate
    m = _tiny_gpt(seed=3)
    m.__dict__["sjd2"] = SJD2Embedding(NoiseSchedule(levels=2), EmbedNorm.from_embedding(_emb_rows(m)))
    cls = torch.tensor([0, 1])
    quiet = generate(m, cls, 20, method="sjd2", window=4, seed=2, progress=False)
    assert "sjd2 W=4" not in capsys.readouterr().err
    shown = generate(m, cls, 20, method="sjd2", window=4, seed=2, progress=True)
    err = capsys.readouterr().err
    assert "sjd2 W=4" in err and "/40" in err
    assert torch.equal(quiet.tokens, shown.tokens)


@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_sjd2_kv_cache_equals_recomputed_prefix(kv):
    """The KV-cache forward and the prefix-recomputing one give the same SJD2 tokens (float64 model)."""
    from sjd_kernels.sjd2 import generate_sjd2
    m = _tiny_gpt(seed=2)
    cls, T, W = torch.tensor([2, 0, 1]), 30, 6
    emb = SJD2Embedding(NoiseSchedule(levels=4, s_min=0.3), EmbedNorm.from_embedding(_emb_rows(m)))
    with torch.no_grad():
        emb.level_embed.weight.normal_(0, 0.1)
    a = generate_sjd2(m, cls, T, sjd2=emb, window=W, seed=5, cfg_scale=2.0, kv=kv)
    b = generate_sjd2(m, cls, T, sjd2=emb, window=W, seed=5, cfg_scale=2.0, kv=kv,
                      forward=_tiny_forward(m, cls, T, W, cfg=True))
    assert torch.equal(a.tokens, b.tokens)
    assert a.stats.sjd2.steps.tolist() == b.stats.sjd2.steps.tolist()


@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_decode_noisy_runs_deterministic_and_batch_invariant(kv):
    from sjd_kernels.sjd2.decode import sjd2_loop
    m = _tiny_gpt(seed=1)
    T, W = 24, 5
    emb = SJD2Embedding(NoiseSchedule(levels=4, s_min=0.3), EmbedNorm.from_embedding(_emb_rows(m)))
    with torch.no_grad():
        emb.level_embed.weight.normal_(0, 0.1)
        cls = torch.tensor([0, 2, 1])
        a = sjd2_loop(_tiny_forward(m, cls, T, W, cfg=True), _emb_rows(m), emb, T, [1, 2, 3], window=W,
                      kv=kv, cfg_scale=2.0)
        b = sjd2_loop(_tiny_forward(m, cls, T, W, cfg=True), _emb_rows(m), emb, T, [1, 2, 3], window=W,
                      kv=kv, cfg_scale=2.0)
        alone = sjd2_loop(_tiny_forward(m, cls[1:2], T, W, cfg=True), _emb_rows(m), emb, T, [2], window=W,
                          kv=kv, cfg_scale=2.0)
    assert torch.equal(a.tokens, b.tokens)
    assert bool((a.tokens >= 0).all()) and bool((a.tokens < m.vocab_size).all())
    assert torch.equal(alone.tokens[0], a.tokens[1])             # same seed, same image, whatever the batch
    if kv == "keep":
        assert int(a.noisy_kv.sum()) > 0 and int(a.refed.sum()) == 0
    else:
        assert int(a.noisy_kv.sum()) == 0 and int(a.refed.sum()) > 0


def test_decode_law_exact_when_rows_ignore_inputs():
    """With a model whose rows do not depend on its inputs, noisy inputs change nothing: SJD2 must then
    sample exactly the target law (chi-square on the joint law of 3 tokens, false-alarm rate 1e-6,
    power 0.99 against an error of 0.02 in any of the 27 cells: ``stats.assert_law``).
    This checks the verification/drafting plumbing: the stored law of a noisy position's draft, the
    window shift, the ring state."""
    from sjd_kernels.sjd2.decode import sjd2_loop, SeqForward
    V, T, W, d = 3, 3, 3, 4
    B = stats.required_n(V ** T)                                  # 58 222
    g = torch.Generator().manual_seed(7)
    table = torch.randn(1 + T + 2 * W + 2, V, generator=g) * 1.5        # logits by sequence index only
    E = torch.randn(V, d, generator=g)
    emb = SJD2Embedding(NoiseSchedule(levels=3, s_min=0.3), EmbedNorm.from_embedding(E))
    model_fn = lambda x: table[:x.shape[1]].expand(x.shape[0], -1, -1)
    fw = SeqForward(model_fn, torch.zeros(B, 1, d), B, T + 2 * W + 2, 0, V)
    res = sjd2_loop(fw, E, emb, T, torch.arange(B) + 11, window=W)
    assert res.nfe < T                                            # drafts were accepted along the way
    idx = (res.tokens * torch.tensor([V * V, V, 1])).sum(1)
    p = torch.softmax(table[:T].double(), -1)                     # row at sequence index t is image position t
    law = (p[0].view(V, 1, 1) * p[1].view(1, V, 1) * p[2].view(1, 1, V)).flatten()
    stats.assert_law(idx.numpy(), law.numpy(), "sjd2 joint law of 3 tokens")


# ---------------------------------------------------------------- checkpoints and the fine-tuned bundled model

def test_checkpoint_roundtrip_and_hash(tmp_path):
    import json
    from sjd_kernels.models.gpt import GPT, GPTConfig
    from sjd_kernels.models.bundled import BundledModelError
    from sjd_kernels.sjd2 import checkpoint
    cfg = dict(vocab_size=16, max_image_tokens=8, num_classes=2, n_layer=1, n_head=2, n_kv_head=2, d_model=8)
    (tmp_path / "mnist.json").write_text(json.dumps({"files": {"gpt": {"sha256": "0" * 64}}, "gpt": cfg}))
    gpt = GPT(GPTConfig(**cfg))
    emb = SJD2Embedding(NoiseSchedule(levels=3, s_min=0.25), EmbedNorm.from_embedding(checkpoint.image_embedding(gpt)))
    with torch.no_grad():
        emb.level_embed.weight.normal_()
    checkpoint.save("mnist", gpt, emb, out=tmp_path, training={"seed": 0})
    g2, e2 = checkpoint.load_finetuned("mnist", tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), g2.state_dict().values()))
    assert torch.equal(e2.level_embed.table(), emb.level_embed.table()) and e2.schedule == emb.schedule
    assert torch.equal(e2.norm.std, emb.norm.std)
    path = tmp_path / "mnist_sjd2.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(BundledModelError, match="SHA-256"):
        checkpoint.load_finetuned("mnist", tmp_path)


def test_checkpoint_of_another_base_gpt_is_refused(tmp_path):
    """A fine-tune is a whole GPT, so one made from an earlier base would still decode: it must be refused
    (at ``manifest``, which the demo's and scripts' checks call, and at ``load_finetuned``)."""
    import json
    from sjd_kernels.models.gpt import GPT, GPTConfig
    from sjd_kernels.models.bundled import BundledModelError
    from sjd_kernels.sjd2 import checkpoint
    cfg = dict(vocab_size=16, max_image_tokens=8, num_classes=2, n_layer=1, n_head=2, n_kv_head=2, d_model=8)
    base = tmp_path / "mnist.json"
    base.write_text(json.dumps({"files": {"gpt": {"sha256": "0" * 64}}, "gpt": cfg}))
    gpt = GPT(GPTConfig(**cfg))
    checkpoint.save("mnist", gpt, SJD2Embedding(NoiseSchedule(levels=3), EmbedNorm.from_embedding(
        checkpoint.image_embedding(gpt))), out=tmp_path)
    assert checkpoint.manifest("mnist", tmp_path)["base_gpt_sha256"] == "0" * 64
    checkpoint.load_finetuned("mnist", tmp_path)
    base.write_text(json.dumps({"files": {"gpt": {"sha256": "1" * 64}}, "gpt": cfg}))    # the base GPT retrained
    for call in (checkpoint.manifest, checkpoint.load_finetuned):
        with pytest.raises(BundledModelError, match=r"fine-tuned from the mnist GPT with SHA-256 000000000000.*"
                                                    r"now lists 111111111111.*stale.*finetune_sjd2.py --model mnist"):
            call("mnist", tmp_path)
    man = json.loads((tmp_path / "mnist_sjd2.json").read_text())
    del man["base_gpt_sha256"]
    (tmp_path / "mnist_sjd2.json").write_text(json.dumps(man))
    with pytest.raises(BundledModelError, match="lacks the entries.*base_gpt_sha256"):
        checkpoint.manifest("mnist", tmp_path)


def test_bundled_finetune_matches_the_bundled_base():
    """The committed SJD2 fine-tune was made from the committed base GPT: read from the two JSON files and
    the GPT file itself, not through ``checkpoint.manifest`` (whose own check is the code under test above)."""
    import json
    from sjd_kernels.models import bundled
    if not _finetuned_exists():
        pytest.skip("no SJD2 fine-tune committed (python/finetune_sjd2.py)")
    pinned = json.loads((bundled.WEIGHTS_DIR / "mnist_sjd2.json").read_text())["base_gpt_sha256"]
    base = json.loads((bundled.WEIGHTS_DIR / "mnist.json").read_text())["files"]["gpt"]
    assert pinned == base["sha256"] == bundled.sha256_file(bundled.WEIGHTS_DIR / base["file"]), (pinned, base)


def _finetuned_exists():
    from sjd_kernels.models.bundled import WEIGHTS_DIR
    return (WEIGHTS_DIR / "mnist_sjd2.json").exists()


@pytest.mark.skipif(not _finetuned_exists(), reason="no SJD2 fine-tune committed (python/finetune_sjd2.py)")
def test_finetuned_model_keeps_ar_quality():
    """The SJD2 fine-tune decoded with plain AR: held-out clean cross-entropy and AR samples as good as the base's."""
    from sjd_kernels import data
    from sjd_kernels.models import bundled
    from sjd_kernels.sjd2 import checkpoint, generate_sjd2
    base = bundled.load("mnist")
    gpt, emb = checkpoint.load_finetuned("mnist")
    X, y = data.real_images("mnist", "test", n=100, seed=0)
    tok, lab = base.tokenizer.encode(X), torch.as_tensor(y)
    with torch.no_grad():
        ce = {name: float(torch.nn.functional.cross_entropy(m.forward_train(lab, tok).flatten(0, 1).float(),
                                                             tok.flatten()))
              for name, m in (("base", base.gpt), ("ft", gpt))}
    assert ce["ft"] < 1.05 * ce["base"], ce
    n = 100
    classes = torch.arange(n) % base.num_classes
    acc = {}
    for name, m in (("base", base.gpt), ("ft", gpt)):
        r = generate_sjd2(m, classes, base.tokens_per_image, window=0, seed=list(range(n)), cfg_scale=3.0)
        acc[name] = base.quality.accuracy(base.tokenizer.decode(r.tokens).numpy(), classes.numpy())
    # one-sided two-proportion test at false-alarm rate 1e-3 (z = 3.09) on the pooled accuracy: catches a
    # fine-tune that destroyed the class conditioning (accuracy towards 0.1), not sampling noise
    p = (acc["ft"] + acc["base"]) / 2
    tol = 3.09 * (2 * p * (1 - p) / n) ** 0.5
    assert acc["ft"] >= acc["base"] - tol, (acc, tol)


# ---------------------------------------------------------------- generate(method="sjd2"): argument checks, errors

def _sjd2_gpt(seed=0, levels=3):
    """``_tiny_gpt`` carrying SJD2 parameters (``model.sjd2``, as ``checkpoint.load_finetuned`` sets them) and
    counting its forwards (``m.calls``)."""
    m = _tiny_gpt(seed=seed)
    emb = SJD2Embedding(NoiseSchedule(levels=levels, s_min=0.3), EmbedNorm.from_embedding(_emb_rows(m)))
    with torch.no_grad():
        emb.level_embed.weight.normal_(0, 0.1)
    m.__dict__["sjd2"] = emb
    m.calls = 0
    fwd = m.forward

    def forward(*a, **k):
        m.calls += 1
        return fwd(*a, **k)
    m.forward = forward
    return m


def test_sjd2_refuses_unused_and_bad_arguments_before_work():
    """``generate(method="sjd2")`` used to skip the loop's checks: options it ignores (forced, tree, beta,
    uncond, ...) ran silently, and bad values failed deep inside (or allocated for a huge window)."""
    from sjd_kernels.decoding import generate
    m = _sjd2_gpt()
    c = torch.tensor([0, 1])
    bad = [
        ("does not use forced", dict(forced=torch.full((2, 8), 7))),
        ("does not use tree_width", dict(tree_width=2)),
        ("does not use tree_depth", dict(tree_depth=1)),
        ("does not use beta", dict(beta=0.5)),
        ("does not use uncond", dict(cfg_scale=2.0, uncond=torch.tensor([3, 3]))),
        ("does not use vp_form", dict(vp_form="log")),
        ("does not use draft_init", dict(draft_init="left")),
        ("does not use cache_len", dict(cache_len=64)),
        ("does not use return_cache", dict(return_cache=True)),
        ("does not use on_step", dict(on_step=lambda *a: None)),
        ("beta must be a finite real number", dict(beta="x")),
        ("state_capacity", dict(state_capacity=8)),
        ("num_tokens must be an int >= 1", dict(num_tokens=0)),
        ("num_tokens 65 exceeds the model's max_image_tokens 64", dict(num_tokens=65)),
        ("window must be an int >= 0", dict(window=4.0)),
        ("window must be an int >= 0", dict(window=-1)),
        ("cfg_scale must be a float or give one value per request", dict(cfg_scale=[2, 3, 4])),
        ("cfg_scale must be a finite real number", dict(cfg_scale=float("nan"))),
        ("cfg_scale must be a finite real number", dict(cfg_scale=None)),
        ("cfg_scale must be a finite real number", dict(cfg_scale="3")),
        ("seed must be an int or integers that fit in int64", dict(seed=[2 ** 64, 1])),
        ("seed must be an int or integers that fit in int64", dict(seed=None)),
        ("seed must be an int or integers that fit in int64", dict(seed="1")),
        ("one seed per request", dict(seed=[1, 2, 3])),
        ("temperature must be", dict(temperature=-1.0)),
        ("top_k must be", dict(top_k=13)),
        ("top_p must be", dict(top_p=0.0)),
        ("backend must be", dict(backend="fast")),
        ("sjd2 must be an SJD2Embedding", dict(sjd2="bogus")),
        ("sjd2 must be an SJD2Embedding", dict(sjd2=3)),
        ("sjd2_kv .* must be one of keep, recompute", dict(sjd2_kv="bogus")),
    ]
    for msg, kw in bad:
        kw = dict(kw)
        m.calls = 0
        with pytest.raises(SJDInputError, match=msg):
            generate(m, c, kw.pop("num_tokens", 8), "sjd2", window=kw.pop("window", 4), **kw)
        assert m.calls == 0, msg
    # a plain GPT (no SJD2 parameters) is refused, naming the model it needs; it used to run SJD silently
    plain = _tiny_gpt()
    with pytest.raises(SJDInputError, match="needs a model fine-tuned for SJD2.*load_finetuned"):
        generate(plain, c, 8, "sjd2", window=4)
    from sjd_kernels.sjd2 import generate_sjd2
    with pytest.raises(SJDInputError, match="needs a model fine-tuned for SJD2"):
        generate_sjd2(plain, c, 8, window=4)
    generate_sjd2(plain, c, 8, sjd2=None, window=4)             # explicit sjd2=None: plain SJD, as documented
    generate(plain, c, 8, "sjd2", window=0)                      # window 0 is AR: no SJD2 parameter is used
    with pytest.raises(SJDInputError, match="belongs to another model"):
        generate_sjd2(plain, c, 8, window=4, sjd2=SJD2Embedding(NoiseSchedule(levels=2), EmbedNorm(8)))


def test_sjd2_window_cut_and_per_request_cfg():
    """The window is cut to num_tokens - 1 as in the other methods (``window=10**6`` used to allocate for a
    million positions); ``cfg_scale`` takes one value per request (a tensor used to fail)."""
    from sjd_kernels.decoding import generate
    m = _sjd2_gpt(seed=1)
    c, T = torch.tensor([0, 2]), 10
    big = generate(m, c, T, "sjd2", window=10 ** 6, seed=[3, 4])
    cut = generate(m, c, T, "sjd2", window=T - 1, seed=[3, 4])
    assert big.stats.window == T - 1 and torch.equal(big.tokens, cut.tokens)
    assert bool((big.tokens >= 0).all()) and bool((big.tokens < m.vocab_size).all())
    both = generate(m, c, T, "sjd2", window=4, seed=[3, 4], cfg_scale=torch.tensor([2.0, 3.0]))
    for i, s in enumerate((2.0, 3.0)):
        alone = generate(m, c[i:i + 1], T, "sjd2", window=4, seed=[[3, 4][i]], cfg_scale=s)
        assert torch.equal(alone.tokens[0], both.tokens[i]), i


def test_sjd2_device_error_raises():
    """A step reporting an error (temperature 1e-38 overflows the scaled rows) raises SJDDeviceError at once;
    it used to feed the -1 drafts back and end with 'SJD2 did not finish'."""
    from sjd_kernels.decoding import generate
    from sjd_kernels.ops import SJDDeviceError
    m = _sjd2_gpt(seed=2)
    with torch.no_grad():
        m.head.weight.mul_(10.0)
    with pytest.raises(SJDDeviceError, match="non-finite logits"):
        generate(m, torch.tensor([0, 1]), 12, "sjd2", window=4, temperature=1e-38)
    assert m.calls == 1                                          # raised after the failing step, not at the limit


# ---------------------------------------------------------------- sjd2_prepare: ring contents it cannot use

def test_prepare_refuses_shared_ring_slots_and_bad_levels_on_the_cpu():
    from sjd_kernels.ops._common import SJDInputError as Err
    c = _prepare_case()
    c["positions"][2, 3] = c["positions"][2, 5]               # one window position listed twice
    snap = _clone(c)
    with pytest.raises(Err, match="positions: request 2's window positions share ring slots"):
        sjd2_prepare(**c, backend="torch")
    assert torch.equal(c["latent"], snap["latent"]) and torch.equal(c["level"], snap["level"])
    c = _prepare_case()
    c["level"][2, 2] = 99                                      # read by position 11 of request 2 (R = 9)
    with pytest.raises(Err, match="level: request 2's ring slot 2 .* holds level 99, outside 0..K = 0..5"):
        sjd2_prepare(**c, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spoil,msg", [
    (lambda c: c["sigma"].__setitem__(2, 0.0), "sigma must be > 0 at levels 1..K .* got 0.0 at level 2"),
    (lambda c: c["std"].__setitem__(1, 0.0), "std must be > 0 in every dimension"),
    (lambda c: c["alpha"].__setitem__(1, float("inf")), "alpha holds NaN or infinite values"),
    (lambda c: c["mean"].__setitem__(0, float("nan")), "mean holds NaN or infinite values"),
    (lambda c: c["level_table"].__setitem__((3, 0), float("-inf")), "level_table holds NaN or infinite values"),
], ids=["zero-sigma", "zero-std", "inf-alpha", "nan-mean", "inf-level-table"])
def test_prepare_refuses_tables_that_fill_the_ring_with_nan_on_the_cpu(spoil, msg, backend):
    """Each of these used to write NaN or inf into the inputs and the latent ring, with a clean status."""
    from sjd_kernels.ops._common import SJDInputError as Err
    if backend == "triton" and not (triton_available()[0] and os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    c = _prepare_case()
    spoil(c)
    snap = _clone(c)
    with pytest.raises(Err, match=msg):
        sjd2_prepare(**c, backend=backend)
    assert torch.equal(c["latent"], snap["latent"]) and torch.equal(c["level"], snap["level"])


def _reads_token(c, b, i) -> bool:
    """Whether slot (b, i) uses its token, by the SPEC's rule slot by slot (as ``_prepare_f64``)."""
    p = int(c["positions"][b, i])
    if p < 0:
        return False
    if p < int(c["commit_end"][b]):
        return True
    K = c["alpha"].shape[0] - 1
    k = K if p >= int(c["fresh_start"][b]) else int(c["level"][b, p % c["latent"].shape[1]])
    stepped = p < int(c["row_end"][b]) and k > 0
    return stepped or k == 0


@pytest.mark.parametrize("bad_token", [19, -1, 2 ** 40])
def test_prepare_refuses_tokens_it_reads_outside_the_table_on_the_cpu(bad_token):
    """A token the op reads (committed slot, DDIM step towards it, or level 0) must be a row of
    embed_weight (Vt = 19 here): an SJDInputError naming the slot, nothing changed. Tokens the op
    does not read (condition slots, noisy slots without a sample) may hold anything."""
    from sjd_kernels.ops._common import SJDInputError as Err
    base = _prepare_case()
    B, N = base["tokens"].shape
    reads = {(b, i): _reads_token(base, b, i) for b in range(B) for i in range(N)}
    assert any(reads.values()) and not all(reads.values())
    kinds = set()
    for (b, i), read in reads.items():
        c = _prepare_case()
        c["tokens"][b, i] = bad_token
        if read:
            snap = _clone(c)
            with pytest.raises(Err, match=rf"tokens: request {b}'s slot {i} .* holds token {bad_token}, "
                                          r"outside \[0, 19\)"):
                sjd2_prepare(**c, backend="torch")
            assert torch.equal(c["latent"], snap["latent"]) and torch.equal(c["level"], snap["level"])
        else:
            kinds.add("condition" if int(c["positions"][b, i]) < 0 else "noisy")
            sjd2_prepare(**c, backend="torch")
    assert kinds == {"condition", "noisy"}


def test_prepare_refuses_empty_tables_and_rings():
    from sjd_kernels.ops._common import SJDInputError as Err
    c = _prepare_case()
    c["embed_weight"] = c["embed_weight"][:0]
    with pytest.raises(Err, match=r"embed_weight must be \[Vt >= 1, d >= 1\], got \[0, 24\]"):
        sjd2_prepare(**c, backend="torch")
    c = _prepare_case()
    c["latent"], c["level"] = c["latent"][:, :0], c["level"][:, :0]
    with pytest.raises(Err, match=r"latent must be \[B, R >= 1, d\]"):
        sjd2_prepare(**c, backend="torch")


def _prepare_bad(what):
    """A case the op cannot use, by ``what``: a ring level outside 0..K read by a window position, a token
    outside [0, Vt) read by a committed slot, by a DDIM step or by a window slot at level 0 that takes no
    step, or nothing wrong (``ok``); every case also
    holds a bad token and a bad level the op does not read (a condition slot's token, the ring level of a
    position entering now)."""
    c = _prepare_case()
    c["tokens"][0, 0] = -7                                   # the condition slot of request 0: not read
    c["level"][0, 5] = 77                                    # ring slot of position 5 of request 0: fresh, not read
    assert int(c["positions"][0, 0]) < 0 and int(c["positions"][0, 6]) == 5 and int(c["fresh_start"][0]) <= 5
    if what.startswith("level"):
        c["level"][2, 2] = int(what[len("level"):])          # read by position 11 of request 2 (R = 9)
    elif what == "token_committed":
        c["tokens"][1, 0] = 19                               # X[n-1] of request 1, committed
    elif what == "token_step":
        c["tokens"][1, 1] = -1                               # position 5 of request 1: a DDIM step towards it
    elif what == "token_level0":
        c["level"][2, 3] = 0                                 # position 12 of request 2: in the window at level 0,
        c["tokens"][2, 2] = 19                               # no step: its output is its token's embedding
    return c


@pytest.mark.parametrize("what", ["level99", "level-3", "token_committed", "token_step", "token_level0", "ok"])
def test_prepare_kernels_clamp_and_report_what_they_cannot_use(what):
    """Without the host checks (the GPU path), a ring level outside 0..K or a token outside the table must
    not read outside the tables: every backend clamps the same way (the reference defines it) and sets bit
    32 of status[0]; inputs it does not read (and a clean case) leave the status at zero."""
    from sjd_kernels.ops._common import BACKEND_CODE, SJDDeviceError, check_status
    c = _prepare_bad(what)
    with pytest.raises(SJDInputError) if what != "ok" else contextlib.nullcontext():
        sjd2_prepare(**_clone(c), backend="torch")           # the public op checks CPU tensors on the host
    op = torch.ops.sjd.sjd2_prepare
    want_c = _clone(c)
    want_st = torch.zeros(4, dtype=torch.int32)
    want = op(*want_c.values(), want_st, BACKEND_CODE["torch"])
    assert bool(torch.isfinite(want).all())
    assert want_st.tolist() == [0 if what == "ok" else 32, 0, 0, 0]
    if what != "ok":
        with pytest.raises(SJDDeviceError, match="sjd2_prepare clamped the ids and levels"):
            check_status(want_st.clone())
    runs = ["cuda"]
    if os.environ.get("TRITON_INTERPRET") == "1" and triton_available()[0]:
        runs.append("triton")
    for be in runs:
        got_c = _clone(c)
        st = torch.tensor([64, 1, 2, 3], dtype=torch.int32)   # bits and counters set before stay
        if be == "cuda":
            from _util import sim_module
            from sjd_kernels.cuda import sim
            sim_module()
            with sim.simulate("reverse"):
                got = op(*got_c.values(), st, BACKEND_CODE[be])
        else:
            got = op(*got_c.values(), st, BACKEND_CODE[be])
        _assert_cuda_prepare_matches(c, got, got_c, want, want_c)
        assert st.tolist() == [64 | int(want_st[0]), 1, 2, 3], be


def test_prepare_status_argument_is_checked():
    """``status`` must be an int32 [4] tensor on the op's device; with one, CPU tensors are still checked
    on the host (an SJDInputError, nothing changed, the status untouched)."""
    c = _prepare_case()
    for bad, msg in ((torch.zeros(4, dtype=torch.int64), "status must have dtype int32"),
                     (torch.zeros(3, dtype=torch.int32), r"status must have shape \[4\]"),
                     (torch.zeros(4, dtype=torch.int32, device="meta"), "status must be on cpu")):
        with pytest.raises(SJDInputError, match=msg):
            sjd2_prepare(**_clone(c), status=bad, backend="torch")
    c = _prepare_bad("token_step")
    snap, st = _clone(c), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(SJDInputError, match="tokens: request 1's slot 1"):
        sjd2_prepare(**c, status=st, backend="torch")
    assert st.tolist() == [0, 0, 0, 0]
    assert torch.equal(c["latent"], snap["latent"]) and torch.equal(c["level"], snap["level"])


def _reports_bad_inputs(backend, what, dev):
    from sjd_kernels.ops._common import SJDDeviceError, check_status
    c = {k: v.to(dev) for k, v in _prepare_bad(what).items()}
    snap = _clone(c)
    with pytest.raises(SJDInputError):
        sjd2_prepare(**c, backend=backend)
    assert torch.equal(c["latent"], snap["latent"]) and torch.equal(c["level"], snap["level"])
    st = torch.zeros(4, dtype=torch.int32, device=dev)
    out = sjd2_prepare(**c, status=st, backend=backend)
    assert bool(torch.isfinite(out).all())
    with pytest.raises(SJDDeviceError, match="sjd2_prepare clamped"):
        check_status(st)
    good = {k: v.to(dev) for k, v in _prepare_bad("ok").items()}
    sjd2_prepare(**good, status=st, backend=backend)
    assert check_status(st) == {"zero_mass_residuals": 0, "zero_mass_coupling": 0, "state_overflows": 0}


@pytest.mark.parametrize("backend", ["torch", "cuda", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("what", ["level99", "token_step"])
def test_prepare_without_host_checks_reports_bad_inputs(backend, what, monkeypatch):
    """The GPU path of the public op on CPU tensors (its host-tensor test patched to answer no; the cuda
    backend runs in the CPU simulator): without ``status`` it checks on the host anyway (SJDInputError,
    nothing changed); with it, nothing is checked on the host and the kernel sets bit 32, which
    check_status raises; a clean call after it leaves the status clean."""
    import sjd_kernels.ops.sjd2_prepare as op_mod
    monkeypatch.setattr(op_mod, "host_checks", lambda t: False)
    if backend == "cuda":
        from _util import sim_module
        from sjd_kernels.cuda import sim
        sim_module()
        with sim.simulate("reverse"):
            _reports_bad_inputs(backend, what, "cpu")
    else:
        _reports_bad_inputs(backend, what, "cpu")


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["torch", pytest.param("cuda", marks=requires_cuda_ext), "triton"])
@pytest.mark.parametrize("what", ["level99", "token_step"])
def test_prepare_on_the_gpu_reports_bad_inputs(backend, what):
    """On a GPU: without ``status`` the op checks on the host (SJDInputError, nothing changed); with it,
    nothing is checked on the host and the kernel sets bit 32, which check_status raises."""
    if backend == "triton":
        pytest.importorskip("triton")
    _reports_bad_inputs(backend, what, "cuda")
