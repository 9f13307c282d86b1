"""``tree_kv_update`` (SPEC section 5): the accepted path's K/V move into place after the committed prefix.

For every model row r and entry j with ``path[r, j] >= 0``, slot ``cache_len[r] + j`` takes the old
contents of slot ``cache_len[r] + path[r, j]`` (all layers, K and V, all heads). The tests poison the
whole cache with random bit patterns (NaNs included) and compare bit for bit against a plain Python
loop over a snapshot: every moved entry equals its source, and every other slot is untouched.
Layouts: a stacked tensor ``[layers, 2, R, H_kv, S, D]`` and per-layer lists (``(keys, values)``,
a list of ``(k, v)`` pairs, with and without a pointer table); bf16, fp16 and fp32.

Backends: ``torch`` and, when their modules exist, ``triton`` (``sjd_kernels.triton.tree_kv_update``;
CPU tensors under ``TRITON_INTERPRET=1``) and ``cuda`` (``sjd_kernels.cuda.tree_kv_update``), all
through the public op; shapes stay tiny so the Triton interpreter is quick.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_tree_verify import available_backends, backend_device  # noqa: E402

import sjd_kernels as sk  # noqa: E402
from sjd_kernels.reference import tree as ref  # noqa: E402

I64 = torch.int64
BACKENDS = available_backends("tree_kv_update")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
LAYERS, R, H, S, D = 3, 4, 2, 24, 8


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def poisoned(shape, dtype, seed, device="cpu"):
    """Random bit patterns (every value, NaNs and infinities included) of ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    it = BITS[dtype]
    lo, hi = (-(2 ** 15), 2 ** 15) if it == torch.int16 else (-(2 ** 31), 2 ** 31)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(it).view(dtype).to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(BITS[t.dtype])


def expected_stacked(kv: torch.Tensor, path: torch.Tensor, cache_len: torch.Tensor) -> torch.Tensor:
    """The specification as a loop over a snapshot: ``[layers, 2, R, H, S, D]``."""
    old = kv.detach().cpu().clone()
    new = old.clone()
    for r in range(path.shape[0]):
        for j in range(path.shape[1]):
            p = int(path[r, j])
            if p >= 0:
                new[:, :, r, :, int(cache_len[r]) + j] = old[:, :, r, :, int(cache_len[r]) + p]
    return new


def to_list(kv: torch.Tensor):
    return [kv[l, 0].clone() for l in range(kv.shape[0])], [kv[l, 1].clone() for l in range(kv.shape[0])]


def from_list(keys, values) -> torch.Tensor:
    return torch.stack([torch.stack([k.cpu(), v.cpu()]) for k, v in zip(keys, values)])


# path rows (padded with -1) and cache lengths
CASES = {
    # the overlapping case of SPEC section 5: nodes [0, 2, 3] into slots [0, 1, 2]
    "overlap_0_2_3": ([[0, 2, 3, -1]] * R, [3, 0, 7, 5]),
    # ragged: rows accepting nothing (root only), everything in place, deep moves
    "ragged": ([[0, -1, -1, -1], [0, 1, 2, 3], [0, 4, 9, 13], [0, -1, -1, -1]], [0, 6, 2, 10]),
    # padded entries in the middle (skipped) and a path from a K=3, depth 3 tree
    "padded": ([[0, 3, -1, 12], [0, 1, 5, -1], [0, 2, 8, 20], [-1, -1, -1, -1]], [1, 0, 3, 2]),
}


def _path(name):
    p, cl = CASES[name]
    return torch.tensor(p, dtype=I64), torch.tensor(cl, dtype=I64)


def _call(cache_form, kv, path, cache_len, backend, status=None, ptr=False):
    """Run the public op on ``kv`` given in ``cache_form``; return the resulting stacked cache (CPU)."""
    dev = backend_device(backend)
    kv = kv.to(dev)
    path, cache_len = path.to(dev), cache_len.to(dev)
    st = None if status is None else status.to(dev)
    if cache_form == "stacked":
        sk.tree_kv_update(kv, path, cache_len, status=st, backend=backend)
        out = kv.cpu()
    else:
        keys, values = to_list(kv)
        cache = (keys, values) if cache_form == "lists" else list(zip(keys, values))
        table = sk.kv_pointer_table(keys, values) if ptr else None
        sk.tree_kv_update(cache, path, cache_len, status=st, ptr_table=table, backend=backend)
        out = from_list(keys, values)
    if status is not None:
        status.copy_(st.cpu())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["stacked", "lists"])
def test_moves_bit_exact(form, case, dtype, backend):
    path, cache_len = _path(case)
    kv = poisoned((LAYERS, 2, R, H, S, D), dtype, seed=len(case) * 7 + DTYPES.index(dtype))
    want = expected_stacked(kv, path, cache_len)
    status = torch.zeros(4, dtype=torch.int32)
    own_status = case == "ragged"                                   # this case runs without a status buffer
    got = _call(form, kv.clone(), path, cache_len, backend, status=None if own_status else status)
    assert torch.equal(bits(got), bits(want)), "moved entries differ from their sources or other slots changed"
    if not own_status:
        assert int(status[0]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_forms_and_pointer_table(backend):
    path, cache_len = _path("overlap_0_2_3")
    kv = poisoned((LAYERS, 2, R, H, S, D), torch.bfloat16, seed=5)
    want = bits(expected_stacked(kv, path, cache_len))
    for form, ptr in (("pairs", False), ("lists", True)):
        got = _call(form, kv.clone(), path, cache_len, backend, ptr=ptr)
        assert torch.equal(bits(got), want), (form, ptr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_a_verified_tree(backend):
    """End to end: the path ``tree_verify`` returns moves exactly the accepted nodes' K/V."""
    B, V, K, Dp, W = R, 5, 3, 2, 3
    g = torch.Generator().manual_seed(9)
    q_state = torch.softmax(torch.randn(B, W + 1, V, generator=g), -1)
    q_kind = torch.zeros(B, W + 1, dtype=torch.int32)
    pos = torch.randint(0, 9, (B,), generator=g)
    seed = torch.arange(B, dtype=I64) * 1013 + 5
    step = torch.zeros(B, dtype=I64)
    tree = ref.build_tree(torch.zeros(B, dtype=I64), pos, seed, step, q_state, q_kind, K, Dp, W)
    logits = torch.log(q_state[:, :1]).expand(B, tree.num_nodes, V).contiguous()     # P close to q: long paths
    st = torch.zeros(4, dtype=torch.int32)
    na, path, _ = ref.tree_verify(logits, None, None, tree.tokens, tree.parent, tree.depth, tree.sib, tree.q_slot,
                                  pos, seed, step, None, q_state, q_kind, st, 1.0, 0, 1.0, tree.max_depth)
    assert bool((na >= 0).all())
    Sx = 4 + tree.num_nodes + 2
    cache_len = torch.tensor([4, 0, 2, 1], dtype=I64)
    kv = poisoned((2, 2, B, H, Sx, D), torch.float16, seed=10)
    got = _call("stacked", kv.clone(), path, cache_len, backend)
    for r in range(B):
        for j in range(int(na[r]) + 1):
            src = int(cache_len[r]) + int(path[r, j])
            assert torch.equal(bits(got[:, :, r, :, int(cache_len[r]) + j]), bits(kv[:, :, r, :, src]))
    assert torch.equal(bits(got), bits(expected_stacked(kv, path, cache_len)))


BAD = {
    "path_below_index": ([0, 0, 2, -1], 3),        # path[1] = 0 < 1: a source overwritten before it is read
    "source_past_cache": ([0, 2, 30, -1], 3),      # cache_len + 30 >= S
    "negative_cache_len": ([0, 1, 2, -1], -1),
    "cache_len_plus_path_wraps": ([-1, 5, -1, -1], 2 ** 63 - 3),   # the sum passes 2^63: not a slot
    "path_plus_cache_len_wraps": ([0, 2 ** 63 - 1, -1, -1], 1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("form", ["stacked", "lists"])
def test_bad_indices_raise_and_leave_cache_unchanged(form, name, backend):
    path, cache_len = _path("overlap_0_2_3")
    row, cl = BAD[name]
    path[2] = torch.tensor(row)
    cache_len[2] = cl
    kv = poisoned((LAYERS, 2, R, H, S, D), torch.bfloat16, seed=11)
    before = bits(kv)
    for status in (None, torch.zeros(4, dtype=torch.int32)):        # CPU tensors always check on the host
        if backend_device(backend) != "cpu" and status is not None:
            continue                                                 # device path: see the reference test below
        work = kv.clone().to(backend_device(backend))
        keys, values = to_list(work)                                 # the lists form's own tensors
        with pytest.raises(sk.SJDInputError, match="row\\(s\\) \\[2\\]"):
            if form == "stacked":
                sk.tree_kv_update(work, path.to(work.device), cache_len.to(work.device), status=status,
                                  backend=backend)
            else:
                sk.tree_kv_update((keys, values), path.to(work.device), cache_len.to(work.device), status=status,
                                  backend=backend)
        after = work if form == "stacked" else from_list(keys, values)
        assert torch.equal(bits(after), before), "the cache changed although the call raised"
        if status is not None:
            assert int(status[0]) == 0


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("form", ["stacked", "lists"])
def test_reference_skips_only_the_bad_row(form, name):
    """Without host checks (the device contract): the bad row is untouched, status bit 4 is set, the others move."""
    path, cache_len = _path("overlap_0_2_3")
    row, cl = BAD[name]
    path[2] = torch.tensor(row)
    cache_len[2] = cl
    kv = poisoned((LAYERS, 2, R, H, S, D), torch.float32, seed=12)
    good = path.clone()
    good[2] = -1
    want = expected_stacked(kv, good, cache_len.clamp(min=0))
    status = torch.zeros(4, dtype=torch.int32)
    if form == "stacked":
        got = kv.clone()
        ref.tree_kv_update(got, path, cache_len, status)
    else:
        keys, values = to_list(kv)
        ref.tree_kv_update_list(keys, values, path, cache_len, status)
        got = from_list(keys, values)
    assert torch.equal(bits(got), bits(want))
    assert int(status[0]) == ref.ERR_TREE_INDEX


def test_kv_moves_contract():
    path = torch.tensor([[0, 2, 3, -1], [0, 1, -1, -1], [0, 0, -1, -1]])
    move, src, dst, bad = ref.kv_moves(path, torch.tensor([5, 0, 1]), 16)
    assert move.tolist() == [[False, True, True, False], [False, False, False, False], [False] * 4]
    assert bad.tolist() == [False, False, True]
    assert src[0, 1:3].tolist() == [7, 8] and dst[0, 1:3].tolist() == [6, 7]


def test_argument_errors():
    kv = torch.zeros(LAYERS, 2, R, H, S, D, dtype=torch.bfloat16)
    path, cache_len = _path("overlap_0_2_3")
    with pytest.raises(sk.SJDInputError, match="cache must be"):
        sk.tree_kv_update(kv[:, :1], path, cache_len)
    with pytest.raises(sk.SJDInputError, match="path"):
        sk.tree_kv_update(kv, path.to(torch.int32), cache_len)
    with pytest.raises(sk.SJDInputError, match="cache_len"):
        sk.tree_kv_update(kv, path, cache_len[:2])
    keys, values = to_list(kv)
    with pytest.raises(sk.SJDInputError, match="equal length"):
        sk.tree_kv_update((keys, values[:-1]), path, cache_len)
    with pytest.raises(sk.SJDInputError, match="values\\[1\\]"):
        sk.tree_kv_update((keys, [values[0], values[1].float(), values[2]]), path, cache_len)
    with pytest.raises(sk.SJDInputError, match="cache must be a stacked tensor"):
        sk.tree_kv_update("cache", path, cache_len)


def test_caches_that_share_memory_are_refused():
    """A move applied through two views of the same memory would be applied twice: the same tensor
    listed twice, ``([k], [k])`` and a stride-0 stacked cache are refused before anything moves;
    K and V interleaved in one buffer (separate elements) are accepted."""
    kv = poisoned((2, 2, R, H, S, D), torch.float32, seed=20)
    path, cache_len = _path("overlap_0_2_3")
    keys, values = to_list(kv)
    before = [bits(t).clone() for t in keys + values]
    for cache in ([(keys[0], values[0]), (keys[0], values[0])], ([keys[0]], [keys[0]]),
                  ([keys[0], keys[1]], [values[0], keys[1][:, :, :]])):
        with pytest.raises(sk.SJDInputError, match="share memory"):
            sk.tree_kv_update(cache, path, cache_len)
    assert all(torch.equal(bits(t), b) for t, b in zip(keys + values, before))
    flat = torch.zeros(1, 2, R, H, S, D).expand(2, 2, R, H, S, D)
    with pytest.raises(sk.SJDInputError, match="share memory"):
        sk.tree_kv_update(flat, path, cache_len)
    # K and V interleaved: [R, H, S, 2, D] holds both; the views' extents intersect, their elements do not
    buf = poisoned((R, H, S, 2, D), torch.float32, seed=21)
    k, v = buf[:, :, :, 0], buf[:, :, :, 1]
    want = from_list([k.clone()], [v.clone()])
    want = expected_stacked(want, path, cache_len)
    sk.tree_kv_update(([k], [v]), path, cache_len)
    assert torch.equal(bits(from_list([k], [v])), bits(want))


def test_views_at_other_offsets_that_share_memory_are_refused():
    """Strided views of one buffer that start at different addresses: refused when some element is
    in both (layers sliced from a buffer with overlapping windows), accepted when the views only
    interleave (layers sliced from a layer-inner buffer), and the moves are then right."""
    path, cache_len = _path("overlap_0_2_3")
    base = poisoned((R, H, S + 1, D), torch.float32, seed=23)
    vbuf = poisoned((2, R, H, S + 1, D), torch.float32, seed=24)          # V with K's strides
    k0, k1 = base[:, :, :S], base[:, :, 1:]
    assert not k0.is_contiguous() and k0.data_ptr() != k1.data_ptr()
    before = bits(base).clone(), bits(vbuf).clone()
    with pytest.raises(sk.SJDInputError, match=r"keys\[0\] and keys\[1\] share memory"):
        sk.tree_kv_update(([k0, k1], [vbuf[0, :, :, :S], vbuf[1, :, :, :S]]), path, cache_len)
    assert torch.equal(bits(base), before[0]) and torch.equal(bits(vbuf), before[1])
    # three layers' K and V interleaved in [R, layers, 2, H, S, D]: every extent intersects every other
    buf = poisoned((R, 3, 2, H, S, D), torch.float32, seed=25)
    keys, values = [buf[:, i, 0] for i in range(3)], [buf[:, i, 1] for i in range(3)]
    want = expected_stacked(from_list([k.clone() for k in keys], [v.clone() for v in values]), path, cache_len)
    sk.tree_kv_update((keys, values), path, cache_len)
    assert torch.equal(bits(from_list(keys, values)), bits(want))


def test_a_cache_whose_elements_overlap_through_its_strides_is_refused():
    """torch._debug_has_internal_overlap answers 2 ("too hard to tell") for non-dense views; such a
    cache with overlapping elements (here head h's slot s + 1 is head h + 1's slot s) used to be
    accepted, and the GPU kernels, one block per (head group, layer and K/V, row), would race on it.
    A non-dense cache whose elements are distinct is still accepted and moved right."""
    Sx, Dx = 6, 2
    base = torch.arange(200, dtype=torch.float32)
    kv = base.as_strided((1, 2, 1, 2, Sx, Dx), (100, 50, 50, Dx, Dx, 1))
    assert torch._debug_has_internal_overlap(kv) == 2
    path, cache_len = torch.tensor([[0, 2, 3, -1]]), torch.tensor([1])
    for backend in ("torch", "triton"):
        with pytest.raises(sk.SJDInputError, match="cache has elements that share memory"):
            sk.tree_kv_update(kv, path, cache_len, backend=backend)
    assert torch.equal(base, torch.arange(200, dtype=torch.float32))
    ok = base.clone().as_strided((1, 2, 1, 2, Sx, Dx), (100, 50, 50, 13, Dx, 1))   # heads 13 apart: no overlap
    assert torch._debug_has_internal_overlap(ok) == 2
    want = expected_stacked(ok.clone(), path, cache_len)
    sk.tree_kv_update(ok, path, cache_len)
    assert torch.equal(bits(ok), bits(want))


def _random_layout(g, max_dims: int, strides: tuple):
    """A random small shape with strides in ``range(*strides)``, and the element offsets it lists."""
    nd = int(torch.randint(1, max_dims + 1, (1,), generator=g))
    shape = tuple(int(x) for x in torch.randint(1, 5, (nd,), generator=g))
    stride = tuple(int(x) for x in torch.randint(*strides, (nd,), generator=g))
    offs = [sum(i * st for i, st in zip(idx, stride)) for idx in itertools.product(*[range(n) for n in shape])]
    return shape, stride, offs


def test_self_overlap_equals_brute_force():
    """``_self_overlap`` (the verdict for strided caches torch cannot judge) against the offsets listed."""
    from sjd_kernels.ops.tree import _self_overlap
    g = torch.Generator().manual_seed(27)
    seen = {True: 0, False: 0}
    for _ in range(600):
        shape, stride, offs = _random_layout(g, 4, (0, 9))
        t = torch.zeros(200).as_strided(shape, stride)
        want = len(set(offs)) < len(offs)
        assert _self_overlap(t) is want, (shape, stride)
        seen[want] += 1
    assert seen[True] > 100 and seen[False] > 100, seen


def test_same_layout_overlap_search_equals_brute_force():
    """The overlap test of two same-layout views against the byte sets themselves, on random small
    shapes, strides (overlapping ones included), element sizes and offsets."""
    from sjd_kernels.ops.tree import _same_layout_views_overlap
    g = torch.Generator().manual_seed(26)
    seen = {True: 0, False: 0}
    for _ in range(400):
        shape, stride, offs = _random_layout(g, 3, (1, 13))
        esize = [1, 2, 4][int(torch.randint(0, 3, (1,), generator=g))]
        offsets = set(offs)
        a = {o * esize + b for o in offsets for b in range(esize)}
        for delta in range(-max(a) - 2, max(a) + 3):
            want = any((x + delta) in a for x in a)
            got = _same_layout_views_overlap(delta, shape, stride, esize)
            assert got is want, (shape, stride, esize, delta, got, want)
            seen[want] += 1
    assert seen[True] > 100 and seen[False] > 100, seen


def test_pointer_table_errors():
    kv = poisoned((2, 2, R, H, S, D), torch.float32, seed=22)
    path, cache_len = _path("overlap_0_2_3")
    keys, values = to_list(kv)
    with pytest.raises(sk.SJDInputError, match="non-empty lists of equal length"):
        sk.kv_pointer_table([], [])
    for bad in (None, kv, "kv"):
        with pytest.raises(sk.SJDInputError, match="keys must be a list of per-layer tensors"):
            sk.kv_pointer_table(bad, values)
    with pytest.raises(sk.SJDInputError, match="equal length"):
        sk.kv_pointer_table(keys, values[:1])
    other_k, other_v = to_list(kv)
    stale = sk.kv_pointer_table(other_k, other_v)        # built for other tensors
    before = [bits(t).clone() for t in keys + values]
    with pytest.raises(sk.SJDInputError, match="ptr_table does not hold"):
        sk.tree_kv_update((keys, values), path, cache_len, ptr_table=stale)
    assert all(torch.equal(bits(t), b) for t, b in zip(keys + values, before))


def test_cuda_launch_limits_are_input_errors():
    """Paths over 8192 entries (the CUDA kernel's shared copy) are refused by the op for backend 'cuda'."""
    from _util import sim_module
    from sjd_kernels.cuda import sim
    sim_module()
    kv = torch.zeros(1, 2, 1, 1, 9000, 4)
    path = torch.full((1, 8193), -1, dtype=I64)
    with sim.simulate("forward"):
        with pytest.raises(sk.SJDInputError, match="at most 65535 rows, 32767 layers and paths of 8192 entries, "
                                                   "got R = 1, 1 layers, P = 8193: use backend='triton' or 'torch'"):
            sk.tree_kv_update(kv, path, torch.zeros(1, dtype=I64), backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_more_rows_than_grid_z_are_input_errors(backend):
    """Both GPU kernels launch on grid (heads, 2 * layers, R): past 65535 rows the Triton one failed at launch
    (the CUDA message sent such inputs to it). Nothing is written."""
    from sjd_kernels.cuda import sim
    if backend == "cuda":
        from _util import sim_module
        sim_module()
    kv = torch.arange(2 * 65536 * 2, dtype=torch.float32).view(1, 2, 65536, 1, 2, 1)
    before = kv.clone()
    path = torch.ones((65536, 1), dtype=I64)              # slot 0 would receive node 1 (slot 1): a real move
    ctx = sim.simulate("forward") if backend == "cuda" else contextlib.nullcontext()
    with ctx, pytest.raises(sk.SJDInputError, match=f"the {'CUDA' if backend == 'cuda' else 'Triton'} kernel of "
                            f"tree_kv_update takes at most 65535 rows.*got R = 65536, 1 layers, P = 1: use "
                            f"backend='torch'$"):
        sk.tree_kv_update(kv, path, torch.zeros(65536, dtype=I64), backend=backend)
    assert torch.equal(kv, before)
