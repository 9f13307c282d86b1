"""The "reference SJD" baseline: the public SJD loop's post-LM-head step, in PyTorch, step for step.

It follows the structure of the public SJD implementation (Teng et al., ICLR 2025,
``scheduler/jacobi_iteration_*.py``) rather than this library's design, so that the
benchmark can show what a user of that code pays today:

1. CFG on raw logits ``u + s * (c - u)``, temperature, a Hugging Face style top-k warper
   (keep every score ``>=`` the k-th largest), ``softmax``;
2. ``torch.multinomial`` draws a token from every target row (the next drafts);
3. ``torch.rand`` fills a uniform tensor of the full ``[B, W+1, V]`` shape;
4. a Python loop over requests and window positions runs the acceptance test
   ``r < min(1, P(d) / Q(d))`` one position at a time (each test reads a device value
   on the host); at the first rejection the token is drawn with ``torch.multinomial``
   from ``norm(max(0, P - Q))``; if every draft is accepted the bonus row's sample is
   committed;
5. the surviving positions keep the samples of step 2 with ``Q = P`` (dense); new tail
   positions get a uniform random image token stored one-hot (the public ``random``
   initialisation).

Two deliberate differences from the public code, both to keep it a correct SJD and a
fair baseline: each request commits its own number of tokens (the public loop commits the
batch minimum), and the residual is not re-warped by top-k (it is already supported on
the top-k set, so re-warping changes nothing but time). The law test in
``tests/test_bench.py`` checks that the committed token follows the target law.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def warp_probs(logits: torch.Tensor, uncond: Optional[torch.Tensor] = None, cfg_scale: Optional[torch.Tensor] = None,
               temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Target rows ``[B, L, V]`` float32 as the public loop computes them (CFG, temperature, top-k, softmax)."""
    x = logits.float()
    if uncond is not None:
        s = cfg_scale.float().view(-1, *([1] * (x.dim() - 1)))
        u = uncond.float()
        x = s * (x - u) + u
    if temperature != 1.0:
        x = x / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return F.softmax(x, dim=-1)


class ReferenceSJD:
    """Per-request window state of the public SJD loop: drafts ``[B, W]`` and their laws ``[B, W, V]``.

    ``step(logits)`` takes the ``W+1`` target rows of one forward over
    ``[X[n-1], D[0..W-1]]`` and returns ``(num_accepted [B], committed list of [m_b+1]
    tensors, next_drafts [B, W])``; it updates the stored drafts and laws.
    """

    def __init__(self, batch: int, window: int, vocab: int, *, temperature: float = 1.0, top_k: int = 0,
                 device="cpu", generator: Optional[torch.Generator] = None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.B, self.W, self.V = batch, window, vocab
        self.temperature, self.top_k = temperature, top_k
        self.device = torch.device(device)
        self.generator = generator
        self.zero_mass_residuals = 0
        self.drafts, self.draft_probs = self._random_tokens(batch, window)

    def _random_tokens(self, b: int, n: int):
        tok = torch.randint(0, self.V, (b, n), device=self.device, generator=self.generator)
        probs = torch.zeros(b, n, self.V, device=self.device).scatter_(-1, tok.unsqueeze(-1), 1.0)
        return tok, probs

    def set_window(self, drafts: torch.Tensor, draft_probs: torch.Tensor) -> None:
        """Install a window (drafts and the laws they were drawn from), e.g. for a benchmark case."""
        self.drafts, self.draft_probs = drafts.clone(), draft_probs.float().clone()

    def residual(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Unnormalised residual law ``max(0, P - Q)`` of a rejected position (``P`` if it has no mass)."""
        resid = (p - q).clamp(min=0)
        if float(resid.sum()) <= 0.0:             # only rounding can get here: P != Q at a rejection
            self.zero_mass_residuals += 1
            return p
        return resid

    def step(self, logits: torch.Tensor, uncond: Optional[torch.Tensor] = None,
             cfg_scale: Optional[torch.Tensor] = None):
        B, W1, V = logits.shape
        W = W1 - 1
        assert B == self.B and W == self.W and V == self.V, "shape does not match the state"
        P = warp_probs(logits, uncond, cfg_scale, self.temperature, self.top_k)
        sampled = torch.multinomial(P.flatten(0, 1), 1, generator=self.generator).view(B, W1)
        rs = torch.rand(P.shape, device=P.device, generator=self.generator)
        D, Q = self.drafts, self.draft_probs
        num_accepted, committed = [], []
        next_drafts = torch.empty(B, W, dtype=torch.int64, device=P.device)
        next_probs = torch.empty(B, W, V, dtype=torch.float32, device=P.device)
        for b in range(B):
            m = W
            tok = sampled[b, W]                                   # bonus row sample if all are accepted
            for i in range(W):
                d = D[b, i]
                p = P[b, i, d]
                q = Q[b, i, d]
                if bool(rs[b, i, d] < (p / q).clamp(max=1)):      # host reads the decision, as the public loop
                    continue
                m = i
                resid = self.residual(P[b, i], Q[b, i])
                tok = torch.multinomial(resid / resid.sum(), 1, generator=self.generator)[0]
                break
            num_accepted.append(m)
            committed.append(torch.cat([D[b, :m], tok.view(1)]))
            keep = W - m                                          # rows m+1..W survive as drafts
            next_drafts[b, :keep] = sampled[b, m + 1:]
            next_probs[b, :keep] = P[b, m + 1:]
            if m > 0:
                t, pr = self._random_tokens(1, m)
                next_drafts[b, keep:] = t[0]
                next_probs[b, keep:] = pr[0]
        self.drafts, self.draft_probs = next_drafts, next_probs
        return torch.tensor(num_accepted), committed, next_drafts
