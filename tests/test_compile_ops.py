"""``tree_verify``, ``tree_kv_update`` and ``sjd2_prepare`` under ``torch.compile(fullgraph=True)``: the public
calls (argument checks included) trace without a graph break, and the compiled call returns and writes what
the eager call does, token for token and bit for bit (torch backend; the kernels' registration is the one
``tests/test_opcheck.py`` checks). ``jacobi_step`` and ``verify_chain`` have theirs in
``tests/test_ops_registration.py`` and ``tests/test_verify_chain.py``."""
import pytest
import torch

import sjd_kernels as sk
from sjd_kernels.sjd2 import NoiseSchedule, sjd2_prepare

I64 = torch.int64


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _clone(d):
    return {k: v.clone() for k, v in d.items()}


def _tree_case(seed=0, B=3, V=11, K=2, depth=2, window=3):
    g = torch.Generator().manual_seed(seed)
    st = sk.JacobiState.create(B, window, V, seed=[5, 6, 7][:B])
    st.q_state.copy_(torch.softmax(torch.randn(st.q_state.shape, generator=g), -1))
    st.q_kind.zero_()
    pos = torch.tensor([0, 4, 9][:B])
    tree = sk.build_tree(st, torch.randint(0, V, (B,), generator=g), pos, K=K, depth=depth, window=window)
    rows = torch.gather(st.q_state, 1, tree.q_slot.clamp(min=0).unsqueeze(-1).expand(B, tree.num_nodes, V))
    logits = torch.log(rows) + 0.3 * torch.randn(B, tree.num_nodes, V, generator=g)   # P near q: long paths
    return st, tree, pos, logits


def test_tree_verify_compiled_equals_eager():
    st_a, tree, pos, logits = _tree_case()
    st_b = sk.JacobiState(*(t.clone() if isinstance(t, torch.Tensor) else t for t in (
        st_a.q_state, st_a.q_kind, st_a.p_prev, st_a.seed, st_a.step, st_a.status)))

    def f(lg, tokens, parent, depth, sib, q_slot, p, q_state, q_kind, p_prev, seed, step, status):
        s = sk.JacobiState(q_state, q_kind, p_prev, seed, step, status)
        t = sk.TreeLayout(tokens, parent, depth, sib, q_slot, tree.max_depth)
        o = sk.tree_verify(lg, t, p, s, temperature=0.9, backend="torch")
        return o.num_accepted, o.tokens, o.path

    args = (tree.tokens, tree.parent, tree.depth, tree.sib, tree.q_slot, pos)
    want = f(logits, *args, st_a.q_state, st_a.q_kind, st_a.p_prev, st_a.seed, st_a.step, st_a.status)
    got = _compiled(f)(logits, *args, st_b.q_state, st_b.q_kind, st_b.p_prev, st_b.seed, st_b.step, st_b.status)
    assert bool((want[0] >= 0).all()) and int(want[0].sum()) > 0          # something was accepted
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    for a, b in ((st_a.step, st_b.step), (st_a.status, st_b.status), (st_a.q_state, st_b.q_state)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [False, True])
def test_tree_kv_update_compiled_equals_eager(bad):
    """Compiled with a status: the same moves; a malformed row, refused by the host check eagerly on the
    CPU, is skipped and reported (bit 4) as the op does on a GPU (no host check while tracing)."""
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(2, 2, 3, 2, 12, 4, generator=g)
    path = torch.tensor([[0, 2, 3, -1], [0, 1, 2, 3], [0, 3, -1, -1]])
    cache_len = torch.tensor([2, 5, 0])
    if bad:
        path[1, 1] = 0                                        # path[1] < 1: the row is left as it is

    def f(kv, path, cache_len, status):
        sk.tree_kv_update(kv, path, cache_len, status=status, backend="torch")
        return kv

    kv_a, st_a = kv.clone(), torch.zeros(4, dtype=torch.int32)
    if bad:                                                   # eager on the CPU: refused by the host check
        with pytest.raises(sk.SJDInputError, match=r"bad path in row\(s\) \[1\]"):
            f(kv_a, path, cache_len, st_a)
        assert torch.equal(kv_a, kv) and not st_a.any()
        torch.ops.sjd.tree_kv_update(kv_a, path, cache_len, st_a, 1)     # the op itself (no host check)
    else:
        f(kv_a, path, cache_len, st_a)
    kv_b, st_b = kv.clone(), torch.zeros(4, dtype=torch.int32)
    _compiled(f)(kv_b, path, cache_len, st_b)
    assert not torch.equal(kv_a, kv)
    assert torch.equal(kv_a, kv_b) and st_a.tolist() == st_b.tolist() == [4 if bad else 0, 0, 0, 0]
    if bad:
        assert torch.equal(kv_b[:, :, 1], kv[:, :, 1])


def _prepare_case(seed=0, B=3, N=7, R=9, d=16, Vt=19, K=5):
    g = torch.Generator().manual_seed(seed)
    a, s = NoiseSchedule(levels=K, s_min=0.1).coefficients()
    n = torch.tensor([0, 5, 11][:B])
    pos = n.view(B, 1) - 1 + torch.arange(N)
    pos[0, 0] = -1
    return dict(embed_weight=torch.randn(Vt, d, generator=g), mean=torch.randn(d, generator=g),
                std=torch.rand(d, generator=g) + 0.5, level_table=torch.randn(K + 1, d, generator=g), alpha=a,
                sigma=s, tokens=torch.randint(0, Vt, (B, N), generator=g), positions=pos,
                seed=torch.tensor([11, -3, 2 ** 40 + 5][:B]), commit_end=n.clone(),
                fresh_start=n + torch.tensor([2, 0, 6][:B]), row_end=n + torch.tensor([4, 3, 6][:B]),
                latent=torch.randn(B, R, d, generator=g), level=torch.randint(0, K + 1, (B, R), generator=g).int())


@pytest.mark.parametrize("bad", [False, True])
def test_sjd2_prepare_compiled_equals_eager(bad):
    """Compiled with a status: the same inputs, latents and levels; a token it reads outside the table
    (clamped) sets bit 32 in both (the host check that refuses it eagerly on the CPU does not run while
    tracing)."""
    c = _prepare_case()
    if bad:
        c["tokens"][1, 0] = 19                                # X[n-1] of request 1: committed, read

    def f(status, **kw):
        return sjd2_prepare(**kw, status=status, backend="torch")

    want_c, st_a = _clone(c), torch.zeros(4, dtype=torch.int32)
    if bad:
        with pytest.raises(sk.SJDInputError, match="tokens: request 1's slot 0"):
            f(st_a, **want_c)
        want = torch.ops.sjd.sjd2_prepare(*want_c.values(), st_a, 1)       # the op itself (no host check)
    else:
        want = f(st_a, **want_c)
    got_c, st_b = _clone(c), torch.zeros(4, dtype=torch.int32)
    got = _compiled(f)(st_b, **got_c)
    assert torch.equal(got, want)
    assert torch.equal(got_c["latent"], want_c["latent"]) and torch.equal(got_c["level"], want_c["level"])
    assert not torch.equal(got_c["level"], c["level"])                    # the ring moved
    assert st_a.tolist() == st_b.tolist() == [32 if bad else 0, 0, 0, 0]
