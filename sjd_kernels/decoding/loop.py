"""The decoding loop: drives a model with the fused ``jacobi_step`` op.

One loop serves every chain method; they differ only in the op's draft mode and window:

| method          | window | op mode                     | lossless |
|-----------------|--------|-----------------------------|----------|
| ``ar``          | 0      | gumbel_jacobi (one token)   | it is the target |
| ``sjd``         | W      | sjd                         | yes |
| ``sjd_vp``      | W      | sjd with beta (VP)          | yes (Qvp is stored as the draft law) |
| ``coupling``    | W      | coupling (maximal coupling) | yes |
| ``gumbel``      | W      | gumbel (shared noise, probabilistic verification) | yes |
| ``gumbel_jacobi`` | W    | gumbel_jacobi (exact match) | yes, and token-identical to ``ar`` |

``ar`` samples each token with position-keyed Gumbel noise (the exponential race with the
GUMBEL stream), which is exact AR sampling and makes ``gumbel_jacobi`` reproduce AR's image
under the same seed. Positions given to the op are image-token positions (0 = first image
token). The model protocol (``sjd_kernels.models.gpt.GPT`` implements it): ``vocab_size``,
``num_layers``, ``num_kv_heads``, ``head_dim``, ``embed_tokens(ids)``, ``embed_cond(cond)``,
``null_condition(B)``, ``forward(embeds, positions, cache, mask, write_slots)``.

Per-request seeds: ``seed`` may be a list/tensor with one seed per request; an int ``s`` gives
request ``i`` the seed ``s * 1_000_003 + i``. A request's tokens depend only on its own seed, so
the same seed gives the same image alone or inside any batch.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from ..ops import JacobiState, SJDInputError, check_status, init_window, jacobi_step
from .cache import StaticKVCache

METHODS = {
    "ar": ("gumbel_jacobi", False),
    "sjd": ("sjd", True),
    "sjd_vp": ("sjd", True),
    "coupling": ("coupling", True),
    "gumbel": ("gumbel", True),
    "gumbel_jacobi": ("gumbel_jacobi", True),
}
EXTRA_METHODS = ("pac", "sjd2")


def available_methods() -> tuple[str, ...]:
    """Methods ``generate`` accepts here."""
    out = list(METHODS)
    try:
        from ..ops import tree  # noqa: F401
        out.append("pac")
    except Exception:
        pass
    try:
        from ..sjd2 import decode  # noqa: F401
        out.append("sjd2")
    except Exception:
        pass
    return tuple(out)


@dataclass
class GenerateStats:
    method: str
    num_tokens: int
    nfe: int = 0                   # window forwards (a CFG pair of rows is one forward)
    nfe_prefill: int = 0
    accepted_hist: list = field(default_factory=list)   # count of steps committing k tokens, k = 1..W+1
    wall_s: float = 0.0
    forward_s: float = 0.0
    post_s: float = 0.0            # everything after the LM head (the op, commit bookkeeping)
    zero_mass_residuals: int = 0

    @property
    def nfe_total(self) -> int:
        return self.nfe + self.nfe_prefill

    @property
    def tokens_per_step(self) -> float:
        return self.num_tokens / max(1, self.nfe)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(nfe_total=self.nfe_total, tokens_per_step=self.tokens_per_step)
        return d


@dataclass
class GenerateOutput:
    tokens: torch.Tensor           # [B, num_tokens] i64
    stats: GenerateStats


def request_seeds(seed, batch: int, device) -> torch.Tensor:
    if isinstance(seed, int):
        return torch.tensor([seed * 1_000_003 + i for i in range(batch)], dtype=torch.int64, device=device)
    s = torch.as_tensor(seed, dtype=torch.int64).reshape(-1).to(device)
    if s.numel() != batch:
        raise SJDInputError(f"seed must be an int or give one seed per request ({batch}), got {s.numel()}")
    return s


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, cond, num_tokens: int, method: str = "sjd", *, window: int = 16, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0, seed=0, beta: float = 0.5,
             vp_form: str = "add", draft_init: str = "uniform", backend: str = "auto", progress=None,
             forced: torch.Tensor | None = None, check: bool = True) -> GenerateOutput:
    """Generate ``num_tokens`` image tokens per request; returns tokens ``[B, num_tokens]`` and stats.

    ``cond``: the model's condition batch (class ids ``[B]`` for the in-package GPT).
    ``cfg_scale != 1`` runs a conditional and an unconditional row per request.
    ``window``: drafts per step (ignored by ``ar``). ``beta``/``vp_form``: verification prediction
    strength and form for ``sjd_vp``. ``draft_init``: 'uniform' or 'left' for new window positions.
    ``progress``: a tqdm bar (default: on when stderr is a terminal).
    """
    if method in EXTRA_METHODS:
        if method == "sjd2":
            from ..sjd2.decode import generate_sjd2
            return generate_sjd2(model, cond, num_tokens, window=window, temperature=temperature, top_k=top_k,
                                 top_p=top_p, cfg_scale=cfg_scale, seed=seed, backend=backend, progress=progress)
        raise NotImplementedError(f"method {method!r} needs the tree ops, which this build does not have")
    if method not in METHODS:
        raise SJDInputError(f"method must be one of {', '.join(available_methods())}, got {method!r}")
    mode, uses_window = METHODS[method]
    W = int(window) if uses_window else 0
    if W < 0:
        raise SJDInputError(f"window must be >= 0, got {window}")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise SJDInputError(f"num_tokens must be a positive int, got {num_tokens!r}")
    V = model.vocab_size
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cond = torch.as_tensor(cond).to(dev)
    B = cond.shape[0]
    if B < 1:
        raise SJDInputError("cond must hold at least one request")
    use_cfg = cfg_scale != 1.0
    seeds = request_seeds(seed, B, dev)
    beta_eff = float(beta) if method == "sjd_vp" else 0.0

    # model rows: B conditional (+ B unconditional); the condition is at model position 0
    cond_emb = model.embed_cond(cond)                                        # [B, 1, d]
    if use_cfg:
        cond_emb = torch.cat([cond_emb, model.embed_cond(model.null_condition(B, dev))], 0)
    rows = cond_emb.shape[0]
    S = num_tokens + W + 1
    cache = StaticKVCache(model.num_layers, rows, model.num_kv_heads, S, model.head_dim, dtype=dtype, device=dev)
    state = JacobiState.create(B, max(W, 1), V, seeds, device=dev, vp=(method == "sjd_vp"))
    cfg_t = torch.full((B,), float(cfg_scale), dtype=torch.float32, device=dev) if use_cfg else None
    n = torch.zeros(B, dtype=torch.int64, device=dev)                      # committed tokens per request
    out = torch.full((B, num_tokens + W + 1), -1, dtype=torch.int64, device=dev)
    drafts = init_window(state, n, W, forced) if W > 0 else torch.zeros(B, 0, dtype=torch.int64, device=dev)
    last_tok = torch.zeros(B, dtype=torch.int64, device=dev)
    stats = GenerateStats(method=method, num_tokens=num_tokens, accepted_hist=[0] * (W + 1))
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_tokens * B, desc=f"{method} W={W}", unit="tok", leave=False)
    t_start = time.perf_counter()
    cols = torch.arange(W + 1, device=dev)
    while True:
        done = n >= num_tokens
        if bool(done.all()):
            break
        t0 = time.perf_counter()
        win_len = torch.clamp(torch.minimum(torch.full_like(n, W), num_tokens - n - 1), min=0)
        # inputs [X[n-1], D0..D_{W-1}]; at n = 0 the condition plays X[-1]
        tok_in = torch.cat([last_tok.view(B, 1), drafts], 1)
        emb = model.embed_tokens(tok_in.clamp(0, V - 1))
        first = (n == 0).view(B, 1, 1)
        emb = torch.where(first & (cols.view(1, -1, 1) == 0), cond_emb[:B].expand(-1, W + 1, -1), emb)
        if use_cfg:
            emb_u = torch.where(first & (cols.view(1, -1, 1) == 0), cond_emb[B:].expand(-1, W + 1, -1),
                                model.embed_tokens(tok_in.clamp(0, V - 1)))
            emb = torch.cat([emb, emb_u], 0)
        nr = torch.cat([n, n]) if use_cfg else n
        cache.lengths.copy_(nr)
        slots, mask = cache.window_mask(W + 1)
        logits = model(emb, slots, cache=cache, mask=mask, write_slots=slots)
        _sync(dev)
        t1 = time.perf_counter()
        if logits.dtype == torch.float64:          # tiny float64 test models: the op reads fp32/bf16/fp16
            logits = logits.float()
        lc = logits[:B]
        lu = logits[B:] if use_cfg else None
        o = jacobi_step(lc, drafts, win_len, n, state, uncond_logits=lu, cfg_scale=cfg_t, forced=forced,
                        temperature=temperature, top_k=top_k, top_p=top_p, mode=mode, beta=beta_eff,
                        vp_form=vp_form, tail_init=draft_init, backend=backend)
        m = torch.where(done, torch.zeros_like(o.num_accepted), o.num_accepted)
        # commit: tokens[b, :m+1] -> out[b, n : n+m+1]; finished requests write nothing
        keep = (cols.view(1, -1) <= m.view(B, 1)) & ~done.view(B, 1)
        dst = (n.view(B, 1) + cols).clamp(max=out.shape[1] - 1)
        out.scatter_(1, torch.where(keep, dst, torch.full_like(dst, out.shape[1] - 1)),
                     torch.where(keep, o.tokens, out.gather(1, torch.full_like(dst, out.shape[1] - 1))))
        new_last = torch.gather(o.tokens, 1, m.clamp(min=0).view(B, 1)).squeeze(1)
        last_tok = torch.where(done, last_tok, new_last)
        n = torch.where(done, n, n + m + 1)
        drafts = o.next_drafts
        _sync(dev)
        t2 = time.perf_counter()
        stats.nfe += 1
        stats.forward_s += t1 - t0
        stats.post_s += t2 - t1
        hist = torch.bincount(m[~done], minlength=W + 1)
        stats.accepted_hist = [a + int(b) for a, b in zip(stats.accepted_hist, hist.tolist())]
        if check:
            counters = check_status(state.status)
            stats.zero_mass_residuals += counters["zero_mass_residuals"]
        if bar is not None:
            bar.n = int(torch.clamp(n, max=num_tokens).sum())
            bar.refresh()
    if bar is not None:
        bar.close()
    stats.wall_s = time.perf_counter() - t_start
    return GenerateOutput(out[:, :num_tokens].contiguous(), stats)
