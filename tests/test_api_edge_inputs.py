"""Edge inputs to the public API: arguments of the wrong kind, huge Python ints, meta tensors, states
with malformed tensors, NumPy integer scalars. Each bad one is an SJDInputError naming the argument,
raised before any work (no model forward, nothing modified); valid ones behave as before."""
from fractions import Fraction

import numpy as np
import pytest
import torch

import sjd_kernels as sk
from sjd_kernels import SJDInputError
from sjd_kernels.decoding import generate
from sjd_kernels.decoding.cache import StaticKVCache
from sjd_kernels.models import GPT, GPTConfig
from sjd_kernels.ops._common import check_finite, check_status
from sjd_kernels.reference import jacobi_step as ref

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded

I64 = torch.int64
META = torch.device("meta")
HUGE = 10 ** 400          # beyond the float range: float(HUGE) overflows
N = 6


class Counting(GPT):
    calls = 0

    def forward(self, *a, **k):
        Counting.calls += 1
        return super().forward(*a, **k)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_image_tokens=N, num_classes=3)
    return Counting(cfg).double().eval()


COND = torch.tensor([0, 1])


def _gen(model, **kw):
    return generate(model, COND, N, kw.pop("method", "sjd"), window=kw.pop("window", 3), backend="torch",
                    progress=False, seed=[3, 4], **kw)


def _refused_before_forward(model, match, **kw):
    cond = COND.clone()
    Counting.calls = 0
    with pytest.raises(SJDInputError, match=match):
        _gen(model, **kw)
    assert Counting.calls == 0, f"{kw}: the model ran before the refusal"
    assert torch.equal(COND, cond)


def _state(B=2, W=3, V=16, vp=False):
    return sk.JacobiState.create(B, W, V, seed=[5 + i for i in range(B)], vp=vp)


def _tensors(st):
    return (st.q_state, st.q_kind, st.p_prev, st.seed, st.step, st.status, st.q_idx)


def _snapshot(st):
    return [t.clone() for t in _tensors(st)]


def _unchanged(st, snap):
    return all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(_tensors(st), snap))


def _with(st, **repl):
    d = dict(q_state=st.q_state, q_kind=st.q_kind, p_prev=st.p_prev, seed=st.seed, step=st.step, status=st.status)
    d.update(repl)
    return sk.JacobiState(**d)


# ------------------------------------------------------------------------------------ 1. generate's options
def test_generate_method_of_the_wrong_type(model):
    for method in (["sjd"], {"sjd": 1}, None, 3):
        _refused_before_forward(model, r"^method must be one of .*sjd", method=method)


def test_generate_on_step_not_callable_refused_before_forward(model):
    for on_step in (5, "print", [print]):
        _refused_before_forward(model, r"^on_step must be None or a callable", on_step=on_step)
    seen = []
    _gen(model, on_step=lambda tokens, n, cache: seen.append(n.clone()))
    assert seen and int(seen[-1].min()) == N


def test_generate_return_cache_must_be_a_bool(model):
    for flag in ("no", "", 1, 0, None, np.bool_(True)):
        _refused_before_forward(model, r"^return_cache must be True or False", return_cache=flag)
    assert isinstance(_gen(model, return_cache=True).cache, StaticKVCache)
    assert _gen(model, return_cache=False).cache is None


# ------------------------------------------------------------------------------------ 2. huge Python ints
def test_check_finite_beyond_the_float_range():
    for v in (HUGE, -HUGE, Fraction(HUGE, 3)):
        with pytest.raises(SJDInputError, match=r"^x must be a finite real number, got"):
            check_finite("x", v)
    assert check_finite("x", 10 ** 300) == 1e300 and check_finite("x", Fraction(1, 4)) == 0.25


def test_jacobi_step_huge_beta_and_vp_eps():
    st = _state(vp=True)
    pos = torch.tensor([0, 4])
    drafts = sk.init_window(st, pos, 3)
    logits = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
    win = torch.tensor([3, 2])
    snap = _snapshot(st)
    for kw, match in ((dict(beta=HUGE), r"^beta must be a finite real number"),
                      (dict(beta=-HUGE), r"^beta must be a finite real number"),
                      (dict(beta=0.5, vp_eps=HUGE), r"^vp_eps must be a finite real number")):
        with pytest.raises(SJDInputError, match=match):
            sk.jacobi_step(logits, drafts, win, pos, st, mode="vp", backend="torch", **kw)
        assert _unchanged(st, snap), kw
    out = sk.jacobi_step(logits, drafts, win, pos, st, mode="vp", beta=10 ** 3, backend="torch")
    assert out.tokens.shape == (2, 4)


def test_generate_huge_beta(model):
    for method in ("sjd_vp", "coupling"):
        _refused_before_forward(model, r"^beta must be a finite real number", method=method, beta=HUGE)


# ------------------------------------------------------------------------------------ 3. init_window's state
def test_init_window_checks_the_state_tensors():
    st = _state()
    pos = torch.tensor([0, 2])
    snap = _snapshot(st)
    bad = [
        (dict(step=torch.zeros(3, dtype=I64)), r"^state\.step must have shape \[2\]"),
        (dict(step=torch.zeros(2, dtype=torch.int32)), r"^state\.step must have dtype int64"),
        (dict(step=torch.zeros(2, 2, dtype=I64)[:, 0]), r"^state\.step must be contiguous"),
        (dict(seed=st.seed.double() + 0.7), r"^state\.seed must have dtype int64"),
        (dict(seed=st.seed.to(torch.int32)), r"^state\.seed must have dtype int64"),
        (dict(seed=st.seed.view(2, 1)), r"^state\.seed must be 1-D"),
        (dict(status=torch.zeros(3, dtype=torch.int32)), r"^state\.status must have shape \[4\]"),
        (dict(status=torch.zeros(4, dtype=I64)), r"^state\.status must have dtype int32"),
        (dict(step=torch.zeros(2, dtype=I64, device=META)), r"^state\.step must be on cpu"),
        (dict(q_kind=st.q_kind.to(I64)), r"^state\.q_kind must have dtype int32"),
        (dict(q_kind=st.q_kind[0]), r"^state\.q_kind must be 2-D"),
        (dict(q_kind=st.q_kind[:1]), r"^state\.q_kind must have shape \[2, None\]"),
    ]
    for repl, match in bad:
        with pytest.raises(SJDInputError, match=match):
            sk.init_window(_with(st, **repl), pos, 3)
        assert _unchanged(st, snap), match
    # a valid state: the same drafts and slot kinds as the reference
    kind = st.q_kind.clone()
    want = ref.init_window(st.seed, pos, st.step, 3, 16, kind)
    assert torch.equal(sk.init_window(st, pos, 3), want) and torch.equal(st.q_kind, kind)


def test_float_seeds_are_refused_integer_seeds_of_any_int_dtype_work():
    for seed in ([1.7], [1.0], 1.7, torch.tensor([1.7]), np.array([1.0]), np.float64(2.0)):
        with pytest.raises(SJDInputError, match=r"^seed must be an int or integers"):
            sk.JacobiState.create(1, 3, 16, seed=seed)
    for seed in ([7], 7, np.int64(7), torch.tensor([7], dtype=torch.int32), np.array([7], dtype=np.uint8),
                 torch.tensor([7], dtype=torch.int16)):
        st = sk.JacobiState.create(1, 3, 16, seed=seed)
        assert st.seed.dtype == I64 and st.seed.tolist() == [7]


# ------------------------------------------------------------------------------------ 4. meta tensors, huge sizes
def test_meta_seed_and_meta_status():
    with pytest.raises(SJDInputError, match=r"^seed must be .*meta tensor"):
        sk.JacobiState.create(1, 3, 16, seed=torch.tensor([1], device=META))
    st = sk.JacobiState.create(1, 3, 16, seed=torch.tensor([1], device=META), device=META)   # a shape-only state
    assert st.seed.is_meta and st.q_state.shape == (1, 4, 16)
    with pytest.raises(SJDInputError, match=r"^check_status takes a status tensor with values, got a meta"):
        check_status(torch.zeros(4, dtype=torch.int32, device=META))
    assert check_status(torch.zeros(4, dtype=torch.int32))["state_overflows"] == 0


def test_create_sizes_beyond_what_a_tensor_holds():
    for kw, match in ((dict(capacity=10 ** 30), r"capacity=10{30} out of range"),
                      (dict(batch=4, seed=[1, 2, 3, 4], ring=2 ** 31 - 1, vocab=2 ** 30),
                       r"^batch=4, window=3 \(ring 2147483647\), vocab=1073741824 out of range")):
        args = dict(batch=1, window=3, vocab=16, seed=[1]) | kw
        with pytest.raises(SJDInputError, match=match) as e:
            sk.JacobiState.create(args.pop("batch"), args.pop("window"), args.pop("vocab"), args.pop("seed"), **args)
        assert "a tensor holds at most 2^63 - 1" in str(e.value)


def test_create_sizes_beyond_what_the_kernels_take():
    """Sizes the kernels take as 32-bit ints (or, for lanes, walk in 32-bit steps) are refused by name,
    before the tensor-size check; the largest accepted ones make a shape-only (meta) state."""
    for kw, match in ((dict(window=10 ** 30), r"^window must be at most 65534, got 10{30}$"),
                      (dict(window=65535), r"^window must be at most 65534, got 65535$"),
                      (dict(vocab=10 ** 30), r"^vocab must be at most 1073741824, got 10{30}$"),
                      (dict(vocab=2 ** 30 + 1), r"^vocab must be at most 1073741824"),
                      (dict(ring=2 ** 31), r"^ring must be at most 2147483647, got 2147483648$"),
                      (dict(batch=2 ** 62, seed=0), r"^batch must be at most 2147483647, got 4611686018427387904$"),
                      (dict(batch=2 ** 31, seed=0), r"^batch must be at most 2147483647")):
        args = dict(batch=1, window=3, vocab=16, seed=[1]) | kw
        with pytest.raises(SJDInputError, match=match):
            sk.JacobiState.create(args.pop("batch"), args.pop("window"), args.pop("vocab"), args.pop("seed"), **args)
    st = sk.JacobiState.create(2 ** 31 - 1, 65534, 2 ** 30, seed=torch.zeros(2 ** 31 - 1, dtype=I64, device=META),
                               device=META, capacity=4)
    assert st.q_state.shape == (2 ** 31 - 1, 65535, 4) and st.vocab_size == 2 ** 30


def test_ops_refuse_sizes_beyond_what_the_kernels_take():
    """Batch and vocabulary sizes of the window tensors, tree logits, the SJD2 embedding width and the
    KV cache's head count and width are checked against the kernels' 32-bit sizes (shape-only meta
    tensors: nothing is allocated), as an SJDInputError naming the tensor and the dimension."""
    from sjd_kernels.ops._common import check_window_rows
    from sjd_kernels.sjd2 import sjd2_prepare
    for shape, match in (((1, 2, 2 ** 30 + 1), r"^logits has V = 1073741825 \(dimension 2 of \[1, 2, 1073741825\]\); "
                                               r"at most 1073741824 are supported$"),
                         ((2 ** 31, 2, 1), r"^logits has B = 2147483648 \(dimension 0")):
        with pytest.raises(SJDInputError, match=match):
            check_window_rows("logits", torch.empty(shape, device=META))
        st = sk.JacobiState.create(1, 1, 1, seed=[1], device=META)
        with pytest.raises(SJDInputError, match=match):
            sk.jacobi_step(torch.empty(shape, device=META), torch.zeros(1, 1, dtype=I64, device=META),
                           torch.zeros(1, dtype=I64, device=META), torch.zeros(1, dtype=I64, device=META), st)
        z = torch.zeros(shape[0] if shape[0] < 2 ** 31 else 1, 2, dtype=I64, device=META)
        tree = sk.TreeLayout(z, z, z, z, z, 1)
        with pytest.raises(SJDInputError, match=match):
            sk.tree_verify(torch.empty(shape, device=META), tree, torch.zeros(1, dtype=I64, device=META), st)
    big = torch.empty(2 ** 31 - 1, 1, 2 ** 30, dtype=torch.bfloat16, device=META)
    assert check_window_rows("logits", big) == (2 ** 31 - 1, 1, 2 ** 30)
    with pytest.raises(SJDInputError, match=r"^embed_weight has d = 1073741825 \(dimension 1"):
        z = torch.zeros(1, device=META)
        sjd2_prepare(torch.empty(4, 2 ** 30 + 1, device=META), z, z, z, z, z, *(torch.zeros(1, 1, dtype=I64),) * 2,
                     *(torch.zeros(1, dtype=I64),) * 4, torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.int32))
    m = dict(device=META)
    z, i = torch.zeros(1, **m), torch.zeros(1, dtype=I64, **m)
    with pytest.raises(SJDInputError, match=r"^alpha has K \+ 1 = 2147483648 \(dimension 0"):
        sjd2_prepare(torch.empty(4, 1, **m), z, z, z, torch.empty(2 ** 31, **m), z, *(i.view(1, 1),) * 2, i, i, i, i,
                     torch.zeros(1, 1, 1, **m), torch.zeros(1, 1, dtype=torch.int32, **m))
    for shape, match in (((1, 2, 1, 2 ** 31, 4, 8), r"^cache has H_kv = 2147483648 \(dimension -3"),
                         ((1, 2, 1, 1, 4, 2 ** 30 + 1), r"^cache has D = 1073741825 \(dimension -1")):
        with pytest.raises(SJDInputError, match=match):
            sk.tree_kv_update(torch.empty(shape, device=META), torch.zeros(1, 2, dtype=I64, device=META),
                              torch.zeros(1, dtype=I64, device=META), status=torch.zeros(4, dtype=torch.int32,
                                                                                         device=META))


def test_cache_len_beyond_what_a_tensor_holds(model):
    _refused_before_forward(model, r"^cache_len=10{30} out of range", cache_len=10 ** 30)
    _refused_before_forward(model, r"^cache_len=1152921504606846976 out of range", cache_len=2 ** 60)
    with pytest.raises(SJDInputError, match=r"^max_len=10{30} out of range"):
        StaticKVCache(1, 1, 1, 10 ** 30, 1)
    assert _gen(model, cache_len=64, return_cache=True).cache.max_len == 64


# ------------------------------------------------------------------------------------ 5. NumPy integer scalars
def test_create_capacity_takes_numpy_integers():
    a = sk.JacobiState.create(2, 3, 16, seed=[1, 2], capacity=np.int64(4))
    b = sk.JacobiState.create(2, 3, 16, seed=[1, 2], capacity=4)
    assert a.sparse and all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))
    for bad in (4.0, np.float64(4.0), True, np.bool_(True), np.int64(0), "4"):
        with pytest.raises(SJDInputError, match=r"^capacity must be a positive int"):
            sk.JacobiState.create(2, 3, 16, seed=[1, 2], capacity=bad)


def test_generate_state_capacity_and_tree_options_take_numpy_integers(model):
    a = _gen(model, state_capacity=np.int64(8), top_k=4)
    b = _gen(model, state_capacity=8, top_k=4)
    assert torch.equal(a.tokens, b.tokens) and a.stats.state_bytes == b.stats.state_bytes
    a = _gen(model, method="pac", tree_width=np.int64(2), tree_depth=np.int32(1))
    b = _gen(model, method="pac", tree_width=2, tree_depth=1)
    assert torch.equal(a.tokens, b.tokens) and a.stats.tree_nodes == b.stats.tree_nodes
    for kw, match in ((dict(state_capacity=8.0), "state_capacity must be a positive int"),
                      (dict(state_capacity=np.float64(8.0)), "state_capacity must be a positive int"),
                      (dict(state_capacity=True), "state_capacity must be a positive int"),
                      (dict(method="pac", tree_width=np.float64(2.0)), "tree_width must be an int in"),
                      (dict(method="pac", tree_width=True), "tree_width must be an int in"),
                      (dict(method="pac", tree_depth=np.float32(1.0)), "tree_depth must be an int >= 0"),
                      (dict(method="pac", tree_depth=False), "tree_depth must be an int >= 0")):
        _refused_before_forward(model, "^" + match, **kw)


def test_shape_only_calls_without_a_status():
    """Meta tensors carry no values: ``sjd2_prepare`` and ``tree_kv_update`` without a status skip the host
    checks they run for GPU tensors (there is nothing to read) and answer with shapes."""
    import test_sjd2 as t2

    from sjd_kernels.sjd2 import sjd2_prepare
    c = {k: v.to(META) for k, v in t2._prepare_case().items()}
    out = sjd2_prepare(**c, backend="torch")
    assert out.is_meta and tuple(out.shape) == (3, 7, 24)
    sk.tree_kv_update(torch.empty(1, 2, 2, 1, 8, 4, device=META), torch.zeros(2, 3, dtype=I64, device=META),
                      torch.zeros(2, dtype=I64, device=META), backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_zero_input_slots_and_zero_cache_rows(backend):
    """sjd2_prepare with no input slot (N = 0) returns [B, 0, d] and leaves the ring alone; tree_kv_update
    with no model row (R = 0) moves nothing. Both used to crash in the reference (a gather from an empty
    dim; a view(-1) of 0 elements), which the Triton wrapper also calls for these shapes."""
    import contextlib
    import os
    from sjd_kernels.ops.sjd2_prepare import sjd2_prepare
    ctx = contextlib.nullcontext()
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if backend == "cuda":
        from _util import sim_module
        from sjd_kernels.cuda import sim
        sim_module()
        ctx = sim.simulate("reverse")
    Vt, d, K, B, R = 12, 4, 3, 2, 6
    alpha = torch.tensor([1.0, 0.9, 0.6, 0.2])
    latent, level = torch.randn(B, R, d), torch.arange(B * R, dtype=torch.int32).view(B, R) % (K + 1)
    lat0, lev0 = latent.clone(), level.clone()
    z = torch.zeros(B, 0, dtype=I64)
    with ctx:
        out = sjd2_prepare(torch.randn(Vt, d), torch.zeros(d), torch.ones(d), torch.zeros(K + 1, d), alpha,
                           (1 - alpha ** 2).sqrt(), z, z.clone(), torch.tensor([1, 2]), torch.tensor([0, 3]),
                           torch.tensor([0, 3]), torch.tensor([0, 3]), latent, level, backend=backend)
        assert out.shape == (B, 0, d)
        assert torch.equal(latent, lat0) and torch.equal(level, lev0)
        st = torch.zeros(4, dtype=torch.int32)
        kv = torch.randn(1, 2, 0, 1, 4, 2)
        sk.tree_kv_update(kv, torch.empty(0, 3, dtype=I64), torch.empty(0, dtype=I64), status=st, backend=backend)
        sk.tree_kv_update(([torch.randn(0, 1, 4, 2)], [torch.randn(0, 1, 4, 2)]), torch.empty(0, 3, dtype=I64),
                          torch.empty(0, dtype=I64), status=st, backend=backend)
        assert st.tolist() == [0, 0, 0, 0]
