"""The decoding loop on the in-package GPT: greedy and Gumbel oracles, exact laws, batch invariance,
prompts of several positions, forced tokens, stats and input errors.

Models are tiny float64 GPTs with random weights (scaled up so sequences vary), so near-ties
cannot flake the token-for-token oracles.
"""
import itertools

import numpy as np
import pytest
import torch

from sjd_kernels.decoding import derive_seeds, generate, request_seeds
from sjd_kernels.models import GPT, GPTConfig, Prefix
from sjd_kernels.ops import SJDInputError

from stats import assert_law, sequence_codes, target_law64

WINDOWED = ["sjd", "sjd_vp", "coupling", "gumbel", "gumbel_jacobi"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def tiny(V=16, N=12, layers=2, d=32, seed=0, classes=3, kv=1, head=40.0, emb=20.0, cls=None):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=V, n_layer=layers, n_head=2, n_kv_head=kv, d_model=d, max_image_tokens=N,
                    num_classes=classes)
    m = (cls or GPT)(cfg).double().eval()
    with torch.no_grad():               # sharper rows than the 0.02 init, so sequences vary
        m.head.weight.mul_(head)
        m.tok_emb.weight.mul_(emb)
        m.cls_emb.weight.mul_(emb)
    return m


class PrefixGPT(GPT):
    """A GPT whose prompt has several positions: conditional rows ``[cond, a, b]`` (3 positions),
    unconditional rows ``[null]`` (1 position), so CFG twins have different cache lengths."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.extra = torch.nn.Parameter(torch.randn(2, cfg.d_model))

    def prefix(self, cond, cfg, uncond=None):
        cond = self.check_cond(cond)
        B = cond.shape[0]
        c = torch.cat([self.embed_cond(cond), self.extra.expand(B, 2, -1).to(self.tok_emb.weight.dtype)], 1)
        lengths = [3] * B
        if cfg:
            u = self.embed_cond(self.null_condition(B))
            c = torch.cat([c, torch.cat([u, torch.zeros_like(u).expand(B, 2, -1)], 1)], 0)
            lengths += [1] * B
        return Prefix(c, torch.tensor(lengths))

    def full_logits(self, cond, tokens, cfg):
        """Reference: one causal forward per row over [prompt, tokens[:-1]] (no cache)."""
        pre = self.prefix(cond, cfg)
        B, N = tokens.shape
        out = []
        for r in range(pre.embeds.shape[0]):
            L = int(pre.lengths[r])
            x = torch.cat([pre.embeds[r, :L], self.embed_tokens(tokens[r % B, :-1])], 0).unsqueeze(0)
            out.append(self.forward(x, torch.arange(L + N - 1).unsqueeze(0))[0, L - 1:])
        return torch.stack(out)


def prefix_model(seed=0, V=16, N=12):
    torch.manual_seed(seed)
    m = PrefixGPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_image_tokens=N,
                            num_classes=3)).double().eval()
    with torch.no_grad():
        m.head.weight.mul_(40.0)
        m.tok_emb.weight.mul_(20.0)
        m.cls_emb.weight.mul_(20.0)
        m.extra.mul_(2.0)
    return m


# ------------------------------------------------------------------------------------ oracles
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("method", WINDOWED + ["ar_gumbel"])
def test_greedy_equals_ar(method, cfg_scale):
    m = tiny()
    cond = torch.tensor([0, 1, 2, 1])
    ar = generate(m, cond, 12, "ar", top_k=1, cfg_scale=cfg_scale, seed=3)
    for window, init in [(5, "uniform"), (16, "left"), (1, "uniform")]:
        out = generate(m, cond, 12, method, window=window, top_k=1, cfg_scale=cfg_scale, seed=11, draft_init=init)
        assert torch.equal(out.tokens, ar.tokens), (window, init)
    t0 = generate(m, cond, 12, method, window=3, temperature=0.0, cfg_scale=cfg_scale, seed=1)
    assert torch.equal(t0.tokens, ar.tokens)


@pytest.mark.parametrize("window", [1, 4, 16])
def test_gumbel_jacobi_equals_ar_gumbel_with_sampling(window):
    m = tiny(seed=1, head=8.0)
    cond = torch.tensor([0, 1, 2, 0, 1])
    kw = dict(seed=7, cfg_scale=2.0, top_k=8, top_p=0.95)
    ar = generate(m, cond, 12, "ar_gumbel", **kw)
    gj = generate(m, cond, 12, "gumbel_jacobi", window=window, **kw)
    assert torch.equal(ar.tokens, gj.tokens)
    assert gj.stats.nfe <= ar.stats.nfe == 12
    other = generate(m, cond, 12, "ar_gumbel", seed=8, cfg_scale=2.0, top_k=8, top_p=0.95)
    assert not torch.equal(ar.tokens, other.tokens)          # the seed matters


def test_vp_beta_zero_is_sjd():
    m = tiny(seed=2, head=8.0)
    cond = torch.tensor([0, 1, 2])
    a = generate(m, cond, 12, "sjd", window=4, seed=5, cfg_scale=2.0)
    b = generate(m, cond, 12, "sjd_vp", window=4, seed=5, cfg_scale=2.0, beta=0.0)
    assert torch.equal(a.tokens, b.tokens) and a.stats.accepted_hist == b.stats.accepted_hist
    c = generate(m, cond, 12, "sjd_vp", window=4, seed=5, cfg_scale=2.0, beta=1.0)
    assert c.stats.state_bytes > a.stats.state_bytes        # the previous target rows are kept


def test_prefix_of_several_positions_and_ragged_cfg_rows():
    """Prompts of 3 (conditional) and 1 (unconditional) positions: prefill + per-row lengths."""
    m = prefix_model(seed=3)
    cond = torch.tensor([0, 1, 2])
    ar = generate(m, cond, 12, "ar", top_k=1, cfg_scale=2.0, seed=1)
    assert ar.stats.nfe_prefill == 1
    # the greedy AR tokens follow the reference full forward (CFG on raw logits, argmax)
    lg = m.full_logits(cond, ar.tokens, cfg=True)
    comb = lg[3:] + 2.0 * (lg[:3] - lg[3:])
    assert torch.equal(comb.float().argmax(-1), ar.tokens)
    for method in WINDOWED:
        assert torch.equal(generate(m, cond, 12, method, window=4, top_k=1, cfg_scale=2.0, seed=2).tokens,
                           ar.tokens), method
    a = generate(m, cond, 12, "ar_gumbel", cfg_scale=2.0, seed=4)
    b = generate(m, cond, 12, "gumbel_jacobi", window=5, cfg_scale=2.0, seed=4)
    assert torch.equal(a.tokens, b.tokens)


def test_forced_tokens():
    m = tiny(seed=4, head=8.0)
    cond = torch.tensor([0, 1])
    forced = torch.full((2, 12), -1, dtype=torch.int64)
    forced[:, 3::4] = 15                                  # e.g. a row-end token every 4 positions
    forced[1, 0] = 2
    ar = generate(m, cond, 12, "ar_gumbel", seed=3, forced=forced, cfg_scale=1.5)
    assert (ar.tokens[:, 3::4] == 15).all() and ar.tokens[1, 0] == 2
    gj = generate(m, cond, 12, "gumbel_jacobi", window=5, seed=3, forced=forced, cfg_scale=1.5)
    assert torch.equal(ar.tokens, gj.tokens)
    g1 = generate(m, cond, 12, "ar", top_k=1, forced=forced)
    for method in WINDOWED:
        assert torch.equal(generate(m, cond, 12, method, window=4, top_k=1, forced=forced).tokens, g1.tokens)


# ------------------------------------------------------------------------------------ laws
V_LAW, N_LAW = 3, 4


@pytest.fixture(scope="module")
def law_model():
    torch.manual_seed(5)
    m = GPT(GPTConfig(vocab_size=V_LAW, n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_image_tokens=N_LAW,
                      num_classes=2)).double().eval()
    with torch.no_grad():
        m.head.weight.mul_(12.0)
        m.tok_emb.weight.mul_(30.0)
        m.cls_emb.weight.mul_(30.0)
    return m


def exact_sequence_law(m, cls, cfg_scale, **target):
    """The AR law of whole sequences, from the model's conditionals and stats.target_law64 (float64)."""
    seqs = torch.tensor(list(itertools.product(range(V_LAW), repeat=N_LAW)))
    with torch.no_grad():
        c = m.forward_train(torch.full((len(seqs),), cls), seqs).numpy()
        u = m.forward_train(m.null_condition(len(seqs)), seqs).numpy()
    P = target_law64(c, uncond=u if cfg_scale != 1.0 else None, cfg=cfg_scale, **target)
    p = np.take_along_axis(P, seqs.numpy()[..., None], -1)[..., 0].prod(-1)
    out = np.zeros(V_LAW ** N_LAW)
    out[sequence_codes(seqs.numpy(), V_LAW)] = p
    return out


LAW_CASES = [
    ("ar", dict(temperature=1.3)),
    ("ar_gumbel", dict(top_k=2)),
    ("sjd", dict(cfg_scale=2.0, top_k=2)),
    ("sjd", dict(window=3, draft_init="left", temperature=0.7)),
    ("sjd_vp", dict(beta=1.0)),
    ("sjd_vp", dict(beta=0.5, vp_form="log", top_k=2)),
    ("coupling", dict(cfg_scale=2.0)),
    ("coupling", dict(beta=0.5, top_p=0.9)),
    ("gumbel", dict()),
    ("gumbel_jacobi", dict(cfg_scale=2.0)),
]


@pytest.mark.parametrize("method,kw", LAW_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(LAW_CASES)])
def test_sequence_law_equals_ar(law_model, method, kw):
    """Joint law of 4 tokens over V = 3 (81 cells) equals the exactly enumerated AR law (alpha 1e-6)."""
    kw = dict(kw)
    cfg_scale = kw.pop("cfg_scale", 1.0)
    window = kw.pop("window", 2)
    target = {k: kw[k] for k in ("temperature", "top_k", "top_p") if k in kw}
    p = exact_sequence_law(law_model, 1, cfg_scale, **target)
    assert p.max() < 0.3 and (p > 0.01).sum() >= 15         # a law with real structure
    n = 90_000
    seen = dict(prev=None, later=0)

    def on_step(tokens, done, cache):                      # requests that accepted a draft after step 1
        if seen["prev"] is not None:
            seen["later"] += int(((done - seen["prev"]) >= 2).sum())
        seen["prev"] = done.clone()
    out = generate(law_model, torch.full((n,), 1), N_LAW, method, window=window, seed=123, cfg_scale=cfg_scale,
                   on_step=on_step, **kw)
    assert_law(sequence_codes(out.tokens.numpy(), V_LAW), p, label=f"{method} {kw} cfg {cfg_scale}")
    if method not in ("ar", "ar_gumbel"):
        hist = out.stats.accepted_hist
        assert sum(hist[1:]) > n // 10                      # windows really committed several tokens
        # and in later steps too (drafts accepted after the first step, whose drafts are all uniform)
        assert seen["later"] > n // 20, seen["later"]


# ------------------------------------------------------------------------------------ batches and seeds
def test_batch_invariance():
    """A request's tokens depend only on its seed and condition: alone == inside a batch of 8."""
    m = tiny(seed=2, head=8.0)
    seeds = [101, 202, 303, 404, 505, 606, 707, 808]
    cond = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for method in ["ar", "sjd", "sjd_vp", "coupling", "gumbel_jacobi"]:
        batch = generate(m, cond, 12, method, window=4, seed=seeds, cfg_scale=1.5, top_k=10).tokens
        for i in (0, 5, 7):
            alone = generate(m, cond[i:i + 1], 12, method, window=4, seed=[seeds[i]], cfg_scale=1.5, top_k=10).tokens
            assert torch.equal(alone[0], batch[i]), (method, i)


def test_int_seed_derivation():
    m = tiny(seed=3, head=8.0)
    cond = torch.tensor([2, 0, 1])
    s = derive_seeds(9, 3)
    assert s == derive_seeds(9, 3) and len(set(s)) == 3 and all(0 <= x < 2 ** 63 for x in s)
    assert derive_seeds(9, 5)[:3] == s                            # a request's seed depends on its index only
    assert derive_seeds(np.int64(9), 3) == s and request_seeds(np.int64(9), 3, "cpu").tolist() == s
    for seed, batch, name in ((1.5, 3, "seed"), ("9", 3, "seed"), (None, 3, "seed"), (9, -2, "batch"),
                              (9, 2.0, "batch")):
        with pytest.raises(SJDInputError, match=f"^{name} must"):
            derive_seeds(seed, batch)
    a = generate(m, cond, 12, "sjd", window=3, seed=9)
    b = generate(m, cond, 12, "sjd", window=3, seed=s)
    assert torch.equal(a.tokens, b.tokens)
    c = generate(m, cond[1:2], 12, "sjd", window=3, seed=[s[1]])
    assert torch.equal(c.tokens[0], a.tokens[1])
    assert not torch.equal(a.tokens[0], generate(m, cond[:1], 12, "sjd", window=3, seed=10).tokens[0])


# ------------------------------------------------------------------------------------ stats, options, errors
def test_stats():
    m = tiny(head=8.0)
    out = generate(m, torch.tensor([0, 1, 2]), 12, "coupling", window=4, seed=1, cfg_scale=2.0)
    s = out.stats
    assert s.nfe_prefill == 0 and s.nfe_total == s.nfe == max(s.steps)
    assert len(s.accepted_hist) == 5 and sum(s.accepted_hist) == sum(s.steps)
    assert sum((k + 1) * c for k, c in enumerate(s.accepted_hist)) == 3 * 12
    assert s.tokens_per_step == 12 / s.nfe and s.mean_tokens_per_step >= s.tokens_per_step
    assert s.forward_s > 0 and s.post_s > 0 and s.wall_s >= s.forward_s + s.post_s
    assert s.cache_bytes == 2 * 2 * 6 * 1 * (1 + 12 + 4) * 16 * 8      # layers, k/v, rows, H, S, D, f64
    d = s.as_dict()
    assert d["nfe_total"] == s.nfe and d["method"] == "coupling"
    big = generate(m, torch.tensor([0]), 12, "sjd", window=50, seed=1)    # window cut to num_tokens - 1
    assert big.stats.window == 11 and (big.tokens >= 0).all()
    assert generate(m, torch.tensor([0]), 1, "sjd", window=4, seed=1).tokens.shape == (1, 1)


def test_progress_bar(capsys):
    m = tiny()
    generate(m, torch.tensor([0]), 12, "sjd", window=4, progress=True)
    assert "sjd W=4" in capsys.readouterr().err


class Counting(GPT):
    calls = 0

    def forward(self, *a, **k):
        Counting.calls += 1
        return super().forward(*a, **k)


class WrongVocab(GPT):
    @property
    def vocab_size(self):
        return self.config.vocab_size + 1


def test_bad_input_fails_before_work():
    cfg = GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_image_tokens=12, num_classes=3)
    m = Counting(cfg).double().eval()
    c2 = torch.tensor([0, 1])
    bad = [
        (SJDInputError, "method must be one of", dict(method="magic")),
        (SJDInputError, "one seed per request", dict(seed=[1, 2, 3])),
        (SJDInputError, "num_tokens must be", dict(num_tokens=0)),
        (SJDInputError, "exceeds the model's max_image_tokens", dict(num_tokens=13)),
        (SJDInputError, "window must be", dict(window=-1)),
        (SJDInputError, "top_k must be", dict(top_k=17)),
        (SJDInputError, "top_p must be", dict(top_p=0.0)),
        (SJDInputError, "temperature must be", dict(temperature=-1.0)),
        (SJDInputError, "temperature must be", dict(temperature=float("inf"))),
        (SJDInputError, "temperature must be", dict(temperature=1e-39)),
        (SJDInputError, "temperature must be", dict(temperature="1.0")),
        (SJDInputError, "draft_init", dict(draft_init="upper")),
        (SJDInputError, "vp_form", dict(method="sjd_vp", vp_form="mul")),
        (SJDInputError, "beta", dict(method="sjd", beta=0.5)),
        (SJDInputError, "cache_len 10 is too small", dict(cache_len=10)),
        (SJDInputError, "one value per request", dict(cfg_scale=[2.0, 2.0, 2.0])),
        (SJDInputError, "uncond is given", dict(uncond=torch.tensor([3, 3]))),
        (SJDInputError, "forced must be", dict(forced=torch.full((3, 12), -1))),
        (SJDInputError, "forced ids must be", dict(forced=torch.full((2, 12), 16))),
        (SJDInputError, "backend must be", dict(backend="fast")),
        (ValueError, "class ids must be in", dict(cond=torch.tensor([0, 7]))),
        (ValueError, "uncond must have one row per request", dict(cfg_scale=2.0, uncond=torch.tensor([3]))),
    ]
    for err, msg, kw in bad:
        kw = dict(kw)
        args = dict(cond=kw.pop("cond", c2), num_tokens=kw.pop("num_tokens", 12), method=kw.pop("method", "sjd"))
        Counting.calls = 0
        with pytest.raises(err, match=msg):
            generate(m, args["cond"], args["num_tokens"], args["method"], window=kw.pop("window", 4), **kw)
        assert Counting.calls == 0, msg
    w = WrongVocab(cfg).double().eval()
    with pytest.raises(SJDInputError, match="does not match its LM head"):
        generate(w, c2, 12, "sjd", window=4)
    with pytest.raises(TypeError, match="not a decoding model"):
        generate(torch.nn.Linear(2, 2), c2, 12, "sjd")


class CastLogits(GPT):
    """A GPT whose forward returns its logits as another dtype (``cast``)."""
    cast = None

    def forward(self, *a, **k):
        x = super().forward(*a, **k)
        return torch.complex(x.float(), torch.ones_like(x.float())) if self.cast == "complex" else x.to(self.cast)


@pytest.mark.parametrize("method", ["sjd", "pac", "ar"])
@pytest.mark.parametrize("cast", ["complex", torch.int64, torch.bool])
def test_logits_of_a_non_float_dtype_are_refused(method, cast):
    """Complex logits lost their imaginary part (a warning only) and integer logits passed as logits."""
    cfg = GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_image_tokens=12, num_classes=3)
    m = CastLogits(cfg).eval()
    m.cast = cast
    with pytest.raises(SJDInputError, match="the model returned logits of dtype"):
        generate(m, torch.tensor([0, 1]), 6, method, window=3, backend="torch")


# ------------------------------------------------------------------------------------ sparse state
@pytest.mark.parametrize("method,kw", [("sjd", {}), ("sjd_vp", dict(beta=0.5)), ("coupling", dict(beta=0.5)),
                                       ("gumbel", {}), ("gumbel_jacobi", {})])
def test_sparse_state_same_tokens_as_dense(method, kw):
    """With room for every top-k support, ``state_capacity`` changes memory, not a single token."""
    m = tiny(seed=4, head=8.0)
    cond = torch.tensor([0, 1, 2, 0])
    a = generate(m, cond, 12, method, window=4, seed=[5, 6, 7, 8], cfg_scale=1.5, top_k=4, **kw)
    b = generate(m, cond, 12, method, window=4, seed=[5, 6, 7, 8], cfg_scale=1.5, top_k=4, state_capacity=4, **kw)
    assert torch.equal(a.tokens, b.tokens) and a.stats.steps == b.stats.steps
    assert b.stats.state_overflows == 0
    assert b.stats.state_bytes < a.stats.state_bytes


@pytest.mark.parametrize("method", ["sjd", "coupling"])
def test_sparse_state_overflow_law_equals_ar(law_model, method):
    """Capacity 1 without top-k: nearly every row overflows and drafts uniformly; the law stays AR's."""
    p = exact_sequence_law(law_model, 1, 1.0)
    n = 90_000
    out = generate(law_model, torch.full((n,), 1), N_LAW, method, window=2, seed=321, state_capacity=1)
    assert out.stats.state_overflows > n
    assert_law(sequence_codes(out.tokens.numpy(), V_LAW), p, label=f"{method} sparse capacity 1")


def test_sparse_state_bad_options():
    m = tiny()
    with pytest.raises(SJDInputError, match="state_capacity"):
        generate(m, torch.tensor([0]), 12, "sjd", window=4, state_capacity=0)
    with pytest.raises(SJDInputError, match="chain methods"):
        generate(m, torch.tensor([0]), 12, "pac", window=4, state_capacity=8)
    with pytest.raises(SJDInputError, match="chain methods"):
        generate(m, torch.tensor([0]), 12, "sjd2", window=4, state_capacity=8)


# ------------------------------------------------------------------------------------ device errors, option checks
def _recording(m):
    """``m`` with its ``embed_tokens`` recording the smallest token id it was fed (-1 = a failed token)."""
    seen = []
    orig = m.embed_tokens

    def embed_tokens(ids):
        seen.append(int(ids.min()))
        return orig(ids)
    m.embed_tokens = embed_tokens
    return m, seen


class NaNLogits(GPT):
    def forward(self, *a, **k):
        out = super().forward(*a, **k)
        return torch.full_like(out, float("nan"))


@pytest.mark.parametrize("method", ["ar", "sjd", "sjd_vp", "coupling", "gumbel", "gumbel_jacobi", "pac"])
def test_device_error_raises_and_never_feeds_minus_one(method):
    """A step whose op reports an error (temperature 1e-38 overflows the scaled logits to +inf) raises
    SJDDeviceError naming the cause; the failed requests' -1 tokens are never fed back nor returned
    (the error used to reach the model as an IndexError in embed_tokens, or, with pac, come back as -1)."""
    from sjd_kernels.ops import SJDDeviceError
    m, seen = _recording(tiny())
    steps = []
    with pytest.raises(SJDDeviceError, match="non-finite logits"):
        generate(m, torch.tensor([1, 2]), 12, method, window=4, backend="torch", temperature=1e-38,
                 on_step=lambda out, n, cache: steps.append(n.clone()))
    assert seen and min(seen) >= 0, seen
    assert all(int(n.max()) == 0 for n in steps)           # nothing of a failed request was committed
    # a model emitting NaN logits: the same error, for a CFG batch too
    cfg = GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_image_tokens=12, num_classes=3)
    nan_model, seen = _recording(NaNLogits(cfg).double().eval())
    with pytest.raises(SJDDeviceError, match="non-finite logits"):
        generate(nan_model, torch.tensor([0, 1]), 12, method, window=4, backend="torch", cfg_scale=2.0)
    assert seen and min(seen) >= 0, seen


def test_bad_options_are_named_before_work():
    """Options the chosen method does not use are refused, and malformed seeds, CFG scales, betas and
    top-p values are SJDInputErrors naming the argument, all before any model forward."""
    cfg = GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_image_tokens=12, num_classes=3)
    m = Counting(cfg).double().eval()
    c2 = torch.tensor([0, 1])
    bad = [
        ("vp_form .* applies to sjd_vp and coupling, not 'sjd'", "sjd", dict(vp_form="log")),
        ("vp_form .* applies to sjd_vp and coupling, not 'gumbel'", "gumbel", dict(vp_form="add")),
        ("vp_form must be 'add' or 'log'", "coupling", dict(vp_form=["log"])),
        ("sjd2/sjd2_kv .* apply to method 'sjd2', not 'sjd'", "sjd", dict(sjd2_kv="bogus")),
        ("sjd2/sjd2_kv .* apply to method 'sjd2', not 'sjd'", "sjd", dict(sjd2_kv="keep")),
        ("sjd2/sjd2_kv .* apply to method 'sjd2', not 'coupling'", "coupling", dict(sjd2="bogus")),
        ("sjd2/sjd2_kv .* apply to method 'sjd2', not 'pac'", "pac", dict(sjd2="model")),
        ("seed must be an int or integers that fit in int64", "sjd", dict(seed=[2 ** 64, 1])),
        ("seed must be an int or integers that fit in int64", "sjd", dict(seed=None)),
        ("seed must be an int or integers that fit in int64", "sjd", dict(seed="1")),
        ("seed must be an int or integers that fit in int64", "sjd", dict(seed=1.0)),
        ("seed must be an int or integers", "sjd", dict(seed=["a", "b"])),
        ("cfg_scale must be a finite real number", "sjd", dict(cfg_scale=None)),
        ("cfg_scale must be a finite real number", "sjd", dict(cfg_scale="3")),
        ("cfg_scale must be a finite real number", "sjd", dict(cfg_scale=[2.0, float("nan")])),
        ("cfg_scale must be a finite real number", "sjd", dict(cfg_scale=True)),
        ("cfg_scale must be a finite real number", "sjd", dict(cfg_scale=[])),
        ("beta must be a finite real number", "sjd_vp", dict(beta="x")),
        ("beta must be a finite real number", "coupling", dict(beta=float("nan"))),
        ("beta must be a finite real number", "sjd_vp", dict(beta=True)),
        ("top_p must be", "sjd", dict(top_p=True)),
        ("window must be an int >= 0", "ar", dict(window=-5)),              # checked for AR too
        ("window must be an int >= 0", "ar_gumbel", dict(window=2.5)),
        ("state_capacity: the sparse state stores the support", "sjd_vp", dict(beta=-0.5, state_capacity=4)),
    ]
    for msg, method, kw in bad:
        Counting.calls = 0
        with pytest.raises(SJDInputError, match=msg):
            generate(m, c2, 12, method, **{"window": 4, **kw})
        assert Counting.calls == 0, (msg, kw)
    # what stays accepted: vp_form with the VP methods, beta 0 with any method, per-request CFG tensors
    generate(m, c2, 12, "coupling", window=4, beta=0.0, vp_form="log")
    generate(m, c2, 12, "sjd", window=4, beta=0.0, cfg_scale=torch.tensor([2.0, 3.0]), seed=torch.tensor([3, 4]))
