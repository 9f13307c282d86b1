"""Triton kernels of ``jacobi_step`` (spec: ``sjd_kernels.reference.jacobi_step``).

Two launches, no host synchronisation, fixed output shapes (CUDA-graph capturable):

1. ``_jacobi_rows_kernel``, grid ``(B, W+1)``: one program per target row ``j`` of request ``b``
   (rows beyond ``win_len[b]`` exit at once). It fuses CFG combine, temperature, top-k, softmax,
   top-p (or greedy), verification of the row's draft, the row's commit candidate (residual race,
   or bonus race on the last row), the row's next draft (sjd / vp / coupling / gumbel /
   gumbel_jacobi) and the row's state writes (``q_state``, ``p_prev``, ``q_kind``). Per-row results
   go to small scratch tensors: flags (row error, draft error, zero-mass residual, zero-mass
   coupling redraw, accepted), the candidate and the new draft.
2. ``_jacobi_commit_kernel``, grid ``(B,)``: first rejection ``m``, committed tokens,
   ``next_drafts`` (rows after ``m``, then new tail positions: uniform by the 4-word rejection rule
   of ``rng.uniform_token``, or a copy of the left neighbour), tail ``q_kind`` writes (after every
   row write of kernel 1, as in the reference), error outputs (-1) and the status atomics.

Sparse state (``q_idx`` given, constexpr ``SPARSE``): a slot is C ascending lane ids with values
(``reference.jacobi_step``). The old law of a lane comes from a vectorised binary search over the
slot's ids (``_sparse_find``, only on lanes a race can pick); the new entries are an ordered
compaction of the lanes with ``P > 0`` (``prefix_count``), written after the barrier that ends every
read of the slot; a row with more than C such lanes drafts uniformly and raises flag ``F_OVERFLOW``.
With the candidate list (below) the race list is that compaction: it is stored as the slot's
entries, and the old law and p_prev are searched at the listed lanes only (a search over a tile of
LIST_K lanes instead of a masked one over the row tile); a row whose support exceeds C takes the
row path.

Races over a list (constexpr ``LIST_K``, ``list_size``: on when top-k is on, unless the VP law is
additive with beta < 0, which can be positive where P is 0; with the sparse state only together
with the candidate list): the lanes with ``P > 0`` (about top-k of them) go, in lane order, to a
per-row scratch list, and the residual, bonus, fresh-draft, coupling-redraw and Gumbel races run
over it (a race weighs no other lane), so their Philox words, logs and divisions cost LIST_K lanes
instead of the whole row; a row whose support overflows the list (ties at the threshold) races
densely. Same results as the dense races (the interpreter parity tests run both).
``LIST_RACES = False`` turns it off.

Top-k through a candidate list (constexpr ``CAND_K``, ``cand_size``: whenever the races run over a
list): the top-k threshold search (``sampling.kth_rounds``)
runs over the row only until at most CAND_K = next_pow2(2 k + 32) lanes lie at or above the
bracket's lower end; those lanes (ids and scaled logits, in lane order) go to a scratch list and
the search goes on over them from the same state, so it makes the same rounds and finds the same
threshold. Softmax, top-p and the compaction of the lanes with P > 0 into the race list run over
the candidate list, and the VP law over the race list (it is zero where P is); the dense Qt and
P rows are only written (zeros, then the listed values after a barrier).
Ties that overflow the candidate list or the race list fall back to the row. Outputs equal the
row path's; stored P values can differ in the last ulp (the softmax sum runs in another order).
``CAND_LIST = False`` turns it off (bench backend ``triton_rowsearch``).

State after an error is undefined (kernel 1 cannot know that another row of the same request is
bad): DESIGN.md asks callers to re-initialise it; outputs of that request are -1 as in the reference.

Numerics follow the float32 reference op by op: fp contraction is disabled at launch
(``enable_fp_fusion=False``: ``u + s * (c - u)`` and the VP trend must not become FMAs), divisions
that feed a decision use ``div_rn`` (Triton's ``/`` is ``div.full.f32`` on NVIDIA), ``exp`` is
libdevice ``expf``, ``log`` the libdevice polynomial. What remains different is summation order
(softmax and top-p sums, VP normalisation) and last-ulp exp/log differences, which can move a
sample across a boundary in rare cases.

Tile: one row is one register tile ``BLOCK_V = next_power_of_2(V)`` (V up to 32768; 16 warps above
4096 lanes, ``rows_warps``). Several V-sized vectors are live at once (the logits or keys, P, Q_t;
Q_old and the noise in the dense races), which spills registers for V >= 16384 (``python -m
sjd_kernels.bench.sass`` shows the stack). A chunked version would keep P (or the combined logits)
in a global/L2 scratch row, loop over V in chunks for each pass (max, exp-sum, each count of the
top-k and top-p bracket searches, each race as a running (best key, lowest lane) pair), and
regenerate Philox words per chunk from the lane offset (``lane_words`` would take a ``lane0``);
results are the same since every reduction used here is order-insensitive except the float sums.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import rng as _rng
from ..ops._common import lane_contiguous
from ..reference import jacobi_step as _ref
from ..reference import target as _ref_target
from .rng import counter_word, four_words, lane_words, lane_words_at, seed_key
from .sampling import (INT32_MAX, exponential, float_key, gather_lane, key_value, kth_init_row, kth_rounds,
                       pow_accurate, prefix_count, prefix_count_total, race, row_max, softmax_top_p, target_row,
                       uniform24, uniform_token)

try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except Exception:  # pragma: no cover - older layouts
    _Interpreted = ()

# constexpr copies of the reference's constants
S_ACCEPT: tl.constexpr = tl.constexpr(_rng.STREAM_ACCEPT)
S_RESID: tl.constexpr = tl.constexpr(_rng.STREAM_RESID)
S_DRAFT: tl.constexpr = tl.constexpr(_rng.STREAM_DRAFT)
S_COUPLE: tl.constexpr = tl.constexpr(_rng.STREAM_COUPLE)
S_COUPLE_RES: tl.constexpr = tl.constexpr(_rng.STREAM_COUPLE_RES)
S_TAIL: tl.constexpr = tl.constexpr(_rng.STREAM_TAIL)
S_GUMBEL: tl.constexpr = tl.constexpr(_rng.STREAM_GUMBEL)
M_SJD: tl.constexpr = tl.constexpr(_ref.MODE_SJD)
M_COUPLING: tl.constexpr = tl.constexpr(_ref.MODE_COUPLING)
M_GUMBEL: tl.constexpr = tl.constexpr(_ref.MODE_GUMBEL)
M_GUMBEL_JACOBI: tl.constexpr = tl.constexpr(_ref.MODE_GUMBEL_JACOBI)
K_DENSE: tl.constexpr = tl.constexpr(_ref.KIND_DENSE)
K_UNIFORM: tl.constexpr = tl.constexpr(_ref.KIND_UNIFORM)
K_ONEHOT: tl.constexpr = tl.constexpr(_ref.KIND_ONEHOT)
K_MASK: tl.constexpr = tl.constexpr(_ref.KIND_MASK)
K_FLAG_PREV: tl.constexpr = tl.constexpr(_ref.FLAG_PREV)

# per-row flag bits written by kernel 1 (bits 0 and 1 are the status error bits themselves)
F_ROW_BAD: tl.constexpr = tl.constexpr(_ref.ERR_NONFINITE)      # 1
F_DRAFT_BAD: tl.constexpr = tl.constexpr(_ref.ERR_DRAFT_RANGE)  # 2
F_ZERO_RESID: tl.constexpr = tl.constexpr(4)
F_ZERO_COUPLE: tl.constexpr = tl.constexpr(8)
F_ACCEPT: tl.constexpr = tl.constexpr(16)
F_OVERFLOW: tl.constexpr = tl.constexpr(32)
IDX_PAD: tl.constexpr = tl.constexpr(_ref.IDX_PAD)

# exponent special cases of torch.pow(tensor, scalar), which the reference's log-form VP hits
POW_GENERAL, POW_ONE, POW_TWO, POW_HALF, POW_THREE, POW_NEG_ONE, POW_NEG_HALF, POW_NEG_TWO = range(8)
_POW_CASES = {1.0: POW_ONE, 2.0: POW_TWO, 0.5: POW_HALF, 3.0: POW_THREE, -1.0: POW_NEG_ONE,
              -0.5: POW_NEG_HALF, -2.0: POW_NEG_TWO}


@triton.jit
def _pow_scalar(r, beta, BETA_POW: tl.constexpr, INTERP: tl.constexpr):
    """``r ** beta`` computed the way ``torch.pow(tensor, beta)`` does for its special exponents."""
    if BETA_POW == 1:
        out = r
    elif BETA_POW == 2:
        out = r * r
    elif BETA_POW == 3:
        out = tl.sqrt_rn(r)
    elif BETA_POW == 4:
        out = r * r * r
    elif BETA_POW == 5:
        out = tl.math.div_rn(tl.full(r.shape, 1.0, tl.float32), r)
    elif BETA_POW == 6:
        out = tl.math.div_rn(tl.full(r.shape, 1.0, tl.float32), tl.sqrt_rn(r))
    elif BETA_POW == 7:
        out = tl.math.div_rn(tl.full(r.shape, 1.0, tl.float32), r * r)
    else:
        out = pow_accurate(r, beta, INTERP)
    return out


@triton.jit
def _vp_predict(p, pp, valid, beta, eps, VP_FORM: tl.constexpr, BETA_POW: tl.constexpr, INTERP: tl.constexpr):
    """``Qvp`` of ``reference.jacobi_step.vp_predict`` on one row tile (P itself when the weights have no
    positive finite sum)."""
    if VP_FORM == 0:
        w = tl.maximum(p + beta * (p - pp), 0.0)
    else:
        r = tl.math.div_rn(p + eps, pp + eps)
        w = p * _pow_scalar(r, beta, BETA_POW, INTERP)
    w = tl.where(valid, w, 0.0)
    s = tl.sum(w, 0)
    ok = (s > 0.0) & (s < float("inf"))
    return tl.where(ok, tl.math.div_rn(w, tl.zeros_like(w) + tl.where(ok, s, 1.0)), p)


@triton.jit
def _old_law(stored, lanes, valid, is_draft, kind, D, q_unif):
    """The law the draft of this row was drawn from, as a tile: the stored dense row, uniform, or
    one-hot at D (0 outside a draft row and on padded lanes)."""
    Qold = tl.where(kind == K_UNIFORM, q_unif, stored)
    Qold = tl.where(kind >= K_ONEHOT, tl.where(lanes == D, 1.0, 0.0), Qold)
    return tl.where(valid & is_draft, Qold, 0.0)


@triton.jit
def _residual_race(P, Qold, E, lanes, valid, is_draft):
    """The residual race ``max(0, P - Qold)`` of a draft row (the race over P on the bonus row); on
    zero residual mass the race over P with the same noise. Returns the lane and whether the
    residual mass was zero. The row's commit candidate (P, the stored law) and the coupling
    redraw (Qt, the stored law) are both this race."""
    r = race(tl.where(is_draft, tl.maximum(P - Qold, 0.0), P), E, lanes, valid)
    zero = r < 0
    if r < 0:
        r = race(P, E, lanes, valid)
    return r, zero


@triton.jit
def _draft_race(Qt, Qtl, ids, lval, use_list, lanes, valid, k0, k1, c_pos, c_step, BLOCK_V: tl.constexpr):
    """The row's next draft from Qt (DRAFT noise): over the listed lanes (Qtl: Qt there) or the whole row."""
    if use_list:
        new = race(Qtl, exponential(lane_words_at(k0, k1, c_pos, c_step, S_DRAFT, ids)), ids, lval)
    else:
        new = race(Qt, exponential(lane_words(k0, k1, c_pos, c_step, S_DRAFT, BLOCK_V)), lanes, valid)
    return new.to(tl.int64)


@triton.jit
def _sparse_find(idx_row, keys, want, C, NSTEPS: tl.constexpr):
    """Lower bound of each key in the ascending ids ``idx_row[0:C]`` (NSTEPS >= ceil(log2(C + 1))
    halvings); returns the entry of each key and whether the id there equals it (masked by ``want``)."""
    lo = tl.zeros_like(keys)
    hi = lo + C
    for _ in tl.static_range(NSTEPS):
        live = want & (lo < hi)
        mid = (lo + hi) >> 1
        v = tl.load(idx_row + mid, mask=live, other=0)
        right = live & (v < keys)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(live & (~right), mid, hi)
    hit = want & (lo < C)
    found = hit & (tl.load(idx_row + lo, mask=hit, other=-1) == keys)
    return lo, found


@triton.jit
def _sparse_row_law(P, lanes, valid, is_draft, is_forced, row_bad, kind, D, j, C, q_unif, i_row, q_row,
                    NSTEPS: tl.constexpr):
    """The old law of a draft row from its sparse slot, over the whole row tile: returns the row's
    support size, whether it overflows the slot, the entry of each lane and whether it holds one,
    the old law as a tile and its value at the draft."""
    n_sup = tl.sum((valid & (P > 0.0)).to(tl.int32), 0)
    ovf_row = (j >= 1) & (n_sup > C) & (~is_forced) & (~row_bad)
    # only lanes a race can pick need the old law: P > 0 (residual), Qt > 0 (coupling; Qt lies in
    # P's support unless the row overflows), and the draft's own lane
    want = valid & is_draft & (kind == K_DENSE) & ((P > 0.0) | (lanes == D) | ovf_row)
    at, found = _sparse_find(i_row, lanes, want, C, NSTEPS)
    Qold = _old_law(tl.load(q_row + at, mask=found, other=0.0), lanes, valid, is_draft, kind, D, q_unif)
    Qd = gather_lane(Qold, lanes, D)             # 0 when D is not a lane of [0, V)
    return n_sup, ovf_row, at, found, Qold, Qd


@triton.jit
def _sparse_put(i_row, q_row, pp_row, at, keep, ids, qt, p, HAS_PREV: tl.constexpr):
    """Entries ``at`` (where ``keep``) of a sparse slot: lane ids, Qt and, with HAS_PREV, P."""
    tl.store(i_row + at, ids, mask=keep)
    tl.store(q_row + at, qt, mask=keep)
    if HAS_PREV:
        tl.store(pp_row + at, p, mask=keep)


@triton.jit
def _jacobi_rows_kernel(
        logits_ptr, stride_lb, stride_lj, uncond_ptr, stride_ub, stride_uj, cfg_ptr,
        drafts_ptr, win_ptr, pos_ptr, seed_ptr, step_ptr, forced_ptr, L,
        q_state_ptr, q_kind_ptr, p_prev_ptr, q_idx_ptr,
        flags_ptr, cand_ptr, new_ptr, list_ptr, listp_ptr, listq_ptr, cid_ptr, cy_ptr,
        W, V, R, C, temperature, top_k, top_p, beta, vp_eps, q_unif,
        HAS_UNCOND: tl.constexpr, HAS_FORCED: tl.constexpr, HAS_PREV: tl.constexpr, USE_VP: tl.constexpr,
        VP_FORM: tl.constexpr, BETA_POW: tl.constexpr, GREEDY: tl.constexpr, DO_TOPK: tl.constexpr,
        DO_TOPP: tl.constexpr, MODE: tl.constexpr, INTERP: tl.constexpr, BLOCK_V: tl.constexpr,
        SPARSE: tl.constexpr = False, BLOCK_C: tl.constexpr = 1, C_STEPS: tl.constexpr = 1,
        LIST_K: tl.constexpr = 0, CAND_K: tl.constexpr = 0):
    b = tl.program_id(0).to(tl.int64)      # requests on grid x (up to 2**31 - 1; y stops at 65535)
    j = tl.program_id(1)
    wl = tl.load(win_ptr + b)
    if j <= wl:
        W1 = W + 1
        lanes = tl.arange(0, BLOCK_V)
        valid = lanes < V
        p_abs = tl.load(pos_ptr + b) + j
        slot = p_abs % R
        k0, k1 = seed_key(tl.load(seed_ptr + b))
        c_pos = counter_word(p_abs)
        c_step = counter_word(tl.load(step_ptr + b))
        c_zero = tl.zeros_like(c_pos)
        is_draft = j < wl
        f = tl.full([], -1, tl.int64)
        if HAS_FORCED:
            f = tl.load(forced_ptr + b * L + p_abs, mask=p_abs < L, other=-1)
        is_forced = f >= 0
        D = tl.load(drafts_ptr + b * W + j, mask=is_draft, other=0)

        # ---- target row P (float32, padded lanes 0)
        j64 = j.to(tl.int64)                # j * the row stride passes 2**31 for row-strided views
        x = tl.load(logits_ptr + b * stride_lb + j64 * stride_lj + lanes, mask=valid, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            u = tl.load(uncond_ptr + b * stride_ub + j64 * stride_uj + lanes, mask=valid, other=0.0).to(tl.float32)
            s = tl.load(cfg_ptr + b)
            x = tl.where((x == -float("inf")) & (u == -float("inf")), x, u + s * (x - u))
        # ``temperature`` is the float32 reciprocal of T, as in the reference and the CUDA kernel
        if CAND_K > 0:
            # ---- top-k through a candidate list (CAND_K > 0: the races run over a list).
            # The threshold search runs over the row only until at most CAND_K lanes lie at or
            # above its lower end; those lanes (in lane order) go to a scratch list and the search
            # goes on over them from the same state (``kth_rounds``: same rounds, same threshold).
            # Softmax, top-p and the compaction of the lanes with P > 0 into the race list then
            # cost CAND_K lanes, and the dense P is only written (zeros, then the list's values).
            # When ties overflow the candidate list or the race list, P is computed over the row.
            bad, ym = row_max(x, valid, temperature, False)
            y = tl.where(valid & (~bad), x * temperature, float("-inf"))
            # the search starts from the row maximum (a bad row's lanes are all -inf here)
            key, lo, hi, kmin, cge, cgt, gap = kth_init_row(float_key(y), valid,
                                                            float_key(tl.where(bad, float("-inf"), ym)), V)
            lo, hi, cge, cgt, gap = kth_rounds(key, top_k, lo, hi, kmin, cge, cgt, gap, CAND_K)
            mx = tl.where(bad, 0.0, ym)
            P = tl.zeros([BLOCK_V], dtype=tl.float32)
            li = tl.arange(0, LIST_K)
            ids = tl.zeros([LIST_K], dtype=tl.int32)
            Pl = tl.zeros([LIST_K], dtype=tl.float32)
            lval = li < 0
            n_list = tl.full([], 0, tl.int32)
            # cge bounds the count at or above lo (it is exact unless a max finish ended the search)
            use_list = cge <= CAND_K
            if use_list:
                keep_c = key >= lo                          # padded lanes carry a key below lo
                at_c, n_c = prefix_count_total(keep_c, BLOCK_V)
                cbase = (b * W1 + j) * CAND_K
                tl.store(cid_ptr + cbase + at_c, lanes, mask=keep_c)
                tl.store(cy_ptr + cbase + at_c, y, mask=keep_c)
                tl.debug_barrier()
                ci = tl.arange(0, CAND_K)
                cval = ci < n_c
                # written by other threads of this program before the barrier: read through L2 (.cg)
                idc = tl.load(cid_ptr + cbase + ci, mask=cval, other=0, cache_modifier=".cg")
                yc = tl.load(cy_ptr + cbase + ci, mask=cval, other=float("-inf"), cache_modifier=".cg")
                kc = tl.where(cval, float_key(yc), -INT32_MAX - 1)
                lo, hi, cge, cgt, gap = kth_rounds(kc, top_k, lo, hi, kmin, cge, cgt, gap, 0)
                yc = tl.where(yc >= key_value(lo), yc, float("-inf"))
                Pc = softmax_top_p(yc, cval, mx, top_p, DO_TOPP, INTERP)
                keep_p = cval & (~bad) & (Pc > 0.0)
                at_p, n_list = prefix_count_total(keep_p, CAND_K)
                use_list = n_list <= LIST_K
                if SPARSE:                          # the list is the slot's new entries: at most C
                    use_list = use_list & (n_list <= C)
                if use_list:
                    lbase = (b * W1 + j) * LIST_K
                    tl.store(list_ptr + lbase + at_p, idc, mask=keep_p)
                    tl.store(listp_ptr + lbase + at_p, Pc, mask=keep_p)
                    tl.debug_barrier()
                    lval = li < n_list
                    ids = tl.load(list_ptr + lbase + li, mask=lval, other=0, cache_modifier=".cg")
                    Pl = tl.load(listp_ptr + lbase + li, mask=lval, other=0.0, cache_modifier=".cg")
            else:
                lo, hi, cge, cgt, gap = kth_rounds(key, top_k, lo, hi, kmin, cge, cgt, gap, 0)
            if not use_list:
                y = tl.where(y >= key_value(lo), y, float("-inf"))
                P = softmax_top_p(y, valid, mx, top_p, DO_TOPP, INTERP)
                P = tl.where(valid & (~bad), P, 0.0)
        else:
            P, bad = target_row(x, lanes, valid, V, temperature, top_k, top_p, GREEDY, DO_TOPK, DO_TOPP, INTERP)
        row_bad = bad & (~is_forced)

        # ---- LIST_K > 0: the lanes with P > 0 (about top_k of them), in lane order, go to a
        # per-row scratch list. Every race of a row on the dense state weighs only such lanes
        # (residual, bonus and Gumbel over P; the fresh draft and the coupling redraw over Qt: P or
        # a VP law that is zero where P is),
        # so those races draw Philox words, logs and divisions for LIST_K lanes instead of BLOCK_V.
        # A row whose support does not fit the list (ties at the top-k threshold) races densely.
        if CAND_K > 0:
            pass                                 # built with the target row above
        elif LIST_K > 0:
            tl.static_assert(not SPARSE, "the sparse state takes the list path with the candidate list only")
            keep_l = valid & (P > 0.0)
            n_list = tl.sum(keep_l.to(tl.int32), 0)
            at_l = prefix_count(keep_l, BLOCK_V)
            lbase = (b * W1 + j) * LIST_K
            tl.store(list_ptr + lbase + at_l, lanes, mask=keep_l & (at_l < LIST_K))
            tl.store(listp_ptr + lbase + at_l, P, mask=keep_l & (at_l < LIST_K))
            tl.debug_barrier()
            li = tl.arange(0, LIST_K)
            lval = li < n_list
            # written by other threads of this program before the barrier: read through L2 (.cg)
            ids = tl.load(list_ptr + lbase + li, mask=lval, other=0, cache_modifier=".cg")
            Pl = tl.load(listp_ptr + lbase + li, mask=lval, other=0.0, cache_modifier=".cg")
            use_list = n_list <= LIST_K
        else:                                    # one-lane stand-ins: the list branches never run
            use_list = tl.full([], 0, tl.int1)
            n_list = tl.full([], 0, tl.int32)
            li = tl.arange(0, 1)
            ids = tl.zeros([1], dtype=tl.int32)
            Pl = tl.zeros([1], dtype=tl.float32)
            lval = ids < 0

        # ---- the stored law of the draft
        in_range = (D >= 0) & (D < V)
        draft_bad = is_draft & (~in_range) & (~(is_forced & (D == f)))
        kind_all = tl.load(q_kind_ptr + b * R + slot)
        kind = kind_all & K_MASK
        if SPARSE:
            # entries of this slot: ascending lane ids, values of Qt and P at them (row width C);
            # a row whose support does not fit the slot drafts uniformly (below)
            q_row = q_state_ptr + (b * R + slot) * C
            i_row = q_idx_ptr + (b * R + slot) * C
            # the old law at the listed lanes (the list path: the support fits the slot there, and
            # the races read no other lane; a binary search per listed lane, none over the row tile)
            ent_l = tl.zeros_like(ids)
            found_l = ids < 0
            Qol = tl.zeros_like(Pl)
            if use_list:
                n_sup = n_list
                ovf_row = n_list < 0
                at = tl.zeros([BLOCK_V], dtype=tl.int32)
                found = lanes < 0
                Qold = tl.zeros([BLOCK_V], dtype=tl.float32)
                ent_l, found_l = _sparse_find(i_row, ids, lval & is_draft & (kind == K_DENSE), C, C_STEPS)
                Qol = _old_law(tl.load(q_row + ent_l, mask=found_l, other=0.0), ids, lval, is_draft, kind, D, q_unif)
                # Qd only meets P(D) and Qt(D) in the acceptance and coupling tests, both 0 and so
                # both false when D is off the list, whatever Qd is there
                Qd = gather_lane(Qol, ids, D)
            else:
                n_sup, ovf_row, at, found, Qold, Qd = _sparse_row_law(P, lanes, valid, is_draft, is_forced, row_bad,
                                                                      kind, D, j, C, q_unif, i_row, q_row, C_STEPS)
        else:
            # the dense old law: the acceptance test reads one lane; the whole row is read below
            # only by the races that use it (the residual of a rejected draft, the coupling redraw)
            q_row = q_state_ptr + (b * R + slot) * V
            Qd = tl.load(q_row + D, mask=is_draft & in_range & (kind == K_DENSE), other=0.0)
            Qd = tl.where(kind == K_UNIFORM, q_unif, tl.where(kind >= K_ONEHOT, 1.0, Qd))
            Qd = tl.where(is_draft & in_range, Qd, 0.0)
            Qold = tl.zeros([BLOCK_V], dtype=tl.float32)
        if use_list:
            Pd = gather_lane(Pl, ids, D)              # P is 0 off the list (padded slots hold 0)
        else:
            Pd = gather_lane(P, lanes, D)

        # ---- verification and the row's commit candidate
        zero_res = tl.full([], 0, tl.int1)
        g = tl.full([], -1, tl.int32)
        if MODE >= M_GUMBEL:
            if (MODE == M_GUMBEL_JACOBI) | (j >= 1):    # position-keyed noise, step 0; row 0 of gumbel
                if use_list:                            # draws no next draft, so reads no g
                    g = race(Pl, exponential(lane_words_at(k0, k1, c_pos, c_zero, S_GUMBEL, ids)), ids, lval)
                else:
                    g = race(P, exponential(lane_words(k0, k1, c_pos, c_zero, S_GUMBEL, BLOCK_V)), lanes, valid)
        if MODE == M_GUMBEL_JACOBI:
            accept = D == g
            cand = g.to(tl.int64)
        else:
            wa, _a1, _a2, _a3 = four_words(k0, k1, c_pos, c_step, S_ACCEPT)
            accept = uniform24(wa) * Qd < Pd
            # the commit reads a row's candidate only where the window stops: at the first rejected
            # draft or at the bonus row, so an accepted draft row draws no residual (its candidate
            # stays -1, as in the CUDA kernel)
            r = tl.full([], -1, tl.int32)
            if (~accept) | (~is_draft):
                if use_list:
                    if not SPARSE:                  # (sparse: looked up above)
                        Qol = _old_law(tl.load(q_row + ids, mask=lval & (is_draft & (kind == K_DENSE)), other=0.0),
                                       ids, lval, is_draft, kind, D, q_unif)
                    r, zr = _residual_race(Pl, Qol, exponential(lane_words_at(k0, k1, c_pos, c_step, S_RESID, ids)),
                                           ids, lval, is_draft)
                else:
                    if not SPARSE:
                        Qold = _old_law(tl.load(q_row + lanes, mask=valid & (is_draft & (kind == K_DENSE)), other=0.0),
                                        lanes, valid, is_draft, kind, D, q_unif)
                    r, zr = _residual_race(P, Qold, exponential(lane_words(k0, k1, c_pos, c_step, S_RESID, BLOCK_V)),
                                           lanes, valid, is_draft)
                zero_res = zr & is_draft & (~is_forced) & (~row_bad)
            cand = r.to(tl.int64)
        accept = tl.where(is_forced, D == f, accept)
        cand = tl.where(is_forced, f, cand)

        # ---- the row's next draft and its law Qt (row 0's position is always committed: skipped)
        zero_cpl = tl.full([], 0, tl.int1)
        ovf_flag = tl.full([], 0, tl.int1)
        new = tl.full([], -1, tl.int64)
        if j >= 1:
            Qt = P
            Qtl = Pl                             # Qt at the listed lanes (Qt = P without VP)
            # only a draft row's slot holds this position's previous row (the bonus slot holds a
            # stale row of an earlier position): the bonus row uses Qt = P
            has_pp = ((kind_all & K_FLAG_PREV) != 0) & is_draft
            if USE_VP and CAND_K > 0:
                if has_pp:
                    if use_list:                 # the VP law is zero where P is: the listed lanes suffice
                        if SPARSE:
                            ppl = tl.load(p_prev_ptr + (b * R + slot) * C + ent_l, mask=found_l, other=0.0)
                        else:
                            ppl = tl.load(p_prev_ptr + (b * R + slot) * V + ids, mask=lval, other=0.0)
                        Qtl = _vp_predict(Pl, ppl, lval, beta, vp_eps, VP_FORM, BETA_POW, INTERP)
                    else:
                        if SPARSE:
                            pp = tl.load(p_prev_ptr + (b * R + slot) * C + at, mask=found, other=0.0)
                        else:
                            pp = tl.load(p_prev_ptr + (b * R + slot) * V + lanes, mask=valid, other=0.0)
                        Qt = _vp_predict(P, pp, valid, beta, vp_eps, VP_FORM, BETA_POW, INTERP)
            elif USE_VP:
                if has_pp:
                    if SPARSE:
                        pp = tl.load(p_prev_ptr + (b * R + slot) * C + at, mask=found, other=0.0)
                    else:
                        pp = tl.load(p_prev_ptr + (b * R + slot) * V + lanes, mask=valid, other=0.0)
                    Qt = _vp_predict(P, pp, valid, beta, vp_eps, VP_FORM, BETA_POW, INTERP)
                if LIST_K > 0:
                    if use_list:                 # the VP law is zero where P is (the launcher checks the form)
                        tl.store(listq_ptr + lbase + at_l, Qt, mask=keep_l & (at_l < LIST_K))
                        tl.debug_barrier()
                        Qtl = tl.load(listq_ptr + lbase + li, mask=lval, other=0.0, cache_modifier=".cg")
            ovf = tl.full([], 0, tl.int1)
            if SPARSE:
                # the support does not fit the slot: this position drafts from the uniform law
                ovf = ovf_row
                if ovf:
                    Qt = tl.where(valid, q_unif, 0.0)
            if MODE >= M_GUMBEL:
                new = g.to(tl.int64)
                if ovf:
                    E_dr = exponential(lane_words(k0, k1, c_pos, c_step, S_DRAFT, BLOCK_V))
                    new = race(Qt, E_dr, lanes, valid).to(tl.int64)
            elif MODE == M_COUPLING:
                if is_draft:
                    wc, _c1, _c2, _c3 = four_words(k0, k1, c_pos, c_step, S_COUPLE)
                    if use_list:                 # Qt is 0 off the list (padded slots hold 0)
                        QtD = gather_lane(Qtl, ids, D)
                    else:
                        QtD = gather_lane(Qt, lanes, D)
                    keep = uniform24(wc) * Qd < QtD
                    if keep:
                        new = D
                    elif use_list:
                        # the redraw weighs max(Qt - Qold, 0), zero where Qt is: the listed lanes suffice
                        # (names apart from the dense branch's: a tile of LIST_K lanes, not BLOCK_V)
                        if SPARSE:               # looked up above
                            Qo_l = Qol
                        else:
                            Qo_l = _old_law(tl.load(q_row + ids, mask=lval & (kind == K_DENSE), other=0.0),
                                            ids, lval, is_draft, kind, D, q_unif)
                        rc, zc = _residual_race(Qtl, Qo_l, exponential(lane_words_at(k0, k1, c_pos, c_step,
                                                                                      S_COUPLE_RES, ids)),
                                                ids, lval, is_draft)
                        zero_cpl = zc & (~is_forced) & (~row_bad)
                        new = rc.to(tl.int64)
                    else:
                        if not SPARSE:
                            Qold = _old_law(tl.load(q_row + lanes, mask=valid & (kind == K_DENSE), other=0.0),
                                            lanes, valid, is_draft, kind, D, q_unif)
                        rc, zc = _residual_race(Qt, Qold, exponential(lane_words(k0, k1, c_pos, c_step, S_COUPLE_RES,
                                                                                 BLOCK_V)),
                                                lanes, valid, is_draft)
                        zero_cpl = zc & (~is_forced) & (~row_bad)
                        new = rc.to(tl.int64)
                else:
                    new = _draft_race(Qt, Qtl, ids, lval, use_list, lanes, valid, k0, k1, c_pos, c_step, BLOCK_V)
            else:
                new = _draft_race(Qt, Qtl, ids, lval, use_list, lanes, valid, k0, k1, c_pos, c_step, BLOCK_V)
            new = tl.where(is_forced, f, new)

            # state of this position; every thread has read Q_old / p_prev of this slot before
            # any thread overwrites it (the loads and stores may use different layouts)
            tl.debug_barrier()
            if SPARSE:
                # ordered compaction of the support (forced and overflowing rows store no entries)
                if (~is_forced) & (~ovf):
                    pp_row = p_prev_ptr + (b * R + slot) * C
                    if use_list:                 # the list is the support, in lane order
                        _sparse_put(i_row, q_row, pp_row, li, lval, ids, Qtl, Pl, HAS_PREV)
                    else:
                        keep = valid & (P > 0.0)
                        _sparse_put(i_row, q_row, pp_row, prefix_count(keep, BLOCK_V), keep, lanes, Qt, P, HAS_PREV)
                    c = tl.arange(0, BLOCK_C)
                    pad = (c >= n_sup) & (c < C)
                    tl.store(i_row + c, tl.full([BLOCK_C], IDX_PAD, tl.int32), mask=pad)
                    tl.store(q_row + c, tl.zeros([BLOCK_C], tl.float32), mask=pad)
                    if HAS_PREV:
                        tl.store(p_prev_ptr + (b * R + slot) * C + c, tl.zeros([BLOCK_C], tl.float32), mask=pad)
            elif CAND_K > 0:
                if use_list:                     # zeros, then the listed lanes (Qt and P are 0 off them)
                    tl.store(q_row + lanes, tl.zeros([BLOCK_V], dtype=tl.float32), mask=valid)
                    if HAS_PREV:
                        tl.store(p_prev_ptr + (b * R + slot) * V + lanes, tl.zeros([BLOCK_V], dtype=tl.float32),
                                 mask=valid)
                    tl.debug_barrier()
                    tl.store(q_row + ids, Qtl, mask=lval)
                    if HAS_PREV:
                        tl.store(p_prev_ptr + (b * R + slot) * V + ids, Pl, mask=lval)
                else:
                    tl.store(q_row + lanes, Qt, mask=valid)
                    if HAS_PREV:
                        tl.store(p_prev_ptr + (b * R + slot) * V + lanes, P, mask=valid)
            else:
                tl.store(q_row + lanes, Qt, mask=valid)
                if HAS_PREV:
                    tl.store(p_prev_ptr + (b * R + slot) * V + lanes, P, mask=valid)
            if HAS_PREV:
                kind_new = tl.where(is_forced, K_ONEHOT, K_DENSE | K_FLAG_PREV)
            else:
                kind_new = tl.where(is_forced, K_ONEHOT, K_DENSE)
            kind_new = tl.where(ovf, K_UNIFORM, kind_new)
            tl.store(q_kind_ptr + b * R + slot, kind_new.to(tl.int32))
            ovf_flag = ovf

        flags = tl.where(row_bad, F_ROW_BAD, 0) | tl.where(draft_bad, F_DRAFT_BAD, 0) \
            | tl.where(zero_res, F_ZERO_RESID, 0) | tl.where(zero_cpl, F_ZERO_COUPLE, 0) \
            | tl.where(accept, F_ACCEPT, 0) | tl.where(ovf_flag, F_OVERFLOW, 0)
        tl.store(flags_ptr + b * W1 + j, flags)
        tl.store(cand_ptr + b * W1 + j, cand)
        tl.store(new_ptr + b * W1 + j, new)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _jacobi_commit_kernel(
        drafts_ptr, win_ptr, pos_ptr, seed_ptr, step_ptr, forced_ptr, L,
        q_kind_ptr, flags_ptr, cand_ptr, new_ptr, status_ptr,
        num_acc_ptr, tokens_ptr, next_ptr,
        W, V, R,
        HAS_FORCED: tl.constexpr, TAIL_LEFT: tl.constexpr, BLOCK_W1: tl.constexpr, BLOCK_W: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    W1 = W + 1
    wl = tl.load(win_ptr + b)
    pos = tl.load(pos_ptr + b)

    # ---- first rejection, errors, counters
    j = tl.arange(0, BLOCK_W1)
    fl = tl.load(flags_ptr + b * W1 + j, mask=j <= wl, other=0)
    rej = (j < wl) & ((fl & F_ACCEPT) == 0)
    m = tl.minimum(tl.min(tl.where(rej, j, W1), 0).to(tl.int64), wl)
    err = tl.max(fl & F_ROW_BAD, 0) | tl.max(fl & F_DRAFT_BAD, 0)
    req_bad = err != 0
    n_zero = tl.sum((fl >> 2) & 1, 0)
    n_zcpl = tl.sum((fl >> 3) & 1, 0)
    n_ovf = tl.sum((fl >> 5) & 1, 0)
    if err != 0:
        tl.atomic_or(status_ptr, err)
    if n_zero > 0:
        tl.atomic_add(status_ptr + 1, n_zero)
    if n_zcpl > 0:
        tl.atomic_add(status_ptr + 2, n_zcpl)
    if n_ovf > 0:
        tl.atomic_add(status_ptr + 3, n_ovf)

    # ---- committed tokens
    cand_m = tl.load(cand_ptr + b * W1 + m)
    d = tl.load(drafts_ptr + b * W + j, mask=j < m, other=0)
    tok = tl.where(j < m, d, tl.where(j == m, cand_m, -1))
    tok = tl.where(req_bad, -1, tok)
    tl.store(tokens_ptr + b * W1 + j, tok, mask=j < W1)
    tl.store(num_acc_ptr + b, tl.where(req_bad, -1, m))

    # ---- next window: rows after m, then new tail positions
    i = tl.arange(0, BLOCK_W)
    im = i < W
    src = m + 1 + i
    from_row = src <= wl
    nd = tl.load(new_ptr + b * W1 + src, mask=im & from_row, other=0)
    tpos = pos + src
    if HAS_FORCED:
        ft = tl.load(forced_ptr + b * L + tpos, mask=im & (tpos < L), other=-1)
    else:
        ft = tl.full([BLOCK_W], -1, tl.int64)
    tail = im & (~from_row)
    if TAIL_LEFT:
        # the reference copies left to right; equivalently each tail slot takes the last forced
        # token at or before it within the tail, else the value just before the tail
        base = tl.where(m < wl, tl.load(new_ptr + b * W1 + wl), cand_m)
        last = tl.associative_scan(tl.where(tail & (ft >= 0), i, -1), 0, _max_combine)
        if HAS_FORCED:
            lf = tl.load(forced_ptr + b * L + pos + m + 1 + last, mask=im & (last >= 0), other=-1)
        else:
            lf = tl.full([BLOCK_W], -1, tl.int64)
        tt = tl.where(last >= 0, lf, base)
        # a copied id outside [0, V) (forced structural token) draws uniformly instead
        k0, k1 = seed_key(tl.load(seed_ptr + b))
        c_pos = counter_word(tpos)
        c_step = tl.zeros_like(c_pos) + counter_word(tl.load(step_ptr + b))
        w0, w1, w2, w3 = four_words(k0, k1, c_pos, c_step, S_TAIL)
        oob = (ft < 0) & ((tt < 0) | (tt >= V))
        tt = tl.where(oob, uniform_token(w0, w1, w2, w3, V), tt)
        tkind = tl.where(oob, K_UNIFORM, K_ONEHOT).to(tl.int32)
    else:
        k0, k1 = seed_key(tl.load(seed_ptr + b))
        c_pos = counter_word(tpos)
        c_step = tl.zeros_like(c_pos) + counter_word(tl.load(step_ptr + b))
        w0, w1, w2, w3 = four_words(k0, k1, c_pos, c_step, S_TAIL)
        tt = tl.where(ft >= 0, ft, uniform_token(w0, w1, w2, w3, V))
        tkind = tl.where(ft >= 0, K_ONEHOT, K_UNIFORM).to(tl.int32)
    nd = tl.where(tail, tt, nd)
    nd = tl.where(req_bad, -1, nd)
    tl.store(next_ptr + b * W + i, nd, mask=im)
    tl.store(q_kind_ptr + b * R + tpos % R, tkind, mask=tail & (~req_bad))


# Warps of the rows kernels (jacobi_step, tree_verify) for rows of more than 4096 lanes. 16 gives
# each thread 32 lanes of the row in up to 128 registers (one block per SM: 25 % occupancy on an
# H100/H200); 32 halves the lanes per thread at 64 registers with some spilling (`python -m
# sjd_kernels.bench.sass`), for twice the warps to hide latency. The bench variant ``triton_w32``
# times 32 beside the default.
ROWS_WARPS_LARGE = 16


@contextlib.contextmanager
def rows_warps(n: int):
    """Run the rows kernel with ``n`` warps for rows of more than 4096 lanes inside this block."""
    global ROWS_WARPS_LARGE
    if n not in (8, 16, 32):
        raise ValueError(f"rows_warps: 8, 16 or 32, got {n}")
    old, ROWS_WARPS_LARGE = ROWS_WARPS_LARGE, n
    try:
        yield
    finally:
        ROWS_WARPS_LARGE = old


def _num_warps(block_v: int) -> int:
    if block_v <= 1024:
        return 4
    if block_v <= 4096:
        return 8
    return ROWS_WARPS_LARGE


def kernel_config(V: int, W: int) -> dict:
    """Block sizes and warps of both kernels for vocabulary V and window W (also used by the codegen test)."""
    block_v = max(16, triton.next_power_of_2(V))
    return {"BLOCK_V": block_v, "num_warps_rows": _num_warps(block_v),
            "BLOCK_W1": max(2, triton.next_power_of_2(W + 1)), "BLOCK_W": max(2, triton.next_power_of_2(max(W, 1)))}


# The races over the list of lanes with P > 0 (module docstring); False: always the dense races.
LIST_RACES = True


def list_size(V: int, top_k: int, greedy: bool, sparse: bool, use_vp: bool, vp_form: int, beta: float) -> int:
    """LIST_K of the rows kernel: room for the lanes with P > 0 when every race of a row weighs only
    them (top-k on, not the additive VP law with beta < 0, which can be positive where P is 0; the
    sparse state only with the candidate list, whose race list becomes the slot's entries), and the
    list is at most a quarter of the row tile; 0 (dense races) otherwise."""
    if not LIST_RACES or greedy or not 0 < top_k < V or (sparse and not CAND_LIST) \
            or (use_vp and vp_form == _ref.VP_ADD and beta < 0.0):
        return 0
    k = triton.next_power_of_2(top_k + 16)
    return k if 4 * k <= kernel_config(V, 1)["BLOCK_V"] else 0


# The top-k search through a candidate list (module docstring); False: the search over the row.
CAND_LIST = True


@contextlib.contextmanager
def cand_list(on: bool):
    """Run the rows kernel with the candidate list on or off inside this block (``CAND_LIST``)."""
    global CAND_LIST
    old, CAND_LIST = CAND_LIST, bool(on)
    try:
        yield
    finally:
        CAND_LIST = old


def cand_size(V: int, top_k: int, list_k: int) -> int:
    """CAND_K of the rows kernel: the candidate list of the top-k search when the races run over a
    list (``list_k > 0``: the next draft's law, P or its VP law, is zero off the lanes with P > 0):
    room for about twice top-k, at most half the row tile; 0 (the search and softmax over the row)
    otherwise."""
    if not CAND_LIST or list_k == 0:
        return 0
    c = triton.next_power_of_2(2 * top_k + 32)
    return c if 2 * c <= kernel_config(V, 1)["BLOCK_V"] else 0


def sparse_block(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def sparse_steps(C: int) -> int:
    """Halvings of the binary search over C entries: ceil(log2(C + 1))."""
    return max(1, int(C).bit_length())


def is_interpreted() -> bool:
    return isinstance(_jacobi_rows_kernel, _Interpreted) if _Interpreted else False


def _inv_temperature(t: float) -> float:
    """float32(1) / float32(T), exactly as the reference computes it."""
    import numpy as np
    return float(np.float32(1.0) / np.float32(t))


def jacobi_step_triton(logits, uncond, cfg_scale, drafts, win_len, pos, seed, step, forced,
                       q_state, q_kind, p_prev, status,
                       temperature, top_k, top_p, mode, beta, vp_form, vp_eps, tail_init, q_idx=None):
    """Fused Triton ``jacobi_step``: same arguments, outputs and in-place updates as the reference.

    ``logits``/``uncond`` ``[B, W+1, V]`` bf16/fp16/fp32 with a contiguous last dim (any row
    strides and offset); state tensors contiguous. Returns ``(num_accepted [B], tokens [B, W+1],
    next_drafts [B, W])`` int64.
    """
    from ..ops.jacobi_step import check_kernel_args, check_kernel_knobs
    B, W, V = check_kernel_args(logits, uncond, cfg_scale, drafts, win_len, pos, seed, step, forced, q_state, q_kind,
                                p_prev, status, q_idx, inputs_contiguous=False)          # copied below
    check_kernel_knobs(V, temperature, top_k, top_p, mode, beta, vp_form, vp_eps, tail_init)
    W1 = W + 1
    R = q_state.shape[1]
    dev = logits.device
    temperature, top_p, beta, vp_eps = float(temperature), float(top_p), float(beta), float(vp_eps)
    top_k, mode, vp_form, tail_init = int(top_k), int(mode), int(vp_form), int(tail_init)
    has_prev = p_prev.numel() > 0
    sparse = q_idx is not None and q_idx.numel() > 0
    Cap = q_idx.shape[2] if sparse else V
    has_forced = forced is not None and forced.numel() > 0
    greedy = temperature == 0.0
    use_vp = has_prev and beta != 0.0 and mode in (_ref.MODE_SJD, _ref.MODE_COUPLING)
    logits, uncond = lane_contiguous(logits), lane_contiguous(uncond)
    drafts, win_len, pos, seed, step = (t.contiguous() for t in (drafts, win_len, pos, seed, step))
    forced_t = forced.contiguous() if has_forced else drafts
    L = forced.shape[1] if has_forced else 0

    num_accepted = torch.empty(B, dtype=torch.int64, device=dev)
    tokens = torch.empty(B, W1, dtype=torch.int64, device=dev)
    next_drafts = torch.empty(B, W, dtype=torch.int64, device=dev)
    flags = torch.empty(B, W1, dtype=torch.int32, device=dev)
    cand = torch.empty(B, W1, dtype=torch.int64, device=dev)
    new = torch.empty(B, W1, dtype=torch.int64, device=dev)
    cfg = kernel_config(V, W)
    interp = is_interpreted()

    unc = uncond if uncond is not None else logits
    do_topk = (not greedy) and 0 < top_k < V
    list_k = list_size(V, top_k, greedy, sparse, use_vp, vp_form, beta)
    cand_k = cand_size(V, top_k, list_k)
    if sparse and not cand_k:                  # (cand_size > 0 whenever list_size is: a safeguard)
        list_k = 0
    # the scratch lists exist only when a row can use them (otherwise the kernel never reads the
    # pointers: the state tensors stand in, with the right dtypes)
    lists = torch.empty((B, W1, list_k), dtype=torch.int32, device=dev) if list_k else q_kind
    listp = torch.empty((B, W1, list_k), dtype=torch.float32, device=dev) if list_k else q_state
    listq = torch.empty((B, W1, list_k), dtype=torch.float32, device=dev) if list_k and use_vp and not cand_k \
        else q_state
    cids = torch.empty((B, W1, cand_k), dtype=torch.int32, device=dev) if cand_k else q_kind
    cys = torch.empty((B, W1, cand_k), dtype=torch.float32, device=dev) if cand_k else q_state
    _jacobi_rows_kernel[(B, W1)](
        logits, logits.stride(0), logits.stride(1), unc, unc.stride(0), unc.stride(1),
        cfg_scale if uncond is not None else q_state,
        drafts, win_len, pos, seed, step, forced_t, L,
        q_state, q_kind, p_prev if has_prev else q_state, q_idx if sparse else q_kind,
        flags, cand, new, lists, listp, listq, cids, cys,
        W, V, R, Cap, _inv_temperature(temperature) if not greedy else 1.0, top_k, top_p, beta, vp_eps, 1.0 / V,
        HAS_UNCOND=uncond is not None, HAS_FORCED=has_forced, HAS_PREV=has_prev, USE_VP=use_vp,
        VP_FORM=vp_form, BETA_POW=_POW_CASES.get(beta, POW_GENERAL), GREEDY=greedy,
        DO_TOPK=do_topk, DO_TOPP=(not greedy) and _ref_target.topp_on(top_p), MODE=mode,
        INTERP=interp, BLOCK_V=cfg["BLOCK_V"], SPARSE=sparse, BLOCK_C=sparse_block(Cap) if sparse else 1,
        C_STEPS=sparse_steps(Cap) if sparse else 1, LIST_K=list_k, CAND_K=cand_k, num_warps=cfg["num_warps_rows"],
        enable_fp_fusion=False)
    _jacobi_commit_kernel[(B,)](
        drafts, win_len, pos, seed, step, forced_t, L,
        q_kind, flags, cand, new, status,
        num_accepted, tokens, next_drafts,
        W, V, R,
        HAS_FORCED=has_forced, TAIL_LEFT=tail_init == _ref.TAIL_LEFT, BLOCK_W1=cfg["BLOCK_W1"],
        BLOCK_W=cfg["BLOCK_W"], num_warps=1)
    return num_accepted, tokens, next_drafts


_ROWS_TYPES = dict(
    logits_ptr=None, stride_lb="i64", stride_lj="i64", uncond_ptr=None, stride_ub="i64", stride_uj="i64",
    cfg_ptr="*fp32", drafts_ptr="*i64", win_ptr="*i64", pos_ptr="*i64", seed_ptr="*i64", step_ptr="*i64",
    forced_ptr="*i64", L="i32", q_state_ptr="*fp32", q_kind_ptr="*i32", p_prev_ptr="*fp32", q_idx_ptr="*i32",
    flags_ptr="*i32", cand_ptr="*i64", new_ptr="*i64", list_ptr="*i32", listp_ptr="*fp32", listq_ptr="*fp32",
    cid_ptr="*i32", cy_ptr="*fp32",
    W="i32", V="i32", R="i32", C="i32", temperature="fp32", top_k="i32", top_p="fp32", beta="fp32", vp_eps="fp32",
    q_unif="fp32")
_COMMIT_TYPES = dict(
    drafts_ptr="*i64", win_ptr="*i64", pos_ptr="*i64", seed_ptr="*i64", step_ptr="*i64", forced_ptr="*i64",
    L="i32", q_kind_ptr="*i32", flags_ptr="*i32", cand_ptr="*i64", new_ptr="*i64", status_ptr="*i32",
    num_acc_ptr="*i64", tokens_ptr="*i64", next_ptr="*i64", W="i32", V="i32", R="i32")


def codegen_cases(V: int = 16384, W: int = 32) -> list[dict]:
    """Representative compilations of this module's kernels (for the ahead-of-time codegen test).

    Each case: ``kernel`` (attribute name in this module), ``signature`` and ``constexprs`` for
    ``triton.compiler.ASTSource`` and launch ``options``; the rows kernel for bf16 and fp32 logits
    over the main constexpr branches (every draft mode, VP add/log, greedy, top-k/top-p).
    """
    cfg = kernel_config(V, W)
    cases = []
    # the launcher's list sizes at top-k 1000 (0 where the row is too small for them)
    lk = list_size(V, 1000, False, False, False, _ref.VP_ADD, 0.0)
    ck = cand_size(V, 1000, lk)
    lks = list_size(V, 1000, False, True, False, _ref.VP_ADD, 0.0)
    cks = cand_size(V, 1000, lks)
    rows = [
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=True, HAS_PREV=True, USE_VP=True, VP_FORM=_ref.VP_LOG,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=True, MODE=_ref.MODE_COUPLING)),
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=False, HAS_PREV=True, USE_VP=True, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_SJD,
                      LIST_K=lk, CAND_K=ck)),
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=False, HAS_PREV=True, USE_VP=True, VP_FORM=_ref.VP_LOG,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_COUPLING,
                      LIST_K=lk)),
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=False, HAS_PREV=False, USE_VP=False, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_SJD)),
        # top-k through a candidate list, races over the listed lanes (top-k 1000): sjd, coupling,
        # gumbel (the B 32 benchmark case is the first), as the launcher sizes them
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=False, HAS_PREV=False, USE_VP=False, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_SJD,
                      LIST_K=lk, CAND_K=ck)),
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=True, HAS_PREV=True, USE_VP=False, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=True, MODE=_ref.MODE_COUPLING,
                      LIST_K=lk, CAND_K=ck)),
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=False, HAS_PREV=False, USE_VP=False, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_GUMBEL,
                      LIST_K=lk, CAND_K=ck)),
        # races over the list without the candidate list (the launcher with CAND_LIST = False)
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=False, HAS_PREV=False, USE_VP=False, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_SJD,
                      LIST_K=lk)),
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=True, HAS_PREV=False, USE_VP=False, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=True, DO_TOPK=False, DO_TOPP=False,
                      MODE=_ref.MODE_GUMBEL_JACOBI)),
        ("fp32", dict(HAS_UNCOND=False, HAS_FORCED=True, HAS_PREV=True, USE_VP=True, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_HALF, GREEDY=False, DO_TOPK=True, DO_TOPP=True, MODE=_ref.MODE_SJD)),
        ("fp32", dict(HAS_UNCOND=False, HAS_FORCED=False, HAS_PREV=False, USE_VP=False, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=False, DO_TOPP=False, MODE=_ref.MODE_GUMBEL)),
        # sparse state, capacity 1064 (top-k 1000 plus room for ties)
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=True, HAS_PREV=True, USE_VP=True, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_COUPLING,
                      SPARSE=True, BLOCK_C=sparse_block(1064), C_STEPS=sparse_steps(1064))),
        ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=False, HAS_PREV=False, USE_VP=False, VP_FORM=_ref.VP_ADD,
                      BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_GUMBEL,
                      SPARSE=True, BLOCK_C=sparse_block(1064), C_STEPS=sparse_steps(1064))),
    ]
    if cks:
        # the sparse state through the candidate list (the race list becomes the slot's entries):
        # the B 32 sparse benchmark case, and coupling with VP
        rows += [
            ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=False, HAS_PREV=False, USE_VP=False, VP_FORM=_ref.VP_ADD,
                          BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_SJD,
                          SPARSE=True, BLOCK_C=sparse_block(1064), C_STEPS=sparse_steps(1064), LIST_K=lks,
                          CAND_K=cks)),
            ("bf16", dict(HAS_UNCOND=True, HAS_FORCED=True, HAS_PREV=True, USE_VP=True, VP_FORM=_ref.VP_ADD,
                          BETA_POW=POW_GENERAL, GREEDY=False, DO_TOPK=True, DO_TOPP=False, MODE=_ref.MODE_COUPLING,
                          SPARSE=True, BLOCK_C=sparse_block(1064), C_STEPS=sparse_steps(1064), LIST_K=lks,
                          CAND_K=cks)),
        ]
    warps = [cfg["num_warps_rows"]] * len(rows)
    if cfg["BLOCK_V"] > 4096:                            # the B 32 benchmark case with 32 warps (triton_w32)
        rows.append(next(r for r in rows if r[1].get("CAND_K") and not r[1]["USE_VP"]
                         and r[1]["MODE"] == _ref.MODE_SJD))
        warps.append(32)
    for (dt, ce), nw in zip(rows, warps):
        sig = dict(_ROWS_TYPES, logits_ptr=f"*{dt}", uncond_ptr=f"*{dt}")
        ce = dict(ce, INTERP=False, BLOCK_V=cfg["BLOCK_V"])
        ce.setdefault("LIST_K", 0)                       # ASTSource does not apply constexpr defaults
        ce.setdefault("CAND_K", 0)
        sig.update({k: "constexpr" for k in ce})
        name = (f"rows-{dt}-mode{ce['MODE']}{'-greedy' if ce['GREEDY'] else ''}{'-vp' if ce['USE_VP'] else ''}"
                f"{'-sparse' if ce.get('SPARSE') else ''}{'-list' if ce.get('LIST_K') else ''}"
                f"{'-cand' if ce.get('CAND_K') else ''}"
                f"{'' if nw == cfg['num_warps_rows'] else f'-w{nw}'}")
        cases.append(dict(name=name, kernel="_jacobi_rows_kernel", signature=sig, constexprs=ce,
                          options=dict(num_warps=nw, enable_fp_fusion=False)))
    for forced, left in ((True, False), (False, True)):
        ce = dict(HAS_FORCED=forced, TAIL_LEFT=left, BLOCK_W1=cfg["BLOCK_W1"], BLOCK_W=cfg["BLOCK_W"])
        sig = dict(_COMMIT_TYPES, **{k: "constexpr" for k in ce})
        cases.append(dict(name=f"commit-{'left' if left else 'uniform'}", kernel="_jacobi_commit_kernel",
                          signature=sig, constexprs=ce, options=dict(num_warps=1)))
    return cases
