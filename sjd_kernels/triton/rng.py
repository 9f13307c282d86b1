"""Philox4x32-10 in Triton, bit-identical to ``sjd_kernels.rng`` (the PyTorch twin).

Counter layout (see ``sjd_kernels.rng``): key ``(seed & 0xffffffff, seed >> 32)``,
counter ``(lane // 4, position, step, stream)``, word ``lane % 4`` of the output block.
Everything here is uint32 arithmetic: products wrap mod 2**32 and ``tl.umulhi`` gives
the high half, so no 64-bit emulation is needed (unlike the int64 PyTorch reference).
"""
from __future__ import annotations

import triton
import triton.language as tl

PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds on uint32 tensors of one shape (broadcast before calling).

    Returns the 4 output words. Same round function as ``sjd_kernels.rng.philox4x32``.
    """
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, PHILOX_M0) ^ c3 ^ k1
        c1 = tl.mul(_c2, PHILOX_M1, sanitize_overflow=False)
        c3 = tl.mul(_c0, PHILOX_M0, sanitize_overflow=False)
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def seed_key(seed):
    """Philox key words of an int64 seed: ``(seed & 0xffffffff, (seed >> 32) & 0xffffffff)`` as uint32."""
    s = seed.to(tl.int64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1


@triton.jit
def counter_word(x):
    """An int64 counter field (position, step) reduced mod 2**32 to uint32, as the reference does."""
    return (x.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def four_words(k0, k1, c1, c2, STREAM: tl.constexpr):
    """The 4 words of lane group 0 for counter ``(0, c1, c2, STREAM)``; c1, c2 uint32 tensors of one shape."""
    z = tl.zeros_like(c1)
    return philox4x32_10(z, c1, c2, z + STREAM, z + k0, z + k1)


@triton.jit
def lane_words(k0, k1, c1, c2, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """uint32 words ``[BLOCK]`` of lanes ``0..BLOCK-1`` for counter ``(lane // 4, c1, c2, STREAM)``.

    ``c1``, ``c2``, ``k0``, ``k1`` are uint32 scalars. One Philox call per group of 4 lanes;
    the 4 words are interleaved back into lane order (join + reshape keeps the order).
    BLOCK must be a power of two >= 4.
    """
    g = tl.arange(0, BLOCK // 4).to(tl.uint32)
    z = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(g, z + c1, z + c2, z + STREAM, z + k0, z + k1)
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK])


@triton.jit
def lane_words_from(k0, k1, c1, c2, STREAM: tl.constexpr, g0, BLOCK: tl.constexpr):
    """``lane_words`` of lanes ``4 * g0 .. 4 * g0 + BLOCK - 1`` (a tile of a row read in chunks):
    group ids start at the int scalar ``g0``."""
    g = (g0 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    z = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(g, z + c1, z + c2, z + STREAM, z + k0, z + k1)
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK])


@triton.jit
def lane_words_at(k0, k1, c1, c2, STREAM: tl.constexpr, lanes):
    """The words of ``lane_words`` at the int32 lane ids ``lanes`` (any shape, ids >= 0): one Philox
    call per id for its group ``lane // 4``, word ``lane % 4``."""
    g = (lanes >> 2).to(tl.uint32)
    z = tl.zeros_like(g)
    w0, w1, w2, w3 = philox4x32_10(g, z + c1, z + c2, z + STREAM, z + k0, z + k1)
    e = lanes & 3
    return tl.where(e == 0, w0, tl.where(e == 1, w1, tl.where(e == 2, w2, w3)))
