"""``jacobi_step`` at the edges of the float range, on every backend that runs on the CPU.

Finite inputs that push the arithmetic to its limits: temperatures near 0 and near the float32
maximum, CFG scales that overflow or nearly do, rows that are flat, all -inf but one lane, fp16 at
its largest values, a vocabulary of one, a top-p that keeps one lane, a top-p reached exactly in
float32 or rounding to 1 in float32, a sparse state that overflows.
For each, the reference gives the result the op's contract names (greedy, uniform, an error in
``status`` for a row that overflows to inf, ...), and the Triton kernel (interpreter) and the CUDA
kernels (CPU simulator, default path and ``hist_topk`` + ``list_races``) give the reference's
outputs, state and status bit for bit.
"""
from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import sjd_kernels as sk  # noqa: E402
from _util import sim_module  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's NumPy on masked lanes

B, W, V = 2, 4, 64
NONFINITE = 1                                                      # status[0] bit of a non-finite row


def _randn(b, w, v):
    return torch.randn(b, w + 1, v, generator=torch.Generator().manual_seed(5)) * 3


def _flat(value):
    return lambda b, w, v: torch.full((b, w + 1, v), value)


def _one_lane(b, w, v):
    x = torch.full((b, w + 1, v), float("-inf"))
    x[:, :, 7 % v] = 0.0
    return x


def _masked(b, w, v):
    """Random rows with the first 16 lanes masked (-inf), as a model whose head output is masked
    upstream gives them; under CFG both rows hold the -inf."""
    x = _randn(b, w, v)
    x[:, :, :16] = float("-inf")
    return x


def _two_lanes_0p7(b, w, v):
    """Lanes 7 and 8 only, at probabilities float32(0.7) (a hair below the double 0.7) and 0.3."""
    x = torch.full((b, w + 1, v), float("-inf"))
    x[:, :, 7], x[:, :, 8] = 0.8472979068756104, 0.0
    return x


def _tiny_tail(b, w, v):
    """Random rows with four lanes 27 below the rest: each has a probability near 1e-13."""
    x = _randn(b, w, v)
    x[:, :, :4] = -30.0
    return x


def _fp16_extremes(b, w, v):
    r = torch.rand(b, w + 1, v, generator=torch.Generator().manual_seed(6))
    return torch.where(r < 0.5, 65504.0, -65504.0)


# name: (logits builder, logits dtype, vocabulary, options, expected outcome)
CASES = {
    "temperature-1e-30": (_randn, torch.float32, V, dict(temperature=1e-30), "greedy"),
    "temperature-1e30": (_randn, torch.float32, V, dict(temperature=1e30), "uniform"),
    "top-p-1e-9": (_randn, torch.float32, V, dict(top_p=1e-9), "greedy"),
    "top-p-0.7-at-float32-0.7": (_two_lanes_0p7, torch.float32, V, dict(top_p=0.7), "one-lane"),
    "top-p-rounds-to-1": (_tiny_tail, torch.float32, V, dict(top_p=0.99999999), "all-lanes"),
    "top-k-1": (_randn, torch.float32, V, dict(top_k=1), "greedy"),
    "coupling-temperature-1e-30": (_randn, torch.float32, V, dict(temperature=1e-30, mode="coupling"), "greedy"),
    "cfg-1e30": (_randn, torch.float32, V, dict(cfg=1e30), "greedy-cfg"),
    "cfg-1e38-bf16-overflows": (_randn, torch.bfloat16, V, dict(cfg=1e38), "error"),
    "flat": (_flat(0.0), torch.float32, V, {}, "uniform"),
    "fp16-max-flat": (_flat(65504.0), torch.float16, V, {}, "uniform"),
    "fp16-max-and-min": (_fp16_extremes, torch.float16, V, {}, "valid"),
    "all-minus-inf-but-one": (_one_lane, torch.float32, V, {}, "one-lane"),
    "gumbel-jacobi-all-minus-inf-but-one": (_one_lane, torch.float32, V, dict(mode="gumbel_jacobi"), "one-lane"),
    "cfg-3-all-minus-inf-but-one": (_one_lane, torch.float32, V, dict(cfg=3.0), "one-lane"),
    "cfg-3-masked-lanes-bf16": (_masked, torch.bfloat16, V, dict(cfg=3.0), "masked"),
    "cfg-1-masked-lanes-gumbel": (_masked, torch.float32, V, dict(cfg=1.0, mode="gumbel"), "masked"),
    "vocabulary-of-one": (_randn, torch.float32, 1, {}, "uniform"),
    "vp-log-beta-1e30": (_randn, torch.float32, V, dict(mode="vp", beta=1e30, vp_form="log", vp=True), "valid"),
    "sparse-overflow": (_flat(0.0), torch.float32, V, dict(top_k=1, capacity=4), "uniform-overflow"),
}

BACKENDS = ("torch", "triton", "cuda", "cuda_hist")


def _step(backend, build, dtype, v, opts):
    opts = dict(opts)
    cfg, vp, capacity = opts.pop("cfg", None), opts.pop("vp", False), opts.pop("capacity", None)
    st = sk.JacobiState.create(B, W, v, seed=[3, 4], vp=vp, capacity=capacity)
    pos = torch.zeros(B, dtype=torch.int64)
    drafts = sk.init_window(st, pos, W)
    logits = build(B, W, v)
    kw = {}
    if cfg is not None:
        kw = dict(uncond_logits=(0.5 * logits).to(dtype), cfg_scale=torch.full((B,), cfg))
    ctx, feats = contextlib.nullcontext(), contextlib.nullcontext()
    if backend.startswith("cuda"):
        from sjd_kernels.cuda import sim
        from sjd_kernels.cuda.jacobi_step import kernel_features
        ctx = sim.simulate(order="reverse", seed=0)
        if backend == "cuda_hist":
            feats = kernel_features("hist_topk", "list_races")
    with ctx, feats:
        out = sk.jacobi_step(logits.to(dtype), drafts, torch.full((B,), W), pos, st,
                             backend="cuda" if backend.startswith("cuda") else backend, **opts, **kw)
    return logits, drafts, out, st


@pytest.fixture(scope="module")
def runs():
    """Every case on every backend, once (the simulator and the interpreter are slow to start)."""
    pytest.importorskip("triton")
    from sjd_kernels.triton.jacobi_step import is_interpreted
    if not is_interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported")
    sim_module()
    return {(name, be): _step(be, *CASES[name][:4]) for name in CASES for be in BACKENDS}


def _greedy(logits):
    """Row 0's argmax (with CFG, u + s (c - u) = (1 + s) c / 2 for u = c / 2: the same argmax)."""
    return logits[:, 0].argmax(-1)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_gives_the_contract_outcome(runs, name):
    build, dtype, v, opts, outcome = CASES[name]
    logits, drafts, out, st = runs[(name, "torch")]
    status = st.status.tolist()
    acc, tok = out.num_accepted, out.tokens
    if outcome == "error":
        assert status[0] & NONFINITE and (acc == -1).all() and (tok == -1).all(), (status, acc)
        return
    assert status[0] == 0, status
    assert ((acc >= 0) & (acc <= W)).all() and ((tok[:, 0] >= 0) & (tok[:, 0] < v)).all(), (acc, tok)
    if outcome in ("greedy", "greedy-cfg"):
        # the target is a point mass on the row's argmax: the first draft (uniform) is rejected
        # unless it is the argmax, and the committed token is the argmax
        want = _greedy(logits)
        first = torch.where(acc > 0, drafts[:, 0], tok[:, 0])
        assert torch.equal(first, want), (first, want)
    elif outcome in ("uniform", "uniform-overflow"):
        # uniform target, uniform drafts: every draft passes (ratio 1), the bonus token follows
        assert (acc == W).all() and torch.equal(tok[:, :W], drafts), (acc, tok, drafts)
        assert status[3] == (B * W if outcome == "uniform-overflow" else 0), status   # one per stored row
    elif outcome == "one-lane":
        assert (acc == 0).all() and (tok[:, 0] == 7).all(), (acc, tok)
    elif outcome == "all-lanes":
        # top_p = 0.99999999 is 1 in float32: off, so the stored laws keep even the ~1e-13 lanes
        stored = st.q_state[(st.q_state > 0).any(-1)]
        assert len(stored) and (stored > 0).all(), (st.q_state > 0).sum(-1)
    elif outcome == "masked":
        # lanes at -inf in both rows stay masked under CFG (not -inf - -inf = NaN): the status is
        # clean (checked above) and no committed token is one of them
        committed = torch.arange(W + 1) <= acc[:, None]
        assert ((tok >= 16) | ~committed).all(), (acc, tok)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_the_reference(runs, name, backend):
    _, _, ref_out, ref_st = runs[(name, "torch")]
    _, _, out, st = runs[(name, backend)]
    for what, a, b in (("num_accepted", out.num_accepted, ref_out.num_accepted), ("tokens", out.tokens, ref_out.tokens),
                       ("next_drafts", out.next_drafts, ref_out.next_drafts), ("status", st.status, ref_st.status)):
        assert torch.equal(a, b), (what, a, b)
    if CASES[name][4] == "error":
        return                                      # a failed request's state is the contract's "undefined"
    assert torch.equal(st.q_kind, ref_st.q_kind), (st.q_kind, ref_st.q_kind)
    assert torch.equal(st.q_state > 0, ref_st.q_state > 0), ((st.q_state > 0).sum(-1), (ref_st.q_state > 0).sum(-1))
    assert torch.allclose(st.q_state, ref_st.q_state, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert torch.allclose(st.p_prev, ref_st.p_prev, rtol=1e-6, atol=1e-7, equal_nan=True)
