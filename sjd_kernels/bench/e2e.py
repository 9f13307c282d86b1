"""``bench e2e``: decoding on a model, per method: NFE, step compression, tokens/s, latency,
the split of step time between the model forward and post-LM-head work, and for lossless
methods a two-sample test of their tokens against AR's. Window sweeps, and a beta sweep for
``sjd_vp`` (acceptance against beta).

Models (``--model``):

- ``mnist`` (default; alias ``bundled``) and ``photo``: the trained models shipped in the package
  (``sjd_kernels.models.bundled``); ``sjd2`` runs on the bundled SJD2 fine-tune when there is one.
  A bundled model whose weights are missing is skipped with a message (exit 0).
- ``llamagen-xl`` / ``chameleon-7b``: random-weight models of those shapes, built directly on the
  GPU in bf16 with the in-package GPT, for latency only: random weights make every row nearly
  the same law, so acceptance, NFE and whole-image speed-ups there are artefacts and are not
  reported; the cost of one window step relative to one AR step (``step_cost_vs_ar``) and its
  split are what they measure. Without a CUDA device they are refused (exit 2): a 7B model is
  never built on the host.
- ``tiny``: a random 2-layer GPT (smoke tests; CPU allowed; step costs only).

The loop is ``sjd_kernels.decoding.generate``. Its own clocks (CUDA events on a GPU, host
``perf_counter`` on the CPU) split every window step into the model forward (inputs up to the
LM head: ``GenerateStats.forward_s``) and post-LM-head work (the op and the commit:
``GenerateStats.post_s``); the split columns are those sums divided by the step count, never an
estimate. ``reference_sjd`` runs the public SJD loop's post-head step (``reference_sjd.py``) on
the same model and static KV cache, timed the same way, so the comparison isolates the step
logic. The SJD2 loop reports no split: its split columns stay empty.

Without a CUDA device the bundled models still run (counts, laws, and CPU wall-clock times);
every CPU time is labelled ``clock=cpu`` and the summary says it is not GPU speed.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Optional

import numpy as np
import torch

from ..demo import BACKEND_NAMES
from ..ops._common import as_int, resolve_backend
from .timing import has_gpu, machine_info

# LlamaGen-XL: 36 layers, d 1280, 20 heads, 16384 codes, 256 tokens (256 px).
# Chameleon/Lumina-mGPT 7B: 32 layers, d 4096, 32 heads; image slice of 8192 codes, 1024 tokens (512 px).
MODELS = {
    "mnist": {"bundled": "mnist", "cfg_scale": 3.0, "top_k": 0},
    "photo": {"bundled": "photo", "cfg_scale": 3.0, "top_k": 0},
    "llamagen-xl": {"n_layer": 36, "d_model": 1280, "n_head": 20, "vocab": 16384, "num_tokens": 256,
                    "cfg_scale": 4.0, "top_k": 1000, "num_classes": 1000, "gpu_only": True},
    "chameleon-7b": {"n_layer": 32, "d_model": 4096, "n_head": 32, "vocab": 8192, "num_tokens": 1024,
                     "cfg_scale": 3.0, "top_k": 2000, "num_classes": 1000, "gpu_only": True},
    "tiny": {"n_layer": 2, "d_model": 64, "n_head": 4, "vocab": 64, "num_tokens": 32, "cfg_scale": 3.0, "top_k": 0,
             "num_classes": 10},
}
ALIASES = {"bundled": "mnist"}
METHODS = ("ar", "ar_gumbel", "sjd", "sjd_vp", "coupling", "gumbel", "gumbel_jacobi", "pac", "sjd2", "reference_sjd")
WINDOW_SWEEP = ("sjd", "coupling", "gumbel", "pac", "sjd2", "reference_sjd")
RANDOM_MODEL_METHODS = ("ar", "sjd", "sjd_vp", "coupling", "gumbel", "reference_sjd")
SPARSE_STATE_METHODS = ("sjd", "sjd_vp", "coupling", "gumbel", "gumbel_jacobi")   # what --state-capacity applies to

COLUMNS = ["model", "method", "sweep", "window", "beta", "vp_form", "batch", "num_tokens", "samples", "nfe", "nfe_sd",
           "nfe_prefill", "step_compression", "tokens_per_step", "tokens_per_step_sd", "tokens_per_step_ci",
           "latency_ms", "latency_p20_ms", "latency_p80_ms", "tokens_per_s", "speedup_latency", "step_ms",
           "step_cost_vs_ar", "forward_ms_per_step", "post_head_ms_per_step", "post_head_frac", "clock", "law_test",
           "law_p", "law_detail", "law_n", "tokens_per_step_law", "tokens_per_step_law_sd", "state_bytes",
           "state_overflows", "note",
           "backend", "device",
           "gpu", "torch", "triton", "cuda", "python", "commit"]

# settings when not given on the command line: (device kind, trained) -> defaults
DEFAULTS = {
    ("cuda", True): dict(batch=1, samples=5, windows=[8, 16, 32, 64], betas=[0.0, 0.25, 0.5, 1.0, 2.0], law=256),
    ("cpu", True): dict(batch=8, samples=2, windows=[8, 16, 32], betas=[0.0, 0.5, 1.0], law=64),
    ("cuda", False): dict(batch=1, samples=2, windows=[16, 32, 64], betas=[0.0, 0.5], law=0),
    ("cpu", False): dict(batch=2, samples=1, windows=[8, 16], betas=[0.0, 0.5], law=0),
}
QUICK = dict(samples=1, windows=[16], betas=[0.0, 0.5], law=32)
CPU_NOTE = ("CPU run: latency, tokens/s, speed-ups and the forward/post-head split are host wall-clock times on "
            "this CPU (clock=cpu); they are NOT GPU speed and must not be quoted as such. NFE, step compression, "
            "acceptance and the law tests do not depend on the device.")


# --------------------------------------------------------------------------- models
class ModelUnavailable(RuntimeError):
    """The model cannot run here: ``kind`` is ``skip`` (no weights) or ``refuse`` (needs a GPU)."""

    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind


class Models:
    """The model of a run, its settings, and (lazily) the SJD2 fine-tune of a bundled model."""

    def __init__(self, name: str, device, dtype=torch.bfloat16):
        self.name, self.device = name, torch.device(device)
        spec = MODELS[name]
        self.spec = spec
        self.cfg_scale, self.top_k = spec["cfg_scale"], spec["top_k"]
        self.state_capacity = None          # sparse Jacobi state for SPARSE_STATE_METHODS (None: dense)
        self._sjd2 = None
        if "bundled" in spec:
            from ..models import bundled
            try:
                b = bundled.load(spec["bundled"], device=self.device, dtype=torch.float32)
            except bundled.BundledModelError as e:
                raise ModelUnavailable("skip", f"bundled model {spec['bundled']!r} is not available here: {e}")
            self.gpt, self.trained = b.gpt.eval(), True
            self.num_tokens, self.num_classes = b.tokens_per_image, b.num_classes
        else:
            if spec.get("gpu_only") and self.device.type != "cuda":
                raise ModelUnavailable("refuse", f"model {name!r} is a random-weight model of that shape, built on "
                                                 f"the GPU for latency only; no CUDA device is visible here, so it "
                                                 f"is not built (it would not fit a CPU run)")
            from ..models.gpt import GPT, GPTConfig
            cfg = GPTConfig(vocab_size=spec["vocab"], n_layer=spec["n_layer"], n_head=spec["n_head"],
                            d_model=spec["d_model"], max_image_tokens=spec["num_tokens"],
                            num_classes=spec["num_classes"])
            torch.manual_seed(0)
            old = torch.get_default_dtype()
            dt = dtype if self.device.type == "cuda" else torch.float32
            torch.set_default_dtype(dt)      # build in the target dtype: a 7B model never exists in fp32
            try:
                with self.device:
                    self.gpt = GPT(cfg).eval()
            finally:
                torch.set_default_dtype(old)
            self.trained = False
            self.num_tokens, self.num_classes = spec["num_tokens"], spec["num_classes"]

    def has_sjd2(self) -> bool:
        if "bundled" not in self.spec:
            return False
        from ..models.bundled import WEIGHTS_DIR
        return (WEIGHTS_DIR / f"{self.spec['bundled']}_sjd2.json").exists()

    def sjd2(self):
        """``(gpt, sjd2)`` of the bundled model's SJD2 fine-tune (raises when there is none)."""
        if self._sjd2 is None:
            if "bundled" not in self.spec:
                raise RuntimeError("sjd2 needs a fine-tuned model: only the bundled models have one")
            from ..sjd2.checkpoint import load_finetuned
            gpt, emb = load_finetuned(self.spec["bundled"], device=self.device, dtype=torch.float32)
            self._sjd2 = (gpt.eval(), emb)
        return self._sjd2

    def cond(self, batch: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randint(0, self.num_classes, (batch,), generator=g).to(self.device)


def decoding_methods() -> tuple:
    """What this build can run: ``generate``'s methods, then ``reference_sjd``."""
    from ..decoding import available_methods
    return tuple(available_methods()) + ("reference_sjd",)


def lossless_methods() -> set:
    from ..decoding.methods import METHODS as TABLE
    return {m for m, spec in TABLE.items() if getattr(spec, "lossless", False)} | {"reference_sjd"}


def _sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def generate_any(models: Models, method: str, cond, num_tokens: int, *, seeds, window, beta=None, vp_form="add",
                 backend="auto") -> dict:
    """One generation: ``{"tokens", "nfe", "nfe_prefill", "steps", "forward_s", "post_s", "split"}``.

    ``forward_s``/``post_s`` are the loop's own measurements (``GenerateStats``); ``split`` is False
    when the loop does not report them (SJD2).
    """
    kw = dict(cfg_scale=models.cfg_scale, top_k=models.top_k, seed=seeds)
    if method == "reference_sjd":
        r = generate_reference_sjd(models.gpt, cond, num_tokens, window=window, **kw)
        r["split"] = True
        return r
    from ..decoding import generate
    if method == "sjd2":
        gpt, emb = models.sjd2()
        out = generate(gpt, cond, num_tokens, "sjd2", window=window, sjd2=emb, backend=backend, progress=False, **kw)
        st = out.stats
        res = getattr(st, "sjd2", None)
        steps = res.steps.tolist() if res is not None else [st.nfe] * out.tokens.shape[0]
        return {"tokens": out.tokens, "nfe": st.nfe, "nfe_prefill": st.nfe_prefill, "steps": steps,
                "forward_s": 0.0, "post_s": 0.0, "split": False}
    extra = {}
    if method in ("sjd_vp", "coupling") and beta is not None:
        extra = {"beta": beta, "vp_form": vp_form}
    if models.state_capacity and method in SPARSE_STATE_METHODS and window:
        extra["state_capacity"] = models.state_capacity
    out = generate(models.gpt, cond, num_tokens, method, window=window or 0, backend=backend, progress=False,
                   **extra, **kw)
    st = out.stats
    return {"tokens": out.tokens, "nfe": st.nfe, "nfe_prefill": st.nfe_prefill,
            "steps": list(st.steps) or [st.nfe] * out.tokens.shape[0], "forward_s": st.forward_s,
            "post_s": st.post_s, "split": True, "state_bytes": st.state_bytes,
            "state_overflows": st.state_overflows}


@torch.no_grad()
def generate_reference_sjd(model, cond, num_tokens: int, *, window: int = 16, cfg_scale: float = 1.0,
                           top_k: int = 0, temperature: float = 1.0, seed=0) -> dict:
    """The public SJD loop's post-head step (``ReferenceSJD``) driving the in-package model and static cache.

    Same model calls as ``generate`` (prefix, one forward over ``[X[n-1], D]`` per step, commit
    by rewinding the cache lengths); the step is the public loop's: full-vocabulary uniforms,
    ``torch.multinomial`` and a host-side loop over window positions. Its randomness is torch's,
    so its tokens are compared with AR's by law, not token for token. Forward and post-head
    time are measured per step like the library loop (CUDA events on a GPU, host clock on CPU).
    ``window`` is cut to ``num_tokens - 1`` as ``generate`` cuts it (a longer window has nothing to
    draft).
    """
    from ..decoding.cache import StaticKVCache
    from .reference_sjd import ReferenceSJD
    p = next(iter(model.parameters()))
    dev, dtype = p.device, p.dtype
    N, W, V = int(num_tokens), int(window), model.vocab_size
    if W < 1:
        raise ValueError(f"reference_sjd needs a window >= 1 (the public loop has no window-0 form), got {W}")
    W = min(W, N - 1) if N > 1 else 1
    use_cfg = cfg_scale != 1.0
    pre = model.prefix(cond, use_cfg)
    rows = pre.embeds.shape[0]
    B = rows // 2 if use_cfg else rows
    lengths = pre.lengths.to(dev, torch.int64)
    L = int(lengths.max())
    cache = StaticKVCache(model.num_layers, rows, model.num_kv_heads, L + N + W + 1, model.head_dim, dtype=dtype,
                          device=dev)
    emb0 = pre.embeds.to(dtype)
    nfe_prefill = 0
    if L > 1:
        slots, mask = cache.window(L - 1)
        model(emb0[:, :L - 1], slots, cache=cache, mask=mask, write_slots=slots)
        nfe_prefill = 1
    cache.set_lengths(lengths - 1)
    first = emb0[torch.arange(rows, device=dev), lengths - 1].unsqueeze(1)
    s0 = int(seed[0]) if isinstance(seed, (list, tuple)) else int(seed)
    gen = torch.Generator(device=dev).manual_seed(s0)
    ref = ReferenceSJD(B, W, V, temperature=temperature, top_k=top_k, device=dev, generator=gen)
    cfg_t = torch.full((B,), float(cfg_scale), device=dev) if use_cfg else None
    n = [0] * B
    steps = [0] * B
    out = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    last = torch.zeros(B, dtype=torch.int64, device=dev)
    cuda = dev.type == "cuda"

    def now():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    marks = []
    nfe = 0
    while min(n) < N:
        t0 = now()
        e = model.embed_tokens(torch.cat([last.view(B, 1), ref.drafts], 1))
        if use_cfg:
            e = torch.cat([e, e], 0)
        fresh = torch.tensor([x == 0 for x in n] * (2 if use_cfg else 1), device=dev).view(rows, 1, 1)
        e = torch.cat([torch.where(fresh, first, e[:, :1]), e[:, 1:]], 1)
        slots, mask = cache.window(W + 1)
        logits = model(e, slots, cache=cache, mask=mask, write_slots=slots)
        t1 = now()
        m, committed, _ = ref.step(logits[:B], logits[B:] if use_cfg else None, cfg_t)
        for b in range(B):
            if n[b] >= N:
                continue
            c = committed[b][:N - n[b]]
            out[b, n[b]:n[b] + c.numel()] = c
            n[b] += c.numel()
            last[b] = c[-1]
            steps[b] += 1
        nn_ = torch.tensor(n, device=dev)
        cache.set_lengths(lengths - 1 + (torch.cat([nn_, nn_]) if use_cfg else nn_))
        marks.append((t0, t1, now()))
        nfe += 1
    _sync(dev)
    el = (lambda a, b: a.elapsed_time(b) * 1e-3) if cuda else (lambda a, b: b - a)
    return {"tokens": out, "nfe": nfe, "nfe_prefill": nfe_prefill, "steps": steps,
            "forward_s": sum(el(a, b) for a, b, _ in marks), "post_s": sum(el(b, c) for _, b, c in marks)}


# --------------------------------------------------------------------------- statistics
def two_sample_test(a: np.ndarray, b: np.ndarray, positions=None, alpha: float = 1e-3) -> dict:
    """Are token sequences ``a [Na, T]`` and ``b [Nb, T]`` drawn from one law?

    Chi-square homogeneity on the token at a few positions (rare tokens pooled so every expected
    count is >= 5) and Mann-Whitney on two per-image statistics (tokens equal to the left
    neighbour; mean token id). Bonferroni over all tests; ``pass`` when the smallest adjusted
    p-value is above ``alpha``. It finds gross bias (a method drawing from the wrong law), not
    every small one: the op-level law tests are the exact ones.
    """
    from scipy import stats
    T = a.shape[1]
    positions = positions or sorted({0, 1, T // 2, T - 1})
    pvals, names = [], []
    for t in positions:
        xa, xb = a[:, t], b[:, t]
        cats, counts = np.unique(np.concatenate([xa, xb]), return_counts=True)
        order = np.argsort(-counts)
        keep, pooled = [], []
        n = len(xa) + len(xb)
        for i in order:
            (keep if counts[i] * min(len(xa), len(xb)) / n >= 5 else pooled).append(cats[i])
        rows = []
        for grp in [[c] for c in keep] + ([pooled] if pooled else []):
            rows.append([np.isin(xa, grp).sum(), np.isin(xb, grp).sum()])
        tab = np.array(rows).T
        tab = tab[:, tab.sum(0) > 0]
        if tab.shape[1] < 2:
            continue
        p = stats.chi2_contingency(tab)[1]
        pvals.append(p)
        names.append(f"pos{t}")
    for nm, f in (("left_repeat", lambda x: (x[:, 1:] == x[:, :-1]).mean(1)), ("mean_id", lambda x: x.mean(1))):
        fa, fb = f(a), f(b)
        if np.ptp(np.concatenate([fa, fb])) == 0:
            continue
        pvals.append(stats.mannwhitneyu(fa, fb).pvalue)
        names.append(nm)
    if not pvals:
        return {"law_test": "n/a", "law_p": "", "law_detail": "no usable statistic"}
    adj = min(1.0, min(pvals) * len(pvals))
    worst = names[int(np.argmin(pvals))]
    return {"law_test": "pass" if adj > alpha else "FAIL", "law_p": round(adj, 6),
            "law_detail": f"{len(pvals)} tests, Bonferroni; smallest at {worst}; {len(a)} vs {len(b)} images"}


def _r(x, nd=3):
    return round(float(x), nd)


# --------------------------------------------------------------------------- one configuration
def run_config(models: Models, *, method: str, num_tokens: int, batch: int, samples: int, seed: int,
               window: Optional[int] = None, beta: Optional[float] = None, vp_form: str = "add",
               backend: str = "auto") -> dict:
    """Warm-up once, then ``samples`` timed generations of ``batch`` requests (distinct seeds)."""
    dev = models.device
    kw = dict(window=window, beta=beta, vp_form=vp_form, backend=backend)

    def seeds_of(sd):
        return [sd * 100003 + i for i in range(batch)]

    # warm-up: the whole configuration on a GPU (allocator, kernel compilation for these shapes); on the CPU a
    # short generation is enough to load every code path, and the full one would double a CPU run's time
    warm = num_tokens if dev.type == "cuda" else min(num_tokens, 2 * (window or 1) + 2)
    generate_any(models, method, models.cond(batch, seed), warm, seeds=seeds_of(seed), **kw)
    lat, nfe, pre, fwd, post, per_req = [], [], [], [], [], []
    state_bytes = ""
    overflows = None                # sparse-state overflows over the timed generations (None: not reported)
    split = True
    for s in range(samples):
        sd = seed + 1 + s
        cond = models.cond(batch, sd)
        _sync(dev)
        t0 = time.perf_counter()
        r = generate_any(models, method, cond, num_tokens, seeds=seeds_of(sd), **kw)
        _sync(dev)
        lat.append((time.perf_counter() - t0) * 1e3)
        nfe.append(r["nfe"])
        pre.append(r["nfe_prefill"])
        split = split and r["split"]
        if r["nfe"] > 0:
            fwd.append(r["forward_s"] * 1e3 / r["nfe"])
            post.append(r["post_s"] * 1e3 / r["nfe"])
        per_req += [num_tokens / max(1, st) for st in r["steps"]]
        state_bytes = r.get("state_bytes", "")
        if "state_overflows" in r:
            overflows = (overflows or 0) + int(r["state_overflows"])
    lat = np.array(lat)
    nfe_m = float(np.mean(nfe))
    out = {"method": method, "window": window if window is not None else "", "beta": beta if beta is not None else "",
           "vp_form": vp_form if beta is not None else "", "batch": batch, "num_tokens": num_tokens,
           "samples": samples, "nfe": _r(nfe_m, 2), "nfe_sd": _r(np.std(nfe, ddof=1), 2) if len(nfe) > 1 else "",
           "nfe_prefill": _r(np.mean(pre), 2), "step_compression": _r(num_tokens / max(nfe_m, 1e-9)),
           "clock": "cuda" if dev.type == "cuda" else "cpu", "state_bytes": state_bytes,
           "state_overflows": overflows if overflows is not None else ""}
    per = np.array(per_req)
    out["tokens_per_step"] = _r(per.mean())
    if len(per) > 1:
        out["tokens_per_step_sd"] = _r(per.std(ddof=1))
        out["tokens_per_step_ci"] = _r(1.96 * per.std(ddof=1) / math.sqrt(len(per)))
    med = float(np.median(lat))
    out.update(latency_ms=_r(med), latency_p20_ms=_r(np.percentile(lat, 20)),
               latency_p80_ms=_r(np.percentile(lat, 80)), tokens_per_s=_r(batch * num_tokens / (med * 1e-3), 1))
    if split and fwd:
        f, p = float(np.median(fwd)), float(np.median(post))
        out["forward_ms_per_step"] = _r(f, 4)
        out["post_head_ms_per_step"] = _r(p, 4)
        out["step_ms"] = _r(f + p, 4)
        out["post_head_frac"] = _r(p / (f + p), 4) if f + p > 0 else ""
    return out


# --------------------------------------------------------------------------- the sweep
class SettingsError(ValueError):
    """A setting ``run_e2e`` cannot use; the message starts with the setting's name."""


def _max_tokens(model: str) -> Optional[int]:
    """Image tokens the model can generate (None when a bundled model's files are missing: the run skips it)."""
    spec = MODELS[model]
    if "bundled" not in spec:
        return int(spec["num_tokens"])
    from ..models import bundled
    try:
        return int(bundled.manifest(spec["bundled"])["gpt"]["max_image_tokens"])
    except (bundled.BundledModelError, KeyError):
        return None


def check_settings(model: str = "mnist", methods=None, windows=None, betas=None, num_tokens=None, batch=None,
                   samples=None, law_samples=None, threads=None, state_capacity=None, backend: str = "auto",
                   budget_s: float = 1e9, name=None) -> None:
    """Raise ``SettingsError`` for the first setting ``run_e2e`` cannot use, before any model is built.

    ``name(key)`` names the setting in the message (the CLI passes its flags; default: the keyword).
    Method names must be ``METHODS`` or this build's (``decoding_methods()``; one of ``METHODS`` that
    this build lacks is skipped with a note by the run); windows are ints >= 0; betas finite;
    ``num_tokens`` in [1, the model's image tokens]; the backend one that runs on this machine's
    device (``sjd_kernels.backends()``).
    """
    name = name or (lambda k: k)

    def bad(key, msg):
        raise SettingsError(f"{name(key)}: {msg}")

    def is_int(v):
        return as_int(v) is not None and not isinstance(v, torch.Tensor)

    model = ALIASES.get(model, model)
    if model not in MODELS:
        bad("model", f"unknown model {model!r}; choose from {', '.join(list(MODELS) + list(ALIASES))}")
    if methods is not None:
        known = tuple(dict.fromkeys(METHODS + decoding_methods()))
        unknown = [m for m in methods if m not in known]
        if unknown:
            bad("methods", f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    if num_tokens is not None:
        if not is_int(num_tokens) or num_tokens < 1:
            bad("num_tokens", f"must be an int >= 1 (image tokens per request), got {num_tokens!r}")
        limit = _max_tokens(model)
        if limit is not None and num_tokens > limit:
            bad("num_tokens", f"{num_tokens} exceeds the {model} model's {limit} image tokens")
    for key, v, lo in (("batch", batch, 1), ("samples", samples, 1), ("law_samples", law_samples, 0),
                       ("threads", threads, 1), ("state_capacity", state_capacity, 1)):
        if v is not None and (not is_int(v) or v < lo):
            bad(key, f"must be an int >= {lo}, got {v!r}")
    if windows is not None:
        if len(windows) == 0:
            bad("windows", "give at least one window")
        wrong = [w for w in windows if not is_int(w) or w < 0]
        if wrong:
            bad("windows", f"windows are ints >= 0 (drafts per step), got {' '.join(map(str, wrong))}")
        _check_method_windows(model, methods, windows, bad)
    if betas is not None:
        wrong = [b for b in betas if not isinstance(b, (int, float)) or not math.isfinite(b)]
        if wrong:
            bad("betas", f"betas must be finite numbers, got {' '.join(map(str, wrong))}")
    if not isinstance(budget_s, (int, float)) or not budget_s > 0:
        bad("budget_s", f"must be a number of seconds > 0, got {budget_s!r}")
    if backend not in BACKEND_NAMES:
        bad("backend", f"unknown backend {backend!r}; choose from {', '.join(BACKEND_NAMES)}")
    device = torch.device("cuda" if has_gpu() else "cpu")
    try:
        resolve_backend(backend, device)
    except (ValueError, RuntimeError) as e:
        bad("backend", f"{backend!r} cannot run on {device.type} here: {e}")


def _check_method_windows(model: str, methods, windows, bad) -> None:
    """Windows the run would give a method that cannot take them (every window reaches every method of
    ``WINDOW_SWEEP``): ``reference_sjd`` below 1 (its loop has no window-0 form), ``pac`` below its tree
    depth. ``methods`` None: the run's default methods for ``model``."""
    avail = decoding_methods()
    if methods is None:
        methods = [m for m in avail if "bundled" in MODELS[model] or m in RANDOM_MODEL_METHODS]
    methods = [m for m in methods if m in avail]
    if "reference_sjd" in methods and any(w < 1 for w in windows):
        bad("windows", "window 0 cannot run reference_sjd (the public SJD loop needs a window >= 1); drop 0 or "
                       "choose --methods without reference_sjd")
    if "pac" in methods:
        from ..decoding.pac import window_problem
        for w in windows:
            why = window_problem(w)
            if why:
                bad("windows", f"window {w}: {why}; drop {w} or choose --methods without pac")


def _settings(device_type: str, trained: bool, quick: bool, **given) -> dict:
    d = dict(DEFAULTS[(device_type, trained)])
    if quick:
        d.update(QUICK)
        if not trained:
            d["law"] = 0
    for k, v in given.items():
        if v is not None:
            d[k] = v
    return d


def run_e2e(model: str = "mnist", methods=None, windows=None, betas=None, vp_forms=("add",), num_tokens=None,
            batch=None, samples=None, law_samples=None, seed: int = 0, out_dir=None, csv_path=None,
            json_path=None, budget_s: float = 1e9, quick: bool = False, backend: str = "auto", command: str = "",
            threads: Optional[int] = None, write_when_not_run: bool = True, log=print,
            state_capacity: Optional[int] = None) -> dict:
    """Run the sweep; returns ``{"rows", "info", "failed", "status", "notes", ...}``.

    ``status``: ``ok``, ``skipped`` (a bundled model without weights), ``refused`` (a GPU-only
    model without a GPU) or ``error``. ``threads``: torch CPU threads for the run (default: 1
    without a GPU, where the small bundled models gain little from more and a shared machine's
    wall clock stays steadier; unchanged with one); restored afterwards. ``write_when_not_run``:
    write the files of a skipped or refused run too (the CLI does when the output was named).
    ``state_capacity``: sparse Jacobi state (that many entries per position) for the windowed chain
    methods (``SPARSE_STATE_METHODS``); None keeps it dense. Settings it cannot use raise
    ``SettingsError`` (a ``ValueError``) before any model is built (``check_settings``).
    """
    check_settings(model, methods, windows, betas, num_tokens, batch, samples, law_samples, threads, state_capacity,
                   backend, budget_s)
    old_threads = torch.get_num_threads()
    if threads is None and not has_gpu():
        threads = 1
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run_e2e(model, methods, windows, betas, vp_forms, num_tokens, batch, samples, law_samples, seed,
                        out_dir, csv_path, json_path, budget_s, quick, backend, command, write_when_not_run, log,
                        state_capacity)
    finally:
        torch.set_num_threads(old_threads)


def _run_e2e(model, methods, windows, betas, vp_forms, num_tokens, batch, samples, law_samples, seed, out_dir,
             csv_path, json_path, budget_s, quick, backend, command, write_when_not_run, log,
             state_capacity=None) -> dict:
    t0 = time.time()
    info = machine_info()
    gpu = has_gpu()
    model = ALIASES.get(model, model)
    result = {"info": info, "rows": [], "command": command, "model": model, "failed": False, "notes": [],
              "status": "ok"}
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(list(MODELS) + list(ALIASES))}")
    device = "cuda" if gpu else "cpu"
    if not gpu:
        result["notes"].append(CPU_NOTE)
    try:
        avail = decoding_methods()
        models = Models(model, device)
    except ModelUnavailable as e:
        result["status"] = "skipped" if e.kind == "skip" else "refused"
        msg = f"{result['status']}: {e}"
        log(msg)
        result["notes"].append(msg)
        if write_when_not_run:
            _write(result, out_dir, csv_path, json_path)
            log("wrote " + (", ".join(result["written"]) or "no files"))
        return result
    except Exception as e:
        msg = f"cannot run: {type(e).__name__}: {e}"
        log(msg)
        result["notes"].append(msg)
        result["failed"], result["status"] = True, "error"
        _write(result, out_dir, csv_path, json_path)
        log("wrote " + (", ".join(result["written"]) or "no files"))
        return result
    trained = models.trained
    models.state_capacity = state_capacity
    st = _settings(device, trained, quick, batch=batch, samples=samples, windows=windows, betas=betas,
                   law=law_samples)
    batch, samples, law_n = int(st["batch"]), int(st["samples"]), int(st["law"])
    windows, betas = sorted(set(st["windows"])), list(st["betas"])
    T = int(num_tokens or models.num_tokens)
    if quick and not num_tokens:        # --quick changes defaults only: an explicit num_tokens is honoured
        T = min(T, 64)
    if methods:
        unknown = [m for m in methods if m not in avail]
        if unknown:
            msg = f"not offered by this build, skipped: {', '.join(unknown)}"
            result["notes"].append(msg)
            log(msg)
        methods = [m for m in methods if m in avail]
    else:
        methods = [m for m in avail if (trained or m in RANDOM_MODEL_METHODS)]
    if "sjd2" in methods and not models.has_sjd2():
        methods.remove("sjd2")
        msg = f"sjd2 skipped: no SJD2 fine-tune of {model!r} is bundled"
        result["notes"].append(msg)
        log(msg)
    methods = ["ar"] + [m for m in methods if m != "ar"]
    default_w = 16 if 16 in windows else windows[len(windows) // 2]
    lossless = lossless_methods()
    log(f"e2e: model {model} ({'trained' if trained else 'random weights: step costs only'}) on {device}, {T} tokens, "
        f"batch {batch}, cfg {models.cfg_scale}, top-k {models.top_k}, methods {methods}, windows {windows} "
        f"(default {default_w}), {f'sjd_vp betas {betas}, ' if 'sjd_vp' in methods else ''}{samples} timed samples, "
        f"law samples {law_n}, "
        f"state {'sparse, capacity ' + str(state_capacity) if state_capacity else 'dense'}")
    if not gpu:
        log(CPU_NOTE)
    vp_default = 0.5
    configs = [("method", m, (None if m in ("ar", "ar_gumbel") else default_w),
                vp_default if m == "sjd_vp" else None) for m in methods]
    configs += [("window", m, w, None) for m in methods if m in WINDOW_SWEEP for w in windows if w != default_w]
    if "sjd_vp" in methods:
        configs += [("beta", "sjd_vp", default_w, b) for b in betas]
    rows, skipped = [], 0
    ar = {}
    law_cache = {}
    done = {}
    for sweep, m, w, b in configs:
        forms = vp_forms if sweep == "beta" else ("add",)
        for form in forms:
            key = (m, w, b, form if b is not None else "")
            if key in done:              # the same configuration in another sweep: reuse its numbers
                r = dict(done[key])
                rows.append(_row(info, model, backend, device, r, sweep))
                continue
            if time.time() - t0 > budget_s:
                skipped += 1
                continue
            try:
                r = run_config(models, method=m, num_tokens=T, batch=batch, samples=samples, seed=seed + 1000,
                               window=w, beta=b, vp_form=form, backend=backend)
            except Exception as e:
                rows.append(_row(info, model, backend, device,
                                 {"method": m, "window": w if w is not None else "", "beta": b if b is not None else "",
                                  "note": f"failed: {type(e).__name__}: {str(e)[:200]}"}, sweep))
                log(f"[e2e] {m} W={w} beta={b}: failed: {type(e).__name__}: {e}")
                result["failed"] = True
                continue
            notes = []
            if m == "ar":
                ar = r
            if ar.get("latency_ms") and r.get("latency_ms"):
                r["speedup_latency"] = _r(ar["latency_ms"] / r["latency_ms"])
            if ar.get("step_ms") and r.get("step_ms"):
                r["step_cost_vs_ar"] = _r(r["step_ms"] / ar["step_ms"])
            if m == "sjd2":
                notes.append("SJD2 fine-tune, not lossless (targets see noisy inputs); speed-up vs the base AR; "
                             "its loop reports no forward/post-head split")
            if m == "reference_sjd":
                notes.append("public SJD loop's step (torch RNG, host loop over positions)")
            if not trained:
                for k in ("nfe", "nfe_sd", "step_compression", "tokens_per_step", "tokens_per_step_sd",
                          "tokens_per_step_ci", "speedup_latency", "latency_ms", "latency_p20_ms", "latency_p80_ms",
                          "tokens_per_s"):
                    r.pop(k, None)
                notes.append("random weights: NFE, acceptance and whole-image latency are artefacts; "
                             "step costs only")
            elif sweep == "method" and time.time() - t0 < budget_s:
                try:
                    if m == "gumbel_jacobi":
                        # deterministic Gumbel-Jacobi equals AR with the same Gumbel noise: same seeds, same tokens
                        k = max(2, min(16, law_n)) if law_n else 0
                        if k:
                            a, _ = _law_tokens(models, "ar_gumbel", None, None, "add", T, k, seed + 70000, backend)
                            g, g_steps = _law_tokens(models, m, w, None, "add", T, k, seed + 70000, backend)
                            r.update(_law_steps(g_steps, T))
                            same = float((a == g).all(1).mean())
                            r.update(law_test="pass" if same == 1.0 else "FAIL", law_p="",
                                     law_detail=f"token for token vs ar_gumbel, same seeds: {same:.0%} of {k} "
                                                f"images equal")
                            if same < 1.0:
                                result["failed"] = True
                    elif m != "ar" and law_n and (m in lossless or m == "sjd2"):
                        if "ar" not in law_cache:
                            law_cache["ar"] = _law_tokens(models, "ar", None, None, "add", T, law_n, seed + 50000,
                                                          backend)[0]
                        toks, steps = _law_tokens(models, m, w, b, "add", T, law_n, seed + 90000, backend)
                        r.update(_law_steps(steps, T))
                        res = two_sample_test(law_cache["ar"], toks)
                        if m in lossless:
                            r.update(res)
                            if res["law_test"] == "FAIL":
                                result["failed"] = True
                        else:       # sjd2 is not lossless: the test is information, not a check
                            r.update(law_test="info: " + ("no difference found" if res["law_test"] == "pass"
                                                          else "differs from AR"),
                                     law_p=res["law_p"], law_detail=res["law_detail"])
                except Exception as e:
                    r["law_test"], r["law_detail"] = "error", f"{type(e).__name__}: {str(e)[:200]}"
                    result["failed"] = True
            if r.get("state_overflows"):
                msg = (f"WARNING: {m} W={w}: {r['state_overflows']} sparse-state overflows (rows whose support "
                       f"exceeded --state-capacity {state_capacity} were drafted uniformly): the speed-up is lost; "
                       f"raise the capacity")
                log(f"[e2e] {msg}")
                notes.append(f"{r['state_overflows']} sparse-state overflows")
            r["note"] = "; ".join(notes)
            done[key] = r
            row = _row(info, model, backend, device, r, sweep)
            rows.append(row)
            log(f"[e2e] {model} {sweep:<6} {m:<14} W={str(w):<4} beta={str(b):<5} NFE {row['nfe']} (sd "
                f"{row['nfe_sd']}) compression {row['step_compression']} tok/step {row['tokens_per_step']} (sd "
                f"{row['tokens_per_step_sd']}) latency {row['latency_ms']} ms [{row['clock']}] speed-up "
                f"{row['speedup_latency']} step {row['step_ms']} ms (x{row['step_cost_vs_ar']} of AR) post-head "
                f"{row['post_head_frac']} law {row['law_test']} {row['law_p']}")
    if skipped:
        result["notes"].append(f"budget of {budget_s:.0f} s reached: {skipped} configurations not run")
    result["rows"] = rows
    result["settings"] = {"device": device, "num_tokens": T, "batch": batch, "cfg_scale": models.cfg_scale,
                          "top_k": models.top_k, "samples": samples, "law_samples": law_n, "trained": trained,
                          "methods": methods, "windows": windows, "default_window": default_w, "betas": betas,
                          "vp_forms": list(vp_forms), "seed": seed, "backend": backend,
                          "state_capacity": state_capacity or "",
                          "torch_threads": torch.get_num_threads()}
    result["seconds"] = time.time() - t0
    _write(result, out_dir, csv_path, json_path)
    log(f"e2e: {len(rows)} rows in {result['seconds']:.0f} s")
    log("wrote " + (", ".join(result["written"]) or "no files"))
    return result


def _law_steps(steps: list, T: int) -> dict:
    """Per-request step compression over the law run's requests (a larger sample than the timed ones)."""
    per = np.array([T / max(1, s) for s in steps], dtype=np.float64)
    return {"law_n": len(per), "tokens_per_step_law": _r(per.mean()),
            "tokens_per_step_law_sd": _r(per.std(ddof=1)) if len(per) > 1 else ""}


def _law_tokens(models: Models, m, w, b, form, T, n, seed, backend):
    """``(tokens [n, T], steps [n])`` of ``n`` requests with seeds ``seed*7 + i`` (batches of up to 64).

    The conditions do not depend on ``seed``: two calls see the same sequence of classes, so a
    two-sample test compares the token laws given the same conditions.
    """
    out, steps, done = [], [], 0
    while done < n:
        k = min(64, n - done)
        seeds = [seed * 7 + done + i for i in range(k)]
        r = generate_any(models, m, models.cond(k, 4242 + done), T, seeds=seeds, window=w, beta=b, vp_form=form,
                         backend=backend)
        out.append(r["tokens"].detach().cpu().numpy())
        steps += list(r["steps"])
        done += k
    return np.concatenate(out, 0), steps


def _row(info: dict, model: str, backend: str, device: str, r: dict, sweep: str) -> dict:
    row = {k: "" for k in COLUMNS}
    row.update({k: v for k, v in r.items() if k in row})
    row.update(model=model, sweep=sweep, backend=backend, device=device, gpu=info["gpu"], torch=info["torch"],
               triton=info["triton"], cuda=info["cuda"], python=info["python"], commit=info["commit"])
    return row


def _write(result: dict, out_dir, csv_path, json_path) -> None:
    """The run's files: every file into ``out_dir`` (``csv_path``/``json_path`` moving those two), or
    without ``out_dir`` only the named ones. ``result["written"]`` lists the paths written."""
    rows = result["rows"]
    written = result.setdefault("written", [])
    if out_dir and not csv_path:
        csv_path = os.path.join(out_dir, "e2e.csv")
    if out_dir and not json_path:
        json_path = os.path.join(out_dir, "e2e.json")
    md_path = os.path.join(out_dir, "e2e.md") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        from .plots import plot_acceptance_vs_beta, plot_speedup_vs_window
        result.setdefault("plots", [])
        for fn, path in ((plot_speedup_vs_window, "e2e_speedup.png"), (plot_acceptance_vs_beta, "e2e_beta.png")):
            try:
                fn(rows, os.path.join(out_dir, path), model=result.get("model", ""))
                result["plots"].append(path)
                written.append(os.path.join(out_dir, path))
            except ValueError:
                pass            # no rows of that kind in this run
            except Exception as e:          # a plot must never lose the numbers
                result["notes"].append(f"plot {path} failed: {type(e).__name__}: {e}")
    written += [p for p in (csv_path, json_path, md_path) if p]     # listed in the JSON too
    if csv_path:
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if md_path:
        with open(md_path, "w") as f:
            f.write(summary_markdown(result))


def _pm(r: dict, a: str, b: str) -> str:
    return f"{r.get(a, '')} ± {r[b]}" if r.get(b) not in ("", None) else str(r.get(a, ""))


def summary_markdown(result: dict) -> str:
    info = result["info"]
    st = result.get("settings", {})
    cpu = st.get("device", "cpu" if info.get("gpu", "").startswith("none") else "cuda") == "cpu"
    lines = ["# sjd_kernels end-to-end benchmark", ""]
    if cpu:
        lines += [f"**{CPU_NOTE}**", ""]
    lines += [f"- model: {result.get('model')} ({'trained' if st.get('trained') else 'random weights'}); status: "
              f"{result.get('status', 'ok')}",
              f"- machine: {info.get('host', '')}; CPU {info.get('cpu', '?')} ({info.get('cpu_count', '?')} logical "
              f"cores, torch CPU kernels {info.get('cpu_capability', 'not recorded')}, torch threads {st.get('torch_threads', info.get('torch_threads', '?'))}); GPU {info['gpu']}",
              f"- versions: torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
              f"python {info['python']}",
              f"- commit: {info.get('commit_full', info['commit'])}",
              f"- command: `{result.get('command', '')}`"]
    if st:
        lines.append(f"- settings: {st['num_tokens']} tokens/image, batch {st['batch']}, CFG {st['cfg_scale']}, "
                     f"top-k {st['top_k']}, {st['samples']} timed generations per configuration after one warm-up "
                     f"({'the same generation' if st['device'] == 'cuda' else 'a short generation'}), "
                     f"default window {st['default_window']}, law test on {st['law_samples']} images per method, "
                     f"seed {st['seed']}, backend {st['backend']}, Jacobi state "
                     f"{'sparse, capacity ' + str(st['state_capacity']) if st.get('state_capacity') else 'dense'}")
    if "seconds" in result:
        lines.append(f"- run time: {result['seconds']:.0f} s")
    if result["rows"]:
        lines += ["- NFE: window forwards per batch of requests (the batch runs until its slowest request is done), "
                  "mean ± sd over the timed generations; step compression = tokens / NFE; tokens/step = mean ± sd over "
                  "requests of tokens / that request's steps (its acceptance), over the timed requests and, where a law "
                  "test ran, over its requests (law run)",
                  "- latency: wall time of one generate() of the batch between device synchronisations, median over "
                  "the timed generations; split (forward = inputs + model up to the LM head, post-head = op + commit): "
                  "the loop's own per-step clocks (GenerateStats.forward_s / post_s), median per step",
                  "- law: two-sample test of each lossless method's tokens against AR's (fresh seeds, same classes): "
                  "chi-square at 4 positions + Mann-Whitney on 2 image statistics, Bonferroni, alpha 1e-3; "
                  "gumbel_jacobi: token for token against ar_gumbel with the same seeds"]
    lines += [f"- {n}" for n in result.get("notes", []) if n != CPU_NOTE]
    rows = result["rows"]
    over = [r for r in rows if r.get("state_overflows") not in ("", None, 0)]
    if over:
        lines.append(f"- **WARNING: sparse-state overflows in {len(over)} rows** (rows whose support exceeded the "
                     f"capacity {st.get('state_capacity', '')} were drafted uniformly, losing the speed-up): "
                     + ", ".join(f"{r['method']} W={r['window']}: {r['state_overflows']}" for r in over))
    if rows:
        lines += ["", "## Methods", ""]
        cols = [("method", "method"), ("W", "window"), ("beta", "beta"), ("NFE", None), ("step compression",
                                                                                        "step_compression"),
                ("tokens/step (per request)", None), ("tokens/step (law run)", None), ("latency ms", "latency_ms"), ("tokens/s", "tokens_per_s"),
                ("speed-up vs AR", "speedup_latency"), ("forward ms/step", "forward_ms_per_step"),
                ("post-head ms/step", "post_head_ms_per_step"), ("post-head share", "post_head_frac"),
                ("state overflows", "state_overflows"), ("law", "law_test"), ("law p", "law_p"), ("note", "note")]

        def table(rs):
            out = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
            for r in rs:
                vals = []
                for c, k in cols:
                    if c == "NFE":
                        vals.append(_pm(r, "nfe", "nfe_sd"))
                    elif c == "tokens/step (law run)":
                        vals.append(_pm(r, "tokens_per_step_law", "tokens_per_step_law_sd")
                                    + (f" (n={r['law_n']})" if r.get("law_n") not in ("", None) else ""))
                    elif c.startswith("tokens/step"):
                        vals.append(_pm(r, "tokens_per_step", "tokens_per_step_sd"))
                    else:
                        vals.append(str(r.get(k, "")))
                out.append("| " + " | ".join(vals) + " |")
            return out

        lines += table([r for r in rows if r["sweep"] == "method"])
        swept = {r["method"] for r in rows if r["sweep"] == "window"}
        win = [r for r in rows if r["sweep"] in ("method", "window") and r["method"] in swept]
        if swept:
            win.sort(key=lambda r: (r["method"], float(r["window"])))
            lines += ["", "## Window sweep", ""] + table(win)
        beta = [r for r in rows if r["sweep"] == "beta"]
        if beta:
            lines += ["", f"## sjd_vp beta sweep (W = {st.get('default_window', '')})", ""] + table(beta)
    if result.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result["plots"])]
    return "\n".join(lines) + "\n"
