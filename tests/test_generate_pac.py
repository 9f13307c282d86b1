"""Method ``pac`` (maximal coupling plus a K-ary draft tree, then a chain; ``sjd_kernels.decoding.pac``):
greedy oracle, exact laws of whole sequences, batch invariance, KV-cache integrity after the tree
compaction, forced tokens, Hugging Face adapters, statistics and option errors.

Models are tiny float64 GPTs (helpers of ``test_generate``), so near-ties cannot flake the oracles.
"""
import itertools

import numpy as np
import pytest
import torch

from sjd_kernels.decoding import generate
from sjd_kernels.decoding import pac as P
from sjd_kernels.models import GPT, GPTConfig
from sjd_kernels.ops import SJDInputError
from sjd_kernels.reference.tree import TreeLayout, tree_template

from stats import assert_law, sequence_codes, target_law64
from test_cache import ar_kv
from test_generate import Counting, prefix_model, tiny


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


# ------------------------------------------------------------------------------------ oracles
TREES = [dict(window=5, tree_width=3, tree_depth=3), dict(window=11, tree_width=4, tree_depth=2, draft_init="left"),
         dict(window=1, tree_width=2, tree_depth=1), dict(window=4, tree_width=1, tree_depth=0)]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_equals_ar(cfg_scale):
    m = tiny()
    cond = torch.tensor([0, 1, 2, 1])
    ar = generate(m, cond, 12, "ar", top_k=1, cfg_scale=cfg_scale, seed=3)
    for kw in TREES:
        out = generate(m, cond, 12, "pac", top_k=1, cfg_scale=cfg_scale, seed=11, **kw)
        assert torch.equal(out.tokens, ar.tokens), kw
    t0 = generate(m, cond, 12, "pac", window=3, temperature=0.0, cfg_scale=cfg_scale, seed=1)
    assert torch.equal(t0.tokens, ar.tokens)


def test_greedy_prefix_rows_and_forced():
    """Prompts of 3 (conditional) and 1 (unconditional) positions; forced tokens inside the tree."""
    m = prefix_model(seed=3)
    cond = torch.tensor([0, 1, 2])
    ar = generate(m, cond, 12, "ar", top_k=1, cfg_scale=2.0, seed=1)
    out = generate(m, cond, 12, "pac", window=4, tree_width=3, tree_depth=2, top_k=1, cfg_scale=2.0, seed=2)
    assert torch.equal(out.tokens, ar.tokens)
    m = tiny(seed=4, head=8.0)
    forced = torch.full((2, 12), -1, dtype=torch.int64)
    forced[:, 3::4] = 15
    forced[1, 0] = 2
    g1 = generate(m, torch.tensor([0, 1]), 12, "ar", top_k=1, forced=forced)
    for kw in TREES[:2]:
        assert torch.equal(generate(m, torch.tensor([0, 1]), 12, "pac", top_k=1, forced=forced, **kw).tokens,
                           g1.tokens)
    s = generate(m, torch.tensor([0, 1]), 12, "pac", window=5, forced=forced, seed=4, cfg_scale=1.5)
    assert (s.tokens[:, 3::4] == 15).all() and s.tokens[1, 0] == 2


# ------------------------------------------------------------------------------------ laws
def exact_law(m, V, N, cls, cfg_scale, **target):
    """float64 AR law of all V**N sequences (as ``test_generate.exact_sequence_law``, any V and N)."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    with torch.no_grad():
        c = m.forward_train(torch.full((len(seqs),), cls), seqs).numpy()
        u = m.forward_train(m.null_condition(len(seqs)), seqs).numpy()
    Pr = target_law64(c, uncond=u if cfg_scale != 1.0 else None, cfg=cfg_scale, **target)
    p = np.take_along_axis(Pr, seqs.numpy()[..., None], -1)[..., 0].prod(-1)
    out = np.zeros(V ** N)
    out[sequence_codes(seqs.numpy(), V)] = p
    return out


def law_gpt(V, N, seed, scale):
    """A one-layer float64 GPT (d 8) with rows sharp enough that windows commit several tokens."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_kv_head=1, d_model=8, max_image_tokens=N,
                      num_classes=2)).double().eval()
    with torch.no_grad():
        m.head.weight.mul_(scale)
        m.tok_emb.weight.mul_(scale)
        m.cls_emb.weight.mul_(scale)
    return m


class RowEndGPT(GPT):
    """A tiny GPT with one structural code (V, a row end) embedded by its own vector."""
    num_extra_tokens = 1

    def __init__(self, cfg):
        super().__init__(cfg)
        self.row_end = torch.nn.Parameter(torch.randn(cfg.d_model, dtype=torch.float64))

    def embed_tokens(self, ids):
        e = self.tok_emb(ids.clamp(0, self.config.vocab_size - 1))
        return torch.where((ids >= self.config.vocab_size).unsqueeze(-1), self.row_end.to(e.dtype).expand_as(e), e)


def test_left_copy_of_a_row_end_drafts_uniformly(monkeypatch):
    """``draft_init="left"``: a new tail position whose left neighbour is a forced row end (an id >= V)
    draws uniformly, as jacobi_step's left copy does. Drafting the row end's id at a free position
    cut every later tree short (the tree has no node at a level whose first sibling is outside the
    slice): same law, more steps."""
    V, N = 16, 16
    m = tiny(V, N, head=8.0, cls=RowEndGPT)
    cond = torch.tensor([0, 1, 2] * 4)
    forced = torch.full((len(cond), N), -1, dtype=torch.int64)
    forced[:, 3::4] = V                                     # a row end every 4 tokens
    seen = []
    propose = P.propose

    def spy(*a, **k):
        nd = propose(*a, **k)
        m_, pos = a[4], a[7]
        p = pos.view(-1, 1) + m_.clamp(min=0).view(-1, 1) + 1 + torch.arange(nd.shape[1])
        f = forced.gather(1, p.clamp(max=N - 1))
        seen.append(((p < N) & (f < 0) & ((nd < 0) | (nd >= V))).sum().item())
        return nd
    monkeypatch.setattr(P, "propose", spy)
    ar = generate(m, cond, N, "ar", top_k=1, forced=forced)
    g = generate(m, cond, N, "pac", window=6, top_k=1, forced=forced, draft_init="left", seed=1, tree_depth=2)
    assert torch.equal(g.tokens, ar.tokens)
    s = generate(m, cond, N, "pac", window=6, forced=forced, draft_init="left", seed=1, tree_depth=2)
    assert (s.tokens[:, 3::4] == V).all() and ((s.tokens >= 0) & (s.tokens < V)).sum() == len(cond) * (N - 4)
    assert len(seen) > 4 and sum(seen) == 0, seen


def test_sequence_law_tree_and_chain():
    """V = 3, 4 tokens (81 cells), a binary tree of depth 2 then one chain level: siblings, the
    continuation below a non-first sibling, the chain row fallback and stored laws all take part."""
    m = law_gpt(3, 4, seed=5, scale=30.0)
    kw = dict(window=3, tree_width=2, tree_depth=2, top_p=0.95)
    p = exact_law(m, 3, 4, 1, 1.0, top_p=0.95)
    assert p.max() < 0.3 and (p > 0.01).sum() >= 15
    n = 84_000
    out = generate(m, torch.full((n,), 1), 4, "pac", seed=321, **kw)
    assert_law(sequence_codes(out.tokens.numpy(), 3), p, label=f"pac {kw}")
    h = out.stats.accepted_hist
    assert sum(h[2:]) > n // 10 and out.stats.nfe >= 3


def test_sequence_law_cfg_topk_left():
    """V = 4, 3 tokens (64 cells) with CFG, top-k and one-hot (left-copy) tail laws; a 3-ary tree."""
    law_model4 = law_gpt(4, 3, seed=7, scale=20.0)
    kw = dict(window=2, tree_width=3, tree_depth=1, top_k=3, draft_init="left")
    p = exact_law(law_model4, 4, 3, 0, 2.0, top_k=3)
    assert p.max() < 0.3 and (p > 0.01).sum() >= 15
    n = 77_000
    out = generate(law_model4, torch.full((n,), 0), 3, "pac", seed=99, cfg_scale=2.0, **kw)
    assert_law(sequence_codes(out.tokens.numpy(), 4), p, label=f"pac {kw} cfg 2")
    assert sum(out.stats.accepted_hist[1:]) > n // 10


# ------------------------------------------------------------------------------------ batches, cache, stats
def test_batch_invariance():
    m = tiny(seed=2, head=8.0)
    seeds = [101, 202, 303, 404, 505, 606, 707, 808]
    cond = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    kw = dict(window=4, tree_width=3, tree_depth=2, cfg_scale=1.5, top_k=10)
    batch = generate(m, cond, 12, "pac", seed=seeds, **kw)
    assert len(set(batch.stats.steps)) > 1                         # ragged acceptance
    for i in (0, 5, 7):
        alone = generate(m, cond[i:i + 1], 12, "pac", seed=[seeds[i]], **kw)
        assert torch.equal(alone.tokens[0], batch.tokens[i]), i
        assert alone.stats.steps[0] == batch.stats.steps[i]
    other = generate(m, cond, 12, "pac", seed=[s + 1 for s in seeds], **kw)
    assert not torch.equal(other.tokens, batch.tokens)


@pytest.mark.parametrize("prompt,cfg", [("class", 2.0), ("prefix", 2.0), ("class", 1.0)])
def test_cache_equals_ar_cache_after_every_step(prompt, cfg):
    """After every step (tree forward, verification, ``tree_kv_update``) each row's committed slots hold
    the K/V an AR prefill of the committed tokens builds."""
    m = tiny(seed=4, head=6.0) if prompt == "class" else prefix_model(seed=5)
    cond = torch.tensor([0, 2, 1, 1])
    snaps = []

    def on_step(tokens, n, cache):
        snaps.append((cache.kv.clone(), cache.lengths.clone(), n.clone()))

    out = generate(m, cond, 12, "pac", window=4, tree_width=3, tree_depth=2, seed=[5, 6, 7, 8], cfg_scale=cfg,
                   top_k=12, on_step=on_step, return_cache=True)
    ref = ar_kv(m, cond, out.tokens, cfg != 1.0)
    pre = m.prefix(cond, cfg != 1.0)
    rows = len(ref)
    assert len(snaps) == out.stats.nfe
    for kv, lengths, n in snaps:
        nn = torch.cat([n, n]) if rows > 4 else n
        assert torch.equal(lengths, pre.lengths - 1 + nn)
        for r in range(rows):
            ln = int(lengths[r])
            assert torch.allclose(kv[:, :, r, :, :ln], ref[r][:, :, :, :ln], atol=1e-10, rtol=1e-10), (r, ln)
    deep = sum(out.stats.accepted_hist[2:]) > 0                  # paths of several nodes were compacted
    assert deep and torch.equal(out.cache.lengths, pre.lengths - 1 + 12)


def test_stats_and_edges():
    m = tiny(head=8.0)
    out = generate(m, torch.tensor([0, 1, 2]), 12, "pac", window=4, tree_width=3, tree_depth=2, seed=1, cfg_scale=2.0)
    s = out.stats
    assert s.tree_nodes == 1 + 3 + 9 + 2 and s.window == 4
    assert s.nfe == max(s.steps) and len(s.accepted_hist) == 5 and sum(s.accepted_hist) == sum(s.steps)
    assert sum((k + 1) * c for k, c in enumerate(s.accepted_hist)) == 3 * 12
    assert s.cache_bytes == 2 * 2 * 6 * 1 * (1 + 12 + 14) * 16 * 8     # the cache holds the whole tree
    assert s.as_dict()["method"] == "pac" and s.forward_s > 0
    one = generate(m, torch.tensor([0, 1]), 1, "pac", window=4, seed=1)       # window cut to 0, depth to 0
    assert one.tokens.shape == (2, 1) and one.stats.window == 0 and one.stats.tree_nodes == 1
    cut = generate(m, torch.tensor([0]), 3, "pac", window=8, tree_depth=3, seed=1)   # depth cut to the window 2
    assert cut.stats.window == 2 and cut.stats.tree_nodes == 1 + 3 + 9 and (cut.tokens >= 0).all()


def test_tree_beats_chain_on_average():
    """On a sampled tiny model the tree commits more tokens per forward than coupling (fixed seeds)."""
    m = tiny(seed=2, head=6.0)
    cond = torch.arange(48) % 3
    kw = dict(window=6, seed=5, cfg_scale=1.5)
    c = generate(m, cond, 12, "coupling", **kw).stats
    t = generate(m, cond, 12, "pac", tree_width=3, tree_depth=3, **kw).stats
    assert t.mean_tokens_per_step > 1.05 * c.mean_tokens_per_step, (t.mean_tokens_per_step, c.mean_tokens_per_step)


def test_backends_agree():
    """The tree ops' kernels (Triton; CUDA where a device exists) give the torch backend's tokens."""
    from sjd_kernels.ops import backends
    avail = backends()
    m = tiny(head=8.0).float()
    kw = dict(window=4, tree_width=3, tree_depth=2, seed=3, cfg_scale=2.0, top_p=0.9)
    ran = 0
    for be in ("triton", "cuda"):
        if not avail[be]["available"]:
            continue
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cpu" and be == "cuda":
            continue
        mm = m.to(dev)
        ref = generate(mm, torch.tensor([0, 1, 2], device=dev), 12, "pac", backend="torch", **kw)
        out = generate(mm, torch.tensor([0, 1, 2], device=dev), 12, "pac", backend=be, **kw)
        assert torch.equal(out.tokens, ref.tokens), be
        ran += 1
    if not ran:
        pytest.skip("no Triton interpreter or CUDA backend here (set TRITON_INTERPRET=1)")


# ------------------------------------------------------------------------------------ helpers of the step
def test_continuation_and_pruning():
    K, D, W = 2, 2, 4
    plan = P.PacPlan.create(K, D, W, "cpu")
    parent, dep, sib, _ = tree_template(K, D, W)
    t = lambda x: torch.tensor([x, x])                               # noqa: E731
    tree = TreeLayout(torch.arange(len(parent)).repeat(2, 1), t(parent), t(dep), t(sib), t([0] * len(parent)), W)
    # nodes: 0 | 1 2 | 3 4 (under 1) 5 6 (under 2) | 7 (under 3) | 8
    assert plan.chain_at.tolist() == [-1, -1, -1, 7, 8, -1]
    path = torch.tensor([[0, 2, -1, -1, -1], [0, 1, 3, -1, -1]])
    cont = P.continuation(plan, tree, path, torch.tensor([1, 2]))
    # request 0 left the spine at node 2: its first child 5, then the chain rows 7 and 8 (spine-conditioned)
    assert cont.tolist() == [[5, 7, 8, -1], [7, 8, -1, -1]]
    pr = P.prune(tree, torch.tensor([4, 1]))
    assert pr.parent[1].tolist() == [-1, 0, 0] + [-1] * 6 and torch.equal(pr.parent[0], tree.parent[0])
    assert P.continuation(plan, pr, torch.tensor([[0, -1, -1, -1, -1]] * 2), torch.tensor([0, 0]))[1].tolist() == \
        [1, -1, -1, -1]
    cl = torch.tensor([3, 5])
    gone = TreeLayout(*(x.clone() for x in (tree.tokens, tree.parent, tree.depth, tree.sib, tree.q_slot)), W)
    for x in (gone.parent, gone.depth, gone.sib, gone.tokens):        # sibling 2 and its subtree not drawn
        x[0, [2, 5, 6]] = -1
    for t in (tree, pr, gone):
        assert torch.equal(plan.attention_mask(t, cl, 20), t.attention_mask(cl, 20))


def test_bad_options_fail_before_work():
    cfg = GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_image_tokens=12, num_classes=3)
    m = Counting(cfg).double().eval()
    bad = [
        ("tree_depth 5 exceeds the window 4", dict(tree_depth=5)),
        ("tree_depth 3 \\(the default\\) exceeds the window 0", dict(window=0)),
        ("tree_width must be an int in", dict(tree_width=0)),
        ("tree_width must be an int in", dict(tree_width=2.0)),
        ("tree_width must be an int in", dict(tree_width=17)),
        ("tree_depth must be an int >= 0", dict(tree_depth=-1)),
        ("nodes; at most 1024", dict(tree_width=8, tree_depth=4)),
        ("apply to method 'pac'", dict(method="coupling", tree_width=3)),
        ("beta", dict(beta=0.5)),
        ("cache_len 20 is too small: .* a tree of 15 nodes", dict(cache_len=20, tree_depth=2, tree_width=3)),
    ]
    for msg, kw in bad:
        kw = dict(kw)
        Counting.calls = 0
        with pytest.raises(SJDInputError, match=msg):
            generate(m, torch.tensor([0, 1]), 12, kw.pop("method", "pac"), window=kw.pop("window", 4), **kw)
        assert Counting.calls == 0, msg
    # a window longer than the image is cut to it, as for the chain methods (its node count is the cut one's);
    # the scripts' check before any model is loaded (window_problem) says the same given the image's tokens
    assert "1024 per request" in P.window_problem(2000) and P.window_problem(2000, 196) is None
    assert "needs a window >= 3" in P.window_problem(2, 196)
    ar = generate(m, torch.tensor([0, 1]), 12, "ar", top_k=1)
    assert torch.equal(generate(m, torch.tensor([0, 1]), 12, "pac", window=2000, top_k=1).tokens, ar.tokens)

    class NoTree(GPT):
        tree_attention = False
    with pytest.raises(NotImplementedError, match="tree_attention"):
        generate(NoTree(cfg).double().eval(), torch.tensor([0]), 12, "pac", window=4)


# ------------------------------------------------------------------------------------ Hugging Face
def test_hf_llama_and_chameleon_greedy():
    pytest.importorskip("transformers")
    from test_hf_adapters import chameleon, greedy_reference, llama
    from sjd_kernels.models.hf import HFImageLM, chameleon_image_ids, from_chameleon, grid_forced
    for attn in ("sdpa", "eager"):
        hf = llama(attn)
        ids = list(range(8, 24))
        a = HFImageLM(hf, ids, uncond_prompt=[1])
        cond, uncond = [[1, 5, 6], [1, 7], [2, 3, 4, 5]], [[1], [1, 2], [1]]
        ref = greedy_reference(hf, ids, cond, uncond, 10, 2.0)
        out = generate(a, cond, 10, "pac", window=4, tree_width=3, tree_depth=2, top_k=1, cfg_scale=2.0,
                       uncond=uncond, seed=3)
        assert torch.equal(out.tokens, ref), attn
    hf = chameleon()
    a = from_chameleon(hf, extra_token_ids=[30], uncond_prompt=[0])
    forced = grid_forced(2, 3, 4, a.vocab_size)
    cond, uncond = [[0, 1], [0, 2, 1]], [[0], [0]]
    ref = greedy_reference(hf, chameleon_image_ids(hf), cond, uncond, forced.shape[1], 3.0, extra=[30], forced=forced)
    out = generate(a, cond, forced.shape[1], "pac", window=4, top_k=1, cfg_scale=3.0, uncond=uncond, forced=forced)
    assert torch.equal(out.tokens, ref)
    s = generate(a, cond, forced.shape[1], "pac", window=4, cfg_scale=3.0, forced=forced, seed=2)
    assert (s.tokens[:, 4::5] == 16).all() and (s.tokens[:, torch.arange(15) % 5 != 4] < 16).all()


# ------------------------------------------------------------------------------------ float64 cache and kernels
def test_float64_model_with_kernel_backend_refused_before_work():
    """The tree step moves the KV cache (model dtype) with tree_kv_update, whose kernels take fp32/fp16/bf16:
    a float64 model with a kernel backend is refused up front, not after the first forward."""
    from sjd_kernels.ops import backends
    avail = backends()
    kernels = [be for be in ("triton", "cuda") if avail[be]["available"]]
    if not kernels:
        pytest.skip("no Triton interpreter or CUDA backend here (set TRITON_INTERPRET=1)")
    cfg = GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_image_tokens=12, num_classes=3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = Counting(cfg).double().eval().to(dev)
    for be in kernels:
        if be == "cuda" and dev == "cpu":
            continue
        Counting.calls = 0
        with pytest.raises(SJDInputError, match="float64 cache needs backend 'torch'"):
            generate(m, torch.tensor([0, 1], device=dev), 12, "pac", window=4, backend=be)
        assert Counting.calls == 0, be
        generate(m.float(), torch.tensor([0, 1], device=dev), 12, "pac", window=4, backend=be)   # float32 runs
        m.double()
