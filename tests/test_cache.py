"""The static per-row KV cache: layout, per-row writes and masks, and integrity during decoding
(after every step, each row's valid slots equal the K/V that AR would have built for the
committed tokens)."""
import pytest
import torch

from sjd_kernels.decoding import StaticKVCache, generate

from test_generate import prefix_model, tiny


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def test_layout_writes_and_mask():
    c = StaticKVCache(3, 2, 2, 10, 4, dtype=torch.float64)
    assert c.kv.shape == (3, 2, 2, 2, 10, 4) and c.nbytes() == 3 * 2 * 2 * 2 * 10 * 4 * 8
    assert c.k.data_ptr() == c.kv.data_ptr() and c.v.shape == (3, 2, 2, 10, 4)
    c.set_lengths(torch.tensor([2, 5]))
    slots, mask = c.window(3)
    assert slots.tolist() == [[2, 3, 4], [5, 6, 7]]
    assert mask.shape == (2, 3, 10)
    assert mask[0, 0].tolist() == [True] * 3 + [False] * 7 and mask[1, 2].tolist() == [True] * 8 + [False] * 2
    k = torch.arange(2 * 2 * 3 * 4, dtype=torch.float64).view(2, 2, 3, 4)
    c.write(1, k, -k, slots)
    assert torch.equal(c.k[1, 0, :, 2:5], k[0]) and torch.equal(c.k[1, 1, :, 5:8], k[1])
    assert torch.equal(c.v[1, 1, :, 5:8], -k[1])
    assert (c.k[1, 0, :, :2] == 0).all() and (c.k[1, 0, :, 5:] == 0).all() and (c.k[0] == 0).all()
    ptr = c.kv.data_ptr()
    c.set_lengths(torch.tensor([4, 6]))                 # commit/rewind is a length change, not a copy
    assert c.kv.data_ptr() == ptr and torch.equal(c.k[1, 1, :, 5:8], k[1])


def ar_kv(model, cond, tokens, cfg):
    """Per model row, the K/V an AR run builds: one causal forward over [prompt, tokens[:-1]]."""
    pre = model.prefix(cond, cfg)
    B, N = tokens.shape
    out = []
    for r in range(pre.embeds.shape[0]):
        L = int(pre.lengths[r])
        x = torch.cat([pre.embeds[r, :L], model.embed_tokens(tokens[r % B, :-1])], 0).unsqueeze(0)
        ref = StaticKVCache(model.num_layers, 1, model.num_kv_heads, L + N - 1, model.head_dim, dtype=torch.float64)
        slots, mask = ref.window(L + N - 1)
        with torch.no_grad():
            model(x, slots, cache=ref, mask=mask, write_slots=slots)
        out.append(ref.kv[:, :, 0])                                       # [layers, 2, H, L+N-1, D]
    return out


@pytest.mark.parametrize("method,window,cfg", [("sjd", 4, 2.0), ("coupling", 3, 1.0), ("sjd_vp", 5, 2.0),
                                               ("gumbel_jacobi", 4, 2.0), ("ar", 0, 2.0), ("gumbel", 16, 1.0)])
@pytest.mark.parametrize("prompt", ["class", "prefix"])
def test_cache_equals_ar_cache_after_every_step(method, window, cfg, prompt):
    m = tiny(seed=4, head=6.0) if prompt == "class" else prefix_model(seed=5)
    cond = torch.tensor([0, 2, 1, 1])
    snaps = []

    def on_step(tokens, n, cache):
        snaps.append((cache.kv.clone(), cache.lengths.clone(), n.clone(), cache.kv.data_ptr()))

    out = generate(m, cond, 12, method, window=window, seed=[5, 6, 7, 8], cfg_scale=cfg, top_k=12,
                   on_step=on_step, return_cache=True)
    ref = ar_kv(m, cond, out.tokens, cfg != 1.0)
    pre = m.prefix(cond, cfg != 1.0)
    rows = len(ref)
    assert len(snaps) == out.stats.nfe and len({s[3] for s in snaps}) == 1     # one buffer, never reallocated
    ragged = False
    for kv, lengths, n, _ in snaps:
        nn = torch.cat([n, n]) if rows > 4 else n
        assert torch.equal(lengths, pre.lengths - 1 + nn)
        ragged |= len(set(n.tolist())) > 1
        for r in range(rows):
            ln = int(lengths[r])
            assert torch.allclose(kv[:, :, r, :, :ln], ref[r][:, :, :, :ln], atol=1e-10, rtol=1e-10), (r, ln)
    final = out.cache
    assert torch.equal(final.lengths, pre.lengths - 1 + 12)
    if method != "ar":
        # windows committed several tokens (some request finished in fewer than 12 steps), unevenly
        assert ragged and min(out.stats.steps) < 12, out.stats.steps
