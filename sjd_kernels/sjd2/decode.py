"""SJD2 decoding: speculative Jacobi-denoising over a ragged batch (SPEC section 6).

One iteration, for every request with ``n`` committed image tokens and a window of W
drafts at positions ``n .. n+W-1``:

1. ``sjd2_prepare`` builds the inputs ``[X[n-1], D[0..W-1]]`` (plus, under the
   ``recompute`` KV policy, committed tokens to re-feed before ``X[n-1]``) and, in the same
   pass, moves each noisy position one DDIM step towards the token just sampled for it;
   positions entering the window start as pure noise at level K.
2. One forward gives the target rows ``P[0..W]`` (clean-token predictions at every position).
3. ``jacobi_step`` (mode ``sjd``) verifies the drafts with SPEC section 3's rule, commits
   ``m + 1`` tokens and samples the next drafts; the draft of a noisy position is the token
   sampled for it from its row, and that row is its stored law ``Q``. New tail positions
   get the op's uniform draft (its token is only used at ``K = 0``, where SJD2 is SJD).

With ``levels = 0`` every input is a token embedding and the iteration is SJD's, token for
token under the same seed. SJD2 is not lossless for ``levels > 0``: rows after a noisy input
are conditioned on it.

KV policy (``kv``): ``keep`` keeps the KV entries computed from noisy inputs of accepted
positions; ``recompute`` rewinds the cache to the first accepted noisy input and re-feeds the
committed tokens from there in the next forward (no extra forward, a longer one). The
default is chosen by measurement in docs/SJD2.md.

The model is reached through a ``forward`` callable (see ``SeqForward``):
``forward(inputs_embeds [B, N, d], positions [B, N], prompt_slot [B, N]) -> (logits, uncond)``
where ``positions`` are contiguous image positions per request (the KV entries of the slots
are written at those positions; the cache before the first slot is kept), ``prompt_slot``
marks slots that hold the prompt's last token (image position -1, embedded by the callable),
and the logits are image-only ``[B, N, V]`` (uncond: the CFG rows, or None).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from ..ops.jacobi_step import JacobiState, init_window, jacobi_step
from ..ops._common import (SJDInputError, check_int, check_sampling, check_status, check_tensor, host_checks,
                           resolve_backend, seed_tensor)
from ..ops.sjd2_prepare import sjd2_prepare, table_problem
from .noise import SJD2Embedding

KV_POLICIES = ("keep", "recompute")


@dataclass
class SJD2Result:
    tokens: torch.Tensor                 # [B, T] i64
    nfe: int                             # forwards after the prompt (a CFG pair counts once)
    steps: torch.Tensor                  # [B] i64, iterations each request took
    noisy_kv: torch.Tensor               # [B] i64, committed tokens whose kept KV came from a noisy input
    refed: torch.Tensor                  # [B] i64, committed tokens re-fed (recompute policy)
    input_slots: int                     # sum over forwards of the slots fed per request (max over the batch)
    status: dict = field(default_factory=dict)
    accepted_hist: list = field(default_factory=list)   # [W+1] request-steps that accepted k drafts (k+1 tokens)
    state_bytes: int = 0                 # the JacobiState

    @property
    def step_compression(self) -> torch.Tensor:
        return self.tokens.shape[1] / self.steps.clamp(min=1).to(torch.float64)


def sjd2_loop(forward, embed_weight: torch.Tensor, sjd2: SJD2Embedding | None, num_tokens: int, seed, *,
              window: int = 16, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              cfg_scale: float | torch.Tensor | None = None, kv: str = "recompute", backend: str = "auto",
              max_steps: int | None = None, progress: bool = False) -> SJD2Result:
    """Decode ``num_tokens`` image tokens per request with SJD2 (``sjd2=None`` or 0 levels: SJD).

    ``embed_weight [V, d]``: the image-token embedding rows (row = image token id); ``kv``: the KV policy
    (module docstring; default ``recompute``, as ``generate_sjd2``: the one docs/SJD2.md measured better);
    ``seed``: one int64 per request (the batch size); ``progress``: a tqdm bar of committed tokens
    (updated at the loop's one synchronisation per iteration). Returns ``SJD2Result``.
    """
    # every argument before any work, as generate_sjd2 (an SJDInputError naming it): floats used to be
    # truncated silently (window 2.5 ran W = 2, num_tokens 5.5 gave 5 tokens, seed 1.7 ran seed 1)
    if not isinstance(kv, str) or kv not in KV_POLICIES:
        raise SJDInputError(f"kv must be one of {', '.join(KV_POLICIES)}, got {kv!r}")
    W = check_int("window", window, 0)                  # 0 = AR through the same op
    T = check_int("num_tokens", num_tokens, 0)
    if max_steps is not None:
        max_steps = check_int("max_steps", max_steps, 1)
    if not isinstance(progress, bool):                  # "no" used to turn the bar on
        raise SJDInputError(f"progress must be True or False, got {progress!r}")
    if not callable(forward):
        raise SJDInputError(f"forward must be a callable (inputs_embeds, positions, prompt_slot) -> "
                            f"(logits, uncond), got {type(forward).__name__}")
    check_tensor("embed_weight", embed_weight, dim=2, last_contiguous=False)
    if not embed_weight.is_floating_point() or min(embed_weight.shape) < 1:
        raise SJDInputError(f"embed_weight must be a float [V >= 1, d >= 1] table of image-token embeddings, got "
                            f"{embed_weight.dtype} {list(embed_weight.shape)}")
    if sjd2 is not None and not isinstance(sjd2, SJD2Embedding):
        raise SJDInputError(f"sjd2 must be an SJD2Embedding or None (SJD), got {type(sjd2).__name__}")
    cap = getattr(forward, "capacity", None) if isinstance(forward, (KVForward, SeqForward)) else None
    if cap is not None and cap < T + 2 * W:
        # a decode feeds image positions up to num_tokens + 2 * window - 1 (at most W committed tokens re-fed
        # before X[n-1] and W drafts after it); KVForward's cache clamps writes past its end, so on a GPU,
        # where the forward cannot check each call without a synchronisation, it decoded other tokens
        raise SJDInputError(f"capacity: the forward holds {cap} image positions, a decode of {T} tokens with window "
                            f"{W} may feed {T + 2 * W} (build it with capacity >= num_tokens + 2 * window)")
    dev = embed_weight.device
    seed = seed_tensor(seed, dev)
    B, R = seed.numel(), W + 1
    if B < 1:
        raise SJDInputError("seed must give one seed per request (at least one), got none")
    V, d = embed_weight.shape
    i64 = torch.int64
    top_k, top_p = check_sampling(temperature, top_k, top_p, V)     # were checked by the op after a forward
    resolve_backend(backend, dev)
    if cfg_scale is not None:                   # a NaN scale was a device error, a wrong count a RuntimeError
        from ..decoding.loop import check_batch_cfg, check_cfg_scale
        cfg_scale = check_cfg_scale(cfg_scale)
        check_batch_cfg(B, cfg_scale)
    if sjd2 is not None:
        check_sjd2_params(sjd2, d)
        # the noise lives in float32 (what the op reads): an SJD2Embedding cast with .double() / .half()
        # used to fail naming the op's ``mean``
        f32 = dict(device=dev, dtype=torch.float32)
        mean, std = sjd2.norm.mean.to(**f32).contiguous(), sjd2.norm.std.to(**f32).contiguous()
        table = sjd2.level_embed.table().detach().to(**f32).contiguous()
        alpha, sigma = sjd2.schedule.coefficients(dev)
    else:
        mean, std = torch.zeros(d, device=dev), torch.ones(d, device=dev)
        table = torch.zeros(1, d, device=dev)
        alpha, sigma = torch.ones(1, device=dev), torch.zeros(1, device=dev)
    cfg = None
    if cfg_scale is not None:
        cfg = torch.as_tensor(cfg_scale, dtype=torch.float32, device=dev).expand(B).contiguous()

    state = JacobiState.create(B, W, V, seed, device=dev)
    latent = torch.zeros(B, R, d, dtype=torch.float32, device=dev)
    level = torch.zeros(B, R, dtype=torch.int32, device=dev)
    n = torch.zeros(B, dtype=i64, device=dev)
    drafts = init_window(state, n, W)
    buf = torch.full((B, T + 1), -1, dtype=i64, device=dev)   # column T: the spare target of discarded writes
    out = buf[:, :T]
    feed_from = n - 1                       # first image position to feed (-1: the prompt's last token)
    commit_end, fresh_start, row_end = n.clone(), n.clone(), n.clone()   # every window position enters now
    steps = torch.zeros(B, dtype=i64, device=dev)
    hist = torch.zeros(W + 1, dtype=i64, device=dev)
    noisy_kv = torch.zeros(B, dtype=i64, device=dev)
    refed = torch.zeros(B, dtype=i64, device=dev)
    nfe = slots_fed = 0
    jW = torch.arange(W, device=dev)
    bidx = torch.arange(B, device=dev).view(B, 1)
    limit = max_steps if max_steps is not None else T + 1

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=B * T, desc=f"sjd2 W={W}", unit="tok", leave=False)
    try:
        while True:
            # the one host synchronisation per iteration: is any request live, did the last step report an
            # error? A request in error returned -1 tokens and drafts: raise (SJDDeviceError) before they are
            # fed to the model or returned. Only the error bits are checked here (the counters accumulate
            # and are read once at the end).
            r = n - 1 - feed_from                                       # committed tokens re-fed before X[n-1]
            live_any, err, done, r_max = torch.stack([(n < T).any().to(i64), state.status[0].to(i64), n.sum(),
                                                      r.max()]).tolist()
            if err:
                check_status(state.status)
            if bar is not None:
                bar.n = done
                bar.refresh()
            if not live_any:
                break
            if nfe >= limit:
                raise RuntimeError(f"SJD2 did not finish in {limit} steps (n = {n.tolist()})")
            live = n < T
            # as the loop: bonus <= T-1
            win_len = torch.where(live, (T - n - 1).clamp(min=0, max=W), torch.zeros_like(n))
            N = r_max + 1 + W
            slot = torch.arange(N, device=dev).view(1, N)
            seq_pos = feed_from.view(B, 1) + slot                       # contiguous per request
            is_win = (seq_pos >= n.view(B, 1)) & (seq_pos < (n + W).view(B, 1))
            is_com = seq_pos < n.view(B, 1)
            wj = (seq_pos - n.view(B, 1)).clamp(0, W - 1)
            com_tok = torch.gather(out, 1, seq_pos.clamp(0, T - 1))
            win_tok = torch.gather(drafts, 1, wj) if W > 0 else torch.zeros_like(com_tok)
            tok = torch.where(is_win, win_tok, torch.where(is_com, com_tok, torch.zeros_like(com_tok)))
            prep_pos = torch.where((is_win | is_com) & (seq_pos >= 0), seq_pos, torch.full_like(seq_pos, -1))
            inputs = sjd2_prepare(embed_weight, mean, std, table, alpha, sigma, tok.contiguous(), prep_pos.contiguous(),
                                  state.seed, commit_end, fresh_start, row_end, latent, level, status=state.status,
                                  backend=backend)
            # which window inputs were noisy in this forward (read before the next prepare moves them)
            in_level = torch.where(is_win, level[bidx, seq_pos.clamp(min=0) % R].to(i64), torch.zeros_like(seq_pos))
            logits, uncond = _check_forward_output(forward(inputs, seq_pos, seq_pos < 0), B, N, V, cfg is not None)
            nfe += 1
            slots_fed += N
            rows = (r.view(B, 1) + slot[:, :W + 1]).clamp(max=N - 1)   # X[n-1], D[0..W-1] -> target rows 0..W
            lg = torch.gather(logits, 1, rows.unsqueeze(-1).expand(B, W + 1, logits.shape[-1]))
            ug = None if uncond is None else torch.gather(uncond, 1, rows.unsqueeze(-1).expand_as(lg))
            if lg.dtype == torch.float64:                               # float64 test models: the op takes f32 logits
                lg, ug = lg.float(), (None if ug is None else ug.float())
            res = jacobi_step(lg, drafts, win_len, n, state, uncond_logits=ug,
                              cfg_scale=cfg if ug is not None else None,
                              temperature=temperature, top_k=top_k, top_p=top_p, mode="sjd", backend=backend)
            m = res.num_accepted
            # commit
            cpos = n.view(B, 1) + torch.arange(W + 1, device=dev)
            ok = (res.tokens >= 0) & (cpos < T) & live.view(B, 1)
            buf.scatter_(1, torch.where(ok, cpos, torch.full_like(cpos, T)), res.tokens)
            # accepted drafts D[0..m-1] whose input was noisy
            acc_level = torch.gather(in_level, 1, (r.view(B, 1) + 1 + jW).clamp(max=N - 1))
            acc_noisy = (jW.view(1, W) < m.view(B, 1)) & (acc_level > 0) & live.view(B, 1)
            n_new = n + m + 1
            if kv == "keep" or W == 0:                                  # W = 0 (AR): nothing noisy to re-feed
                new_feed = n_new - 1
                noisy_kv += acc_noisy.sum(1)
            else:
                first = torch.where(acc_noisy, jW.view(1, W), torch.full_like(acc_noisy, W, dtype=i64)).amin(1)
                new_feed = torch.where(first < W, n + first, n_new - 1)
                refed += torch.where(live, n_new - 1 - new_feed, torch.zeros_like(n))
            steps += live.to(i64)
            hist.scatter_add_(0, m.clamp(0, W), live.to(i64))
            fresh_start = torch.where(live, n + win_len, fresh_start)
            row_end = torch.where(live, n + win_len + 1, row_end)
            feed_from = torch.where(live, new_feed, feed_from)
            drafts = torch.where(live.view(B, 1), res.next_drafts, drafts)
            n = torch.where(live, n_new, n)
            feed_from = torch.where(n < T, feed_from, n - 1)          # finished requests feed one padding slot
            commit_end = n.clone()
    finally:
        if bar is not None:
            bar.close()
    return SJD2Result(tokens=out.contiguous(), nfe=nfe, steps=steps, noisy_kv=noisy_kv, refed=refed,
                      input_slots=slots_fed, status=check_status(state.status), accepted_hist=hist.tolist(),
                      state_bytes=state.state_bytes())


def check_sjd2_params(sjd2: SJD2Embedding, d: int) -> None:
    """The SJD2 parameters a decode reads: the width ``d`` of the token embedding, finite values,
    ``std > 0`` and ``sigma > 0`` at levels 1..K (``ops.sjd2_prepare.table_problem``; NaN or a zero std
    used to surface as a device error about non-finite logits)."""
    mean, std, table = sjd2.norm.mean, sjd2.norm.std, sjd2.level_embed.table().detach()
    if tuple(mean.shape) != (d,) or tuple(std.shape) != (d,) or table.shape[-1] != d:
        raise SJDInputError(f"sjd2: the SJD2 embedding has width {list(mean.shape)}, the model's token embedding "
                            f"{d}: it belongs to another model")
    if table.shape[0] != sjd2.levels + 1 or sjd2.alpha.shape[0] != sjd2.levels + 1:
        raise SJDInputError(f"sjd2: the level embedding has {table.shape[0] - 1} levels, the schedule "
                            f"{sjd2.levels}")
    why = table_problem(mean, std, table, sjd2.alpha, sjd2.sigma,
                        names=("norm.mean", "norm.std", "level_embed", "alpha", "sigma"))
    if why:
        raise SJDInputError(f"sjd2: {why}" + (" (a diverged fine-tune?)" if "NaN" in why else ""))


def _check_forward_output(out, B: int, N: int, V: int, cfg: bool):
    """The ``forward`` callable's answer: ``(logits [B, N, V], uncond [B, N, V] or None)``, uncond given
    exactly when CFG is on (a cfg_scale without unconditional rows used to be ignored silently)."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise SJDInputError(f"forward must return (logits, uncond), got {type(out).__name__}")
    logits, uncond = out
    for name, t in (("logits", logits), ("uncond", uncond)):
        if t is None and name == "uncond":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, N, V) or not t.is_floating_point():
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise SJDInputError(f"forward must return {name} of shape [B, N, V] = {[B, N, V]} (one row per "
                                f"seed and input slot, V = rows of embed_weight), got {got}")
    if cfg and uncond is None:
        raise SJDInputError("cfg_scale is given but forward returned no unconditional rows (uncond is None): "
                            "build the forward with the null-condition prompt rows, or pass cfg_scale=None")
    if not cfg and uncond is not None:
        raise SJDInputError("forward returned unconditional rows (CFG) but no cfg_scale was given")
    return logits, uncond


def _check_batch(B: int, batch: int) -> None:
    if B != batch:
        raise SJDInputError(f"seed: the decode has {B} requests (one per seed), the forward was built for a batch "
                            f"of {batch} (one per prompt row)")


class SeqForward:
    """``forward`` callable for ``sjd2_loop`` over a model without a KV cache.

    It keeps the input embedding of every sequence position in a buffer and runs one full
    causal pass per call. Since the KV entries of a position depend only on the inputs up
    to it, this is exactly a KV cache's semantics (kept entries stay as they were computed,
    re-fed ones are overwritten), at the price of recomputing the prefix: meant for small
    models and tests; the decoding loop's KV cache serves large ones.

    ``model_fn(inputs_embeds [Br, L, d]) -> logits [Br, L, Vfull]``; ``prompt_embeds [Br, P, d]``
    (Br = B, or 2B with CFG: conditional rows first); image logits ``[image_start, image_start + V)``.
    """

    def __init__(self, model_fn, prompt_embeds: torch.Tensor, batch: int, capacity: int, image_start: int,
                 vocab: int):
        Br, P, d = prompt_embeds.shape
        if Br not in (batch, 2 * batch):
            raise SJDInputError(f"prompt_embeds must have B={batch} or 2B rows (CFG), got {Br}")
        self.capacity = check_int("capacity", capacity, 1)
        self.model_fn, self.B, self.P, self.cfg = model_fn, batch, P, Br == 2 * batch
        self.lo, self.V = image_start, vocab
        self.buf = prompt_embeds.new_zeros(Br, P + capacity, d)
        self.buf[:, :P] = prompt_embeds

    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor, prompt_slot: torch.Tensor):
        B, N, _ = inputs.shape
        _check_batch(B, self.B)
        x = inputs.to(self.buf.dtype)
        pos = positions
        if self.cfg:
            x, pos, prompt_slot = torch.cat([x, x]), torch.cat([pos, pos]), torch.cat([prompt_slot, prompt_slot])
        seq = self.P + pos                                    # image position -1 is the prompt's last token
        rows = torch.arange(x.shape[0], device=x.device).view(-1, 1).expand_as(seq)
        w = ~prompt_slot
        L = int(seq.max()) + 1
        if L > self.buf.shape[1]:             # was an IndexError from the buffer write
            raise SJDInputError(f"capacity: image position {L - 1 - self.P} is fed, but the forward holds "
                                f"{self.buf.shape[1] - self.P} image positions (build it with capacity >= "
                                f"num_tokens + 2 * window)")
        self.buf[rows[w], seq[w]] = x[w]
        logits = self.model_fn(self.buf[:, :L])[..., self.lo:self.lo + self.V]
        out = torch.gather(logits, 1, seq.unsqueeze(-1).expand(*seq.shape, self.V))
        if self.cfg:
            return out[:B], out[B:]
        return out, None


class KVForward:
    """``forward`` callable for ``sjd2_loop`` on the decoding loop's ``StaticKVCache``.

    Model position = image position + 1 (the condition sits at 0). Each call sets every row's
    cache length to the model position of its first slot (dropping what was fed after it),
    writes the slots' K/V and attends under the cache's causal mask: exactly the cache
    semantics both KV policies need. ``prompt_embeds [Br, 1, d]``: conditional rows, then the
    null condition's with CFG.
    """

    def __init__(self, model, prompt_embeds: torch.Tensor, batch: int, capacity: int):
        from ..decoding.cache import StaticKVCache
        Br = prompt_embeds.shape[0]
        if Br not in (batch, 2 * batch) or prompt_embeds.dim() != 3 or prompt_embeds.shape[1] != 1:
            raise SJDInputError(f"prompt_embeds must be [B={batch} or 2B (CFG), 1, d], got {list(prompt_embeds.shape)}")
        self.capacity = check_int("capacity", capacity, 1)
        self.model, self.B, self.cfg, self.prompt = model, batch, Br == 2 * batch, prompt_embeds
        p = next(model.parameters())
        self.cache = StaticKVCache(model.num_layers, Br, model.num_kv_heads, capacity + 1, model.head_dim,
                                   dtype=p.dtype, device=p.device)

    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor, prompt_slot: torch.Tensor):
        B, N, _ = inputs.shape
        _check_batch(B, self.B)
        x = inputs.to(self.prompt.dtype)
        if self.cfg:
            x, positions, prompt_slot = torch.cat([x, x]), torch.cat([positions, positions]), \
                torch.cat([prompt_slot, prompt_slot])
        x = torch.where(prompt_slot.unsqueeze(-1), self.prompt.expand(-1, N, -1), x)
        if host_checks(positions):
            # the cache clamps writes past its end into its last slot: a too small capacity decoded other
            # tokens silently (values checked on the host for CPU tensors only)
            need = int(positions[:, 0].max()) + 1 + N
            if need > self.cache.max_len:
                raise SJDInputError(f"capacity: this forward needs {need - 1} image positions, the cache holds "
                                    f"{self.cache.max_len - 1} (build it with capacity >= num_tokens + 2 * window)")
        self.cache.lengths.copy_(positions[:, 0] + 1)
        slots, mask = self.cache.window_mask(N)
        logits = self.model(x, slots, cache=self.cache, mask=mask, write_slots=slots)
        if self.cfg:
            return logits[:B], logits[B:]
        return logits, None


def generate_sjd2(model, cond, num_tokens: int, *, sjd2: SJD2Embedding | None | str = "model", window: int = 16,
                  seed=0, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  kv: str = "recompute", backend: str = "auto", forward=None, progress=None):
    """SJD2 decoding of a class-conditional GPT: ``cond [B]`` class ids, ``num_tokens`` image tokens.

    The entry the decoding loop calls for ``generate(..., method="sjd2")``; same seed and CFG
    conventions as ``generate`` (an int seed s gives request i the seed ``derive_seeds(s, B)[i]``;
    a list or tensor gives one seed per request; ``cfg_scale`` a float or one per request, ``!= 1``
    runs CFG against the null class). ``sjd2``: the SJD2 parameters; ``"model"`` (default) takes
    the model's own ``model.sjd2`` (set by ``checkpoint.load_finetuned``) and refuses a model without
    one (a plain GPT: load the fine-tune with ``sjd_kernels.sjd2.checkpoint.load_finetuned``), except
    at ``window=0`` (AR: no input is ever noisy, so the SJD2 parameters are unused and a plain GPT
    runs AR); an explicit ``None`` (or 0 levels) is SJD and ``window=0`` AR, through the same loop, op
    and randomness. ``window`` is cut to ``num_tokens - 1`` as in ``generate``. ``forward``: a
    callable as in ``sjd2_loop``; by default the loop's static KV cache (``KVForward``).
    ``progress``: a tqdm bar of committed tokens (default: on when stderr is a terminal), as in
    ``generate``. Every argument is checked before any work (``SJDInputError`` naming it); a device
    error of a step (e.g. non-finite rows after CFG and temperature scaling) raises ``SJDDeviceError``.
    Returns ``GenerateOutput(tokens, stats)``; ``stats.sjd2`` holds the ``SJD2Result``.
    """
    from ..decoding.loop import (GenerateOutput, GenerateStats, check_batch_cfg, check_cfg_scale, check_num_tokens,
                                 check_progress, request_seeds)
    from ..models.protocol import check_model
    from ..ops._common import check_sampling, resolve_backend
    from .checkpoint import gpt_forward_parts

    # ---- every argument, before any work
    check_model(model)
    config = getattr(model, "config", None)
    if not (hasattr(model, "embed_cond") and isinstance(getattr(config, "num_classes", None), int)
            and getattr(config, "cond_dim", None) is None):
        raise SJDInputError(f"SJD2 (method 'sjd2') needs the in-package class-conditional GPT "
                            f"(sjd_kernels.models.gpt.GPT with class ids; e.g. "
                            f"sjd_kernels.sjd2.checkpoint.load_finetuned('mnist')[0]), got {type(model).__name__}")
    if isinstance(sjd2, str) and sjd2 != "model":
        raise SJDInputError(f"sjd2 must be an SJD2Embedding, None (SJD) or 'model', got {sjd2!r}")
    if sjd2 is not None and not isinstance(sjd2, (str, SJD2Embedding)):
        raise SJDInputError(f"sjd2 must be an SJD2Embedding, None (SJD) or 'model', got {type(sjd2).__name__}")
    if not isinstance(kv, str) or kv not in KV_POLICIES:
        raise SJDInputError(f"sjd2_kv (kv) must be one of {', '.join(KV_POLICIES)}, got {kv!r}")
    dev = next(model.parameters()).device
    V = model.vocab_size
    N = check_num_tokens(model, num_tokens)
    W = min(check_int("window", window, 0), N - 1)
    if isinstance(sjd2, str):
        sjd2 = getattr(model, "sjd2", None)
        if sjd2 is None and W > 0:
            raise SJDInputError(f"sjd2: {type(model).__name__} carries no SJD2 parameters (model.sjd2): method "
                                f"'sjd2' needs a model fine-tuned for SJD2, e.g. "
                                f"sjd_kernels.sjd2.checkpoint.load_finetuned('mnist')[0], or pass "
                                f"sjd2=<SJD2Embedding> (to generate_sjd2: sjd2=None runs plain SJD)")
        if sjd2 is not None and not isinstance(sjd2, SJD2Embedding):
            raise SJDInputError(f"sjd2: model.sjd2 must be an SJD2Embedding (checkpoint.load_finetuned sets it), "
                                f"got {type(sjd2).__name__}")
    check_progress(progress)
    if forward is not None and not callable(forward):
        raise SJDInputError(f"forward must be None (the model's KV cache) or a callable (inputs_embeds, positions, "
                            f"prompt_slot) -> (logits, uncond), got {type(forward).__name__}")
    top_k, top_p = check_sampling(temperature, top_k, top_p, V)
    resolve_backend(backend, dev)
    scale = check_cfg_scale(cfg_scale)
    cond = model.check_cond(cond)
    B = cond.shape[0]
    check_batch_cfg(B, scale)
    use_cfg = bool((scale != 1.0).any())
    seeds = request_seeds(seed, B, dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        E, prompt, _, _ = gpt_forward_parts(model, cond, cfg=use_cfg)
        if forward is None:              # sjd2_loop checks the SJD2 parameters before any forward
            forward = KVForward(model, prompt, B, N + 2 * W + 2)
        res = sjd2_loop(forward, E, sjd2, N, seeds, window=W, temperature=temperature, top_k=top_k,
                        top_p=top_p, cfg_scale=scale.expand(B).to(dev) if use_cfg else None, kv=kv, backend=backend,
                        progress=sys.stderr.isatty() if progress is None else progress)
    stats = GenerateStats(method="sjd2", num_tokens=N, nfe=res.nfe, nfe_prefill=0,
                          wall_s=time.perf_counter() - t0,
                          zero_mass_residuals=res.status.get("zero_mass_residuals", 0),
                          window=W, batch=B, steps=res.steps.tolist(), accepted_hist=res.accepted_hist,
                          state_bytes=res.state_bytes,
                          cache_bytes=forward.cache.nbytes() if isinstance(forward, KVForward) else 0)
    stats.sjd2 = res
    return GenerateOutput(res.tokens, stats)
