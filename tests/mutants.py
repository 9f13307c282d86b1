"""Deliberately broken variants of the reference ``jacobi_step`` (SPEC sections 3 and 9).

``make(trap)`` returns a step function with the raw reference signature
(``sjd_kernels.reference.jacobi_step.jacobi_step``). ``make(None)`` is a faithful copy of the
reference (``test_jacobi_step_mutations`` checks it agrees bit for bit, so the copy cannot drift);
each trap switches on exactly one bug known from public implementations:

- ``resid_fallback_p``: on rejection, draw from ``P`` instead of ``norm(max(0, P - Q))`` when the
  residual mass is below ``FALLBACK_MASS`` (0.05): biased whenever the stored law is close to the
  target (recycled drafts, a one-hot draft at the mode of a peaked row).
- ``coupling_keeps_old_q``: a coupling step that keeps the old draft stores its old law (and kind)
  instead of ``Qt`` (the kept draft's law is now ``P`` or ``Qvp``).
- ``resid_noise_shared``: one residual noise vector per request (keyed by the seed only), reused
  across positions and steps.
- ``gumbel_slot_keyed``: Gumbel noise keyed by the window slot ``j`` instead of the absolute
  position ``pos + j``.
- ``gumbel_noise_in_resid``: the residual draw reuses the position's Gumbel noise (the noise
  that drew the draft under ``gumbel``) instead of its own stream.
- ``vp_stores_p``: drafts drawn from ``Qvp`` but ``P`` stored as their law.
- ``q_rounded_bf16``: the stored law re-rounded to bf16 after the draft was drawn from the
  float32 numbers.
- ``u_closed_one``: acceptance uniform ``(k + 1) 2^-24`` in (0, 1] and no zero-mass fallback:
  ``u = 1`` rejects a draft with ``P = Q`` and leaves an empty residual (emits -1).
- ``uniform_flag_ignored`` (a kernel-style slip, not in SPEC section 3): the uniform-law flag is
  ignored and the dense ``q_state`` row (stale) is read instead.
"""
from __future__ import annotations

import torch

from sjd_kernels import rng
from sjd_kernels.reference.jacobi_step import (ERR_DRAFT_RANGE, ERR_NONFINITE, FLAG_PREV, KIND_DENSE, KIND_MASK,
                                               KIND_ONEHOT, KIND_UNIFORM, MODE_COUPLING, MODE_GUMBEL,
                                               MODE_GUMBEL_JACOBI, MODE_SJD, STATUS_ERR, STATUS_ZERO_COUPLE,
                                               STATUS_ZERO_RESID, TAIL_UNIFORM, _gather, vp_predict)
from sjd_kernels.reference.target import combine_logits, target_probs

TRAPS = ("resid_fallback_p", "coupling_keeps_old_q", "resid_noise_shared", "gumbel_slot_keyed",
         "gumbel_noise_in_resid", "vp_stores_p", "q_rounded_bf16", "u_closed_one", "uniform_flag_ignored")
FALLBACK_MASS = 0.05


def make(trap: str | None):
    """A step function with the reference signature and the given trap switched on (None: no trap)."""
    if trap is not None and trap not in TRAPS:
        raise ValueError(f"unknown trap {trap!r}; known: {TRAPS}")

    def step(*args, **kw):
        return _step(trap, *args, **kw)
    step.__name__ = f"jacobi_step_{trap or 'clean'}"
    return step


def _step(trap, logits, uncond, cfg_scale, drafts, win_len, pos, seed, step, forced,
          q_state, q_kind, p_prev, status,
          temperature: float, top_k: int, top_p: float, mode: int,
          beta: float, vp_form: int, vp_eps: float, tail_init: int):
    B, W1, V = logits.shape
    W = W1 - 1
    R = q_state.shape[1]
    dev = logits.device
    has_prev = p_prev.numel() > 0
    use_vp = has_prev and beta != 0.0 and mode in (MODE_SJD, MODE_COUPLING)
    i64 = torch.int64
    j = torch.arange(W1, device=dev, dtype=i64)
    posj = pos.view(B, 1) + j
    slot = posj % R
    valid = j.view(1, W1) <= win_len.view(B, 1)
    is_draft = j.view(1, W1) < win_len.view(B, 1)
    bidx = torch.arange(B, device=dev).view(B, 1).expand(B, W1)

    if forced is not None and forced.numel() > 0:
        L = forced.shape[1]
        f = torch.gather(forced, 1, posj.clamp(max=L - 1))
        f = torch.where(posj < L, f, torch.full_like(f, -1))
    else:
        f = torch.full((B, W1), -1, dtype=i64, device=dev)
    is_forced = f >= 0

    x = combine_logits(logits, uncond, cfg_scale)
    P = target_probs(x, temperature, top_k, top_p)
    row_bad = torch.isnan(P).any(-1) & valid & ~is_forced
    P = torch.nan_to_num(P, nan=0.0)

    D = torch.cat([drafts, torch.zeros(B, 1, dtype=i64, device=dev)], 1)
    kind_all = q_kind[bidx, slot].to(i64)
    kind = kind_all & KIND_MASK
    if trap == "uniform_flag_ignored":
        kind = torch.where(kind == KIND_UNIFORM, torch.full_like(kind, KIND_DENSE), kind)
    Qrow = q_state[bidx, slot]
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

    stepb = step.view(B, 1)
    seedb = seed.view(B, 1)
    words_acc = rng.four_words(seedb, posj, stepb, rng.STREAM_ACCEPT)[..., 0]
    if trap == "u_closed_one":
        u_acc = ((words_acc >> 8) + 1).to(torch.float32) * rng.TWO_M24
    else:
        u_acc = rng.uniform24(words_acc)
    if trap == "resid_noise_shared":
        E_res = rng.exponential(rng.lane_words(seedb, torch.zeros_like(posj), torch.zeros_like(stepb),
                                               rng.STREAM_RESID, V))
    else:
        E_res = rng.exponential(rng.lane_words(seedb, posj, stepb, rng.STREAM_RESID, V))
    gum_pos = j.view(1, W1).expand(B, W1) if trap == "gumbel_slot_keyed" else posj
    E_gum = rng.exponential(rng.lane_words(seedb, gum_pos, torch.zeros_like(stepb), rng.STREAM_GUMBEL, V))
    g = rng.race(P, E_gum)

    if mode == MODE_GUMBEL_JACOBI:
        accept = D == g
        cand = g
    else:
        accept = u_acc * Qd < Pd
        resid = torch.clamp(P - Qold, min=0.0)
        E_r = E_gum if trap == "gumbel_noise_in_resid" else E_res
        r = rng.race(resid, E_r)
        zero = (r < 0) & is_draft & ~is_forced & ~row_bad & ~accept
        if trap == "resid_fallback_p":
            r = torch.where(resid.sum(-1) < FALLBACK_MASS, rng.race(P, E_r), r)
        if trap != "u_closed_one":
            r = torch.where(r < 0, rng.race(P, E_r), r)
        bonus = rng.race(P, E_res)
        cand = torch.where(is_draft, r, bonus)
        status[STATUS_ZERO_RESID] += zero.sum().to(status.dtype)
    accept = torch.where(is_forced, D == f, accept)
    cand = torch.where(is_forced, f, cand)

    rej = is_draft & ~accept
    first = torch.where(rej, j.view(1, W1).expand(B, W1), torch.full_like(posj, W1)).amin(1)
    m = torch.minimum(first, win_len)

    Qt = P
    if use_vp:
        prev_ok = (((kind_all & FLAG_PREV) != 0) & is_draft).unsqueeze(-1)
        Qt = torch.where(prev_ok, vp_predict(P, p_prev[bidx, slot], beta, vp_form, vp_eps), P)
    Qstore = Qt
    kept = torch.zeros_like(is_draft)
    if mode in (MODE_GUMBEL, MODE_GUMBEL_JACOBI):
        new = g
    else:
        E_dr = rng.exponential(rng.lane_words(seedb, posj, stepb, rng.STREAM_DRAFT, V))
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
            kept = is_draft & keep
    new = torch.where(is_forced, f, new)
    if trap == "vp_stores_p":
        Qstore = P
    if trap == "coupling_keeps_old_q":
        Qstore = torch.where(kept.unsqueeze(-1), Qold, Qt)
    if trap == "q_rounded_bf16":
        Qstore = Qt.to(torch.bfloat16).to(torch.float32)

    req_bad = (row_bad | draft_bad).any(1)
    err = (row_bad.any().to(torch.int32) * ERR_NONFINITE) | (draft_bad.any().to(torch.int32) * ERR_DRAFT_RANGE)
    status[STATUS_ERR] |= err.to(status.dtype)

    wr = valid & (j.view(1, W1) >= 1) & ~req_bad.view(B, 1)
    new_kind = torch.where(is_forced, torch.full_like(kind_all, KIND_ONEHOT),
                           torch.full_like(kind_all, KIND_DENSE | (FLAG_PREV if has_prev else 0)))
    if trap == "coupling_keeps_old_q":
        new_kind = torch.where(kept & ~is_forced, kind_all & KIND_MASK, new_kind)
    b_w, s_w = bidx[wr], slot[wr]
    q_state[b_w, s_w] = Qstore[wr]
    if has_prev:
        p_prev[b_w, s_w] = P[wr]
    q_kind[b_w, s_w] = new_kind[wr].to(q_kind.dtype)

    tokens = torch.where(j.view(1, W1) < m.view(B, 1), D, torch.full_like(D, -1))
    tokens = tokens.scatter(1, m.view(B, 1), torch.gather(cand, 1, m.view(B, 1)))
    i = torch.arange(W, device=dev, dtype=i64)
    src = m.view(B, 1) + 1 + i
    from_row = src <= win_len.view(B, 1)
    nd = torch.gather(new, 1, src.clamp(max=W))
    tpos = pos.view(B, 1) + src
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
    else:
        last = torch.gather(tokens, 1, m.view(B, 1)).squeeze(1)
        cols = []
        prev_tok = last
        for ii in range(W):
            t = torch.where(tail[:, ii], torch.where(ft[:, ii] >= 0, ft[:, ii], prev_tok), nd[:, ii])
            cols.append(t)
            prev_tok = t
        nd = torch.stack(cols, 1) if W > 0 else nd
        tail_kind = torch.full_like(tpos, KIND_ONEHOT)
    tail_kind = torch.where(ft >= 0, torch.full_like(tail_kind, KIND_ONEHOT), tail_kind)
    tw = tail & ~req_bad.view(B, 1)
    bt = torch.arange(B, device=dev).view(B, 1).expand(B, W)
    q_kind[bt[tw], (tpos % R)[tw]] = tail_kind[tw].to(q_kind.dtype)

    neg = torch.full_like
    num_accepted = torch.where(req_bad, neg(m, -1), m)
    tokens = torch.where(req_bad.view(B, 1), neg(tokens, -1), tokens)
    nd = torch.where(req_bad.view(B, 1), neg(nd, -1), nd)
    return num_accepted, tokens, nd
