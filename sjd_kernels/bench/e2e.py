"""``bench e2e``: decoding on a model, per method: NFE, step compression, tokens/s, latency,
the split of step time between the model forward and post-LM-head work, and for lossless
methods a two-sample test of their tokens against AR's. Window sweeps, and a beta sweep for
``sjd_vp`` (acceptance against beta).

Models:
- ``bundled`` (default when it exists): the trained model shipped in the package;
- ``llamagen-xl`` / ``chameleon-7b``: random-weight models of those shapes built directly on the
  GPU with the in-package GPT, for latency only (random weights give near-uniform targets, so
  acceptance, NFE and the law test mean nothing there and are not reported as such);
- ``tiny``: a random 2-layer GPT for smoke tests (CPU allowed with ``--allow-cpu``).

The loop is ``sjd_kernels.decoding.generate``; the post-LM-head share of each step is measured
in place with CUDA events around every fused-op call the loop makes (nothing is modelled).
"""
from __future__ import annotations

import csv
import importlib
import inspect
import json
import math
import os
import time
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch

from .timing import has_gpu, machine_info

# LlamaGen-XL: 36 layers, d 1280, 20 heads, 16384 codes, 256 tokens (256 px).
# Chameleon/Lumina-mGPT 7B: 32 layers, d 4096, 32 heads; image slice of 8192 codes, 1024 tokens (512 px).
MODELS = {
    "bundled": None,          # the bundled mnist model (sjd_kernels.models.bundled)
    "photo": None,            # the other bundled model
    "llamagen-xl": {"n_layer": 36, "d_model": 1280, "n_head": 20, "vocab": 16384, "num_tokens": 256,
                    "cfg_scale": 4.0, "top_k": 1000},
    "chameleon-7b": {"n_layer": 32, "d_model": 4096, "n_head": 32, "vocab": 8192, "num_tokens": 1024,
                     "cfg_scale": 3.0, "top_k": 2000},
    "tiny": {"n_layer": 2, "d_model": 64, "n_head": 4, "vocab": 64, "num_tokens": 32, "cfg_scale": 3.0, "top_k": 0},
}
# methods of the loop we know how to label; the loop's own list wins when it exports one
METHODS = ("ar", "sjd", "sjd_vp", "coupling", "gumbel", "gumbel_jacobi", "sjd2", "sjd_pac", "reference_sjd")
LOSSLESS = ("sjd", "sjd_vp", "coupling", "gumbel", "sjd_pac", "reference_sjd")
EXACT_AS_AR = ("gumbel_jacobi",)       # deterministic Gumbel-Jacobi: same seed, same tokens as AR's Gumbel twin

COLUMNS = ["model", "method", "sweep", "window", "beta", "vp_form", "batch", "num_tokens", "samples", "nfe",
           "nfe_prefill", "step_compression", "tokens_per_step", "tokens_per_step_ci", "latency_ms", "latency_p20_ms",
           "latency_p80_ms", "tokens_per_s", "speedup_latency", "step_ms", "forward_ms_per_step",
           "post_head_ms_per_step", "post_head_frac", "law_test", "law_p", "law_detail", "note", "backend", "gpu",
           "torch", "triton", "cuda", "python", "commit"]


# --------------------------------------------------------------------------- the loop and the models
def decoding_api():
    """``(generate, methods)`` from ``sjd_kernels.decoding``, or raise ImportError saying what is missing."""
    dec = importlib.import_module("sjd_kernels.decoding")
    gen = getattr(dec, "generate", None)
    if gen is None:
        raise ImportError("sjd_kernels.decoding has no generate()")
    methods = tuple(getattr(dec, "METHODS", ()) or ())
    return gen, methods


def _call_generate(gen, model, cond, num_tokens: int, **kw):
    """Call ``generate`` with the keyword arguments it accepts (unknown ones are dropped and reported)."""
    sig = inspect.signature(gen)
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    use = {k: v for k, v in kw.items() if v is not None and (accepts_any or k in sig.parameters)}
    dropped = sorted(k for k, v in kw.items() if v is not None and k not in use)
    return gen(model, cond, num_tokens, **use), dropped


def _result_fields(res) -> dict:
    """Tokens ``[B, T]`` and counters from whatever the loop returns (an object, a dict, or a tensor)."""
    if isinstance(res, torch.Tensor):
        return {"tokens": res}
    if isinstance(res, dict):
        d = dict(res)
    else:
        d = {k: getattr(res, k) for k in dir(res) if not k.startswith("_") and not callable(getattr(res, k))}
    stats = d.get("stats")
    if stats is not None:
        d.update(stats if isinstance(stats, dict) else
                 {k: getattr(stats, k) for k in dir(stats) if not k.startswith("_")})
    return d


def build_model(name: str, device, dtype=torch.bfloat16):
    """The bundled trained model, or a random-weight in-package GPT of a named shape built on ``device``."""
    if name in ("bundled", "mnist", "photo"):
        b = importlib.import_module("sjd_kernels.models.bundled")
        which = "mnist" if name == "bundled" else name
        bundle = b.load(which, device=device, dtype=torch.float32)
        return bundle.gpt.eval(), {"trained": True, "bundled": which, "num_tokens": bundle.tokens_per_image,
                                   "num_classes": bundle.num_classes}
    spec = MODELS[name]
    gpt = importlib.import_module("sjd_kernels.models.gpt")
    cfg_cls = getattr(gpt, "GPTConfig")
    params = inspect.signature(cfg_cls).parameters
    alias = {"n_layer": ("n_layer", "n_layers", "num_layers", "layers", "depth"),
             "d_model": ("d_model", "dim", "n_embd", "hidden_size", "width"),
             "n_head": ("n_head", "n_heads", "num_heads", "heads"),
             "vocab": ("vocab_size", "vocab", "codebook_size", "num_codes", "image_vocab")}
    kw = {}
    for key, names in alias.items():
        for n in names:
            if n in params:
                kw[n] = spec[key]
                break
        else:
            raise TypeError(f"GPTConfig has no parameter for {key} (looked for {names})")
    for n in ("block_size", "max_seq_len", "max_len", "seq_len", "max_tokens"):
        if n in params:
            kw[n] = spec["num_tokens"] + 256
            break
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(gpt, "GPT")(cfg_cls(**kw))
    model = model.to(dtype).eval()
    return model, {"trained": False, **spec}


def _cond(model, batch: int, device, seed: int):
    """A condition per request: class ids when the model is class-conditional (the loop's convention)."""
    n_cls = None
    for attr in ("num_classes", "n_classes", "n_cond"):
        for obj in (model, getattr(model, "config", None), getattr(model, "cfg", None)):
            if obj is not None and isinstance(getattr(obj, attr, None), int):
                n_cls = getattr(obj, attr)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_cls or 10, (batch,), generator=g).to(device)


# --------------------------------------------------------------------------- in-place step split
class PostHeadTimer:
    """CUDA events around every fused-op call the loop makes (jacobi_step and the tree ops).

    Wraps the op functions where the decoding modules imported them; while a CUDA graph is being
    captured nothing is recorded (a captured step is reported as such, not guessed).
    """
    OPS = ("jacobi_step", "tree_verify", "tree_kv_update", "sjd2_prepare")

    def __init__(self):
        self.pairs = []
        self.calls = 0
        self.captured = False
        self._patched = []

    def _wrap(self, fn):
        timer = self

        def wrapped(*a, **k):
            timer.calls += 1
            if not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
                timer.captured = timer.captured or torch.cuda.is_available()
                return fn(*a, **k)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn(*a, **k)
            e.record()
            timer.pairs.append((s, e))
            return out
        wrapped.__wrapped__ = fn
        return wrapped

    def __enter__(self):
        import sys
        for modname, mod in list(sys.modules.items()):
            if not (modname.startswith("sjd_kernels.decoding") or modname.startswith("sjd_kernels.ops")):
                continue
            if mod is None:
                continue
            for op in self.OPS:
                fn = getattr(mod, op, None)
                if callable(fn) and not hasattr(fn, "__wrapped__") and not isinstance(fn, type):
                    setattr(mod, op, self._wrap(fn))
                    self._patched.append((mod, op, fn))
        return self

    def __exit__(self, *exc):
        for mod, op, fn in self._patched:
            setattr(mod, op, fn)
        self._patched.clear()

    def total_ms(self) -> float:
        if not self.pairs:
            return 0.0
        torch.cuda.synchronize()
        return float(sum(s.elapsed_time(e) for s, e in self.pairs))


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


# --------------------------------------------------------------------------- one configuration
def run_config(gen, model, *, method: str, num_tokens: int, batch: int, samples: int, seed: int, device,
               window: Optional[int] = None, beta: Optional[float] = None, vp_form: Optional[str] = None,
               cfg_scale: Optional[float] = None, top_k: Optional[int] = None, backend: str = "auto",
               timed: bool = True) -> dict:
    """Warm-up once, then ``samples`` timed generations of ``batch`` requests (distinct seeds)."""
    kw = dict(method=method, window=window, beta=beta, vp_form=vp_form, cfg_scale=cfg_scale, top_k=top_k,
              backend=backend)
    cuda = torch.device(device).type == "cuda"
    res, dropped = _call_generate(gen, model, _cond(model, batch, device, seed), num_tokens,
                                  seed=[seed * 100003 + i for i in range(batch)], **kw)    # warm-up (compiles)
    lat, toks, nfe, pre, post, steps_ms = [], [], [], [], [], []
    captured = False
    for s in range(samples):
        sd = seed + 1 + s
        cond = _cond(model, batch, device, sd)
        seeds = [sd * 100003 + i for i in range(batch)]
        with PostHeadTimer() as pt:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res, _ = _call_generate(gen, model, cond, num_tokens, seed=seeds, **kw)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        f = _result_fields(res)
        tk = f.get("tokens")
        toks.append(tk.detach().cpu().numpy())
        lat.append(dt * 1e3)
        n = f.get("nfe", f.get("num_forwards"))
        nfe.append(float(n) if n is not None else float("nan"))
        p = f.get("nfe_prefill", f.get("prefill_forwards", 1))
        pre.append(float(p) if p is not None else float("nan"))
        post.append(pt.total_ms() if cuda else float("nan"))
        captured = captured or pt.captured
    lat = np.array(lat)
    nfe_m = float(np.nanmean(nfe)) if not np.all(np.isnan(nfe)) else float("nan")
    out = {"method": method, "window": window if window is not None else "", "beta": beta if beta is not None else "",
           "vp_form": vp_form or "", "batch": batch, "num_tokens": num_tokens, "samples": samples,
           "nfe": round(nfe_m, 2) if nfe_m == nfe_m else "", "nfe_prefill": round(float(np.nanmean(pre)), 2),
           "tokens": np.concatenate(toks, 0)}
    if nfe_m == nfe_m and nfe_m > 0:
        comp = num_tokens / nfe_m
        out["step_compression"] = round(comp, 3)
        per = num_tokens / np.array(nfe)
        out["tokens_per_step"] = round(float(per.mean()), 3)
        out["tokens_per_step_ci"] = round(float(1.96 * per.std(ddof=1) / math.sqrt(len(per))), 3) if len(per) > 1 else ""
    notes = []
    if dropped:
        notes.append("generate() ignored: " + ",".join(dropped))
    if timed and cuda:
        out.update(latency_ms=round(float(np.median(lat)), 3), latency_p20_ms=round(float(np.percentile(lat, 20)), 3),
                   latency_p80_ms=round(float(np.percentile(lat, 80)), 3),
                   tokens_per_s=round(batch * num_tokens / (float(np.median(lat)) * 1e-3), 1))
        if nfe_m == nfe_m and nfe_m > 0:
            step = float(np.median(lat)) / (nfe_m + float(np.nanmean(pre)))
            out["step_ms"] = round(step, 4)
            ph = float(np.nanmedian(post)) / (nfe_m + float(np.nanmean(pre)))
            if captured:
                notes.append("step captured in a CUDA graph: post-head share not measurable in place")
            elif ph > 0:
                out["post_head_ms_per_step"] = round(ph, 4)
                out["forward_ms_per_step"] = round(step - ph, 4)     # forward + loop bookkeeping
                out["post_head_frac"] = round(ph / step, 4)
    out["note"] = "; ".join(notes)
    return out


# --------------------------------------------------------------------------- the sweep
def run_e2e(model: str = "bundled", methods=None, windows=None, betas=None, vp_forms=("add",), num_tokens=None,
            batch: int = 1, samples=None, law_samples=None, seed: int = 0, out_dir=None, csv_path=None,
            json_path=None, budget_s: float = 1e9, quick: bool = False, backend: str = "auto", command: str = "",
            allow_cpu: bool = False, log=print) -> dict:
    t0 = time.time()
    info = machine_info()
    gpu = has_gpu()
    result = {"info": info, "rows": [], "command": command, "model": model, "failed": False, "notes": []}
    if not gpu and not allow_cpu:
        msg = ("no CUDA device visible: e2e timings refused (CPU times do not mean GPU speed); "
               "pass --allow-cpu for a smoke run without timing columns")
        log(msg)
        result["notes"].append(msg)
        _write(result, out_dir, csv_path, json_path)
        return result
    device = "cuda" if gpu else "cpu"
    try:
        gen, loop_methods = decoding_api()
    except Exception as e:
        msg = f"decoding loop not available ({type(e).__name__}: {e}); nothing to run"
        log(msg)
        result["notes"].append(msg)
        result["failed"] = True
        _write(result, out_dir, csv_path, json_path)
        return result
    name = model
    try:
        mdl, meta = build_model(name, device)
    except Exception as e:
        if name == "bundled":
            log(f"bundled model not available ({type(e).__name__}: {e}); using llamagen-xl random weights")
            name = "llamagen-xl" if gpu else "tiny"
            mdl, meta = build_model(name, device)
        else:
            raise
    result["model"] = name
    trained = bool(meta.get("trained"))
    T = num_tokens or meta.get("num_tokens") or getattr(mdl, "num_tokens", None) or \
        getattr(getattr(mdl, "config", None), "num_tokens", None) or 196
    if quick:
        T = min(T, 64)
    avail = list(loop_methods) or [m for m in METHODS if m != "reference_sjd"]
    methods = [m for m in (methods or avail) if m in avail or m == "reference_sjd"]
    if "ar" not in methods:
        methods = ["ar"] + methods
    windows = windows or ([16] if quick else [8, 16, 32, 64])
    default_w = 16 if 16 in windows else windows[0]
    betas = betas if betas is not None else ([0.0, 0.5] if quick else [0.0, 0.25, 0.5, 1.0, 2.0])
    samples = samples or (2 if quick else 5)
    law_n = law_samples if law_samples is not None else (0 if not trained else (32 if quick else 128))
    top_k = meta.get("top_k") or None
    cfg = meta.get("cfg_scale") if "cfg_scale" in meta else None
    log(f"e2e: model {name} ({'trained' if trained else 'random weights: latency only'}), {T} tokens, batch {batch}, "
        f"methods {methods}, windows {windows}, betas {betas}, {samples} timed samples, law samples {law_n}")

    configs = [("method", m, (None if m == "ar" else default_w), None, None) for m in methods]
    configs += [("window", m, w, None, None) for m in methods if m in ("sjd", "coupling", "sjd_pac", "sjd2")
                for w in windows if w != default_w]
    if "sjd_vp" in methods:
        configs += [("beta", "sjd_vp", default_w, b, f) for f in vp_forms for b in betas]
    rows = []
    ar_tokens = None
    ar_latency = None
    skipped = 0
    for sweep, m, w, b, form in configs:
        if time.time() - t0 > budget_s:
            skipped += 1
            continue
        if m == "reference_sjd":
            rows.append(_row(info, name, backend, {"method": m, "window": w, "note":
                             "reference SJD loop on a model: needs the model's KV-cache API (see report)"}, sweep))
            continue
        try:
            r = run_config(gen, mdl, method=m, num_tokens=T, batch=batch, samples=samples, seed=seed + 1000,
                           device=device, window=w, beta=b, vp_form=form, cfg_scale=cfg, top_k=top_k,
                           backend=backend, timed=gpu)
        except Exception as e:
            rows.append(_row(info, name, backend, {"method": m, "window": w if w is not None else "",
                                                   "beta": b if b is not None else "",
                                                   "note": f"failed: {type(e).__name__}: {str(e)[:200]}"}, sweep))
            log(f"[e2e] {m} W={w} beta={b}: failed: {type(e).__name__}: {e}")
            result["failed"] = True
            continue
        if m == "ar" and sweep == "method":
            ar_latency = r.get("latency_ms")
            ar_tokens = r["tokens"]
        if ar_latency and r.get("latency_ms"):
            r["speedup_latency"] = round(ar_latency / r["latency_ms"], 3)
        if not trained:
            for k in ("step_compression", "tokens_per_step", "tokens_per_step_ci"):
                r.pop(k, None)
            r["note"] = (r.get("note", "") + "; random weights: NFE and acceptance not meaningful, latency per step is"
                         ).strip("; ")
        # law against AR (lossless methods, trained models): fresh generations, enough of them
        if trained and law_n and m in LOSSLESS and sweep == "method" and time.time() - t0 < budget_s:
            try:
                a = _law_tokens(gen, mdl, "ar", None, None, None, T, law_n, batch, device, seed + 50000, cfg, top_k,
                                backend) if "law_ar" not in result else result["law_ar"]
                result["law_ar"] = a
                bt = _law_tokens(gen, mdl, m, w, b, form, T, law_n, batch, device, seed + 90000, cfg, top_k, backend)
                r.update(two_sample_test(a, bt))
                if r["law_test"] == "FAIL":
                    result["failed"] = True
            except Exception as e:
                r["law_test"], r["law_detail"] = "error", f"{type(e).__name__}: {str(e)[:200]}"
        r.pop("tokens", None)
        row = _row(info, name, backend, r, sweep)
        rows.append(row)
        log(f"[e2e] {name} {m:<14} W={str(w):<4} beta={str(b):<5} NFE {row.get('nfe', '')} "
            f"compression {row.get('step_compression', '')} latency {row.get('latency_ms', '')} ms "
            f"tok/s {row.get('tokens_per_s', '')} speed-up {row.get('speedup_latency', '')} "
            f"post-head {row.get('post_head_frac', '')} law {row.get('law_test', '')} {row.get('note', '')}")
    if skipped:
        result["notes"].append(f"budget of {budget_s:.0f} s reached: {skipped} configurations not run")
    result.pop("law_ar", None)
    result["rows"] = rows
    result["seconds"] = time.time() - t0
    _write(result, out_dir, csv_path, json_path)
    return result


def _law_tokens(gen, mdl, m, w, b, form, T, n, batch, device, seed, cfg, top_k, backend) -> np.ndarray:
    out = []
    per = max(batch, min(64, n))
    done = 0
    while done < n:
        k = min(per, n - done)
        seeds = [seed * 7 + done + i for i in range(k)]
        res, _ = _call_generate(gen, mdl, _cond(mdl, k, device, seed), T, seed=seeds, method=m, window=w, beta=b,
                                vp_form=form, cfg_scale=cfg, top_k=top_k, backend=backend)
        out.append(_result_fields(res)["tokens"].detach().cpu().numpy())
        done += k
    return np.concatenate(out, 0)


def _row(info: dict, model: str, backend: str, r: dict, sweep: str) -> dict:
    row = {k: "" for k in COLUMNS}
    row.update({k: v for k, v in r.items() if k in row})
    row.update(model=model, sweep=sweep, backend=backend, gpu=info["gpu"], torch=info["torch"],
               triton=info["triton"], cuda=info["cuda"], python=info["python"], commit=info["commit"])
    return row


def _write(result: dict, out_dir, csv_path, json_path) -> None:
    rows = result["rows"]
    if out_dir and not csv_path:
        csv_path = os.path.join(out_dir, "e2e.csv")
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
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "e2e.md"), "w") as f:
            f.write(summary_markdown(result))
        from .plots import plot_acceptance_vs_beta, plot_speedup_vs_window
        for fn, path in ((plot_speedup_vs_window, "e2e_speedup.png"), (plot_acceptance_vs_beta, "e2e_beta.png")):
            try:
                fn(rows, os.path.join(out_dir, path), model=result.get("model", ""))
            except ValueError:
                pass            # no rows of that kind in this run


def summary_markdown(result: dict) -> str:
    info = result["info"]
    lines = ["# sjd_kernels end-to-end benchmark", "",
             f"- model: {result.get('model')}",
             f"- machine: {info['gpu']}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"python {info['python']}; commit {info['commit']}",
             f"- command: `{result.get('command', '')}`",
             "- latency: wall time of generate() between device synchronisations, median over samples after a "
             "warm-up; post-head share: CUDA events around each fused-op call in the loop",
             "- law: two-sample test of each lossless method's tokens against AR's (fresh seeds), Bonferroni, "
             "alpha 1e-3"]
    lines += [f"- {n}" for n in result.get("notes", [])]
    rows = result["rows"]
    if rows:
        cols = ["method", "sweep", "window", "beta", "vp_form", "nfe", "step_compression", "latency_ms",
                "tokens_per_s", "speedup_latency", "post_head_frac", "law_test", "law_p", "note"]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
