"""The decoding loop on the in-package GPT: greedy and Gumbel oracles, exact law, batch invariance, cache."""
import itertools

import numpy as np
import pytest
import torch

from sjd_kernels.decoding import StaticKVCache, generate
from sjd_kernels.models.gpt import GPT, GPTConfig
from sjd_kernels.ops import SJDInputError

from stats import assert_law

LOSSLESS = ["sjd", "sjd_vp", "coupling", "gumbel", "gumbel_jacobi"]


def tiny(V=16, N=12, layers=2, d=32, seed=0, classes=3, kv=1):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=V, max_image_tokens=N, num_classes=classes, n_layer=layers, n_head=2,
                    n_kv_head=kv, d_model=d)
    m = GPT(cfg).double().eval()
    with torch.no_grad():               # sharper rows than the 0.02 init, so sequences vary
        m.head.weight.mul_(40.0)
        m.tok_emb.weight.mul_(20.0)
        m.cls_emb.weight.mul_(20.0)
    return m


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("method", LOSSLESS)
def test_greedy_equals_ar(method, cfg_scale):
    m = tiny()
    cond = torch.tensor([0, 1, 2, 1])
    ar = generate(m, cond, 12, "ar", top_k=1, cfg_scale=cfg_scale, seed=3)
    out = generate(m, cond, 12, method, window=5, top_k=1, cfg_scale=cfg_scale, seed=11)
    assert torch.equal(out.tokens, ar.tokens)
    t0 = generate(m, cond, 12, method, window=3, temperature=0.0, cfg_scale=cfg_scale, seed=1)
    assert torch.equal(t0.tokens, ar.tokens)


@pytest.mark.parametrize("window", [1, 4, 16])
def test_gumbel_jacobi_equals_ar_with_sampling(window):
    m = tiny(seed=1)
    cond = torch.tensor([0, 1, 2, 0, 1])
    ar = generate(m, cond, 12, "ar", seed=7, cfg_scale=2.0, top_k=8)
    gj = generate(m, cond, 12, "gumbel_jacobi", window=window, seed=7, cfg_scale=2.0, top_k=8)
    assert torch.equal(ar.tokens, gj.tokens)
    assert gj.stats.nfe <= ar.stats.nfe
    other = generate(m, cond, 12, "ar", seed=8, cfg_scale=2.0, top_k=8)
    assert not torch.equal(ar.tokens, other.tokens)          # the seed matters


def _exact_law(m, cls, N, V, cfg_scale):
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    c = torch.full((len(seqs),), cls)
    with torch.no_grad():
        lp = m.forward_train(c, seqs).double()
        if cfg_scale != 1.0:
            lu = m.forward_train(torch.full_like(c, m.config.num_classes), seqs).double()
            lp = lu + cfg_scale * (lp - lu)
        lp = lp.log_softmax(-1)
    logp = lp.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).sum(-1)
    return logp.exp().numpy()


@pytest.mark.parametrize("method,cfg_scale", [("sjd", 1.0), ("sjd_vp", 1.0), ("coupling", 2.0),
                                              ("gumbel", 1.0), ("sjd", 2.0)])
def test_sequence_law_equals_ar(method, cfg_scale):
    V, N = 3, 3
    torch.manual_seed(5)
    m = GPT(GPTConfig(vocab_size=V, max_image_tokens=N, num_classes=2, n_layer=1, n_head=2, n_kv_head=2,
                      d_model=16)).double().eval()
    with torch.no_grad():
        m.head.weight.mul_(6.0)
        m.tok_emb.weight.mul_(30.0)
        m.cls_emb.weight.mul_(30.0)
    p = _exact_law(m, 1, N, V, cfg_scale)
    assert p.max() < 0.3 and (p > 0.02).sum() >= 10        # a law with real structure
    n = 60_000
    out = generate(m, torch.full((n,), 1), N, method, window=2, seed=123, cfg_scale=cfg_scale, beta=1.0,
                   check=False)
    codes = (out.tokens.numpy() * (V ** np.arange(N - 1, -1, -1))).sum(1)
    assert_law(codes, p, label=f"{method} cfg {cfg_scale}")
    assert sum(out.stats.accepted_hist[1:]) > n // 10         # the window really committed several tokens


def test_batch_invariance():
    m = tiny(seed=2)
    seeds = [101, 202, 303, 404, 505, 606, 707, 808]
    cond = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for method in ["sjd", "coupling", "ar"]:
        batch = generate(m, cond, 12, method, window=4, seed=seeds, cfg_scale=1.5).tokens
        for i in (0, 5):
            alone = generate(m, cond[i:i + 1], 12, method, window=4, seed=[seeds[i]], cfg_scale=1.5).tokens
            assert torch.equal(alone[0], batch[i]), method


def test_cache_equals_ar_cache():
    """After a Jacobi run, the committed part of the cache equals a fresh full forward's K/V."""
    m = tiny(seed=4)
    cond = torch.tensor([0, 2])
    import sjd_kernels.decoding.loop as loop
    caches = []
    orig = loop.StaticKVCache

    class Spy(orig):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            caches.append(self)
    loop.StaticKVCache = Spy
    try:
        out = generate(m, cond, 12, "sjd", window=4, seed=9)
    finally:
        loop.StaticKVCache = orig
    cache = caches[0]
    # reference: a causal forward over [cond, tokens[:-1]] writing into a fresh cache
    ref = StaticKVCache(m.num_layers, 2, m.num_kv_heads, 12, m.head_dim, dtype=torch.float64)
    x = torch.cat([m.embed_cond(cond), m.embed_tokens(out.tokens[:, :-1])], 1)
    pos = torch.arange(12).expand(2, 12)
    ref.lengths.zero_()
    slots, mask = ref.window_mask(12)
    with torch.no_grad():
        m(x, slots, cache=ref, mask=mask, write_slots=slots)
    n_valid = 12          # slots 0..11 hold cond + tokens 0..10 once all 12 tokens are committed
    committed = min(n_valid, int(cache.lengths.min()))
    assert committed >= 8
    assert torch.allclose(cache.k[:, :, :, :committed], ref.k[:, :, :, :committed], atol=1e-10)
    assert torch.allclose(cache.v[:, :, :, :committed], ref.v[:, :, :, :committed], atol=1e-10)


def test_stats_and_bad_input():
    m = tiny()
    out = generate(m, torch.tensor([0, 1]), 12, "sjd", window=4, seed=1)
    s = out.stats
    assert s.nfe >= 3 and s.nfe_total == s.nfe + s.nfe_prefill
    assert sum((k + 1) * c for k, c in enumerate(s.accepted_hist)) == 2 * 12
    assert s.forward_s > 0 and s.post_s > 0
    with pytest.raises(SJDInputError, match="method must be one of"):
        generate(m, torch.tensor([0]), 4, "magic")
    with pytest.raises(SJDInputError, match="one seed per request"):
        generate(m, torch.tensor([0, 1]), 4, "sjd", seed=[1, 2, 3])
    with pytest.raises(SJDInputError, match="num_tokens"):
        generate(m, torch.tensor([0]), 0, "sjd")
    with pytest.raises(ValueError, match="class ids"):
        generate(m, torch.tensor([7]), 4, "sjd")
