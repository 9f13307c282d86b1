"""``sjd_kernels.jacobi_step`` at its boundary: bad arguments, device errors, shapes from tiny to large.

- Every malformed argument raises ``SJDInputError`` whose message names the argument, and the
  state is left untouched.
- Non-finite logits and out-of-range draft ids are device errors: the request returns -1,
  ``check_status`` raises ``SJDDeviceError``, and the other requests get exactly what they get
  in a batch without the bad request.
- W from 0 to 128, B from 1 to 64, V from 1 up: outputs are always well formed.
"""
from __future__ import annotations

import os

import pytest
import torch

import sjd_kernels as sk
from sjd_kernels import SJDDeviceError, SJDInputError

I64 = torch.int64


def _backends():
    """``SJD_LAW_BACKENDS`` (default torch), the same knob as the law tests: (backend, device) pairs."""
    names = [b.strip() for b in os.environ.get("SJD_LAW_BACKENDS", "torch").split(",") if b.strip()]
    return [pytest.param((b, os.environ.get("SJD_LAW_DEVICE", "cpu" if b == "torch" else "cuda")), id=b)
            for b in names]


BACKENDS = _backends()


def _setup(B=3, W=4, V=9, vp=False, seed0=11, step0=0, pos=None):
    st = sk.JacobiState.create(B, W, V, seed=[seed0 + 13 * i for i in range(B)], vp=vp)
    st.step.fill_(step0)
    pos = torch.tensor([0, 5, 17, 2, 9, 30, 1, 4][:B], dtype=I64) if pos is None else pos
    drafts = sk.init_window(st, pos, W)
    g = torch.Generator().manual_seed(seed0)
    logits = torch.randn(B, W + 1, V, generator=g) * 2
    win = torch.tensor([W, max(W - 2, 0), 1, W, 0, W, 2, W][:B], dtype=I64).clamp(max=W)
    return st, logits, drafts, win, pos


def _snapshot(st):
    return [t.clone() for t in (st.q_state, st.q_kind, st.p_prev, st.seed, st.step, st.status)]


def _unchanged(st, snap):
    return all(torch.equal(a, b) for a, b in zip((st.q_state, st.q_kind, st.p_prev, st.seed, st.step, st.status), snap))


def _call(st, logits, drafts, win, pos, **kw):
    return sk.jacobi_step(logits, drafts, win, pos, st, **kw)


def _with_state(st, **repl):
    d = dict(q_state=st.q_state, q_kind=st.q_kind, p_prev=st.p_prev, seed=st.seed, step=st.step, status=st.status)
    d.update(repl)
    return sk.JacobiState(**d)


META = torch.device("meta")


def _vp_state():
    return sk.JacobiState.create(3, 4, 9, [1, 2, 3], vp=True)

# (id, argument name expected in the message, function (st, logits, drafts, win, pos) -> call kwargs overrides)
BAD = [
    ("logits_int", "logits", lambda s, l, d, w, p: dict(logits=l.to(I64))),
    ("logits_f64", "logits", lambda s, l, d, w, p: dict(logits=l.double())),
    ("logits_2d", "logits", lambda s, l, d, w, p: dict(logits=l[:, 0])),
    ("logits_strided_lanes", "logits", lambda s, l, d, w, p: dict(logits=torch.randn(3, 5, 18)[..., ::2])),
    ("logits_list", "logits", lambda s, l, d, w, p: dict(logits=l.tolist())),
    ("uncond_shape", "uncond_logits", lambda s, l, d, w, p: dict(uncond_logits=l[:, :-1], cfg_scale=torch.ones(3))),
    ("uncond_dtype", "uncond_logits", lambda s, l, d, w, p: dict(uncond_logits=l.to(I64), cfg_scale=torch.ones(3))),
    ("uncond_no_scale", "cfg_scale", lambda s, l, d, w, p: dict(uncond_logits=l.clone())),
    ("scale_no_uncond", "uncond_logits", lambda s, l, d, w, p: dict(cfg_scale=torch.full((3,), 3.0))),
    ("cfg_scale_dtype", "cfg_scale",
     lambda s, l, d, w, p: dict(uncond_logits=l.clone(), cfg_scale=torch.ones(3, dtype=torch.float64))),
    ("cfg_scale_shape", "cfg_scale", lambda s, l, d, w, p: dict(uncond_logits=l.clone(), cfg_scale=torch.ones(2))),
    ("drafts_int32", "drafts", lambda s, l, d, w, p: dict(drafts=d.to(torch.int32))),
    ("drafts_shape", "drafts", lambda s, l, d, w, p: dict(drafts=d[:, :-1].contiguous())),
    ("drafts_device", "drafts", lambda s, l, d, w, p: dict(drafts=torch.empty(d.shape, dtype=I64, device=META))),
    ("win_len_dtype", "win_len", lambda s, l, d, w, p: dict(win=w.to(torch.int32))),
    ("win_len_shape", "win_len", lambda s, l, d, w, p: dict(win=w[:2])),
    ("pos_dtype", "pos", lambda s, l, d, w, p: dict(pos=p.float())),
    ("pos_shape", "pos", lambda s, l, d, w, p: dict(pos=p.view(3, 1))),
    ("pos_device", "pos", lambda s, l, d, w, p: dict(pos=torch.empty(3, dtype=I64, device=META))),
    ("q_state_vocab", "q_state", lambda s, l, d, w, p: dict(st=_with_state(s, q_state=torch.zeros(3, 5, 8)))),
    ("q_state_dtype", "q_state", lambda s, l, d, w, p: dict(st=_with_state(s, q_state=s.q_state.half()))),
    ("q_kind_dtype", "q_kind", lambda s, l, d, w, p: dict(st=_with_state(s, q_kind=s.q_kind.long()))),
    ("q_kind_shape", "q_kind", lambda s, l, d, w, p: dict(st=_with_state(s, q_kind=s.q_kind[:, :-1].contiguous()))),
    ("p_prev_shape", "p_prev", lambda s, l, d, w, p: dict(st=_with_state(s, p_prev=torch.zeros(3, 5, 4)))),
    ("seed_shape", "seed", lambda s, l, d, w, p: dict(st=_with_state(s, seed=s.seed[:1]))),
    ("seed_dtype", "seed", lambda s, l, d, w, p: dict(st=_with_state(s, seed=s.seed.int()))),
    ("step_dtype", "step", lambda s, l, d, w, p: dict(st=_with_state(s, step=s.step.float()))),
    ("status_shape", "status", lambda s, l, d, w, p: dict(st=_with_state(s, status=torch.zeros(3, dtype=torch.int32)))),
    ("forced_dtype", "forced", lambda s, l, d, w, p: dict(forced=torch.full((3, 40), -1, dtype=torch.int32))),
    ("forced_shape", "forced", lambda s, l, d, w, p: dict(forced=torch.full((2, 40), -1, dtype=I64))),
    ("ring_too_small", "ring",                      # a state made for W = 4 used with W = 5
     lambda s, l, d, w, p: dict(logits=torch.randn(3, 6, 9), drafts=torch.zeros(3, 5, dtype=I64))),
    ("top_k_above_V", "top_k", lambda s, l, d, w, p: dict(top_k=10)),
    ("top_k_negative", "top_k", lambda s, l, d, w, p: dict(top_k=-1)),
    ("top_k_float", "top_k", lambda s, l, d, w, p: dict(top_k=2.5)),
    ("top_p_zero", "top_p", lambda s, l, d, w, p: dict(top_p=0.0)),
    ("top_p_above_1", "top_p", lambda s, l, d, w, p: dict(top_p=1.5)),
    ("top_p_nan", "top_p", lambda s, l, d, w, p: dict(top_p=float("nan"))),
    ("temperature_negative", "temperature", lambda s, l, d, w, p: dict(temperature=-0.5)),
    ("temperature_nan", "temperature", lambda s, l, d, w, p: dict(temperature=float("nan"))),
    ("temperature_inf", "temperature", lambda s, l, d, w, p: dict(temperature=float("inf"))),
    ("temperature_tiny", "temperature", lambda s, l, d, w, p: dict(temperature=1e-39)),
    ("mode_unknown", "mode", lambda s, l, d, w, p: dict(mode="fast")),
    ("beta_with_gumbel", "beta", lambda s, l, d, w, p: dict(st=_vp_state(), mode="gumbel", beta=0.5)),
    ("beta_with_gumbel_jacobi", "beta", lambda s, l, d, w, p: dict(st=_vp_state(), mode="gumbel_jacobi", beta=0.5)),
    ("beta_without_vp_state", "beta", lambda s, l, d, w, p: dict(mode="vp", beta=0.5)),
    ("vp_form_unknown", "vp_form", lambda s, l, d, w, p: dict(vp_form="mul")),
    ("tail_init_unknown", "tail_init", lambda s, l, d, w, p: dict(tail_init="right")),
    ("backend_unknown", "backend", lambda s, l, d, w, p: dict(backend="fastest")),
    ("pos_negative", "pos", lambda s, l, d, w, p: dict(pos=torch.tensor([0, -1, 2]))),
    ("pos_past_2_62", "pos", lambda s, l, d, w, p: dict(pos=torch.tensor([0, 2 ** 62 + 1, 2]))),
    ("beta_nan", "beta", lambda s, l, d, w, p: dict(st=_vp_state(), mode="vp", beta=float("nan"))),
    ("beta_inf", "beta", lambda s, l, d, w, p: dict(st=_vp_state(), mode="vp", beta=float("inf"), vp_form="add")),
    ("beta_none", "beta", lambda s, l, d, w, p: dict(beta=None)),
    ("vp_eps_zero", "vp_eps", lambda s, l, d, w, p: dict(st=_vp_state(), mode="vp", beta=0.5, vp_eps=0.0)),
    ("vp_eps_nan", "vp_eps", lambda s, l, d, w, p: dict(vp_eps=float("nan"))),
    ("vp_eps_str", "vp_eps", lambda s, l, d, w, p: dict(vp_eps="x")),
    ("top_k_bool", "top_k", lambda s, l, d, w, p: dict(top_k=True)),
    ("top_p_str", "top_p", lambda s, l, d, w, p: dict(top_p="0.9")),
    ("top_p_none", "top_p", lambda s, l, d, w, p: dict(top_p=None)),
    ("mode_list", "mode", lambda s, l, d, w, p: dict(mode=["sjd"])),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument_and_leaves_state(case):
    _, name, fn = case
    st, logits, drafts, win, pos = _setup()
    over = fn(st, logits, drafts, win, pos)
    target = over.pop("st", st)
    snap = _snapshot(target)
    args = dict(logits=over.pop("logits", logits), drafts=over.pop("drafts", drafts), win=over.pop("win", win),
                pos=over.pop("pos", pos))
    with pytest.raises(SJDInputError, match=name) as ei:
        _call(target, args["logits"], args["drafts"], args["win"], args["pos"], **over)
    print(f"{case[0]}: {ei.value}")
    assert _unchanged(target, snap), "state changed by a call that was refused"


def test_state_create_errors():
    with pytest.raises(SJDInputError, match="ring"):
        sk.JacobiState.create(2, 4, 9, seed=[1, 2], ring=4)
    with pytest.raises(SJDInputError, match="seed"):
        sk.JacobiState.create(2, 4, 9, seed=5)
    with pytest.raises(SJDInputError, match="seed"):
        sk.JacobiState.create(3, 4, 9, seed=[1, 2])
    for kw, name in ((dict(seed=[1.7, 2.9]), "seed"), (dict(seed=torch.tensor([1.0, 2.0])), "seed"),
                     (dict(seed=torch.tensor([[1, 2]])), "seed"), (dict(seed=[2 ** 64, 1]), "seed"),
                     (dict(seed=["a", "b"]), "seed"), (dict(window=-1), "window"), (dict(window=-5), "window"),
                     (dict(vocab=0), "vocab"), (dict(vocab=-3), "vocab"), (dict(vocab=9.0), "vocab"),
                     (dict(batch=0, seed=[]), "batch"), (dict(ring=5.5), "ring")):
        args = dict(batch=2, window=4, vocab=9, seed=[1, 2]) | kw
        with pytest.raises(SJDInputError, match=name):
            sk.JacobiState.create(args.pop("batch"), args.pop("window"), args.pop("vocab"), args.pop("seed"), **args)
    import numpy as np
    st = sk.JacobiState.create(np.int64(2), 4, 9, seed=np.array([1, 2]))   # NumPy integers are integers
    assert st.q_state.shape == (2, 5, 9) and st.seed.tolist() == [1, 2]


def test_init_window_errors():
    st = sk.JacobiState.create(2, 4, 8, seed=[5, 18])
    pos = torch.tensor([0, 2])
    snap = _snapshot(st)
    for kw, name in ((dict(window=5), "window"), (dict(window=-1), "window"), (dict(window=2.0), "window"),
                     (dict(pos=pos.float()), "pos"), (dict(pos=torch.tensor([0, 1, 2])), "pos"),
                     (dict(pos=[0, 2]), "pos"), (dict(pos=torch.empty(2, dtype=I64, device=META)), "pos"),
                     (dict(pos=torch.tensor([-2, 0])), "pos"), (dict(pos=torch.tensor([0, 2 ** 63 - 2])), "pos"),
                     (dict(forced=torch.full((3, 6), -1)), "forced"), (dict(forced=torch.full((6,), -1)), "forced"),
                     (dict(forced=torch.full((2, 6), -1.0)), "forced")):
        args = dict(pos=pos, window=4) | kw
        with pytest.raises(SJDInputError, match=name):
            sk.init_window(st, args.pop("pos"), args.pop("window"), **args)
        assert _unchanged(st, snap), f"{kw}: state changed by a refused call"
    with pytest.raises(SJDInputError, match="state"):
        sk.init_window(None, pos, 4)
    assert sk.init_window(st, pos, 4).shape == (2, 4)


def test_state_of_the_wrong_type_and_odd_status_words():
    st, logits, drafts, win, pos = _setup()
    for bad in (None, {"q_state": st.q_state}):
        with pytest.raises(SJDInputError, match="state must be a JacobiState"):
            _call(bad, logits, drafts, win, pos)
    with pytest.raises(SJDInputError, match="pass state.status"):
        sk.check_status(st)
    for t in (torch.zeros(2, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32), torch.zeros(4)):
        with pytest.raises(SJDInputError, match="int32 \\[4\\]"):
            sk.check_status(t)
    with pytest.raises(SJDDeviceError, match="unknown error bits 0x40"):
        sk.check_status(torch.tensor([64 | 8, 0, 0, 0], dtype=torch.int32))
    with pytest.raises(SJDDeviceError, match="win_len outside"):
        sk.check_status(torch.tensor([8, 0, 0, 0], dtype=torch.int32))
    import numpy as np
    o = _call(st, logits, drafts, win, pos, top_k=np.int64(5))             # NumPy integers are integers
    sk.check_status(st.status)
    assert (o.num_accepted >= 0).all()


@pytest.mark.parametrize("where", ["p_prev", "q_idx", "q_state_sparse"])
def test_edited_state_is_refused_on_the_cpu(where):
    """The stored laws a step reads must be what the ops write: an edited ``p_prev`` (VP), a sparse
    lane id outside [0, V) or a negative sparse value is an SJDInputError naming the (request, slot);
    the state is left as it was. (``q_state`` / ``q_kind`` of the dense form: test_tree_verify.)"""
    B, W, V = 3, 4, 9
    st = sk.JacobiState.create(B, W, V, seed=[1, 2, 3], vp=where == "p_prev",
                               capacity=None if where == "p_prev" else 5)
    pos = torch.tensor([0, 5, 17])
    drafts = sk.init_window(st, pos, W)
    logits = torch.randn(B, W + 1, V, generator=torch.Generator().manual_seed(4))
    win = torch.tensor([W, 2, 1])
    kw = dict(mode="vp", beta=0.5) if where == "p_prev" else dict(top_k=4)
    o = sk.jacobi_step(logits, drafts, win, pos, st, **kw)                    # a valid state: runs
    sk.check_status(st.status)
    pos = pos + o.num_accepted + 1
    if where == "p_prev":
        st.p_prev[2, 1, 0] = float("nan")
        msg = "p_prev holds NaN, infinite or negative values at \\(request, slot\\) \\[\\[2, 1\\]\\]"
    elif where == "q_idx":
        st.q_idx[0, 3, 1] = V
        msg = "q_idx holds lane ids outside \\[0, V=9\\) at \\(request, slot\\) \\[\\[0, 3\\]\\]"
    else:
        st.q_state[1, 4, 0] = -1.0
        msg = "q_state holds NaN, infinite or negative values at \\(request, slot\\) \\[\\[1, 4\\]\\]"
    snap = [t.clone() for t in (st.q_state.view(torch.int32), st.p_prev.view(torch.int32), st.q_idx, st.q_kind,
                                st.step, st.status)]
    with pytest.raises(SJDInputError, match=msg):
        sk.jacobi_step(logits, o.next_drafts, win, pos, st, **kw)
    now = (st.q_state.view(torch.int32), st.p_prev.view(torch.int32), st.q_idx, st.q_kind, st.step, st.status)
    assert all(torch.equal(a, b) for a, b in zip(now, snap)), "a refused call changed the state"


def _vp_overflow_run(backend, beta, vp_form, sim=False):
    """Two VP steps whose second has a prediction that overflows float32 (a huge beta)."""
    B, W, V = 2, 3, 12
    st = sk.JacobiState.create(B, W, V, seed=[5, 9], vp=True)
    pos = torch.tensor([0, 4])
    win = torch.tensor([3, 2])
    g = torch.Generator().manual_seed(3)
    l1, l2 = torch.randn(B, W + 1, V, generator=g) * 3, torch.randn(B, W + 1, V, generator=g) * 3
    d = sk.init_window(st, pos, W)

    def run():
        o = sk.jacobi_step(l1, d, win, pos, st, mode="vp", beta=0.5, vp_form=vp_form, backend=backend)
        return sk.jacobi_step(l2, o.next_drafts, win, pos + o.num_accepted + 1, st, mode="vp", beta=beta,
                              vp_form=vp_form, backend=backend)
    if sim:
        from _util import sim_module
        from sjd_kernels.cuda import sim as S
        sim_module()
        with S.simulate("reverse"):
            o = run()
    else:
        o = run()
    return o, st


@pytest.mark.parametrize("beta,vp_form", [(100.0, "log"), (1e30, "log"), (-100.0, "log")])
def test_vp_overflow_keeps_the_target_law(beta, vp_form):
    """A prediction whose weights overflow float32 falls back to the target row itself in every
    backend: valid drafts, no NaN in the state, a clean status, the same tokens everywhere."""
    o, st = _vp_overflow_run("torch", beta, vp_form)
    sk.check_status(st.status)
    assert ((o.next_drafts >= 0) & (o.next_drafts < 12)).all()
    assert not bool(torch.isnan(st.q_state).any()) and not bool(torch.isnan(st.p_prev).any())
    others = []
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.importorskip("triton")
        others.append(("triton", False))
    others.append(("cuda", True))
    for be, sim in others:
        o2, st2 = _vp_overflow_run(be, beta, vp_form, sim=sim)
        sk.check_status(st2.status)
        for a, b in ((o.num_accepted, o2.num_accepted), (o.tokens, o2.tokens), (o.next_drafts, o2.next_drafts),
                     (st.q_kind, st2.q_kind)):
            assert torch.equal(a, b), be
        assert torch.allclose(st.q_state, st2.q_state, atol=1e-6), be


def test_good_variants_are_accepted():
    """A vocabulary-slice view (last dim contiguous), bf16/fp16 logits, CFG, a larger ring."""
    st, logits, drafts, win, pos = _setup()
    big = torch.randn(3, 5, 20)
    view = big[..., 4:13]
    assert not view.is_contiguous()
    a = _call(st, view, drafts, win, pos, advance=False)
    st2, *_ = _setup()
    b = _call(st2, view.contiguous(), drafts, win, pos, advance=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.next_drafts, b.next_drafts)
    for dt in (torch.bfloat16, torch.float16):
        st, logits, drafts, win, pos = _setup()
        o = _call(st, logits.to(dt), drafts, win, pos, uncond_logits=logits.flip(-1).to(dt),
                  cfg_scale=torch.full((3,), 3.0))
        sk.check_status(st.status)
        assert ((o.num_accepted >= 0) & (o.num_accepted <= win)).all()
    st = sk.JacobiState.create(3, 4, 9, seed=[1, 2, 3], ring=11)
    pos = torch.tensor([0, 8, 23])
    o = _call(st, torch.randn(3, 5, 9), sk.init_window(st, pos, 4), torch.tensor([4, 4, 4]), pos)
    sk.check_status(st.status)


# ----------------------------------------------------------------------------- device errors

def _bad_logits(kind, logits, b, row):
    out = logits.clone()
    if kind == "nan":
        out[b, row, 2] = float("nan")
    elif kind == "posinf":
        out[b, row, 0] = float("inf")
    else:
        out[b, row, :] = float("-inf")
    return out


def _run_batch(idx, logits, drafts, win, pos, seeds, step0=0, mode="sjd", vp=False, beta=0.0, be=("torch", "cpu")):
    """One step for the requests ``idx`` on backend ``be = (name, device)``; outputs and state back on the CPU."""
    B, W1, V = logits.shape
    name, dev = be
    st = sk.JacobiState.create(len(idx), W1 - 1, V, seed=seeds[idx], vp=vp, device=dev)
    st.step.fill_(step0)
    sk.init_window(st, pos[idx].to(dev), W1 - 1)
    o = sk.jacobi_step(logits[idx].to(dev), drafts[idx].to(dev), win[idx].to(dev), pos[idx].to(dev), st, mode=mode,
                       beta=beta, top_k=6, backend=name)
    o = sk.JacobiOutput(*(t.cpu() for t in (o.num_accepted, o.tokens, o.next_drafts)))
    return o, sk.JacobiState(*(t.cpu() for t in (st.q_state, st.q_kind, st.p_prev, st.seed, st.step, st.status)))


@pytest.mark.parametrize("mode,vp,beta", [("sjd", False, 0.0), ("coupling", True, 0.5), ("gumbel", False, 0.0),
                                          ("gumbel_jacobi", False, 0.0)])
@pytest.mark.parametrize("kind", ["nan", "posinf", "all_neginf", "draft_high", "draft_negative"])
@pytest.mark.parametrize("be", BACKENDS)
def test_device_error_isolated_to_its_request(kind, mode, vp, beta, be):
    B, W, V = 5, 4, 9
    g = torch.Generator().manual_seed(21)
    seeds = torch.tensor([3, 1 << 33, 77, 5, 12], dtype=I64)
    pos = torch.tensor([0, 6, 2, 11, 4], dtype=I64)
    win = torch.tensor([4, 3, 4, 2, 4], dtype=I64)
    logits = torch.randn(B, W + 1, V, generator=g) * 2
    st0 = sk.JacobiState.create(B, W, V, seed=seeds)
    drafts = sk.init_window(st0, pos, W)
    bad = 2
    if kind in ("nan", "posinf", "all_neginf"):
        logits = _bad_logits(kind, logits, bad, 3)
        code = "non-finite"
    else:
        drafts = drafts.clone()
        drafts[bad, 1] = V if kind == "draft_high" else -1
        code = "draft id"
    allb = torch.arange(B)
    o, st = _run_batch(allb, logits, drafts, win, pos, seeds, mode=mode, vp=vp, beta=beta, be=be)
    assert int(o.num_accepted[bad]) == -1
    assert (o.tokens[bad] == -1).all() and (o.next_drafts[bad] == -1).all()
    with pytest.raises(SJDDeviceError, match=code):
        sk.check_status(st.status)
    assert int(st.status[0]) == 0, "check_status clears the status"
    if be[0] == "torch":    # the reference leaves the bad request's state unwritten (fused kernels: undefined)
        fresh = sk.JacobiState.create(B, W, V, seed=seeds, vp=vp)
        sk.init_window(fresh, pos, W)
        assert torch.equal(st.q_kind[bad], fresh.q_kind[bad]) and torch.equal(st.q_state[bad], fresh.q_state[bad])
    # the other requests get exactly what they get in a batch without the bad one
    good = torch.tensor([i for i in range(B) if i != bad])
    o2, st2 = _run_batch(good, logits, drafts, win, pos, seeds, mode=mode, vp=vp, beta=beta, be=be)
    sk.check_status(st2.status)
    for a, b in ((o.num_accepted[good], o2.num_accepted), (o.tokens[good], o2.tokens),
                 (o.next_drafts[good], o2.next_drafts), (st.q_state[good], st2.q_state),
                 (st.q_kind[good], st2.q_kind), (st.p_prev[good] if vp else st.p_prev, st2.p_prev)):
        assert torch.equal(a, b)


def test_errors_ignored_where_not_read():
    """NaN in a padding row (beyond win_len) or in a forced row is not an error; a forced id outside
    [0, V) is a valid draft at its position."""
    B, W, V = 2, 4, 7
    st = sk.JacobiState.create(B, W, V, seed=[1, 2])
    pos = torch.tensor([0, 0])
    forced = torch.full((B, 10), -1, dtype=I64)
    forced[1, 2] = V + 3                                         # a row-end token outside the image slice
    drafts = sk.init_window(st, pos, W, forced)
    assert int(drafts[1, 2]) == V + 3
    logits = torch.randn(B, W + 1, V, generator=torch.Generator().manual_seed(0))
    for j in range(2):                                           # request 1's first two drafts have P = 1:
        logits[1, j, int(drafts[1, j])] = 1e4                    # accepted, so the forced position is reached
    logits[0, 3:] = float("nan")                                 # request 0 uses rows 0..2 only
    logits[1, 2] = float("nan")                                  # forced row
    o = sk.jacobi_step(logits, drafts, torch.tensor([2, 4]), pos, st, forced=forced)
    sk.check_status(st.status)
    assert (o.num_accepted >= 0).all()
    assert int(o.num_accepted[1]) >= 3                           # the forced draft is accepted as well
    assert o.tokens[1, :3].tolist() == [int(drafts[1, 0]), int(drafts[1, 1]), V + 3]


def test_win_len_out_of_range_is_a_clear_error():
    """win_len values outside [0, W] are not checked on the host (no sync); they must still not crash
    with an indexing error (out-of-bounds writes on a GPU): a status error, or SJDInputError naming win_len."""
    for bad_win in (5, -1):
        st, logits, drafts, win, pos = _setup(B=2, W=4)
        win = torch.tensor([bad_win, 4])
        try:
            o = _call(st, logits, drafts, win, pos)
        except SJDInputError as e:
            assert "win_len" in str(e)
            continue
        except (RuntimeError, IndexError) as e:
            pytest.fail(f"win_len={bad_win}: unclear {type(e).__name__}: {e}")
        assert int(o.num_accepted[0]) == -1
        with pytest.raises(SJDDeviceError):
            sk.check_status(st.status)


# ----------------------------------------------------------------------------- shapes

def _check_well_formed(o, win, V, forced_ok=False):
    B, W1 = o.tokens.shape
    na = o.num_accepted
    assert ((na >= 0) & (na <= win)).all()
    jj = torch.arange(W1).view(1, -1)
    used = jj <= na.view(-1, 1)
    tok = o.tokens
    assert ((tok >= 0) & (tok < V))[used].all(), "committed token outside [0, V)"
    assert (tok[~used] == -1).all()
    assert ((o.next_drafts >= 0) & (o.next_drafts < V)).all()


@pytest.mark.parametrize("B,W,V", [(1, 1, 5), (1, 128, 17), (64, 1, 33), (64, 128, 6), (7, 16, 1), (3, 0, 4),
                                   (5, 33, 1), (2, 2, 301), (64, 17, 40)])
@pytest.mark.parametrize("mode", ["sjd", "vp", "coupling", "gumbel", "gumbel_jacobi"])
@pytest.mark.parametrize("be", BACKENDS)
def test_shapes_give_valid_outputs(B, W, V, mode, be):
    vp = mode == "vp"
    name, dev = be
    st = sk.JacobiState.create(B, W, V, seed=torch.arange(B) * 31 + 1, vp=vp, device=dev)
    g = torch.Generator().manual_seed(B * 1000 + W * 10 + V)
    pos = torch.randint(0, 50, (B,), generator=g).to(dev)
    drafts = sk.init_window(st, pos, W)
    for it in range(3):
        win = torch.randint(0, W + 1, (B,), generator=g).to(dev)
        logits = (torch.randn(B, W + 1, V, generator=g) * 3).to(dev)
        o = sk.jacobi_step(logits, drafts, win, pos, st, mode=mode, beta=0.5 if vp else 0.0,
                           top_k=min(V, 5), temperature=0.9, backend=name)
        sk.check_status(st.status)
        _check_well_formed(sk.JacobiOutput(*(t.cpu() for t in (o.num_accepted, o.tokens, o.next_drafts))),
                           win.cpu(), V)
        if V == 1:
            assert (o.num_accepted == win).all()                  # the only token, always accepted
        pos = pos + o.num_accepted + 1
        drafts = o.next_drafts


def test_same_seed_same_output_whatever_the_batch():
    """A request's outputs and state depend on its own seed and inputs only (SPEC section 7)."""
    B, W, V = 6, 5, 11
    g = torch.Generator().manual_seed(9)
    seeds = torch.arange(B, dtype=I64) * 1000003 + 5
    pos = torch.randint(0, 30, (B,), generator=g)
    win = torch.randint(0, W + 1, (B,), generator=g)
    logits = torch.randn(B, W + 1, V, generator=g) * 2
    st = sk.JacobiState.create(B, W, V, seed=seeds)
    drafts = sk.init_window(st, pos, W)
    for mode in ("sjd", "coupling", "gumbel"):
        full, st_full = _run_batch(torch.arange(B), logits, drafts, win, pos, seeds, mode=mode)
        for idx in (torch.tensor([3]), torch.tensor([5, 0, 3]), torch.tensor([4, 1])):
            part, st_part = _run_batch(idx, logits, drafts, win, pos, seeds, mode=mode)
            assert torch.equal(part.tokens, full.tokens[idx]) and torch.equal(part.next_drafts, full.next_drafts[idx])
            assert torch.equal(st_part.q_state, st_full.q_state[idx])
            assert torch.equal(st_part.q_kind, st_full.q_kind[idx])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_negative_pos_on_a_gpu_is_a_status_error(backend):
    """No host sync on a GPU: a request with pos < 0 (or past 2^62) returns -1 and sets status bit 16;
    the other requests get what they get without it (cuda: the extension; triton: compiled)."""
    if backend == "cuda" and not sk.backends()["cuda"]["available"]:
        pytest.skip(sk.backends()["cuda"]["why"])
    if backend == "triton":
        pytest.importorskip("triton")
    B, W, V = 3, 4, 50
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(B, W + 1, V, generator=g) * 2).cuda()
    st = sk.JacobiState.create(B, W, V, seed=[3, 4, 5], device="cuda")
    good_pos = torch.tensor([0, 7, 2], device="cuda")
    drafts = sk.init_window(st, good_pos, W)
    win = torch.tensor([4, 4, 4], device="cuda")
    st0 = st.clone()
    bad_pos = torch.tensor([0, -3, 2 ** 62 + 5], device="cuda")
    for bad in (1, 2):
        pos = good_pos.clone()
        pos[bad] = bad_pos[bad]
        s1 = st0.clone()
        o = sk.jacobi_step(logits, drafts, win, pos, s1, top_k=10, backend=backend)
        assert int(o.num_accepted[bad]) == -1 and bool((o.tokens[bad] == -1).all())
        assert bool((o.next_drafts[bad] == -1).all())
        assert int(s1.status[0].cpu()) == 16
        with pytest.raises(sk.SJDDeviceError, match="pos outside"):
            sk.check_status(s1.status)
        keep = [i for i in range(B) if i != bad]
        s2 = sk.JacobiState.create(B - 1, W, V, seed=[[3, 4, 5][i] for i in keep], device="cuda")
        sk.init_window(s2, good_pos[keep], W)
        o2 = sk.jacobi_step(logits[keep], drafts[keep], win[keep], good_pos[keep], s2, top_k=10, backend=backend)
        assert torch.equal(o.tokens[keep], o2.tokens) and torch.equal(o.next_drafts[keep], o2.next_drafts)
    s3 = st0.clone()
    d = sk.init_window(s3, torch.tensor([1, -1, 3], device="cuda"), W)
    assert bool((d[1] == -1).all()) and bool((d[[0, 2]] >= 0).all()) and int(s3.status[0].cpu()) == 16
