"""``verify_chain``: the PyTorch spec of verification alone, for drafts whose laws are given.

The verification half of ``jacobi_step`` (SPEC section 3) for callers that bring their own
target and draft probabilities (a separate drafter, a different sampler): for a ragged batch of
B requests, draft ``D[j]`` of window row ``j < win_len`` was drawn from ``draft[b, j]`` and is
checked against ``target[b, j]``:

- accept row j when ``u_j * draft[j, D_j] < target[j, D_j]``, ``u_j`` the acceptance uniform
  of stream ACCEPT at ``(seed, pos + j, step)``;
- ``m`` = the first rejected row (``win_len`` when all pass);
- the token at row ``m``: an exponential race over ``max(0, target[m] - draft[m])`` (a rejected
  row's residual), or over ``target[m]`` when ``m = win_len`` (the bonus row), with stream RESID's
  noise at ``(seed, pos + m, step)``; a residual without mass (possible only through rounding)
  falls back to ``target[m]`` and counts in ``status[1]``.

These are the draws ``jacobi_step`` makes for a window whose stored laws are dense rows, so for
``target`` equal to the step's target rows both return the same tokens; the committed token's
law is the target's whatever the draft laws (SPEC section 3). The result depends only on the W
gathered entries and rows ``m`` (the kernels read nothing else).

Shapes: target ``[B, W+1, V]``, draft ``[B, W, V]`` (float probabilities, used as given: the
law statement above needs rows that sum to 1), ids ``[B, W]`` i64, win_len / pos / seed / step
``[B]`` i64, status ``[4]`` i32.
Returns ``num_accepted [B]`` (m, or -1 for a request in error) and ``tokens [B, W+1]`` (the
``m + 1`` committed tokens, then -1). Errors (status[0] bits, request returns -1): a draft id
outside ``[0, V)`` at a row ``j < win_len`` (2); a value that is no probability (NaN, infinite
or negative) among the gathered entries of rows ``j < win_len`` or in the rows ``m`` the race
reads, or a row ``m`` of ``target`` without positive mass (1).
"""
from __future__ import annotations

import torch

from .. import rng
from .jacobi_step import ERR_DRAFT_RANGE, ERR_NONFINITE, STATUS_ERR, STATUS_ZERO_RESID


def _prob(x):
    """True where ``x`` can be a probability: finite and not negative (NaN fails both)."""
    return (x >= 0) & (x < float("inf"))


def verify_chain(target, draft, ids, win_len, pos, seed, step, status):
    B, W1, V = target.shape
    W = W1 - 1
    dev = target.device
    i64 = torch.int64
    j = torch.arange(W1, device=dev, dtype=i64)
    rows = torch.arange(B, device=dev)
    posj = pos.view(B, 1) + j
    is_draft = j.view(1, W1) < win_len.view(B, 1)
    p = target.to(torch.float32)
    q = draft.to(torch.float32)

    # ---- acceptance of every draft row (one gathered entry of each law per row)
    D = torch.cat([ids, torch.zeros(B, 1, dtype=i64, device=dev)], 1)
    in_range = (D >= 0) & (D < V)
    Dc = D.clamp(0, V - 1)
    zero = torch.zeros(B, W1, dtype=torch.float32, device=dev)
    # an id outside [0, V) reads 0 from both laws (the row is rejected; the request is in error)
    Pd = torch.where(in_range, torch.gather(p, 2, Dc.unsqueeze(-1)).squeeze(-1), zero)
    Qd = torch.where(in_range, torch.cat([torch.gather(q, 2, Dc[:, :W].unsqueeze(-1)).squeeze(-1), zero[:, :1]], 1),
                     zero)
    u = rng.uniform24(rng.four_words(seed.view(B, 1), posj, step.view(B, 1), rng.STREAM_ACCEPT)[..., 0])
    accept = u * Qd < Pd
    rej = is_draft & ~accept
    m = torch.minimum(torch.where(rej, j.view(1, W1), torch.full_like(posj, W1)).amin(1), win_len)
    draft_bad = (is_draft & ~in_range).any(1)
    entry_bad = (is_draft & in_range & ~(_prob(Pd) & _prob(Qd))).any(1)

    # ---- the token of row m: residual race (rejected draft) or target race (bonus row)
    resid_row = m < win_len
    pm = p[rows, m]                                                    # [B, V]
    qm = q[rows, m.clamp(max=max(W - 1, 0))] if W > 0 else torch.zeros_like(pm)
    qm = torch.where(resid_row.view(B, 1), qm, torch.zeros_like(qm))
    row_bad = ~_prob(pm).all(1) | ~_prob(qm).all(1)
    E = rng.exponential(rng.lane_words(seed, pos + m, step, rng.STREAM_RESID, V))
    r = rng.race(torch.where(resid_row.view(B, 1), torch.clamp(pm - qm, min=0.0), pm), E)
    no_resid = (r < 0) & resid_row
    cand = torch.where(r < 0, rng.race(pm, E), r)
    no_mass = cand < 0

    bad = draft_bad | entry_bad | row_bad | no_mass
    status[STATUS_ZERO_RESID] += (no_resid & ~bad).sum().to(status.dtype)
    err = ((entry_bad | row_bad | no_mass).any().to(torch.int32) * ERR_NONFINITE) | \
        (draft_bad.any().to(torch.int32) * ERR_DRAFT_RANGE)
    status[STATUS_ERR] |= err.to(status.dtype)

    tokens = torch.where(j.view(1, W1) < m.view(B, 1), D, torch.full_like(D, -1))
    tokens = tokens.scatter(1, m.view(B, 1), cand.view(B, 1))
    num_accepted = torch.where(bad, torch.full_like(m, -1), m)
    tokens = torch.where(bad.view(B, 1), torch.full_like(tokens, -1), tokens)
    return num_accepted, tokens
