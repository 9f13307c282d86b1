"""Triton ``verify_chain``: one program per request, bit for bit the reference
(``sjd_kernels.reference.verify_chain``).

A program gathers ``target[j, D_j]`` and ``draft[j, D_j]`` of every row of its window at once (one
tile of the rows), draws the acceptance uniforms, finds the first rejection ``m``, then reads
rows ``m`` of both laws once, in tiles of ``BLOCK_V`` lanes, for the residual race (the target's
race on the bonus row); the race keeps its best key and the lowest lane holding it, so tiles in
lane order give the whole row's winner, as the reference's ``argmax`` does. Only a residual
without mass (rounding) reads the target row a second time, for the target's race. No other row
is read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import rng as _rng
from ..ops._common import lane_contiguous
from ..reference import jacobi_step as _ref
from .rng import counter_word, four_words, lane_words_from, seed_key
from .sampling import INT32_MAX, exponential, uniform24

S_ACCEPT: tl.constexpr = tl.constexpr(_rng.STREAM_ACCEPT)
S_RESID: tl.constexpr = tl.constexpr(_rng.STREAM_RESID)
ERR_NONFINITE: tl.constexpr = tl.constexpr(_ref.ERR_NONFINITE)
ERR_DRAFT_RANGE: tl.constexpr = tl.constexpr(_ref.ERR_DRAFT_RANGE)
MAX_BLOCK_V = 4096


@triton.jit
def _prob(x):
    """True where ``x`` can be a probability: finite and not negative (NaN fails both)."""
    return (x >= 0.0) & (x < float("inf"))


@triton.jit
def _race_tile(w, E, lanes, valid, best, idx, seen):
    """One tile of an exponential race (``rng.race``): the running best key, its lowest lane and
    whether any lane had ``w > 0``. A later tile takes over only with a strictly larger key."""
    ok = valid & (w > 0.0)
    key = tl.where(ok, tl.math.div_rn(w, E), -1.0)
    key = tl.where(valid, key, float("-inf"))
    b = tl.max(key, 0)
    i = tl.min(tl.where(valid & (key == b), lanes, INT32_MAX), 0)
    take = b > best
    return tl.where(take, b, best), tl.where(take, i, idx), seen | (tl.max(ok.to(tl.int32), 0) > 0)


@triton.jit
def _row_race(prow, qrow, resid, V, k0, k1, cm, c2, BLOCK_V: tl.constexpr):
    """The race over one row read in tiles of ``BLOCK_V`` lanes (stream RESID's noise at the counter
    ``cm``, ``c2``): weights ``max(0, p - q)`` where ``resid`` (a rejected draft's residual; ``q``
    is not read otherwise), else ``p``. Returns (winning lane or -1, whether a value read was no
    probability: NaN, infinite or negative)."""
    best = tl.full([], float("-inf"), tl.float32)
    idx = tl.zeros([], dtype=tl.int32)
    seen = tl.zeros([], dtype=tl.int1)
    bad = tl.zeros([], dtype=tl.int1)
    off = tl.zeros([], dtype=tl.int32)
    while off < V:                     # (a while loop: the interpreter cannot range() over a runtime int)
        lanes = off + tl.arange(0, BLOCK_V)
        valid = lanes < V
        p = tl.load(prow + lanes, mask=valid, other=0.0).to(tl.float32)
        q = tl.load(qrow + lanes, mask=valid & resid, other=0.0).to(tl.float32)
        bad = bad | (tl.max((valid & ~(_prob(p) & _prob(q))).to(tl.int32), 0) > 0)
        E = exponential(lane_words_from(k0, k1, cm, c2, S_RESID, off // 4, BLOCK_V))
        best, idx, seen = _race_tile(tl.where(resid, tl.maximum(p - q, 0.0), p), E, lanes, valid, best, idx, seen)
        off += BLOCK_V
    return tl.where(seen, idx, -1), bad


@triton.jit
def _verify_chain_kernel(t_ptr, t_sb, t_sj, d_ptr, d_sb, d_sj, ids_ptr, wl_ptr, pos_ptr, seed_ptr, step_ptr,
                         status_ptr, num_ptr, tok_ptr, W, V,
                         BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    wl = tl.minimum(tl.maximum(tl.load(wl_ptr + b), 0), W)
    pos = tl.load(pos_ptr + b)
    k0, k1 = seed_key(tl.load(seed_ptr + b))
    c2 = counter_word(tl.load(step_ptr + b))

    # ---- acceptance of every draft row
    js = tl.arange(0, BLOCK_W)
    is_draft = js < wl
    D = tl.load(ids_ptr + b * W + js, mask=is_draft, other=0)
    in_range = (D >= 0) & (D < V)
    ok = is_draft & in_range
    Dc = tl.where(ok, D, 0)
    js64 = js.to(tl.int64)                    # js * the row stride passes 2**31 for row-strided views
    Pd = tl.load(t_ptr + b * t_sb + js64 * t_sj + Dc, mask=ok, other=0.0).to(tl.float32)
    Qd = tl.load(d_ptr + b * d_sb + js64 * d_sj + Dc, mask=ok, other=0.0).to(tl.float32)
    cj = counter_word(pos + js)
    w0, _, _, _ = four_words(k0, k1, cj, tl.zeros_like(cj) + c2, S_ACCEPT)
    accept = uniform24(w0) * Qd < Pd
    m = tl.min(tl.where(is_draft & ~accept, js, wl), 0)
    draft_bad = tl.max((is_draft & ~in_range).to(tl.int32), 0) > 0
    bad = tl.max((ok & ~(_prob(Pd) & _prob(Qd))).to(tl.int32), 0) > 0

    # ---- row m: the residual race of a rejected draft, or the target's race on the bonus row
    resid = m < wl
    cm = counter_word(pos + m)
    prow = t_ptr + b * t_sb + m * t_sj
    cand, bad_row = _row_race(prow, d_ptr + b * d_sb + m * d_sj, resid, V, k0, k1, cm, c2, BLOCK_V)
    bad = bad | bad_row
    zero = resid & (cand < 0)
    if zero:
        # no residual mass (only rounding makes target - draft vanish where the draft was rejected):
        # the target's race with the same noise, a second pass over the row (its values were checked)
        cand, bad_row = _row_race(prow, prow, resid & ~zero, V, k0, k1, cm, c2, BLOCK_V)
    cand = cand.to(tl.int64)
    bad = bad | (cand < 0)
    err = tl.where(bad, ERR_NONFINITE, 0) | tl.where(draft_bad, ERR_DRAFT_RANGE, 0)
    bad = bad | draft_bad
    tl.atomic_or(status_ptr, err, mask=err != 0)
    tl.atomic_add(status_ptr + 1, 1, mask=zero & ~bad)

    # ---- outputs
    tl.store(num_ptr + b, tl.where(bad, -1, m).to(tl.int64))
    jt = tl.arange(0, BLOCK_T)
    Dt = tl.load(ids_ptr + b * W + jt, mask=jt < m, other=-1)
    tok = tl.where(jt < m, Dt, tl.where(jt == m, cand, -1))
    tok = tl.where(bad, -1, tok)
    tl.store(tok_ptr + b * (W + 1) + jt, tok, mask=jt < W + 1)


def kernel_config(V: int, W: int) -> dict:
    bv = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
    return {"BLOCK_V": bv, "BLOCK_W": max(2, triton.next_power_of_2(max(W, 1))),
            "BLOCK_T": max(2, triton.next_power_of_2(W + 1)), "num_warps": 8 if bv >= 2048 else 4}


def verify_chain_triton(target, draft, ids, win_len, pos, seed, step, status):
    """``verify_chain`` with the Triton kernel: same arguments and results as the reference. The
    laws need a contiguous last dimension (any row strides)."""
    from ..ops.verify_chain import check_args
    B, W, V = check_args(target, draft, ids, win_len, pos, seed, step, status)
    W1 = W + 1
    dev = target.device
    target, draft = lane_contiguous(target), lane_contiguous(draft)
    ids, win_len, pos, seed, step = (t.contiguous() for t in (ids, win_len, pos, seed, step))
    d = draft if W > 0 else target                     # never read when W = 0 (no draft rows)
    num = torch.empty(B, dtype=torch.int64, device=dev)
    tokens = torch.empty(B, W1, dtype=torch.int64, device=dev)
    cfg = kernel_config(V, W)
    _verify_chain_kernel[(B,)](target, target.stride(0), target.stride(1), d, d.stride(0), d.stride(1),
                               ids if W > 0 else num, win_len, pos, seed, step, status, num, tokens, W, V,
                               BLOCK_W=cfg["BLOCK_W"], BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"],
                               num_warps=cfg["num_warps"], enable_fp_fusion=False)
    return num, tokens


_TYPES = {"t_ptr": "*fp32", "t_sb": "i64", "t_sj": "i64", "d_ptr": "*fp32", "d_sb": "i64", "d_sj": "i64",
          "ids_ptr": "*i64", "wl_ptr": "*i64", "pos_ptr": "*i64", "seed_ptr": "*i64", "step_ptr": "*i64",
          "status_ptr": "*i32", "num_ptr": "*i64", "tok_ptr": "*i64", "W": "i32", "V": "i32"}


def codegen_cases(V: int) -> list:
    """Compile cases for ``tests/test_codegen.py`` (sm_90 without a GPU): fp32 and bf16 laws."""
    cases = []
    for dt in ("fp32", "bf16"):
        cfg = kernel_config(V, 16)
        ce = {"BLOCK_W": cfg["BLOCK_W"], "BLOCK_T": cfg["BLOCK_T"], "BLOCK_V": cfg["BLOCK_V"]}
        sig = dict(_TYPES, t_ptr=f"*{dt}", d_ptr=f"*{dt}", **{k: "constexpr" for k in ce})
        cases.append(dict(name=f"verify-chain-{dt}", kernel="_verify_chain_kernel", signature=sig, constexprs=ce,
                          options=dict(num_warps=cfg["num_warps"], enable_fp_fusion=False)))
    return cases
