"""Triton kernel of ``sjd2_prepare`` (spec: ``sjd_kernels.reference.sjd2_prepare``).

One program per input slot: it reads the slot's flags and ring level once, then walks the
embedding dimension in blocks, so the level written at the end cannot race with a read
by another program of the same slot. A token it reads outside the table, or a ring level outside
0..K, is clamped into range and sets bit 32 of ``status[0]`` (one atomic from the program of that
slot). Position noise is drawn in the kernel with the
project's Philox counter layout (``sjd2.noise.position_noise``), so a position entering
the window costs no extra pass. The embedding gather, normalisation, DDIM step, level
embedding and cast happen in registers: one read of each input row, one write of the
output row and of the latent.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.jacobi_step import ERR_PREPARE
from ..sjd2.noise import STREAM_SJD2_NOISE
from .rng import counter_word, philox4x32_10, seed_key

E_PREPARE: tl.constexpr = tl.constexpr(ERR_PREPARE)


@triton.jit
def _sjd2_prepare_kernel(E_ptr, mean_ptr, std_ptr, L_ptr, a_ptr, s_ptr, tok_ptr, pos_ptr, seed_ptr,
                         cend_ptr, fstart_ptr, rend_ptr, lat_ptr, lev_ptr, out_ptr, status_ptr,
                         N, R, Vt, K,
                         D: tl.constexpr, STREAM: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)   # pid * D passes 2**31 once the output [B, N, d] does
    b = pid // N
    p = tl.load(pos_ptr + pid)
    tok_in = tl.load(tok_ptr + pid)
    tok = tl.minimum(tl.maximum(tok_in, 0), Vt - 1)
    cend = tl.load(cend_ptr + b)
    fstart = tl.load(fstart_ptr + b)
    rend = tl.load(rend_ptr + b)
    valid = p >= 0
    win = valid & (p >= cend)
    fresh = win & (p >= fstart)
    r = tl.where(valid, p, 0) % R
    k_ring = tl.load(lev_ptr + b * R + r).to(tl.int64)
    k_old = tl.where(fresh, K, k_ring)
    step = win & (p < rend) & (k_old > 0)
    k_new = tl.where(step, k_old - 1, k_old)
    k_new = tl.where(win, k_new, 0)
    noisy = win & (k_new > 0)
    reads = (valid & ~win) | step | (win & (k_new == 0))
    bad = (reads & ((tok_in < 0) | (tok_in >= Vt))) | (win & ~fresh & ((k_old < 0) | (k_old > K)))
    tl.atomic_or(status_ptr + 0, E_PREPARE, mask=bad)
    ko = tl.minimum(tl.maximum(k_old, 0), K)     # table reads stay in bounds for ring levels outside 0..K
    kp = tl.minimum(tl.maximum(k_new, 0), K)
    a_k = tl.load(a_ptr + ko)
    s_k = tl.where(step, tl.load(s_ptr + ko), 1.0)
    a_p = tl.load(a_ptr + kp)
    s_p = tl.load(s_ptr + kp)
    k0, k1 = seed_key(tl.load(seed_ptr + b))
    pu = counter_word(tl.where(valid, p, 0))

    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        m = offs < D
        e = tl.load(E_ptr + tok * D + offs, mask=m, other=0.0)
        mu = tl.load(mean_ptr + offs, mask=m, other=0.0)
        sd = tl.load(std_ptr + offs, mask=m, other=1.0)
        x = tl.load(lat_ptr + (b * R + r) * D + offs, mask=m & win, other=0.0)
        if K > 0:
            zero = tl.zeros([BLOCK_D], dtype=tl.uint32)
            w0, w1, _, _ = philox4x32_10(offs.to(tl.uint32), zero + pu, zero, zero + STREAM, zero + k0, zero + k1)
            u1 = ((w0 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
            u2 = (w1 >> 8).to(tl.float32) * 5.9604644775390625e-08
            z = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
            x = tl.where(fresh, z, x)
        e_hat = (e.to(tl.float32) - mu) / sd
        x_step = a_p * e_hat + (s_p / s_k) * (x - a_k * e_hat)
        x = tl.where(step, x_step, x)
        lv = tl.load(L_ptr + kp * D + offs, mask=m, other=0.0)
        y = (x * sd + mu + lv).to(e.dtype)
        y = tl.where(noisy, y, e)
        y = tl.where(valid, y, tl.zeros_like(y))
        tl.store(out_ptr + pid * D + offs, y, mask=m)
        tl.store(lat_ptr + (b * R + r) * D + offs, x, mask=m & win)
    if win:
        tl.store(lev_ptr + b * R + r, k_new.to(tl.int32))


def sjd2_prepare_triton(embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed,
                        commit_end, fresh_start, row_end, latent, level, status):
    from ..ops.sjd2_prepare import check_kernel_args
    Vt, D, B, N, _ = check_kernel_args(embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed,
                                       commit_end, fresh_start, row_end, latent, level, status)
    R = latent.shape[1]
    K = alpha.shape[0] - 1
    out = torch.empty(B, N, D, dtype=embed_weight.dtype, device=embed_weight.device)
    if B * N == 0:
        return out
    block = min(1024, triton.next_power_of_2(D))
    _sjd2_prepare_kernel[(B * N,)](embed_weight, mean, std, level_table, alpha, sigma, tokens, positions, seed,
                                   commit_end, fresh_start, row_end, latent, level, out, status,
                                   N, R, Vt, K, D=D, STREAM=STREAM_SJD2_NOISE, BLOCK_D=block)
    return out


def codegen_cases(V: int) -> list:
    """Compile cases for ``tests/test_codegen.py`` (sm_90 without a GPU): fp32 and bf16 embeddings of a
    LlamaGen-XL-like width (d 1280); ``V`` is unused (the kernel has no vocabulary axis)."""
    cases = []
    for dt in ("fp32", "bf16"):
        ptrs = dict(E_ptr=f"*{dt}", mean_ptr="*fp32", std_ptr="*fp32", L_ptr="*fp32", a_ptr="*fp32", s_ptr="*fp32",
                    tok_ptr="*i64", pos_ptr="*i64", seed_ptr="*i64", cend_ptr="*i64", fstart_ptr="*i64",
                    rend_ptr="*i64", lat_ptr="*fp32", lev_ptr="*i32", out_ptr=f"*{dt}", status_ptr="*i32")
        ce = {"D": 1280, "STREAM": STREAM_SJD2_NOISE, "BLOCK_D": 1024}
        sig = dict(ptrs, N="i32", R="i32", Vt="i32", K="i32", **{k: "constexpr" for k in ce})
        cases.append(dict(name=f"sjd2-prepare-{dt}", kernel="_sjd2_prepare_kernel", signature=sig, constexprs=ce,
                          options=dict(num_warps=4)))
    return cases
