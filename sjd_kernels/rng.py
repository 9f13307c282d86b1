"""Counter-based random numbers: Philox4x32-10, bit-identical in PyTorch, Triton and CUDA.

Every random number the library draws is a pure function of a key and a counter
(SPEC section 7), so backends, batch compositions and CUDA-graph replays draw the
same numbers:

    key     = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)      seed: per request, int64
    counter = (lane // 4, position, step, stream)                  each taken mod 2**32
    word    = philox4x32_10(counter, key)[lane % 4]                 a uint32

``position`` is the absolute token position, ``step`` the request's iteration counter
(0 for streams that must not change across iterations, e.g. position-keyed Gumbel
noise), ``stream`` one of the ``STREAM_*`` constants and ``lane`` the draw within a row
(vocabulary lane). The request enters through its own seed, which is what makes the
same seed give the same image whatever the batch.

Derived numbers (all backends use exactly these formulas):
- ``u24 = word >> 8`` (24 random bits); acceptance uniform ``u = u24 * 2**-24`` in [0, 1)
- exponential noise ``E = max(-log((u24 + 0.5) * 2**-24), 2**-25)`` (float32), used by the
  exponential race ``argmax_i w_i / E_i`` over lanes with ``w_i > 0`` (lowest lane
  wins ties). The race samples ``i`` with probability ``w_i / sum(w)`` and does not
  depend on summation order.

PyTorch has no uint32 arithmetic, so the reference works in int64 and splits the
32x32-bit products into 16-bit limbs so that nothing overflows.
"""
from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
PHILOX_ROUNDS = 10

# Streams: independent noise for each use (SPEC section 3, condition 3).
STREAM_ACCEPT = 1      # acceptance uniforms of verification
STREAM_RESID = 2       # residual draws at the first rejection, and the bonus token
STREAM_DRAFT = 3       # fresh drafts (sjd, vp) for the next window
STREAM_COUPLE = 4      # coupling keep/redraw uniform
STREAM_COUPLE_RES = 5  # coupling redraw from max(0, P - Q)
STREAM_TAIL = 6        # uniform initialisation of new tail positions
STREAM_GUMBEL = 7      # position-keyed noise shared across iterations (step = 0)
STREAM_TREE = 8        # tree sibling draws (lane-keyed per sibling)
STREAM_TREE_ACCEPT = 9 # tree verification uniforms
STREAM_TREE_RESID = 10 # tree residual draws
STREAM_SJD2_NOISE = 11 # SJD2: Gaussian noise of window positions entering at the top level

TWO_M24 = 2.0 ** -24
E_FLOOR = 2.0 ** -25   # smallest exponential noise value (see exponential)


def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of a * m for int64 ``a`` in [0, 2**32) and a 32-bit constant m."""
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    t = a_lo * m                       # < 2**48
    u = a_hi * m                       # < 2**48; a*m = u * 2**16 + t
    mid = t + ((u & 0xFFFF) << 16)     # < 2**49
    lo = mid & MASK32
    hi = ((u >> 16) + (mid >> 32)) & MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values (broadcastable). Returns 4 int64 tensors."""
    c0 = torch.as_tensor(c0, dtype=torch.int64) & MASK32

    def u32(x):   # Python ints become device fills, not host tensors copied over (CUDA-graph safe)
        x = x.to(torch.int64) if isinstance(x, torch.Tensor) else torch.full_like(c0, int(x))
        return x & MASK32
    c1, c2, c3, k0, k1 = u32(c1), u32(c2), u32(c3), u32(k0), u32(k1)
    for r in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < rounds:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def split_seed(seed: torch.Tensor):
    seed = torch.as_tensor(seed, dtype=torch.int64)
    return seed & MASK32, (seed >> 32) & MASK32


def lane_words(seed, position, step, stream: int, n_lanes: int) -> torch.Tensor:
    """uint32 words (as int64) for lanes ``0..n_lanes-1``: shape ``broadcast(seed, position, step) + [n_lanes]``."""
    seed = torch.as_tensor(seed, dtype=torch.int64)
    dev = seed.device
    position = torch.as_tensor(position, dtype=torch.int64, device=dev)
    step = torch.as_tensor(step, dtype=torch.int64, device=dev)
    k0, k1 = split_seed(seed)
    n_groups = (n_lanes + 3) // 4
    g = torch.arange(n_groups, dtype=torch.int64, device=dev)
    shape = torch.broadcast_shapes(seed.shape, position.shape, step.shape)
    ex = lambda t: t.expand(shape).unsqueeze(-1)
    w = philox4x32(g, ex(position), ex(step), stream, ex(k0), ex(k1))
    words = torch.stack(w, dim=-1).reshape(*shape, n_groups * 4)
    return words[..., :n_lanes]


def four_words(seed, position, step, stream: int) -> torch.Tensor:
    """The 4 words of lane group 0: shape ``broadcast(...) + [4]``."""
    return lane_words(seed, position, step, stream, 4)


def uniform24(words: torch.Tensor) -> torch.Tensor:
    """Acceptance uniform ``(word >> 8) * 2**-24`` in [0, 1), float32."""
    return (words >> 8).to(torch.float32) * TWO_M24


def exponential(words: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise ``-log((u24 + 0.5) * 2**-24)``, float32 (never 0, never inf)."""
    u = ((words >> 8).to(torch.float32) + 0.5) * TWO_M24
    # u24 = 2**24 - 1 makes u round to 1.0 in float32 and -log(u) = -0.0, which would lose the
    # race for a lane with positive weight; 2**-25 is what -log(1 - 2**-25) is to float32 precision.
    return torch.clamp(-torch.log(u), min=E_FLOOR)


def race(weights: torch.Tensor, expo: torch.Tensor) -> torch.Tensor:
    """Exponential race over the last dim: ``argmax_i w_i / E_i`` over ``w_i > 0``, lowest lane on ties.

    Returns int64 indices, -1 where every weight is <= 0 (zero mass).
    """
    w = weights.to(torch.float32)
    key = torch.where(w > 0, w / expo, torch.full_like(w, -1.0))
    idx = torch.argmax(key, dim=-1)
    ok = (w > 0).any(dim=-1)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def uniform_token(seed, position, step, stream: int, vocab: int) -> torch.Tensor:
    """An exactly uniform id in [0, vocab) from 4 words by rejection (word < 2**32 - 2**32 % vocab).

    The first accepted word of the four is used; if all four are rejected (probability
    below (vocab / 2**32)**4) the last one is used. Shape ``broadcast(...)``.
    """
    w = four_words(seed, position, step, stream)
    lim = (1 << 32) - ((1 << 32) % vocab)
    ok = w < lim
    first = torch.argmax(ok.to(torch.int64), dim=-1)           # 0 when none ok
    first = torch.where(ok.any(dim=-1), first, torch.full_like(first, 3))
    return torch.gather(w, -1, first.unsqueeze(-1)).squeeze(-1) % vocab
