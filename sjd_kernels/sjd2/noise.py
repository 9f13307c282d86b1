"""SJD2 noise: the level schedule, embedding normalisation, segment noising and the level embedding.

Noise lives in the *normalised* embedding space (SPEC section 6): with ``e`` a token
embedding, ``e_n = (e - mean) / std`` per dimension (statistics over the image-token
rows of the embedding table), level ``k`` holds ``x_k = a_k * e_n + s_k * eps`` with
``a_k^2 + s_k^2 = 1`` (variance preserving), and the model input of a noisy position is
``x_k * std + mean + L[k]`` (``L`` the learned level embedding, ``L[0] = 0``). A clean
position (level 0) takes the token embedding ``e`` itself, bit for bit, so ``K = 0`` is SJD.

Choices the public text leaves open (labelled as such in docs/SJD2.md):
- the Karras spacing is applied to ``s`` itself on ``[s_min, s_max]`` (``s_max = 1`` by
  default, so level K is exactly pure noise, ``a_K = 0``); ``s_0 = 0``.
- training segments: in "rising" mode the segment levels are sorted, start clean and end
  at K (the shape of an SJD2 window: committed prefix, refined drafts, noisier tail);
  otherwise each segment draws its level uniformly in ``0..K``.
- the normalisation statistics are computed once from the base model's embedding table
  and frozen (buffers), so decoding uses the same map the fine-tune saw.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .. import rng
from ..ops._common import INT_DTYPES, SJDInputError, check_finite, check_int, check_tensor, host_checks

# Gaussian noise of a position entering the window at level K (step 0, keyed by position):
# a stream of its own, beside rng.STREAM_* (1..10).
STREAM_SJD2_NOISE = 11


@dataclass(frozen=True)
class NoiseSchedule:
    """Levels ``k = 0..levels``; ``s_k`` Karras-spaced on ``[s_min, s_max]`` for k >= 1, ``s_0 = 0``.

    ``levels = 0`` is plain SJD (no noisy positions). ``rho`` is Karras' exponent
    (larger puts more levels near ``s_min``).
    """
    levels: int = 8
    s_min: float = 0.2
    s_max: float = 1.0
    rho: float = 7.0

    def __post_init__(self):
        # NumPy ints are taken and stored as Python ints (the manifest is JSON); floats stored as floats
        object.__setattr__(self, "levels", check_int("levels", self.levels, 0))
        for name in ("s_min", "s_max", "rho"):
            object.__setattr__(self, name, check_finite(name, getattr(self, name)))
        if self.levels > 0 and not (0.0 < self.s_min <= self.s_max <= 1.0):
            raise SJDInputError(f"need 0 < s_min <= s_max <= 1 for a variance-preserving schedule, "
                                f"got s_min={self.s_min}, s_max={self.s_max}")
        if not self.rho > 0:
            raise SJDInputError(f"rho must be > 0, got {self.rho}")

    def sigmas64(self) -> torch.Tensor:
        """``s_k`` for k = 0..K, float64 ``[K+1]`` (increasing; ``s_0 = 0``)."""
        K = self.levels
        s = torch.zeros(K + 1, dtype=torch.float64)
        if K == 0:
            return s
        if K == 1:
            s[1] = self.s_max
            return s
        t = torch.arange(K, dtype=torch.float64) / (K - 1)
        lo, hi = self.s_min ** (1.0 / self.rho), self.s_max ** (1.0 / self.rho)
        s[1:] = (lo + t * (hi - lo)) ** self.rho
        s[-1] = self.s_max           # exact end point (no pow rounding): s_max = 1 gives a_K = 0
        return s

    def alphas64(self) -> torch.Tensor:
        """``a_k = sqrt(1 - s_k^2)``, float64 ``[K+1]``."""
        return torch.sqrt(torch.clamp(1.0 - self.sigmas64() ** 2, min=0.0))

    def coefficients(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, s)`` float32 ``[K+1]`` on ``device``: the numbers every backend reads."""
        return (self.alphas64().to(torch.float32).to(device), self.sigmas64().to(torch.float32).to(device))

    def to_dict(self) -> dict:
        return asdict(self)


class EmbedNorm(nn.Module):
    """Per-dimension affine map of token embeddings: ``normalize(e) = (e - mean) / std``.

    ``mean``, ``std`` [d] float32 buffers (saved with the weights, never trained).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("std", torch.ones(dim, dtype=torch.float32))

    @classmethod
    def from_embedding(cls, weight: torch.Tensor, rows: slice | torch.Tensor | None = None,
                       min_std: float = 1e-6) -> "EmbedNorm":
        """Statistics over the image-token rows ``weight[rows]`` (all rows when None)."""
        check_tensor("weight", weight, dim=2, last_contiguous=False)
        if check_finite("min_std", min_std) <= 0.0:
            raise SJDInputError(f"min_std must be > 0 (the normalisation divides by std), got {min_std!r}")
        w = weight.detach().to(torch.float64)
        if rows is not None:
            w = w[rows]
        if not bool(torch.isfinite(w).all()):
            raise SJDInputError("weight must hold finite values, got NaN or infinite ones")
        if w.shape[0] < 2:
            raise SJDInputError(f"need at least 2 image-token rows to normalise, got {w.shape[0]}")
        m = cls(w.shape[1])
        m.mean.copy_(w.mean(0).to(torch.float32))
        m.std.copy_(w.std(0).clamp(min=min_std).to(torch.float32))
        return m

    def normalize(self, e: torch.Tensor) -> torch.Tensor:
        return (e.to(torch.float32) - self.mean) / self.std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


def check_levels(level: torch.Tensor, levels: int, name: str = "level") -> None:
    """``level`` must be an integer tensor with values in ``[0, levels]`` (values checked on the host for
    CPU tensors only: a negative level would index the tables from the end)."""
    check_tensor(name, level, dtypes=INT_DTYPES, last_contiguous=False)
    if host_checks(level) and level.numel() and bool(((level < 0) | (level > levels)).any()):
        raise SJDInputError(f"{name} must lie in [0, K={levels}], got values in [{int(level.min())}, "
                            f"{int(level.max())}]")


class LevelEmbedding(nn.Module):
    """Learned embedding of the noise level, added to the input embedding; level 0 is fixed at zero.

    Only levels 1..K are parameters (``weight [K, d]``, zero-initialised so fine-tuning starts
    from the base model's behaviour); ``table()`` is ``[K+1, d]`` with a constant zero row 0.
    """

    def __init__(self, levels: int, dim: int):
        super().__init__()
        self.levels = check_int("levels", levels, 0)
        dim = check_int("dim", dim, 1)
        self.weight = nn.Parameter(torch.zeros(levels, dim, dtype=torch.float32))

    def table(self) -> torch.Tensor:
        return torch.cat([self.weight.new_zeros(1, self.weight.shape[1]), self.weight], 0)

    def forward(self, level: torch.Tensor) -> torch.Tensor:
        check_levels(level, self.levels)
        return self.table()[level]


class SJD2Embedding(nn.Module):
    """Everything SJD2 adds to a model: the schedule, the normaliser and the level embedding.

    ``inputs_embeds(e, x, level)`` is the model input of every position: ``e`` (the token
    embedding, exact) where ``level == 0``, else ``unnormalize(x) + L[level]``.
    """

    def __init__(self, schedule: NoiseSchedule, norm: EmbedNorm):
        super().__init__()
        self.schedule = schedule
        self.norm = norm
        self.level_embed = LevelEmbedding(schedule.levels, norm.mean.shape[0])
        a, s = schedule.coefficients()
        self.register_buffer("alpha", a, persistent=False)
        self.register_buffer("sigma", s, persistent=False)

    @property
    def levels(self) -> int:
        return self.schedule.levels

    def noise(self, e: torch.Tensor, level: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Normalised noisy latents ``a_k * normalize(e) + s_k * eps``: ``[..., d]`` float32 (differentiable in e)."""
        check_levels(level, self.levels)
        if tuple(level.shape) != tuple(e.shape[:-1]) or tuple(eps.shape) != tuple(e.shape):
            raise SJDInputError(f"level must have shape {list(e.shape[:-1])} and eps {list(e.shape)} (those of e "
                                f"[..., d]), got {list(level.shape)} and {list(eps.shape)}")
        en = self.norm.normalize(e)
        return self.alpha[level].unsqueeze(-1) * en + self.sigma[level].unsqueeze(-1) * eps

    def inputs_embeds(self, e: torch.Tensor, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        noisy = self.norm.unnormalize(x) + self.level_embed(level)
        return torch.where((level > 0).unsqueeze(-1), noisy.to(e.dtype), e)


def sample_segment_levels(batch: int, length: int, levels: int, *, generator: torch.Generator | None = None,
                          max_segments: int = 8, p_rising: float = 0.5) -> torch.Tensor:
    """Noise levels ``[batch, length]`` int64 for a training batch (SPEC section 6).

    Each row is split at random into ``1..max_segments`` contiguous segments (cut points
    uniform without replacement); every segment gets one level. With probability
    ``p_rising`` the row is "rising": at least two segments, levels sorted, the first
    segment clean (0) and the last at K, the shape of an SJD2 window. Otherwise each
    segment's level is uniform in ``0..K``. ``levels = 0`` gives all zeros.
    """
    batch, length = check_int("batch", batch, 1), check_int("length", length, 1)
    levels, max_segments = check_int("levels", levels, 0), check_int("max_segments", max_segments, 1)
    p_rising = check_finite("p_rising", p_rising)
    if not 0.0 <= p_rising <= 1.0:
        raise SJDInputError(f"p_rising must be a probability in [0, 1], got {p_rising!r}")
    out = torch.zeros(batch, length, dtype=torch.int64)
    if levels == 0:
        return out
    g = generator
    for b in range(batch):
        rising = length >= 2 and max_segments >= 2 and torch.rand((), generator=g).item() < p_rising
        lo = 2 if rising else 1
        hi = min(max_segments, length)
        n_seg = int(torch.randint(lo, hi + 1, (), generator=g)) if hi > lo else lo
        cuts = (torch.randperm(length - 1, generator=g)[: n_seg - 1] + 1).sort().values
        bounds = [0] + cuts.tolist() + [length]
        lv = torch.randint(0, levels + 1, (n_seg,), generator=g)
        if rising:
            lv = lv.sort().values
            lv[0], lv[-1] = 0, levels
        for i in range(n_seg):
            out[b, bounds[i]:bounds[i + 1]] = lv[i]
    return out


def _int64_tensor(name: str, v, device=None) -> torch.Tensor:
    """``v`` (an int, a NumPy integer or integer array, a possibly nested list of ints and NumPy integers,
    or an integer tensor; not a bool or a float) as int64, values outside int64 refused, each with an
    ``SJDInputError`` naming ``name``. An empty list is an empty tensor (as an empty integer tensor is)."""
    what = f"{name} must be integers in int64 (an int, a list of ints, or an integer array or tensor)"
    if isinstance(v, torch.Tensor):
        if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise SJDInputError(f"{what}, got a {v.dtype} tensor")
        return v.to(device=device if device is not None else v.device, dtype=torch.int64)
    if isinstance(v, (np.ndarray, np.generic)):
        a = np.asarray(v)
        if a.dtype.kind not in "iu" or (a.dtype.kind == "u" and a.size and int(a.max()) >= 2 ** 63):
            raise SJDInputError(f"{what}, got a NumPy {a.dtype} {'array' if a.ndim else 'scalar'}")
        return torch.as_tensor(a.astype(np.int64), device=device)

    def items(x):
        if isinstance(x, (list, tuple)):
            for y in x:
                yield from items(y)
        else:
            yield x
    if any(isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or not -2 ** 63 <= int(x) < 2 ** 63
           for x in items(v)):
        raise SJDInputError(f"{what}, got {v!r:.60}")
    try:
        return torch.tensor(v, dtype=torch.int64, device=device)
    except (TypeError, ValueError) as e:                              # a ragged nested list
        raise SJDInputError(f"{what} of a regular shape, got {v!r:.60} ({e})") from None


def position_noise(seed: torch.Tensor, position: torch.Tensor, dim: int) -> torch.Tensor:
    """Standard normal noise ``[..., dim]`` float32 of the positions entering the window (rng contract).

    Lane group ``d`` of counter ``(d, position, 0, STREAM_SJD2_NOISE)`` gives words w0, w1;
    Box-Muller: ``sqrt(-2 log((w0 >> 8) + 0.5) * 2^-24) * cos(2 pi (w1 >> 8) * 2^-24)``.
    The Triton prepare kernel draws the same numbers.
    """
    dim = check_int("dim", dim, 1)
    seed = _int64_tensor("seed", seed)
    position = _int64_tensor("position", position, seed.device)
    try:
        torch.broadcast_shapes(seed.shape, position.shape)
    except RuntimeError:
        raise SJDInputError(f"seed {list(seed.shape)} and position {list(position.shape)} must broadcast "
                            f"against each other") from None
    w = rng.lane_words(seed, position, torch.zeros((), dtype=torch.int64, device=seed.device),
                       STREAM_SJD2_NOISE, 4 * dim)
    w = w.reshape(*w.shape[:-1], dim, 4)
    u1 = ((w[..., 0] >> 8).to(torch.float32) + 0.5) * rng.TWO_M24
    u2 = (w[..., 1] >> 8).to(torch.float32) * rng.TWO_M24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)
