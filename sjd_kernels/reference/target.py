"""The target law of one row (SPEC section 2), the PyTorch spec every backend follows.

``P = softmax(topk(l / T))`` then top-p, with ``l = u + s * (c - u)`` under CFG, all in
float32. top-k keeps every value ``>=`` the k-th largest (ties kept); top-p keeps every
probability ``>=`` the threshold ``t*``, the largest probability such that the mass of
``{P >= t*}`` reaches ``p`` (ties kept), then renormalises. ``p`` is a float32 like every other
parameter, and so is the mass it is compared with (summed in float64, then rounded): a ``top_p``
that rounds to 1 in float32 is off. ``T = 0`` is greedy: one-hot
at the argmax, lowest id on ties. Rows at forced positions are handled by the callers.
"""
from __future__ import annotations

import numpy as np
import torch


def combine_logits(logits: torch.Tensor, uncond: torch.Tensor | None, cfg_scale: torch.Tensor | None) -> torch.Tensor:
    """CFG combine in float32: ``u + s * (c - u)``; ``cfg_scale`` is ``[B]`` (broadcast over rows and lanes).
    A lane at -inf in both rows (a token masked before the logits reach the op) stays -inf, where the
    formula would give -inf - -inf = NaN; -inf in one row only is left to the formula."""
    c = logits.to(torch.float32)
    if uncond is None:
        return c
    u = uncond.to(torch.float32)
    s = cfg_scale.to(torch.float32).reshape(-1, *([1] * (c.dim() - 1)))
    return torch.where((c == -torch.inf) & (u == -torch.inf), c, u + s * (c - u))


def topk_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last dim, keepdim (k in 1..V)."""
    return torch.topk(x, k, dim=-1).values[..., -1:]


def topp_on(top_p: float) -> bool:
    """Whether top-p cuts anything: ``top_p`` below 1 in float32 (0.99999999 rounds to 1: off)."""
    return bool(np.float32(top_p) < np.float32(1.0))


def topp_keep(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the top-p set of probability rows ``p`` (ties at the threshold kept): the mass,
    summed in float64 (so CPU and CUDA agree) and rounded to float32, is compared with float32
    ``top_p`` (the kernels compare float32 sums with float32 ``top_p``; docs/DESIGN.md)."""
    srt, _ = torch.sort(p, dim=-1, descending=True)
    cum = torch.cumsum(srt, dim=-1, dtype=torch.float64).to(torch.float32)   # still non-decreasing
    idx = torch.searchsorted(cum, torch.full_like(cum[..., :1], float(np.float32(top_p))))  # first cum >= p
    idx = idx.clamp(max=p.shape[-1] - 1)
    thr = torch.gather(srt, -1, idx)
    return p >= thr


def bad_rows(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[...]`` bool: the rows of ``x [..., V]`` that ``target_probs`` returns as NaN rows: NaN or +inf,
    no finite logit, or (temperature > 0) a +inf or no finite value after scaling by ``1 / T``."""
    bad = torch.isnan(x).any(-1) | (x == float("inf")).any(-1) | ~(x > float("-inf")).any(-1)
    if temperature != 0.0:
        y = x * float(np.float32(1.0) / np.float32(temperature))
        bad = bad | (y == float("inf")).any(-1) | ~(y > float("-inf")).any(-1)
    return bad


def target_probs(x: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Target law from combined float32 logits ``x [..., V]``; returns float32 probabilities.

    Rows containing NaN or +inf, or with no finite logit, come back as NaN rows: the
    callers turn that into a device status error.
    """
    V = x.shape[-1]
    bad = torch.isnan(x).any(-1, keepdim=True) | (x == float("inf")).any(-1, keepdim=True)
    bad = bad | ~(x > float("-inf")).any(-1, keepdim=True)
    x = torch.where(bad, torch.zeros_like(x), x)
    if temperature == 0.0:
        idx = torch.argmax(x, dim=-1, keepdim=True)        # first maximum = lowest id
        p = torch.zeros_like(x).scatter_(-1, idx, 1.0)
    else:
        # multiply by the float32 reciprocal: the same rounding on CPU, CUDA and in the kernels
        # (a host float: no host-to-device copy, so a CUDA graph can capture it; x * s rounds s to float32)
        inv_t = float(np.float32(1.0) / np.float32(temperature))
        y = x * inv_t
        if 0 < top_k < V:
            y = torch.where(y >= topk_threshold(y, top_k), y, torch.full_like(y, float("-inf")))
        m = y.amax(-1, keepdim=True)
        e = torch.exp(y - m)
        p = e / e.sum(-1, keepdim=True)
        if topp_on(top_p):
            keep = topp_keep(p, top_p)
            p = torch.where(keep, p, torch.zeros_like(p))
            p = p / p.sum(-1, keepdim=True)
    return torch.where(bad, torch.full_like(p, float("nan")), p)
