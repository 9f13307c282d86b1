"""The in-package GPT: shapes, causality, cached incremental decoding, checkpoints, CFG dropout."""
import json

import pytest
import torch

from sjd_kernels.decoding.cache import StaticKVCache
from sjd_kernels.models import GPT, GPTCheckpointError, GPTConfig, check_model, drop_condition, load_gpt, save_gpt


def tiny(cond_dim=None, kv=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=16, n_layer=2, n_head=4, n_kv_head=kv, d_model=32, max_image_tokens=10,
                    num_classes=3, cond_dim=cond_dim, **kw)
    m = GPT(cfg).double().eval()
    with torch.no_grad():                       # larger weights than the 0.02 init, so logits really vary
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(15.0)
    return m


def test_config_checks_and_defaults():
    c = GPTConfig(16, 2, 4, None, 32, 8, 3)
    assert c.n_kv_head == 4 and c.head_dim == 8
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPTConfig(vocab_size=16, n_head=4, n_kv_head=3, d_model=32)
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(vocab_size=16, n_head=5, d_model=32)
    with pytest.raises(ValueError, match="grid_width"):
        GPTConfig(vocab_size=16, max_image_tokens=10, grid_width=3)


@pytest.mark.parametrize("cond_dim", [None, 6])
def test_shapes_and_protocol(cond_dim):
    m = tiny(cond_dim)
    check_model(m)
    B, N = 3, 10
    cond = torch.tensor([0, 1, 3]) if cond_dim is None else torch.randn(B, cond_dim, dtype=torch.float64)
    tok = torch.randint(0, 16, (B, N))
    out = m.forward_train(cond, tok)
    assert out.shape == (B, N, 16) and out.dtype == torch.float64
    pre = m.prefix(cond, cfg=True)
    assert pre.embeds.shape == (2 * B, 1, 32) and pre.lengths.tolist() == [1] * (2 * B)
    # the null condition is the last class row / the learned null vector
    null = m.embed_cond(m.null_condition(B))
    assert torch.equal(pre.embeds[B:], null)
    with pytest.raises(ValueError, match="exceed max_image_tokens"):
        m.forward_train(cond, torch.zeros(B, 11, dtype=torch.int64))


def test_bad_cond():
    m = tiny()
    with pytest.raises(ValueError, match="class ids must be in"):
        m.embed_cond(torch.tensor([4]))
    with pytest.raises(ValueError, match="integer class ids"):
        m.embed_cond(torch.tensor([0.5]))
    m2 = tiny(cond_dim=6)
    with pytest.raises(ValueError, match=r"float embeddings \[B, 6\]"):
        m2.embed_cond(torch.zeros(2, 5))


def test_causality():
    """Logits at position i do not depend on tokens > i (teacher forcing: on tokens >= i)."""
    m = tiny()
    cond = torch.tensor([1, 2])
    tok = torch.randint(0, 16, (2, 10))
    base = m.forward_train(cond, tok)
    for i in range(10):
        t2 = tok.clone()
        t2[:, i:] = (t2[:, i:] + 1 + torch.randint(0, 15, t2[:, i:].shape)) % 16
        out = m.forward_train(cond, t2)
        assert torch.equal(out[:, :i + 1], base[:, :i + 1]), i       # logit i predicts token i from tokens < i
        if i + 1 < 10:
            assert not torch.allclose(out[:, i + 1:], base[:, i + 1:])  # and later ones do see the change
    c2 = m.forward_train(torch.tensor([0, 2]), tok)
    assert not torch.allclose(c2[0, 0], base[0, 0])                   # the condition reaches position 0


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_cached_incremental_equals_full(kv):
    """Chunks of 1..4 inputs written at per-row lengths (rows out of step) equal one full forward."""
    m = tiny(kv=kv, seed=kv)
    cond = torch.tensor([0, 2, 3])
    tok = torch.randint(0, 16, (3, 10))
    full = m.forward_train(cond, tok)
    x = torch.cat([m.embed_cond(cond), m.embed_tokens(tok[:, :-1])], 1)          # [3, 10, d]
    cache = StaticKVCache(2, 3, kv, 16, m.head_dim, dtype=torch.float64)
    got = torch.full_like(full, float("nan"))
    chunks = [[1, 2, 3, 4], [3, 3, 4], [2, 1, 1, 4, 2]]                        # ragged per row
    done = [0, 0, 0]
    T = 4
    while any(d < 10 for d in done):
        sizes = [chunks[r].pop(0) if chunks[r] and done[r] < 10 else 0 for r in range(3)]
        sizes = [min(s, 10 - d) for s, d in zip(sizes, done)]
        if not any(sizes):
            break
        slots, mask = cache.window(T)
        inp = torch.stack([x[r, (done[r] + torch.arange(T)).clamp(max=9)] for r in range(3)])
        out = m(inp, slots, cache=cache, mask=mask, write_slots=slots)
        for r in range(3):
            got[r, done[r]:done[r] + sizes[r]] = out[r, :sizes[r]]
            done[r] += sizes[r]
        cache.set_lengths(torch.tensor(done))
    assert done == [10, 10, 10]
    assert torch.allclose(got, full, atol=1e-10, rtol=1e-10)


def test_gqa_matches_repeated_heads():
    """A GQA model equals the full-head model whose K/V projections repeat each group."""
    m = tiny(kv=1, seed=3)
    cfg = GPTConfig(**{**m.config.to_dict(), "n_kv_head": 4})
    full = GPT(cfg).double().eval()
    sd = m.state_dict()
    hd = m.head_dim
    for i in range(2):
        w = sd[f"blocks.{i}.attn.wkv.weight"]                                    # [2 * 1 * hd, d]
        k, v = w[:hd], w[hd:]
        sd[f"blocks.{i}.attn.wkv.weight"] = torch.cat([k.repeat(4, 1), v.repeat(4, 1)])
    full.load_state_dict(sd)
    cond, tok = torch.tensor([1]), torch.randint(0, 16, (1, 10))
    assert torch.allclose(m.forward_train(cond, tok), full.forward_train(cond, tok), atol=1e-10)


@pytest.mark.parametrize("cond_dim", [None, 6])
def test_save_load_roundtrip_and_hash(tmp_path, cond_dim):
    m = tiny(cond_dim, seed=7).float()
    meta = save_gpt(m, tmp_path / "g", extra={"note": "test"})
    assert (tmp_path / "g.safetensors").exists() and (tmp_path / "g.json").exists()
    assert meta["config"]["cond_dim"] == cond_dim and len(meta["sha256"]) == 64
    m2 = load_gpt(tmp_path / "g.safetensors")
    assert m2.config == m.config and not m2.training
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    m3 = GPT.from_pretrained(tmp_path / "g", dtype=torch.float64)
    assert m3.tok_emb.weight.dtype == torch.float64
    # one flipped byte in the weights file: the hash check names the file
    raw = bytearray((tmp_path / "g.safetensors").read_bytes())
    raw[-3] ^= 0x55
    (tmp_path / "g.safetensors").write_bytes(bytes(raw))
    with pytest.raises(GPTCheckpointError, match="SHA-256"):
        load_gpt(tmp_path / "g")
    # a config that no longer matches the tensors (hash made to agree): a shape or name error
    save_gpt(m, tmp_path / "h")
    meta = json.loads((tmp_path / "h.json").read_text())
    meta["config"]["d_model"] = 64
    (tmp_path / "h.json").write_text(json.dumps(meta))
    with pytest.raises(GPTCheckpointError, match="shape"):
        load_gpt(tmp_path / "h")
    with pytest.raises(GPTCheckpointError, match="missing"):
        load_gpt(tmp_path / "nothing")


def test_save_with_info_json_cannot_hold_keeps_the_previous_checkpoint(tmp_path):
    """The weights were written, then json.dump failed half-way through the .json: the previous
    checkpoint at that path could no longer be loaded."""
    from sjd_kernels.ops._common import SJDInputError
    m = tiny(seed=7).float()
    save_gpt(m, tmp_path / "g", extra={"loss": 1.0})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SJDInputError, match="g.json: the manifest cannot be written as JSON"):
        save_gpt(tiny(seed=8).float(), tmp_path / "g", extra={"loss": torch.tensor(1.0)})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert torch.equal(load_gpt(tmp_path / "g").tok_emb.weight, m.tok_emb.weight)


def test_drop_condition():
    g = torch.Generator().manual_seed(0)
    c = torch.zeros(10_000, dtype=torch.int64)
    d = drop_condition(c, 0.1, 10, generator=g)
    assert set(d.unique().tolist()) == {0, 10} and 800 < int((d == 10).sum()) < 1200
    assert torch.equal(drop_condition(c, 0.0, 10), c)
    e = torch.randn(1000, 4)
    de = drop_condition(e, 0.5, 10, generator=g)
    nan_rows = torch.isnan(de).all(1)
    assert 350 < int(nan_rows.sum()) < 650 and torch.equal(de[~nan_rows], e[~nan_rows])


def test_dropout_only_in_training():
    m = tiny(dropout=0.5)
    cond, tok = torch.tensor([0]), torch.randint(0, 16, (1, 10))
    a, b = m.forward_train(cond, tok), m.forward_train(cond, tok)
    assert torch.equal(a, b)
    m.train()
    assert not torch.equal(m.forward_train(cond, tok), a)


def test_backward():
    m = tiny().float().train()
    tok = torch.randint(0, 16, (2, 10))
    loss = torch.nn.functional.cross_entropy(m.forward_train(torch.tensor([0, 3]), tok).flatten(0, 1),
                                             tok.flatten())
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters())
