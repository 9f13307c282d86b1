"""``jacobi_step``: the PyTorch spec of the fused step after the LM head (SPEC sections 2-4, 7).

One call does, for a ragged batch of B requests with a window of W drafts:
CFG combine, temperature, top-k, softmax, top-p -> target rows ``P [B, W+1, V]``;
verification of each draft ``D[j]`` against its stored law ``Q[j]``; the first
rejection ``m``; the residual (or bonus) token; the next window's drafts by the chosen
draft mode; and the per-position state update. It is written for clarity, vectorised
over rows, and is the CPU backend and the oracle of every test.

Shapes (``R >= W + 1`` is the state ring; position ``p`` lives in slot ``p % R``, so
committing never moves the V-sized state):

    logits, uncond  [B, W+1, V]  bf16/fp16/fp32, last dim contiguous (may be a slice view)
    cfg_scale       [B] f32      (only with uncond)
    drafts          [B, W] i64   ids in [0, V) (or the forced id at a forced position)
    win_len         [B] i64      0..W drafts actually in each request's window (ragged)
    pos             [B] i64      absolute position n of D[0] (= committed tokens)
    seed, step      [B] i64      randomness key and the request's iteration counter
    forced          [B, L] i64   per absolute position, -1 or a token forced there (optional)
    q_state         [B, R, V] f32   dense draft laws (mutated); [B, R, C] values in the sparse form
    q_kind          [B, R] i32      KIND_* of each slot, | FLAG_PREV when p_prev holds a row (mutated)
    p_prev          [B, R, V] f32   previous target row per position, for VP (mutated; may be empty);
                                    [B, R, C] values at the same ids as q_state in the sparse form
    q_idx           [B, R, C] i32   sparse form only (empty = dense): lane ids of each slot's entries,
                                    ascending, then IDX_PAD (mutated)
    status          [4] i32         [error bits, zero-mass residuals, zero-mass coupling redraws,
                                    sparse-state overflows]

Sparse state (``q_idx`` non-empty, capacity C): a slot of kind KIND_DENSE stores the lanes where
the row's target ``P`` is positive (the support of ``Qt`` lies inside it: VP's additive form with
``beta >= 0`` and the log form never add mass where ``P = 0``), ascending, with ``Qt`` in
``q_state`` and ``P`` in ``p_prev``; no mass is dropped, so the law is the dense one, bit for bit.
With top-k the support has at most k lanes plus ties at the threshold. A row whose support exceeds
C cannot be stored: that position's next draft is drawn from the uniform law instead (KIND_UNIFORM,
exact since any proposal is, SPEC section 3) and ``status[3]`` counts the event.

Returns ``num_accepted [B] i64`` (m; -1 for a request with an error), ``tokens [B, W+1]
i64`` (the m + 1 committed tokens, then -1) and ``next_drafts [B, W] i64`` (positions
``n+m+1 .. n+m+W``).
"""
from __future__ import annotations

import torch

from .. import rng
from .target import combine_logits, target_probs

MODE_SJD, MODE_COUPLING, MODE_GUMBEL, MODE_GUMBEL_JACOBI = 0, 1, 2, 3
MODES = {"sjd": MODE_SJD, "coupling": MODE_COUPLING, "gumbel": MODE_GUMBEL, "gumbel_jacobi": MODE_GUMBEL_JACOBI}
VP_ADD, VP_LOG = 0, 1
TAIL_UNIFORM, TAIL_LEFT = 0, 1
KIND_DENSE, KIND_UNIFORM, KIND_ONEHOT = 0, 1, 2
KIND_MASK, FLAG_PREV = 3, 4
ERR_NONFINITE, ERR_DRAFT_RANGE, ERR_TREE_INDEX, ERR_WIN_LEN, ERR_POS, ERR_PREPARE = 1, 2, 4, 8, 16, 32
STATUS_ERR, STATUS_ZERO_RESID, STATUS_ZERO_COUPLE, STATUS_OVERFLOW = 0, 1, 2, 3
IDX_PAD = 2**31 - 1                      # id of an unused sparse entry (sorts after every lane)


def vp_predict(p: torch.Tensor, p_prev: torch.Tensor, beta: float, form: int, eps: float) -> torch.Tensor:
    """Predicted next target ``Qvp`` from the current and previous rows (SPEC section 4), float32, normalised.

    A row whose weights have no positive finite sum (all zero, or an overflow: a large ``beta``, a
    NaN from ``0 * inf``) keeps ``p`` itself: any stored law is exact as long as drafts are drawn from it."""
    if form == VP_ADD:
        w = torch.clamp(p + beta * (p - p_prev), min=0.0)
    else:
        w = p * torch.pow((p + eps) / (p_prev + eps), beta)
    s = w.sum(-1, keepdim=True)
    ok = (s > 0) & (s < float("inf"))
    return torch.where(ok, w / torch.where(ok, s, torch.ones_like(s)), p)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, -1, idx.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)


def densify(idx: torch.Tensor, val: torch.Tensor, V: int) -> torch.Tensor:
    """Dense ``[..., V]`` float32 rows from sparse entries (ids outside [0, V), e.g. IDX_PAD, dropped)."""
    i = idx.to(torch.int64)
    i = torch.where((i >= 0) & (i < V), i, torch.full_like(i, V))
    out = torch.zeros(*idx.shape[:-1], V + 1, dtype=torch.float32, device=val.device)
    return out.scatter_(-1, i, val.to(torch.float32))[..., :V]


def sparsify(support: torch.Tensor, rows: list, C: int):
    """The first C lanes (ascending) where ``support [..., V]`` is true, as ``(idx i32 [..., C],
    [row values at idx, ...])``; unused entries get IDX_PAD and 0. Rows with more than C such
    lanes must not be stored (callers check the count)."""
    V = support.shape[-1]
    lanes = torch.arange(V, device=support.device)
    key = torch.where(support, lanes, torch.full_like(lanes, IDX_PAD))
    srt = key.sort(-1).values[..., :C]
    if srt.shape[-1] < C:
        pad = torch.full((*srt.shape[:-1], C - srt.shape[-1]), IDX_PAD, dtype=srt.dtype, device=srt.device)
        srt = torch.cat([srt, pad], -1)
    used = srt < V
    g = srt.clamp(max=V - 1)
    vals = [torch.where(used, torch.gather(r, -1, g), torch.zeros_like(r[..., :1])) for r in rows]
    return srt.to(torch.int32), vals


def jacobi_step(logits, uncond, cfg_scale, drafts, win_len, pos, seed, step, forced,
                q_state, q_kind, p_prev, status,
                temperature: float, top_k: int, top_p: float, mode: int,
                beta: float, vp_form: int, vp_eps: float, tail_init: int, q_idx=None):
    B, W1, V = logits.shape
    W = W1 - 1
    R = q_state.shape[1]
    dev = logits.device
    has_prev = p_prev.numel() > 0
    sparse = q_idx is not None and q_idx.numel() > 0
    use_vp = has_prev and beta != 0.0 and mode in (MODE_SJD, MODE_COUPLING)
    i64 = torch.int64
    j = torch.arange(W1, device=dev, dtype=i64)
    posj = pos.view(B, 1) + j                                          # [B, W+1]
    slot = posj % R
    valid = j.view(1, W1) <= win_len.view(B, 1)                        # rows in use (drafts + bonus)
    is_draft = j.view(1, W1) < win_len.view(B, 1)
    bidx = torch.arange(B, device=dev).view(B, 1).expand(B, W1)

    if forced is not None and forced.numel() > 0:
        L = forced.shape[1]
        f = torch.gather(forced, 1, posj.clamp(max=L - 1))
        f = torch.where(posj < L, f, torch.full_like(f, -1))
    else:
        f = torch.full((B, W1), -1, dtype=i64, device=dev)
    is_forced = f >= 0

    # ---- target rows
    x = combine_logits(logits, uncond, cfg_scale)
    P = target_probs(x, temperature, top_k, top_p)                     # [B, W+1, V]
    row_bad = torch.isnan(P).any(-1) & valid & ~is_forced
    P = torch.nan_to_num(P, nan=0.0)

    # ---- stored law of each draft
    D = torch.cat([drafts, torch.zeros(B, 1, dtype=i64, device=dev)], 1)   # pad the bonus row
    kind_all = q_kind[bidx, slot].to(i64)
    kind = kind_all & KIND_MASK
    # the state rows of the window's slots, as stored (the writes below reuse them)
    q_rows = q_state[bidx, slot]                                       # [B, W+1, V] ([.., C] sparse)
    p_rows = p_prev[bidx, slot] if has_prev else None
    if sparse:
        idx_rows = q_idx[bidx, slot]
        Qrow = densify(idx_rows, q_rows, V)                            # [B, W+1, V]
    else:
        Qrow = q_rows
    in_range = (D >= 0) & (D < V)
    draft_bad = is_draft & ~in_range & ~(is_forced & (D == f))
    Qd = torch.where(kind == KIND_DENSE, _gather(Qrow, D),
                     torch.where(kind == KIND_UNIFORM, torch.full_like(P[..., 0], 1.0 / V), torch.ones_like(P[..., 0])))
    Qd = torch.where(in_range, Qd, torch.zeros_like(Qd))
    Pd = torch.where(in_range, _gather(P, D), torch.zeros_like(Qd))
    lanes = torch.arange(V, device=dev)
    onehot_D = (lanes.view(1, 1, V) == D.unsqueeze(-1))
    Qold = torch.where((kind == KIND_DENSE).unsqueeze(-1), Qrow,
                       torch.where((kind == KIND_UNIFORM).unsqueeze(-1), torch.full_like(Qrow, 1.0 / V),
                                   onehot_D.to(torch.float32)))

    # ---- noise
    stepb = step.view(B, 1)
    seedb = seed.view(B, 1)
    u_acc = rng.uniform24(rng.four_words(seedb, posj, stepb, rng.STREAM_ACCEPT)[..., 0])
    E_res = rng.exponential(rng.lane_words(seedb, posj, stepb, rng.STREAM_RESID, V))
    E_gum = rng.exponential(rng.lane_words(seedb, posj, torch.zeros_like(stepb), rng.STREAM_GUMBEL, V))
    g = rng.race(P, E_gum)                                             # position-keyed Gumbel-max sample

    # ---- verification and the commit candidate of each row
    if mode == MODE_GUMBEL_JACOBI:
        accept = D == g
        cand = g
    else:
        accept = u_acc * Qd < Pd
        resid = torch.clamp(P - Qold, min=0.0)
        r = rng.race(resid, E_res)
        zero = (r < 0) & is_draft & ~is_forced & ~row_bad & ~accept
        r = torch.where(r < 0, rng.race(P, E_res), r)
        bonus = rng.race(P, E_res)
        cand = torch.where(is_draft, r, bonus)
        status[STATUS_ZERO_RESID] += zero.sum().to(status.dtype)
    accept = torch.where(is_forced, D == f, accept)
    cand = torch.where(is_forced, f, cand)

    rej = is_draft & ~accept
    first = torch.where(rej, j.view(1, W1).expand(B, W1), torch.full_like(posj, W1)).amin(1)
    m = torch.minimum(first, win_len)                                  # [B]

    # ---- next drafts of each row and its stored law
    Qt = P
    if use_vp:
        # only draft rows can hold this position's previous row: the bonus slot still holds a stale
        # row of an earlier position (SPEC section 4: the bonus uses Qvp = P)
        prev_ok = (((kind_all & FLAG_PREV) != 0) & is_draft).unsqueeze(-1)
        pp = densify(idx_rows, p_rows, V) if sparse else p_rows
        Qt = torch.where(prev_ok, vp_predict(P, pp, beta, vp_form, vp_eps), P)
    ovf = torch.zeros_like(is_forced)
    if sparse:
        # a state row that cannot hold this row's support: the position's next draft is uniform
        ovf = ((P > 0).sum(-1) > q_idx.shape[2]) & valid & (j.view(1, W1) >= 1) & ~is_forced & ~row_bad
        Qt = torch.where(ovf.unsqueeze(-1), torch.full_like(Qt, 1.0 / V), Qt)
        status[STATUS_OVERFLOW] += ovf.sum().to(status.dtype)
    E_dr = None if mode in (MODE_GUMBEL, MODE_GUMBEL_JACOBI) and not sparse else \
        rng.exponential(rng.lane_words(seedb, posj, stepb, rng.STREAM_DRAFT, V))
    if mode in (MODE_GUMBEL, MODE_GUMBEL_JACOBI):
        new = torch.where(ovf, rng.race(Qt, E_dr), g) if sparse else g
    else:
        fresh = rng.race(Qt, E_dr)
        new = fresh
        if mode == MODE_COUPLING:
            u_c = rng.uniform24(rng.four_words(seedb, posj, stepb, rng.STREAM_COUPLE)[..., 0])
            keep = u_c * Qd < torch.where(in_range, _gather(Qt, D), torch.zeros_like(Qd))
            E_cr = rng.exponential(rng.lane_words(seedb, posj, stepb, rng.STREAM_COUPLE_RES, V))
            rc = rng.race(torch.clamp(Qt - Qold, min=0.0), E_cr)
            zc = (rc < 0) & is_draft & ~keep & ~is_forced & ~row_bad & (j.view(1, W1) >= 1)
            status[STATUS_ZERO_COUPLE] += zc.sum().to(status.dtype)
            rc = torch.where(rc < 0, rng.race(Qt, E_cr), rc)
            new = torch.where(is_draft, torch.where(keep, D, rc), fresh)
    new = torch.where(is_forced, f, new)

    # ---- errors
    req_bad = (row_bad | draft_bad).any(1)
    err = (row_bad.any().to(torch.int32) * ERR_NONFINITE) | (draft_bad.any().to(torch.int32) * ERR_DRAFT_RANGE)
    status[STATUS_ERR] |= err.to(status.dtype)

    # ---- state update: rows 1..win_len (row 0 is always committed), skipped for requests in error
    wr = valid & (j.view(1, W1) >= 1) & ~req_bad.view(B, 1)
    new_kind = torch.where(is_forced, torch.full_like(kind_all, KIND_ONEHOT),
                           torch.where(ovf, torch.full_like(kind_all, KIND_UNIFORM),
                                       torch.full_like(kind_all, KIND_DENSE | (FLAG_PREV if has_prev else 0))))
    # Every (request, row) slot is written, unselected ones with their current value (the rows
    # gathered above; nothing wrote the state since): integer indices only (no boolean-mask
    # indexing, so no host synchronisation and the reference can be captured in a CUDA graph). The
    # W+1 slots of a request are distinct (R > W), so no write races.
    def put(buf, sel, new_rows, cur):
        m_ = sel.view(*sel.shape, *([1] * (cur.dim() - 2)))
        buf[bidx, slot] = torch.where(m_, new_rows, cur).to(buf.dtype)

    if sparse:
        # only KIND_DENSE slots store entries (forced and overflow slots keep stale ones, unread)
        wd = wr & ~is_forced & ~ovf
        idx_new, vals = sparsify(P > 0, [Qt, P], q_idx.shape[2])
        put(q_idx, wd, idx_new, idx_rows)
        put(q_state, wd, vals[0], q_rows)
        if has_prev:
            put(p_prev, wd, vals[1], p_rows)
    else:
        put(q_state, wr, Qt, q_rows)
        if has_prev:
            put(p_prev, wr, P, p_rows)
    put(q_kind, wr, new_kind, kind_all)

    # ---- outputs
    tokens = torch.where(j.view(1, W1) < m.view(B, 1), D, torch.full_like(D, -1))
    tokens = tokens.scatter(1, m.view(B, 1), torch.gather(cand, 1, m.view(B, 1)))
    i = torch.arange(W, device=dev, dtype=i64)
    src = m.view(B, 1) + 1 + i                                         # row index feeding next_drafts[i]
    from_row = src <= win_len.view(B, 1)
    nd = torch.gather(new, 1, src.clamp(max=W))
    tpos = pos.view(B, 1) + src                                        # absolute position of next_drafts[i]
    if forced is not None and forced.numel() > 0:
        ft = torch.gather(forced, 1, tpos.clamp(max=forced.shape[1] - 1))
        ft = torch.where(tpos < forced.shape[1], ft, torch.full_like(ft, -1))
    else:
        ft = torch.full_like(tpos, -1)
    tail = ~from_row
    if tail_init == TAIL_UNIFORM:
        tail_tok = rng.uniform_token(seedb, tpos, stepb, rng.STREAM_TAIL, V)
        tail_kind = torch.full_like(tpos, KIND_UNIFORM)
        tail_tok = torch.where(ft >= 0, ft, tail_tok)
        nd = torch.where(tail, tail_tok, nd)
    else:                                                              # copy the left neighbour, one-hot law
        # A copied value outside [0, V) (a forced structural id such as a row end) cannot be a
        # draft: that slot draws uniformly instead (law KIND_UNIFORM). The copy chain itself is
        # unchanged by the fallback, so every backend computes it with a scan.
        last = torch.gather(tokens, 1, m.view(B, 1)).squeeze(1)
        cols = []
        prev_tok = last
        for ii in range(W):                                            # W is small; this is the readable spec
            t = torch.where(tail[:, ii], torch.where(ft[:, ii] >= 0, ft[:, ii], prev_tok), nd[:, ii])
            cols.append(t)
            prev_tok = t
        nd = torch.stack(cols, 1) if W > 0 else nd
        uni = rng.uniform_token(seedb, tpos, stepb, rng.STREAM_TAIL, V)
        oob = tail & (ft < 0) & ((nd < 0) | (nd >= V))
        nd = torch.where(oob, uni, nd)
        tail_kind = torch.where(oob, torch.full_like(tpos, KIND_UNIFORM), torch.full_like(tpos, KIND_ONEHOT))
    tail_kind = torch.where(ft >= 0, torch.full_like(tail_kind, KIND_ONEHOT), tail_kind)
    tw = tail & ~req_bad.view(B, 1)
    bt = torch.arange(B, device=dev).view(B, 1).expand(B, W)
    ts = tpos % R
    q_kind[bt, ts] = torch.where(tw, tail_kind.to(q_kind.dtype), q_kind[bt, ts])

    neg = torch.full_like
    num_accepted = torch.where(req_bad, neg(m, -1), m)
    tokens = torch.where(req_bad.view(B, 1), neg(tokens, -1), tokens)
    nd = torch.where(req_bad.view(B, 1), neg(nd, -1), nd)
    return num_accepted, tokens, nd


def init_window(seed, pos, step, W: int, V: int, q_kind, forced=None):
    """First window after prefill: uniform drafts for positions ``pos .. pos+W-1`` (stream TAIL).

    Marks their slots KIND_UNIFORM (or KIND_ONEHOT at forced positions) and returns ``[B, W]`` drafts.
    Shared by every backend (it is small), so all backends start from the same window.
    """
    B = pos.shape[0]
    R = q_kind.shape[1]
    p = pos.view(B, 1) + torch.arange(W, device=pos.device)
    tok = rng.uniform_token(seed.view(B, 1), p, step.view(B, 1), rng.STREAM_TAIL, V)
    kind = torch.full_like(p, KIND_UNIFORM)
    if forced is not None and forced.numel() > 0:
        ft = torch.gather(forced, 1, p.clamp(max=forced.shape[1] - 1))
        ft = torch.where(p < forced.shape[1], ft, torch.full_like(ft, -1))
        tok = torch.where(ft >= 0, ft, tok)
        kind = torch.where(ft >= 0, torch.full_like(kind, KIND_ONEHOT), kind)
    b = torch.arange(B, device=pos.device).view(B, 1).expand(B, W)
    q_kind[b, p % R] = kind.to(q_kind.dtype)
    return tok
