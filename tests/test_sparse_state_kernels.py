"""Sparse Jacobi state on the Triton kernel: token for token against the reference.

Multi-step runs through the prefix-to-row table of ``test_jacobi_step_law`` (float32 logits, so
the two backends must agree exactly on tokens, counts, drafts, kinds, entry ids and overflow
counters; the stored values to float rounding, as in ``test_jacobi_step_parity``). Cases cover no overflow (capacity >= every support), ties at
the top-k threshold, and capacity 1 (most rows overflow and draft uniformly). Under the
interpreter on CPU here; the ``gpu`` tests repeat a larger case with the compiled Triton kernel
and run every case on the CUDA kernel.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

sys.path.insert(0, os.path.dirname(__file__))
import test_jacobi_step_law as law  # noqa: E402
from test_sparse_state import SPECS, record_steps  # noqa: E402
from _util import gpu, requires_cuda_ext  # noqa: E402

from sjd_kernels.reference import jacobi_step as ref  # noqa: E402
from sjd_kernels.triton.jacobi_step import is_interpreted  # noqa: E402

INTERP = is_interpreted()
HAS_CUDA = torch.cuda.is_available()
if not INTERP and not HAS_CUDA:
    pytest.skip("triton kernels need TRITON_INTERPRET=1 (set before triton is imported) or a CUDA device",
                allow_module_level=True)



class BigramModel:
    """Logits of position l from the token before it: ``pos_emb[l] + tok_emb[x_{l-1}]`` (any V, L;
    parity only, no enumerated law)."""

    def __init__(self, V, L, seed, scale=2.0):
        g = torch.Generator().manual_seed(seed)
        self.V, self.L = V, L
        self.pos_emb = torch.randn(L + 1, V, generator=g) * scale
        self.tok_emb = torch.randn(V + 1, V, generator=g) * scale
        self.pos_emb[L] = 0.0

    def rows(self, seq, lengths):
        prev = torch.gather(torch.cat([torch.full_like(seq[:, :1], self.V), seq], 1), 1,
                            lengths.clamp(max=seq.shape[1]))
        prev = torch.where(prev < 0, torch.full_like(prev, self.V), prev)
        return self.pos_emb[lengths.clamp(max=self.L)] + self.tok_emb[prev]


def _compare(spec, V, L, n, W, k, cap, device, seed0=91, backend="triton"):
    model = law.TableModel(V, L, 31, 2.0) if V ** L <= 10 ** 6 else BigramModel(V, L, 31, 2.0)
    r_impl, r_rec = record_steps(ref.jacobi_step)
    t_impl, t_rec = record_steps(law.public_impl(backend, device, 0))
    Xr, ir = law.run_sequences(r_impl, spec, model, n, W, seed0, 1.0, k, capacity=cap)
    Xt, it = law.run_sequences(t_impl, spec, model, n, W, seed0, 1.0, k, capacity=cap)
    assert ir["status"] == it["status"], (ir["status"], it["status"])
    assert torch.equal(Xr, Xt), f"{spec}: tokens differ"
    assert len(r_rec) == len(t_rec)
    for s, (a, b) in enumerate(zip(r_rec, t_rec)):
        (qr, kr, pr, ir_, _, *outr), (qt, kt, pt, it_, _, *outt) = a, b
        for x, y in zip(outr, outt):
            assert torch.equal(x, y), f"{spec} step {s}: outputs differ"
        assert torch.equal(kr, kt), f"{spec} step {s}: kinds differ"
        dense = (kr & ref.KIND_MASK) == ref.KIND_DENSE
        assert torch.equal(ir_[dense], it_[dense]), f"{spec} step {s}: entry ids differ"
        # stored numbers to float rounding (softmax sums in another order; the VP trend cancels)
        assert torch.allclose(ref.densify(ir_, qr, V)[dense], ref.densify(it_, qt, V)[dense], rtol=1e-5, atol=1e-6)
        if pr.numel():
            assert torch.allclose(ref.densify(ir_, pr, V)[dense], ref.densify(it_, pt, V)[dense], rtol=1e-5,
                                  atol=1e-10)
    return ir["status"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("k,cap", [(0, 6), (2, 2), (0, 1)], ids=["fits", "topk2-ties", "overflow"])
def test_sparse_triton_matches_reference(spec, k, cap):
    status = _compare(spec, V=6, L=6, n=8, W=3, k=k, cap=cap, device="cpu" if INTERP else "cuda")
    if cap == 1:
        assert status[3] > 0, "the overflow path did not run"
    if cap == 6:
        assert status[3] == 0


@pytest.mark.gpu
@pytest.mark.skipif(INTERP or not HAS_CUDA, reason="needs compiled Triton on a CUDA device (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("spec,cand", [("sjd", True), ("vp_log_b1", True), ("coupling_vp_add_b0.5", True),
                                       ("sjd", False)])
def test_sparse_triton_matches_reference_gpu(spec, cand, monkeypatch):
    """V 3000, top-k 200, C 256: the candidate-list path (a race list of 256 stored as the slot's
    entries); with ``cand`` False the row path (``CAND_LIST = False``), to tell them apart if one fails."""
    import sjd_kernels.triton.jacobi_step as tj
    monkeypatch.setattr(tj, "CAND_LIST", cand)
    assert (tj.list_size(3000, 200, False, True, False, ref.VP_ADD, 0.0) > 0) == cand
    _compare(spec, V=3000, L=24, n=64, W=8, k=200, cap=256, device="cuda")


@gpu
@requires_cuda_ext
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("k,cap", [(0, 6), (2, 2), (0, 1)], ids=["fits", "topk2-ties", "overflow"])
def test_sparse_cuda_matches_reference(spec, k, cap):
    status = _compare(spec, V=6, L=6, n=64, W=3, k=k, cap=cap, device="cuda", backend="cuda")
    if cap == 1:
        assert status[3] > 0, "the overflow path did not run"


@gpu
@requires_cuda_ext
@pytest.mark.parametrize("spec", ["sjd", "vp_log_b1", "coupling_vp_add_b0.5", "gumbel"])
def test_sparse_cuda_matches_reference_larger(spec):
    """V 3000: the block-wide compaction runs over several chunks of 4 lanes per thread; top-k 200
    with capacity 256 (no overflow) and 150 (every row overflows)."""
    _compare(spec, V=3000, L=24, n=64, W=8, k=200, cap=256, device="cuda", backend="cuda")
    status = _compare(spec, V=3000, L=24, n=64, W=8, k=200, cap=150, device="cuda", backend="cuda")
    assert status[3] > 0


# ------------------------------------------------ the sparse state through the candidate list

def _sparse_one_step(logits, drafts, win, forced, cap, mode, vp, K, top_p=1.0, seed=3):
    """One step of the reference and of the Triton kernel from the same sparse state: each slot
    holds cap - 5 random lanes (with the slot's draft for most requests) at values 0.05-0.2, p_prev
    random positive. Returns ``(outputs, state)`` per implementation, state densified."""
    from sjd_kernels.triton.jacobi_step import jacobi_step_triton
    B, W1, V = logits.shape
    W = W1 - 1
    R = W1
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(B) * 3
    q_idx = torch.full((B, R, cap), ref.IDX_PAD, dtype=torch.int32)
    q_state = torch.zeros(B, R, cap)
    p_prev = torch.zeros(B, R, cap) if vp else torch.empty(0)
    for b in range(B):
        for j in range(W):
            slot = int(pos[b] + j) % R
            lanes = torch.randperm(V, generator=g)[:cap - 5]
            if b != 7:                                  # request 7: drafts off the stored support
                lanes = torch.cat([lanes[lanes != drafts[b, j]][:cap - 6], drafts[b, j:j + 1]])
            lanes = lanes.sort().values
            q_idx[b, slot, :lanes.numel()] = lanes.to(torch.int32)
            q_state[b, slot, :lanes.numel()] = 0.05 + 0.15 * torch.rand(lanes.numel(), generator=g)
            if vp:
                p_prev[b, slot, :lanes.numel()] = 0.01 + torch.rand(lanes.numel(), generator=g)
    q_kind = torch.full((B, R), ref.KIND_DENSE | (ref.FLAG_PREV if vp else 0), dtype=torch.int32)
    seed_t, step = torch.arange(11, 11 + B), torch.zeros(B, dtype=torch.int64)
    args = dict(temperature=1.0, top_k=K, top_p=top_p, mode=ref.MODES[mode], beta=-1.0 if vp else 0.0,
                vp_form=ref.VP_LOG, vp_eps=1e-6, tail_init=ref.TAIL_UNIFORM)
    res = []
    for fn in (ref.jacobi_step, jacobi_step_triton):
        s = [t.clone() for t in (q_state, q_kind, p_prev, q_idx)] + [torch.zeros(4, dtype=torch.int32)]
        o = fn(logits, None, None, drafts, win, pos, seed_t, step, forced, s[0], s[1], s[2], s[4],
               *args.values(), q_idx=s[3])
        st = dict(q_kind=s[1], q_idx=s[3], status=s[4], q=ref.densify(s[3], s[0], V),
                  p=ref.densify(s[3], s[2], V) if vp else None)
        res.append(([x.clone() for x in o], st))
    return res


@pytest.mark.skipif(not INTERP, reason="interpreter grid (the GPU tests above cover the compiled kernel)")
@pytest.mark.parametrize("mode,vp,cap,top_p", [("sjd", False, 80, 1.0), ("sjd", False, 40, 1.0),
                                               ("coupling", False, 40, 0.9), ("coupling", True, 80, 1.0),
                                               ("sjd", True, 40, 1.0), ("gumbel", False, 80, 1.0),
                                               ("gumbel_jacobi", False, 40, 1.0)])
def test_sparse_candidate_list_rows_and_fallbacks_match_reference(mode, vp, cap, top_p, monkeypatch):
    """The sparse state on the candidate-list path (V 200, top-k 20: a candidate list of 128 lanes,
    a race list of 64, which becomes the slot's entries) against the reference and against the
    row path (candidate list off), one request per kind of row: smooth rows with a forced row; 100
    ties at the top (the race list overflows: row path; more than C lanes: the row drafts
    uniformly); 50 ties (C 80: the list path stores 50 entries; C 40: the list fits but not the
    slot: row path, uniform draft); 5 finite lanes; a NaN row; a request whose second draft has
    P = 0 (rejected, later rows draw next drafts); 169 lanes kept by top-k, 19 with P > 0 (the
    candidates overflow); drafts off the stored support (old law 0 at the draft). With VP (log
    form, beta -1) the stored p_prev steers Qt; with top-p 0.9 the support shrinks below top-k.
    Tokens, counts, kinds, entry ids and the overflow counter are equal, the stored values agree
    to rounding."""
    import sjd_kernels.triton.jacobi_step as tj
    B, W, V, K = 8, 4, 200, 20
    assert tj.list_size(V, K, False, True, vp, ref.VP_LOG, -1.0) == 64 and tj.cand_size(V, K, 64) == 128
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(B, W + 1, V, generator=g) * 2
    logits[1, :, :100] = 5.0                     # 100 ties: > 64 listed lanes, > C
    logits[2, :, 50:100] = 6.0                   # 50 ties: fit the race list; C 40: not the slot
    logits[3, :, 5:] = float("-inf")             # 5 finite lanes
    logits[4, 2, 17] = float("nan")              # a bad row
    logits[6, :, :150] = -200.0                  # 169 lanes kept by top-k, 19 with P > 0
    logits[6, :, 150:169] = 0.0
    logits[6, :, 169:] = -300.0
    forced = torch.full((B, 40), -1, dtype=torch.int64)
    forced[0, 2] = 9                             # request 0 (pos 0): row 2 forced
    drafts = torch.argsort(logits[:, :W], dim=-1, descending=True, stable=True)[..., 3]
    drafts[0, 2] = 9
    drafts[5, 1] = torch.argmin(logits[5, 1])    # P = 0: rejected, rows 2 and 3 draw next drafts
    win = torch.full((B,), W)
    outs = {}
    for cand in (True, False):
        monkeypatch.setattr(tj, "CAND_LIST", cand)
        assert (tj.list_size(V, K, False, True, vp, ref.VP_LOG, -1.0) > 0) == cand
        (o_r, s_r), (o_t, s_t) = _sparse_one_step(logits, drafts, win, forced, cap, mode, vp, K, top_p)
        for x, y in zip(o_r, o_t):
            assert torch.equal(x, y)
        assert torch.equal(s_r["status"], s_t["status"])
        # overflowing rows 1..4: request 1, and request 2 when C < 50
        assert int(s_r["status"][3]) == 4 * (1 + (cap < 50))
        ok = [b for b in range(B) if int(o_r[0][b]) >= 0]
        assert ok == [0, 1, 2, 3, 5, 6, 7]
        assert torch.equal(s_r["q_kind"][ok], s_t["q_kind"][ok])
        dense = (s_r["q_kind"][ok] & ref.KIND_MASK) == ref.KIND_DENSE
        assert torch.equal(s_r["q_idx"][ok][dense], s_t["q_idx"][ok][dense])
        assert torch.allclose(s_r["q"][ok][dense], s_t["q"][ok][dense], rtol=1e-5, atol=1e-6 if vp else 1e-10)
        if vp:
            assert torch.allclose(s_r["p"][ok][dense], s_t["p"][ok][dense], rtol=1e-5, atol=1e-10)
        outs[cand] = o_t
    for x, y in zip(outs[True], outs[False]):
        assert torch.equal(x, y)
    if mode != "gumbel_jacobi":
        assert 0 < int(outs[True][0][[0, 1, 2, 3, 5, 6, 7]].sum()) < 7 * W     # some accepted, some rejected


@pytest.mark.skipif(not INTERP, reason="interpreter grid (the GPU tests above cover the compiled kernel)")
@pytest.mark.parametrize("spec", ["sjd", "vp_log_b1", "coupling_vp_add_b0.5", "gumbel"])
def test_sparse_candidate_list_multi_step_matches_reference(spec):
    """V 200, top-k 20, C 40: every row takes the candidate-list path and stores its race list as
    the slot's entries; ten positions decoded with the state fed back, token for token."""
    import sjd_kernels.triton.jacobi_step as tj
    assert tj.cand_size(200, 20, tj.list_size(200, 20, False, True, False, ref.VP_ADD, 0.0)) > 0
    status = _compare(spec, V=200, L=10, n=6, W=4, k=20, cap=40, device="cpu")
    assert status[3] == 0
