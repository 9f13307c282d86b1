"""``sjd2_prepare``: the PyTorch spec of SJD2's input preparation (SPEC section 6).

Builds the model inputs of one SJD2 forward and, in the same pass, moves every noisy
window position one DDIM step towards the token just sampled for it. Per input slot
``(b, i)`` at absolute image position ``p = positions[b, i]``:

- ``p < 0``: not an image position (e.g. the condition token): output zeros, nothing written.
- ``p < commit_end[b]``: a committed token: output ``E[tok]``; the state is not touched.
- otherwise a window position, state in ring slot ``r = p % R``:
  ``fresh = p >= fresh_start[b]`` (entering the window now: level K, latent = position
  noise ``eps(seed, p)``), else level ``k = level[b, r]`` and latent ``x = latent[b, r]``.
  If ``p < row_end[b]`` (a token was sampled for it from a row of the last forward) and
  ``k > 0``, one DDIM step towards ``e_hat = (E[tok] - mean) / std``:
  ``x' = a[k-1] * e_hat + (s[k-1] / s[k]) * (x - a[k] * e_hat)``, ``k' = k - 1``.
  Output: ``E[tok]`` when ``k' = 0`` (exactly the token embedding: ``K = 0`` is SJD),
  else ``x' * std + mean + L[k']`` cast to the embedding dtype. Writes ``level[b, r] = k'``
  and ``latent[b, r] = x'``.

Shapes and dtypes:

    embed_weight  [Vt, d]   f32/bf16/f16   the model's token embedding table
    mean, std     [d] f32                  normalisation (image-token rows)
    level_table   [K+1, d] f32             level embedding, row 0 zero
    alpha, sigma  [K+1] f32                schedule (a_k, s_k)
    tokens        [B, N] i64               token of each slot (input token, or the sample e_hat is taken from)
    positions     [B, N] i64               absolute image position of each slot, -1 = not an image slot
    seed          [B] i64                  request seeds (noise of entering positions)
    commit_end, fresh_start, row_end  [B] i64
    latent        [B, R, d] f32            normalised latents by ring slot (mutated)
    level         [B, R] i32               levels by ring slot (mutated)
    status        [4] i32                  device status (mutated; bit 32 of status[0], see below)

Returns ``inputs_embeds [B, N, d]`` in the embedding's dtype.

Inputs it cannot use: a token the slot reads (``slot_levels``) outside ``[0, Vt)``, or a ring level
outside ``0..K`` at a window position that is not fresh. Every backend clamps the id into the table
and the level's table reads into ``0..K`` (so nothing is read out of bounds; the level written back
follows the unclamped one: k - 1 after a step, else k), and sets bit ``ERR_PREPARE`` (32) of ``status[0]``,
without a host synchronisation. (The op checks CPU tensors, and GPU tensors when it is given no status,
on the host before calling any backend.)
"""
from __future__ import annotations

import torch

from .jacobi_step import ERR_PREPARE, STATUS_ERR


def ddim_step(x: torch.Tensor, e_hat: torch.Tensor, a_k, s_k, a_prev, s_prev) -> torch.Tensor:
    """``a_{k-1} e_hat + (s_{k-1} / s_k) (x - a_k e_hat)`` in this operation order (every backend's)."""
    return a_prev * e_hat + (s_prev / s_k) * (x - a_k * e_hat)


def slot_levels(positions, commit_end, fresh_start, row_end, level, K: int):
    """Per slot: ``(committed, win, fresh, k_old, step, k_new)`` of the rule above (masks ``[B, N]``;
    levels int64, ``k_new`` 0 outside the window). A slot reads its token iff
    ``committed | step | (win & k_new == 0)``."""
    B, N = positions.shape
    R = level.shape[1]
    p = positions
    valid = p >= 0
    committed = valid & (p < commit_end.view(B, 1))
    win = valid & ~committed
    fresh = win & (p >= fresh_start.view(B, 1))
    b = torch.arange(B, device=p.device).view(B, 1).expand(B, N)
    k_old = torch.where(fresh, torch.full_like(p, K), level[b, p.clamp(min=0) % R].to(torch.int64))
    step = win & (p < row_end.view(B, 1)) & (k_old > 0)
    k_new = torch.where(step, k_old - 1, k_old)
    k_new = torch.where(win, k_new, torch.zeros_like(k_new))
    return committed, win, fresh, k_old, step, k_new


def bad_slots(tokens, positions, commit_end, fresh_start, row_end, level, K: int, Vt: int, levels=None):
    """``(bad_token, bad_level)`` masks ``[B, N]``: slots that read a token outside ``[0, Vt)``, and
    window slots that are not fresh whose ring level lies outside ``0..K``. ``levels``: the result of
    ``slot_levels`` for these arguments, when the caller has it."""
    committed, win, fresh, k_old, step, k_new = (levels if levels is not None else
                                                 slot_levels(positions, commit_end, fresh_start, row_end, level, K))
    reads = committed | step | (win & (k_new == 0))
    bad_token = reads & ((tokens < 0) | (tokens >= Vt))
    bad_level = win & ~fresh & ((k_old < 0) | (k_old > K))
    return bad_token, bad_level


def sjd2_prepare(embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed,
                 commit_end, fresh_start, row_end, latent, level, status):
    from ..sjd2.noise import position_noise  # here, not at the top: sjd_kernels.sjd2 imports this op's module
    B, N = tokens.shape
    R = latent.shape[1]
    d = embed_weight.shape[1]
    K = alpha.shape[0] - 1
    dev = tokens.device
    p = positions
    valid = p >= 0
    levels = slot_levels(p, commit_end, fresh_start, row_end, level, K)
    committed, win, fresh, k_old, step, k_new = levels
    r = p.clamp(min=0) % R
    b = torch.arange(B, device=dev).view(B, 1).expand(B, N)

    E = embed_weight[tokens.clamp(0, embed_weight.shape[0] - 1)]                 # [B, N, d]
    x_old = latent[b, r]
    if K > 0:                          # no host check of fresh.any(): positions enter at almost every step
        x_old = torch.where(fresh.unsqueeze(-1), position_noise(seed.view(B, 1), p.clamp(min=0), d), x_old)

    e_hat = (E.to(torch.float32) - mean) / std
    kp = k_new.clamp(0, K)             # table reads stay in bounds for ring levels outside 0..K
    ko = k_old.clamp(0, K)
    x_step = ddim_step(x_old, e_hat, alpha[ko].unsqueeze(-1), torch.where(step, sigma[ko], torch.ones_like(sigma[ko])).unsqueeze(-1),
                       alpha[kp].unsqueeze(-1), sigma[kp].unsqueeze(-1))
    x_new = torch.where(step.unsqueeze(-1), x_step, x_old)

    noisy = (x_new * std + mean + level_table[kp]).to(embed_weight.dtype)
    out = torch.where((win & (k_new > 0)).unsqueeze(-1), noisy, E)
    out = torch.where(valid.unsqueeze(-1), out, torch.zeros_like(out))

    bad_token, bad_level = bad_slots(tokens, p, commit_end, fresh_start, row_end, level, K, embed_weight.shape[0],
                                     levels)
    status[STATUS_ERR] |= ((bad_token | bad_level).any().to(torch.int32) * ERR_PREPARE).to(status.dtype)

    # ring writes without a host synchronisation: for each ring slot the input slot that writes it (a window
    # slot; by the contract at most one per ring slot), found by a scatter whose other slots land in a spare
    # column R; slots nobody writes keep their values
    writer = torch.full((B, R + 1), -1, dtype=torch.int64, device=dev)
    writer.scatter_(1, torch.where(win, r, torch.full_like(r, R)), torch.arange(N, device=dev).expand(B, N))
    writer = writer[:, :R]
    src = writer.clamp(min=0)
    hit = writer >= 0
    if N == 0:                                                     # no input slot: nothing writes the ring
        return out
    latent.copy_(torch.where(hit.unsqueeze(-1), torch.gather(x_new, 1, src.unsqueeze(-1).expand(B, R, d)), latent))
    level.copy_(torch.where(hit, torch.gather(k_new, 1, src).to(level.dtype), level))
    return out
