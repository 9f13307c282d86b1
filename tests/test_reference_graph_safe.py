"""The PyTorch reference of ``jacobi_step`` can be captured in a CUDA graph.

The op's benchmark times every backend eagerly and inside a CUDA graph, the reference too, so the
reference step must not synchronise with the host: no boolean-mask indexing, no ``.item()`` on
device tensors, no tensors built from host data and copied over. Checked here on the CPU by running
the reference step under the dispatch mode of ``test_cuda_graph`` (``NoHostSync``), which raises on
each such operation, for every draft mode, dense and sparse state, forced tokens, both tail rules,
top-k, top-p and greedy targets, over whole multi-step runs (acceptance, rejection, ragged ends).
"""
import pytest
import torch

import test_jacobi_step_law as law
from test_cuda_graph import HostSync, NoHostSync
from test_sparse_state import SPECS

from sjd_kernels.reference import jacobi_step as ref

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded

# (label, table seed, scale, temperature, top-k, top-p, W, tail rule, forced)
CASES = [
    ("W2", 11, 2.5, 1.0, 0, 1.0, 2, ref.TAIL_UNIFORM, None),
    ("W3-topk2-left", 12, 2.0, 1.0, 2, 1.0, 3, ref.TAIL_LEFT, None),
    ("W3-forced", 13, 2.5, 0.8, 0, 1.0, 3, ref.TAIL_UNIFORM, [-1, -1, 1, -1]),
    ("W3-topp", 14, 2.0, 1.0, 0, 0.8, 3, ref.TAIL_UNIFORM, None),
    ("W2-greedy", 15, 2.0, 0.0, 0, 1.0, 2, ref.TAIL_UNIFORM, None),
]


def guarded(*a, **kw):
    with NoHostSync():
        return ref.jacobi_step(*a, **kw)


@pytest.mark.parametrize("capacity", [None, 3], ids=["dense", "sparse-C3"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("spec", SPECS)
def test_reference_step_never_syncs_with_the_host(spec, case, capacity):
    label, tseed, scale, T, k, p, W, tail, forced = case
    model = law.TableModel(law.VS, law.LS, tseed, scale)
    X, info = law.run_sequences(guarded, spec, model, 64, W, 500 + tseed, T, k, p, tail, forced,
                                capacity=capacity)
    assert X.shape == (64, law.LS) and bool(((X >= 0) & (X < law.VS)).all())
    assert info["steps"] >= 2


def test_the_guard_catches_the_old_masked_state_write():
    """The form the reference used before (``buf[b[mask], s[mask]] = rows[mask]``) is refused."""
    buf = torch.zeros(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    b = torch.arange(2).view(2, 1).expand(2, 3)
    s = torch.arange(3).view(1, 3).expand(2, 3)
    rows = torch.ones(2, 3, 4)
    with pytest.raises(HostSync):
        with NoHostSync():
            buf[b[mask], s[mask]] = rows[mask]


def test_sjd2_prepare_reference_never_syncs_with_the_host():
    """``sjd2_prepare``'s torch backend (the reference; on a GPU the op calls it with a status and no host
    checks) runs without a host synchronisation, so it can be captured like the kernels: it used to test
    ``fresh.any()`` on the host and write the rings through boolean masks. (Called directly: inside the
    custom op's dispatch the mode would not see the reference's own operations.) Same results: the float64
    slot-by-slot oracle of ``test_sjd2``, and a bad token reported in the status."""
    import test_sjd2 as t2

    from sjd_kernels.reference.sjd2_prepare import sjd2_prepare as ref_prepare
    for seed in range(3):
        c = t2._prepare_case(seed=seed)
        want, lat64, lev64 = t2._prepare_f64(c)
        st = torch.zeros(4, dtype=torch.int32)
        with NoHostSync():
            got = ref_prepare(*c.values(), st)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(c["level"], lev64) and torch.allclose(c["latent"].double(), lat64, rtol=1e-5, atol=1e-5)
        assert st.tolist() == [0, 0, 0, 0]
    c = t2._prepare_bad("token_step")
    st = torch.zeros(4, dtype=torch.int32)
    with NoHostSync():
        ref_prepare(*c.values(), st)
    assert st.tolist() == [32, 0, 0, 0]


@pytest.mark.parametrize("form", ["stacked", "lists"])
def test_tree_kv_update_reference_never_syncs_with_the_host(form):
    """``tree_kv_update``'s torch backend moves the K/V of every row with one gather and one scatter (no
    boolean-mask selection of the moved entries on the host), bit for bit as the copy it specifies,
    malformed rows untouched and reported."""
    import test_tree_kv_update as tk

    from sjd_kernels.reference import tree as tref
    for name in ("overlap_0_2_3", "ragged"):
        path, cache_len = tk._path(name)
        if name == "ragged":
            path[1, 1] = 0                                       # path[1] < 1: row 1 malformed, left as it is
        kv = tk.poisoned((tk.LAYERS, 2, tk.R, tk.H, tk.S, tk.D), torch.bfloat16, seed=3)
        move, src, dst, row_bad = tref.kv_moves(path, cache_len, tk.S)
        want = kv.clone()
        for r, j in move.nonzero().tolist():                     # the copy, entry by entry (path[j] >= j)
            want[:, :, r, :, int(dst[r, j])] = kv[:, :, r, :, int(src[r, j])]
        st = torch.zeros(4, dtype=torch.int32)
        got = kv.clone()
        with NoHostSync():
            if form == "stacked":
                tref.tree_kv_update(got, path, cache_len, st)
            else:
                keys, values = tk.to_list(got)
                tref.tree_kv_update_list(keys, values, path, cache_len, st)
        if form == "lists":
            got = tk.from_list(keys, values)
        assert torch.equal(tk.bits(got), tk.bits(want)), name
        assert st.tolist() == [4 if bool(row_bad.any()) else 0, 0, 0, 0]
        assert bool(row_bad.any()) == (name == "ragged")
