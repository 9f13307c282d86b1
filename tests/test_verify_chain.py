"""``verify_chain``: verification alone for given target and draft laws.

- It is the verification half of ``jacobi_step``: on the same laws, seeds, positions and steps
  both commit the same tokens (so the step's law tests speak for it too).
- The committed token's law is the target's, for adversarial draft laws (chi-square against the
  float64 law, alpha 1e-6, power 0.99 against an error of 0.02 in any cell); a mutant that
  resamples a rejected draft from the target instead of the residual fails that test.
- The Triton kernel (interpreter on CPU) and the CUDA kernel (the CPU simulator, every thread
  order, and its race-checking build) return the reference's tokens, counts and status exactly;
  on a GPU the compiled kernels agree up to a bounded number of boundary cases.
- Bad input: clear errors on the host, device errors in the status word with only the affected
  requests returning -1.
"""
from __future__ import annotations

import inspect
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import sjd_kernels as sk  # noqa: E402
from _util import gpu, requires_cuda, requires_cuda_ext, sim_module  # noqa: E402
from sjd_kernels.ops._common import SJDInputError  # noqa: E402
from sjd_kernels.reference import jacobi_step as RJ  # noqa: E402
from sjd_kernels.reference import verify_chain as RV  # noqa: E402
from sjd_kernels.reference.target import target_probs  # noqa: E402
from stats import assert_law, chisq_gof, ALPHA  # noqa: E402

I64 = torch.int64


def _interpreting() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors. Only a missing Triton skips: a kernel
    module that fails to import fails here."""
    import importlib
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    importlib.import_module("sjd_kernels.triton.verify_chain")
    from sjd_kernels.triton.jacobi_step import is_interpreted
    return is_interpreted()


interpreted = pytest.mark.skipif(not _interpreting(), reason="runs the Triton kernel on CPU tensors "
                                 "(Triton installed, TRITON_INTERPRET=1 before it is imported)")


def _case(B, W, V, seed=0, dtype=torch.float32, ragged=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    target = torch.softmax(2.0 * torch.randn(B, W + 1, V, generator=g), -1)
    draft = torch.softmax(torch.randn(B, W, V, generator=g), -1)
    ids = (torch.multinomial(draft.reshape(-1, V), 1, generator=g).view(B, W) if W
           else torch.zeros(B, 0, dtype=I64))
    win = torch.randint(0, W + 1, (B,), generator=g) if ragged else torch.full((B,), W)
    kw = dict(seed=torch.arange(B, dtype=I64) * 7919 + seed, step=torch.randint(0, 4, (B,), generator=g),
              pos=torch.randint(0, 300, (B,), generator=g), win_len=win)
    t = lambda x: x.to(device)  # noqa: E731
    return t(target.to(dtype)), t(draft.to(dtype)), t(ids), {k: t(v) for k, v in kw.items()}


def _run(backend, target, draft, ids, kw, order="reverse", race=False):
    """``backend`` torch / triton / cuda, or cuda_sim: the CUDA kernel in the CPU simulator."""
    if backend == "cuda_sim":
        sim_module(race=race)
        from sjd_kernels.cuda import sim
        with sim.simulate(order=order, race=race):
            out = sk.verify_chain(target, draft, ids, backend="cuda", **kw)
    else:
        out = sk.verify_chain(target, draft, ids, backend=backend, **kw)
    return out.num_accepted, out.tokens, out.status


BACKENDS = ["torch", pytest.param("triton", marks=interpreted), "cuda_sim"]
KERNELS = [pytest.param("triton", marks=interpreted), "cuda_sim"]


# ----------------------------------------------------------------------------- = jacobi_step

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W,V", [(1, 7), (4, 33), (6, 5)])
def test_same_tokens_as_jacobi_step(backend, W, V):
    """The step's target rows as ``target``, its stored dense laws as ``draft``: same tokens."""
    B = 24
    g = torch.Generator().manual_seed(W * 100 + V)
    logits = 2.0 * torch.randn(B, W + 1, V, generator=g)
    P = target_probs(logits, 1.0, 0, 1.0)
    draft = torch.softmax(torch.randn(B, W, V, generator=g), -1)
    ids = torch.multinomial(draft.reshape(-1, V), 1, generator=g).view(B, W)
    win = torch.randint(0, W + 1, (B,), generator=g)
    pos = torch.randint(0, 40, (B,), generator=g)
    step = torch.randint(0, 3, (B,), generator=g)
    st = sk.JacobiState.create(B, W, V, seed=[5 + 11 * i for i in range(B)], ring=64)
    st.step.copy_(step)
    for b in range(B):
        for j in range(W):
            s = (int(pos[b]) + j) % 64
            st.q_state[b, s] = draft[b, j]
            st.q_kind[b, s] = RJ.KIND_DENSE
    step_out = sk.jacobi_step(logits, ids, win, pos, st, backend="torch", advance=False)
    na, tok, status = _run(backend, P, draft, ids, dict(seed=st.seed, step=step, pos=pos, win_len=win))
    assert torch.equal(na, step_out.num_accepted) and torch.equal(tok, step_out.tokens)
    assert status.tolist() == [0, 0, 0, 0] and st.status.tolist() == [0, 0, 0, 0]
    assert 0 < int(na.sum()) < int(win.sum())          # some drafts accepted, some rejected


# ----------------------------------------------------------------------------- exact law

ADVERSARIAL = {
    "far": [0.70, 0.02, 0.02, 0.02, 0.02, 0.22],
    "one-hot": [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
    "zeros-where-target-positive": [0.0, 0.0, 0.5, 0.5, 0.0, 0.0],
    "support-outside-target": [0.0, 0.1, 0.1, 0.1, 0.1, 0.6],
    "uniform": [1 / 6] * 6,
}
TARGET0 = [0.05, 0.30, 0.05, 0.25, 0.35, 0.0]
TARGET1 = [0.2, 0.2, 0.1, 0.1, 0.2, 0.2]


def _law_run(fn, draft0, n=60_000, seed=3, both=False):
    """Committed tokens of ``n`` requests with one window of 2 rows: row 0 drafted from ``draft0``."""
    V = 6
    g = torch.Generator().manual_seed(seed)
    d0 = torch.tensor(draft0, dtype=torch.float64)
    d1 = torch.tensor(ADVERSARIAL["far"], dtype=torch.float64)
    target = torch.tensor([TARGET0, TARGET1, TARGET1], dtype=torch.float32).expand(n, 3, V).contiguous()
    draft = torch.stack([d0, d1]).float().expand(n, 2, V).contiguous()
    ids = torch.stack([torch.multinomial(d0, n, replacement=True, generator=g),
                       torch.multinomial(d1, n, replacement=True, generator=g)], 1)
    B = n
    status = torch.zeros(4, dtype=torch.int32)
    na, tok = fn(target, draft, ids, torch.full((B,), 2), torch.arange(B) % 97, torch.arange(B, dtype=I64) * 3 + seed,
                 torch.zeros(B, dtype=I64), status)
    assert (na >= 0).all()
    return tok[:, :2].numpy() if both else (tok[:, 0].numpy(), status)


@pytest.mark.parametrize("label", list(ADVERSARIAL))
def test_committed_token_follows_the_target_law(label):
    tok0, _ = _law_run(RV.verify_chain, ADVERSARIAL[label])
    assert_law(tok0, np.array(TARGET0, dtype=np.float64), f"verify_chain first token, draft {label}")


def test_token_after_an_accepted_draft_follows_its_row():
    """Given row 0 accepted, the next committed token (residual of row 1, or the bonus row 2 when
    row 1 is accepted too) follows row 1's target law."""
    n = 80_000
    tok = _law_run(RV.verify_chain, ADVERSARIAL["uniform"], n=n, seed=8, both=True)
    second = tok[:, 1][tok[:, 1] >= 0]
    assert 0.5 * n < second.size < 0.7 * n               # row 0's acceptance: sum(min(target, uniform)) = 0.6
    assert_law(second, np.array(TARGET1, dtype=np.float64), "verify_chain token after an accepted draft")


def _mutant():
    """The trap of SPEC section 3: a rejected draft resampled from the target, not the residual."""
    src = inspect.getsource(RV)
    bad = src.replace("torch.clamp(pm - qm, min=0.0)", "pm")
    assert bad != src
    ns = {"__name__": "sjd_kernels.reference._verify_chain_mutant", "__package__": "sjd_kernels.reference"}
    exec(compile(bad, "<verify_chain mutant>", "exec"), ns)
    return ns["verify_chain"]


def test_law_test_fails_on_a_target_resample_mutant():
    tok0, _ = _law_run(_mutant(), ADVERSARIAL["far"])
    r = chisq_gof(np.bincount(tok0, minlength=6), np.array(TARGET0, dtype=np.float64), "mutant")
    assert r.p_value < ALPHA, r


# ----------------------------------------------------------------------------- kernel parity

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("B,W,V,dtype", [(9, 5, 37, torch.float32), (5, 0, 20, torch.float32),
                                         (4, 7, 4100, torch.bfloat16), (3, 3, 64, torch.float16),
                                         (16, 2, 3, torch.float32), (2, 1, 1, torch.float32),
                                         (6, 150, 40, torch.float32)])
def test_kernels_match_reference(backend, B, W, V, dtype):
    """(W 150 has more window rows than the CUDA block has threads: a thread takes several.)"""
    target, draft, ids, kw = _case(B, W, V, seed=B + W + V, dtype=dtype)
    a = _run("torch", target, draft, ids, kw)
    b = _run(backend, target, draft, ids, kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x, y)


@pytest.mark.parametrize("order", ["forward", "shuffle"])
def test_cuda_kernel_under_other_thread_orders(order):
    target, draft, ids, kw = _case(7, 6, 300, seed=11, dtype=torch.bfloat16)
    a = _run("torch", target, draft, ids, kw)
    b = _run("cuda_sim", target, draft, ids, kw, order=order)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("threads", [32, 96, 1024])
def test_cuda_kernel_block_sizes(threads):
    """Other block widths (``cuda.verify_chain.block_threads``, the bench's chain_cuda_t512): a
    single warp, a width that does not divide the lane groups, the largest block."""
    from sjd_kernels.cuda.verify_chain import block_threads
    target, draft, ids, kw = _case(5, 40, 333, seed=threads)
    a = _run("torch", target, draft, ids, kw)
    with block_threads(threads):
        b = _run("cuda_sim", target, draft, ids, kw, order="shuffle")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with block_threads(48), pytest.raises(ValueError, match="multiple of 32"):
        _run("cuda_sim", target, draft, ids, kw)


def test_cuda_kernel_race_checks():
    """The simulator's race-checking build: no unordered shared or global access in the kernel."""
    target, draft, ids, kw = _case(3, 5, 70, seed=12)
    a = _run("torch", target, draft, ids, kw)
    b = _run("cuda_sim", target, draft, ids, kw, order="shuffle", race=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", KERNELS)
def test_row_strides_and_zero_mass_residuals(backend):
    """Laws as views with row strides (a vocabulary slice), and unnormalised drafts twice the target
    (a rejection leaves no residual mass: the target race takes over and status[1] counts it)."""
    B, W, V = 12, 3, 21
    target, draft, ids, kw = _case(B, W, V, seed=4, ragged=False)
    big = torch.zeros(B, W + 1, V + 9)
    big[..., 4:4 + V] = target
    tv = big[..., 4:4 + V]
    dv = (2.0 * target[:, :W]).contiguous()
    ids = torch.multinomial(target[:, :W].reshape(-1, V), 1, generator=torch.Generator().manual_seed(1)).view(B, W)
    a = _run("torch", tv, dv, ids, kw)
    b = _run(backend, tv, dv, ids, kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert int(a[2][1]) > 0 and int(a[2][0]) == 0          # zero-mass residuals counted, no error


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", BACKENDS)
def test_device_errors_touch_only_their_requests(backend):
    B, W, V = 9, 3, 10
    target, draft, ids, kw = _case(B, W, V, seed=9, ragged=False)
    kw["win_len"] = torch.tensor([3, 3, 3, 3, 0, 3, 3, 3, 3])
    clean = _run(backend, target, draft, ids, kw)
    m = clean[0].tolist()
    t2, d2, i2 = target.clone(), draft.clone(), ids.clone()
    t2[0, 0, ids[0, 0]] = float("nan")                    # a gathered entry: request 0
    i2[1, 1] = V                                          # an id out of range: request 1
    t2[2, m[2]] = 0.0                                     # the row request 2 samples from has no mass
    t2[4, 2, 3] = float("nan")                            # request 4 reads row 0 only: not an error
    d2[6, 0, ids[6, 0]] = -0.25                           # a negative gathered draft entry: request 6
    t2[7, m[7], (ids[7, 0] + 1) % V] = -1e-3              # a negative lane of the row it samples from
    d2[8, 0, ids[8, 0]] = float("inf")                    # an infinite gathered draft entry: request 8
    na, tok, status = _run(backend, t2, d2, i2, kw)
    bad = [0, 1, 2, 6, 7, 8]
    good = [3, 4, 5]
    assert all(m[i] >= 0 for i in range(B))               # the clean run had no error anywhere
    assert na[bad].tolist() == [-1] * len(bad) and (tok[bad] == -1).all()
    assert torch.equal(na[good], clean[0][good]) and torch.equal(tok[good], clean[1][good])
    assert int(status[0]) == RJ.ERR_NONFINITE | RJ.ERR_DRAFT_RANGE
    with pytest.raises(sk.SJDDeviceError, match="outside"):
        sk.check_status(status)


def test_win_len_out_of_range_without_a_host_check(monkeypatch):
    """On a GPU (here: the traced path, which skips host checks) a win_len outside [0, W] is not
    checked on the host: that request returns -1 and status bit 8 is set, the others run."""
    import sjd_kernels.ops._common as common
    target, draft, ids, kw = _case(3, 4, 9, seed=5, ragged=False)
    clean = sk.verify_chain(target, draft, ids, backend="torch", **kw)
    monkeypatch.setattr(common, "compiling", lambda: True)
    kw["win_len"] = torch.tensor([4, 7, 4])
    out = sk.verify_chain(target, draft, ids, backend="torch", **kw)
    assert out.num_accepted[1] == -1 and (out.tokens[1] == -1).all()
    assert torch.equal(out.tokens[[0, 2]], clean.tokens[[0, 2]])
    assert int(out.status[0]) == RJ.ERR_WIN_LEN


@pytest.mark.parametrize("bad_pos", [-5, 2 ** 62 + 1, 2 ** 63 - 1])
def test_pos_out_of_range(monkeypatch, bad_pos):
    """pos outside [0, 2^62], as in jacobi_step: on the CPU an SJDInputError before anything runs;
    without a host check (a GPU; here the traced path) that request returns -1 and sets status bit
    16, the others are as without it."""
    import sjd_kernels.ops._common as common
    target, draft, ids, kw = _case(3, 4, 9, seed=4, ragged=False)
    clean = sk.verify_chain(target, draft, ids, backend="torch", **kw)
    kw["pos"] = torch.tensor([int(kw["pos"][0]), bad_pos, int(kw["pos"][2])])
    status = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(SJDInputError, match=r"pos must be in \[0, 2\^62\]"):
        sk.verify_chain(target, draft, ids, backend="torch", status=status, **kw)
    assert int(status.abs().sum()) == 0
    monkeypatch.setattr(common, "compiling", lambda: True)
    out = sk.verify_chain(target, draft, ids, backend="torch", **kw)
    assert out.num_accepted[1] == -1 and (out.tokens[1] == -1).all()
    assert torch.equal(out.tokens[[0, 2]], clean.tokens[[0, 2]])
    assert torch.equal(out.num_accepted[[0, 2]], clean.num_accepted[[0, 2]])
    assert int(out.status[0]) == RJ.ERR_POS
    with pytest.raises(sk.SJDDeviceError, match="pos outside"):
        sk.check_status(out.status)


def test_host_errors_name_the_argument():
    target, draft, ids, kw = _case(2, 3, 8, ragged=False)
    bad = {
        "draft_probs": dict(draft_probs=draft[:, :2]),
        "draft_ids": dict(draft_ids=ids.int()),
        "target_probs": dict(target_probs=target.to(I64)),
        "win_len": dict(win_len=torch.tensor([4, 0])),
        "seed": dict(seed=torch.zeros(3, dtype=I64)),
        "status": dict(status=torch.zeros(4, dtype=I64)),
    }
    for name, change in bad.items():
        args = dict(target_probs=target, draft_probs=draft, draft_ids=ids, **kw)
        args.update(change)
        with pytest.raises(SJDInputError, match=name):
            sk.verify_chain(args.pop("target_probs"), args.pop("draft_probs"), args.pop("draft_ids"), **args)
    with pytest.raises(SJDInputError, match="backend must be one of"):
        sk.verify_chain(target, draft, ids, backend="cudnn", **kw)
    from sjd_kernels import _ext
    if _ext._SIM is None:                                 # outside the simulator the CUDA kernel needs CUDA tensors
        with pytest.raises(SJDInputError, match="needs CUDA tensors"):
            sk.verify_chain(target, draft, ids, backend="cuda", **kw)


def test_torch_compile_matches_eager():
    target, draft, ids, kw = _case(5, 4, 9, seed=2)

    def f(t, d, i, seed, step, pos, win):
        o = sk.verify_chain(t, d, i, seed=seed, step=step, pos=pos, win_len=win, backend="torch")
        return o.num_accepted, o.tokens

    args = (target, draft, ids, kw["seed"], kw["step"], kw["pos"], kw["win_len"])
    eager = f(*args)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)


def test_no_host_synchronisation_on_the_device_path(monkeypatch):
    """The op's device path (no host check of win_len) and the reference make no call that would
    synchronise with the host or bake host data into a CUDA graph (checked on CPU tensors). The
    reference is called directly: a dispatch mode does not see inside a custom op."""
    import sjd_kernels.ops._common as common
    from test_cuda_graph import NoHostSync, _no_tolist
    target, draft, ids, kw = _case(4, 5, 30, seed=6)
    eager = sk.verify_chain(target, draft, ids, backend="torch", **kw)
    monkeypatch.setattr(common, "compiling", lambda: True)
    monkeypatch.setattr(torch.Tensor, "tolist", _no_tolist)
    status = torch.zeros(4, dtype=torch.int32)
    with NoHostSync():
        out = sk.verify_chain(target, draft, ids, backend="torch", **kw)
        na, tok = RV.verify_chain(target, draft, ids, kw["win_len"], kw["pos"], kw["seed"], kw["step"], status)
    assert torch.equal(out.tokens, eager.tokens) and torch.equal(out.num_accepted, eager.num_accepted)
    assert torch.equal(tok, eager.tokens) and torch.equal(na, eager.num_accepted)


# ----------------------------------------------------------------------------- GPU

@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=requires_cuda_ext)])
def test_graph_replay_equals_eager(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("the compiled Triton kernel needs TRITON_INTERPRET unset")
    target, draft, ids, kw = _case(8, 16, 16384, seed=21, device="cuda")
    eager = _run(backend, target, draft, ids, kw)
    status = torch.zeros(4, dtype=torch.int32, device="cuda")
    for _ in range(2):                                   # warm-up (compiles, allocator) outside the graph
        sk.verify_chain(target, draft, ids, backend=backend, status=status, **kw)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = sk.verify_chain(target, draft, ids, backend=backend, status=status, **kw)
    status.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.num_accepted, eager[0]) and torch.equal(out.tokens, eager[1])
    assert status.tolist() == eager[2].tolist()


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=requires_cuda_ext)])
@pytest.mark.parametrize("B,W,V", [(32, 16, 16384), (4, 64, 32768), (64, 8, 8192)])
def test_kernels_match_reference_on_the_gpu(backend, B, W, V):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("the compiled Triton kernel needs TRITON_INTERPRET unset")
    target, draft, ids, kw = _case(B, W, V, seed=V + B, dtype=torch.bfloat16 if V == 8192 else torch.float32,
                                   device="cuda")
    a = _run("torch", target, draft, ids, kw)
    b = _run(backend, target, draft, ids, kw)
    differ = int((~(a[1] == b[1]).all(1)).sum())
    assert differ <= max(1, B // 100), f"{differ} of {B} requests differ"
    assert int(a[2][0]) == 0 and int(b[2][0]) == 0
