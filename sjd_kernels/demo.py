"""The main demo: every decoding method on a bundled model, on CPU, in a few minutes.

    python -m sjd_kernels.demo                     # MNIST model
    python -m sjd_kernels.demo --model photo --json demo.json --out demo_out

Generates the same class-conditioned batch (same classes, same per-request seeds) with every
method that ``sjd_kernels.decoding.available_methods()`` lists (``sjd2`` with the SJD2 fine-tune
of the model, ``weights/<model>_sjd2.*``; methods that cannot run here are listed as not run), saves a PNG grid (one labelled row per method and
seed 0), and prints one table row per method:

- ``NFE``: model forwards per batch after the prefill (a CFG pair counts once), mean over seeds;
  ``compress``: image tokens / NFE, and ``vs AR``: AR's NFE / the method's NFE.
- ``wall s``: generation time per batch (mean over seeds; CPU, reference op).
- ``acc`` and ``FD``: class accuracy and Frechet distance of the decoded images in the bundled
  classifier's feature space (``sjd_kernels.quality``), mean ± std over seeds; the ``real`` row
  gives the same numbers for real images at the same set size (the floor of FD).
- ``H``: mean entropy (nats) of the target rows the method sampled from, i.e. of the CFG-combined
  law at each position given the tokens before it, evaluated along the method's own samples
  (for ``sjd2``: the rows of its fine-tuned model given clean prefixes; its real rows were
  conditioned on noisy inputs).
- ``p(=AR)``: a two-sample test of the method's tokens against an independent AR sample (other
  seeds, same classes). Statistic: the sum over positions of the per-position chi-square
  homogeneity statistic ``sum_v (a_v - b_v)^2 / (a_v + b_v)`` over token counts; p-value by a
  permutation test that swaps samples between the two sets within each class, which stays valid
  although positions are dependent. Lossless methods should give p-values spread uniformly over
  (0, 1] (the AR row measures AR against its own independent sample, a calibration check); a
  small p-value flags a changed distribution.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .bench.timing import cpu_capability, cpu_name
from .ops._common import BACKENDS

BACKEND_NAMES = ("auto",) + BACKENDS     # what backend= takes


def two_sample_test(a: np.ndarray, b: np.ndarray, strata: np.ndarray, vocab: int, permutations: int = 500,
                    seed: int = 0) -> tuple[float, float]:
    """Stratified permutation test of equal token laws: ``a``, ``b`` ``[n, N]`` ids, ``strata [n]``.

    Row i of ``a`` and row i of ``b`` share stratum ``strata[i]`` (the class), so swapping them keeps
    both sets' class composition. Returns ``(statistic, p_value)``.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"token sets must have equal shapes, got {a.shape} and {b.shape}")
    n, N = a.shape
    both = np.concatenate([a, b])                                   # [2n, N]
    flat = both + (np.arange(N) * vocab)[None, :]                   # id of (position, token)
    tot = np.bincount(flat.reshape(-1), minlength=N * vocab).astype(np.float64)
    nz = tot > 0
    inv = 1.0 / tot[nz]

    def stat(first_rows: np.ndarray) -> float:
        ca = np.bincount(flat[first_rows].reshape(-1), minlength=N * vocab).astype(np.float64)[nz]
        d = 2.0 * ca - tot[nz]                                       # a_v - b_v
        return float((d * d * inv).sum())

    rows = np.arange(n)
    obs = stat(rows)
    rng = np.random.default_rng(seed)
    strata = np.asarray(strata)
    count = 0
    for _ in range(permutations):
        # within a pair (i, n + i) of the same stratum, swap with probability 1/2
        swap = rng.random(n) < 0.5
        count += stat(np.where(swap, rows + n, rows)) >= obs
    return obs, (1 + count) / (1 + permutations)


def save_grid(path: Path, rows: dict[str, np.ndarray], title: str):
    """PNG grid: one row of images ``[k, H, W]`` per label. The title wraps to the grid's width (a grid
    of one or two images is narrower than a line of settings)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rows)
    k = max(len(v) for v in rows.values())
    width = 0.8 * k + 1.4
    lines = textwrap.wrap(title, width=max(16, int(width * 12)))      # about 12 characters an inch at 9 pt
    fig, axes = plt.subplots(len(names), k, figsize=(width, 0.85 * len(names) + 0.35 + 0.15 * len(lines)),
                             squeeze=False)
    for r, name in enumerate(names):
        for c in range(k):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(rows[name]):
                ax.imshow(rows[name][c], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PHOTO_REAL_POOL = 2000      # photo crops the real rows are drawn from (200 per photograph)


def real_per_class(model: str) -> int:
    """Real images per class that ``_balanced_real`` draws from: the most ``--per-class`` can ask for."""
    from . import data
    if model == "mnist":
        return data.MNIST_TRAIN_PER_CLASS
    return PHOTO_REAL_POOL // len(data.PHOTO_NAMES)


def _balanced_real(model: str, labels: np.ndarray, seed: int, pool=None):
    """Real images with exactly the class composition of ``labels`` (drawn without the FD reference)."""
    from . import data
    if pool is None:
        pool = data.mnist("train") if model == "mnist" else data.photo_crops(PHOTO_REAL_POOL, "train", seed=777)
    X, y = pool
    rng = np.random.default_rng(seed)
    idx = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        idx[where] = rng.choice(np.flatnonzero(y == c), size=len(where), replace=False)
    return X[idx], pool


def _reference(model: str):
    """The real set every FD is measured against (never used by ``_balanced_real``)."""
    from . import data
    if model == "mnist":
        return data.mnist("test")[0]
    return data.photo_crops(500, "train", seed=456)[0]


@torch.no_grad()
def target_entropy(gpt, cond: torch.Tensor, tokens: torch.Tensor, cfg_scale: float, temperature: float,
                   top_k: int, top_p: float, batch: int = 64) -> float:
    """Mean entropy (nats) of the target rows ``P`` along ``tokens [B, N]``: the law each token was drawn from."""
    from .reference.target import combine_logits, target_probs
    tot, n = 0.0, 0
    for i in range(0, tokens.shape[0], batch):
        t, c = tokens[i:i + batch], cond[i:i + batch]
        lc = gpt.forward_train(c, t).float()
        lu = gpt.forward_train(gpt.null_condition(len(c)), t).float() if cfg_scale != 1.0 else None
        s = torch.full((len(c),), float(cfg_scale))
        p = target_probs(combine_logits(lc, lu, s if lu is not None else None), temperature, top_k, top_p)
        p = p.double()
        tot += float(-(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum())
        n += t.numel()
    return tot / n


def _mean_std(xs) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def run(model: str = "mnist", *, per_class: int = 2, seeds: int = 3, window: int = 16, cfg_scale: float = 3.0,
        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, methods=None, permutations: int = 500,
        out: Path | str = "demo_out", json_path=None, backend: str = "auto", log=print) -> dict:
    """Run the demo; returns the result dictionary that ``--json`` writes."""
    from .decoding import available_methods, generate
    from .models import bundled

    from .ops import SJDInputError
    t_all = time.perf_counter()
    if per_class > real_per_class(model):       # the real row draws per_class images of each class
        raise SJDInputError(f"per_class must be at most {real_per_class(model)} (the real {model} images per class "
                            f"the real row is drawn from), got {per_class}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b = bundled.load(model)
    N, V = b.tokens_per_image, b.tokenizer.num_codes
    avail = available_methods()
    if methods is None:
        methods = list(avail)
    methods = [m for m in methods if m != "ar"]
    labels = np.repeat(np.arange(b.num_classes), per_class)
    cond = torch.as_tensor(labels, dtype=torch.int64)
    B = len(labels)
    gen_kw = dict(window=window, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                  backend=backend, progress=False)
    reference = _reference(model)
    info = b.manifest.get("info", {})
    log(f"model {model}: {N} tokens/image, {V} codes, {b.num_classes} classes, GPT "
        f"{info.get('gpt', {}).get('parameters', '?')} parameters; batch {B} ({per_class} per class) x {seeds} "
        f"seeds, window {window}, cfg {cfg_scale}, T {temperature}, top-k {top_k}, top-p {top_p}")
    log(f"methods available: {', '.join(avail)}")

    models = {}

    def model_for(method):
        # sjd2 runs its fine-tuned GPT (which carries the SJD2 parameters); every other method the base
        if method not in models:
            if method == "sjd2":
                from .sjd2.checkpoint import load_finetuned
                models[method] = load_finetuned(model)[0]
            else:
                models[method] = b.gpt
        return models[method]

    def gen(method, seed):
        sig = inspect.signature(generate).parameters
        kw = {k: v for k, v in gen_kw.items() if k in sig}
        return generate(model_for(method), cond, N, method=method, seed=seed, **kw)

    results, samples, skipped = {}, {}, {}
    try:
        from .decoding.methods import PENDING
        skipped.update({m: why for m, why in PENDING.items() if m not in avail})
    except ImportError:
        pass
    # AR: the baseline row, and an independent AR sample (other seeds) for the two-sample tests
    order = ["ar"] + methods
    ar_ref = [gen("ar", 1_000 + s).tokens for s in range(seeds)]
    for method in order:
        runs = []
        try:
            for s in range(seeds):
                runs.append(gen(method, s))
        except Exception as e:  # one method failing must not hide the others; the reason is printed
            skipped[method] = f"{type(e).__name__}: {e}"
            log(f"{method}: skipped ({skipped[method]})")
            continue
        toks = torch.cat([r.tokens for r in runs])
        imgs = [b.tokenizer.decode(r.tokens).numpy() for r in runs]
        q = [b.quality.evaluate(im, labels, reference) for im in imgs]
        acc, fd = _mean_std([x["accuracy"] for x in q]), _mean_std([x["fd"] for x in q])
        stat, p = two_sample_test(toks.numpy(), torch.cat(ar_ref).numpy(), np.tile(labels, seeds), V,
                                  permutations=permutations, seed=17)
        nfe = _mean_std([r.stats.nfe for r in runs])
        wall = _mean_std([r.stats.wall_s for r in runs])
        results[method] = {
            "nfe": nfe[0], "nfe_std": nfe[1], "nfe_prefill": runs[0].stats.nfe_prefill,
            "step_compression": N / nfe[0], "wall_s": wall[0], "wall_s_std": wall[1],
            "quality": {"accuracy": acc[0], "accuracy_std": acc[1], "fd": fd[0], "fd_std": fd[1], "n": B},
            "entropy": target_entropy(model_for(method), cond.repeat(seeds), toks, cfg_scale, temperature, top_k, top_p),
            "two_sample_vs_ar": {"statistic": stat, "p_value": p, "permutations": permutations,
                                 "n": int(toks.shape[0])},
            "zero_mass_residuals": int(sum(r.stats.zero_mass_residuals for r in runs)),
        }
        samples[method] = imgs[0]
        log(f"{method}: NFE {nfe[0]:.1f}, {wall[0]:.2f} s per batch")
    ar = results["ar"]
    for r in results.values():
        r["speedup_nfe_vs_ar"] = ar["nfe"] / r["nfe"]
        r["speedup_wall_vs_ar"] = ar["wall_s"] / r["wall_s"]

    pool = None
    real_q, real_imgs = [], None
    for s in range(seeds):
        real, pool = _balanced_real(model, labels, 10 + s, pool)
        real_imgs = real if real_imgs is None else real_imgs
        real_q.append(b.quality.evaluate(real, labels, reference))
    ra, rf = _mean_std([x["accuracy"] for x in real_q]), _mean_std([x["fd"] for x in real_q])
    real_row = {"accuracy": ra[0], "accuracy_std": ra[1], "fd": rf[0], "fd_std": rf[1], "n": B}

    grid = {"real": real_imgs, **{m: samples[m] for m in results}}
    png = out / f"demo_{model}.png"
    save_grid(png, grid, f"{model}: rows = methods (seed 0), columns = classes {per_class}x; "
                         f"window {window}, cfg {cfg_scale}")

    hdr = (f"{'method':<14}{'NFE':>7}{'compress':>9}{'vs AR':>7}{'wall s':>8}{'speed-up':>9}"
           f"{'acc':>13}{'FD':>15}{'H nats':>8}{'p(=AR)':>8}")
    lines = [hdr, "-" * len(hdr)]
    for m, r in results.items():
        qd = r["quality"]
        lines.append(f"{m:<14}{r['nfe']:>7.1f}{r['step_compression']:>8.2f}x{r['speedup_nfe_vs_ar']:>6.2f}x"
                     f"{r['wall_s']:>8.2f}{r['speedup_wall_vs_ar']:>8.2f}x"
                     f"{qd['accuracy']:>7.3f}±{qd['accuracy_std']:.3f}{qd['fd']:>9.1f}±{qd['fd_std']:<5.1f}"
                     f"{r['entropy']:>8.3f}{r['two_sample_vs_ar']['p_value']:>8.3f}")
    lines.append(f"{'real images':<14}{'':>7}{'':>9}{'':>7}{'':>8}{'':>9}"
                 f"{real_row['accuracy']:>7.3f}±{real_row['accuracy_std']:.3f}{real_row['fd']:>9.1f}"
                 f"±{real_row['fd_std']:<5.1f}")
    table = "\n".join(lines)
    log(table)
    log(f"acc/FD: bundled classifier (sjd_kernels.quality), mean ± std over {seeds} seeds of {B} images; "
        f"FD against {len(reference)} real images. p(=AR): stratified permutation test of the tokens "
        f"({seeds * B} per method) against an independent AR sample; ar's own row is a calibration check.")
    log("wall s / speed-up: CPU times of a small model, where a step over a window (its forward and the op, "
        "on the CPU) costs several AR steps, so the methods can be slower than AR here; "
        "NFE and step compression carry over to a GPU, these times do not.")
    for m, why in skipped.items():
        log(f"not run: {m}: {why}")
    res = {"model": model, "tokens_per_image": N, "vocab": V, "batch": B, "seeds": seeds, "window": window,
           "cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p,
           "methods": results, "real": real_row, "skipped": skipped, "png": str(png),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
           "cpu_capability": cpu_capability(), "total_s": time.perf_counter() - t_all}
    (out / f"demo_{model}.txt").write_text(table + "\n")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    log(f"wrote {png}" + (f" and {json_path}" if json_path else "") + f"; total {res['total_s']:.0f} s")
    return res


# --------------------------------------------------------------------------- command-line checks
# Shared with the scripts under ``python/`` and ``benchmarks/``. Each takes ``error``, an argparse
# parser's ``error`` (it prints the usage and the message and exits with status 2), and calls it for
# the first setting that fails; the messages name the command-line flag. They load no model: they run
# before any expensive work.

def check_flags(error, checks) -> None:
    """``checks``: rows ``(flag, value, ok, what)``; the first row that is not ``ok`` is the usage error
    ``argument FLAG: must be WHAT, got VALUE``."""
    for flag, v, ok, what in checks:
        if not ok:
            error(f"argument {flag}: must be {what}, got {v}")


def at_least(lo: int, *flags) -> list:
    """``check_flags`` rows for ``(flag, value)`` pairs that must be ints >= ``lo`` (None: the default, fine)."""
    return [(flag, v, v is None or v >= lo, f"an int >= {lo}") for flag, v in flags]


def in_int64(*flags) -> list:
    """``check_flags`` rows for ``(flag, value)`` pairs that must fit in int64 (seeds)."""
    return [(flag, v, -2 ** 63 <= v < 2 ** 63, "an int that fits in int64") for flag, v in flags]


def model_manifest(error, model: str, flag: str = "--model") -> dict:
    """The bundled model's manifest (its config: vocabulary, classes, tokens), read without loading weights."""
    from .models import bundled
    try:
        return bundled.manifest(model)
    except bundled.BundledModelError as e:
        error(f"argument {flag}: {e}")


def check_device(error, text: str, flag: str = "--device") -> torch.device:
    """``cpu``, or ``cuda``/``cuda:N`` with that CUDA device visible to torch."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        error(f"argument {flag}: {text!r} is not a device: use cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        error(f"argument {flag}: {text!r}: this script runs on cpu or cuda[:N], not {dev.type}")
    if not torch.cuda.is_available():
        error(f"argument {flag}: {text!r}: no CUDA device is visible to torch {torch.__version__} "
              f"(torch.cuda.is_available() is False); use --device cpu")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        error(f"argument {flag}: {text!r}: only {n} CUDA device(s) visible (cuda:0 .. cuda:{n - 1})")
    return dev


def check_generation_args(error, model: str, *, methods=(), window: int = 16, cfg: float = 3.0,
                          temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, backend: str = "auto",
                          device="cpu", method_flag: str = "--methods", manifest: dict | None = None) -> None:
    """``generate``'s checks of these settings (``sjd_kernels.decoding.loop``), made before any model is
    loaded: methods this build offers (``sjd2`` only with its bundled fine-tune), window >= 0 (and, for
    ``pac``, at least its default tree depth, ``decoding.pac.check_tree_options``), a finite CFG scale,
    the temperature range, top-k in [0, V] with V the model's vocabulary, top-p in (0, 1], a backend
    that can run on ``device`` (``sjd_kernels.backends()``)."""
    from .decoding import available_methods
    from .models import bundled
    from .ops import SJDInputError
    from .ops._common import check_sampling, resolve_backend
    avail = available_methods()
    for m in methods:
        if m not in avail:
            error(f"argument {method_flag}: {m!r} is not a decoding method of this build; choose from "
                  f"{', '.join(avail)}")
        if m == "sjd2":
            from .sjd2.checkpoint import manifest as sjd2_manifest
            try:
                sjd2_manifest(model)
            except bundled.BundledModelError as e:
                error(f"argument {method_flag}: 'sjd2' runs the SJD2 fine-tune of the {model} model, which "
                      f"cannot be used here ({e})")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        error(f"argument --window: must be an int >= 0 (drafts per step; 0 = AR), got {window!r}")
    if not math.isfinite(cfg):
        error(f"argument --cfg: the guidance scale must be a finite number, got {cfg!r}")
    man = manifest if manifest is not None else model_manifest(error, model)
    if "pac" in methods:
        from .decoding.pac import window_problem
        why = window_problem(window, int(man["gpt"]["max_image_tokens"]))   # the window used is cut to the image
        if why:
            error(f"argument --window: {why}")
    try:
        check_sampling(temperature, top_k, top_p, int(man["gpt"]["vocab_size"]))
    except SJDInputError as e:      # the message starts with the argument: temperature, top_k or top_p
        error(f"argument --{str(e).split(' ', 1)[0].replace('_', '-')}: {e} ({model} model)")
    if backend not in BACKEND_NAMES:
        error(f"argument --backend: invalid choice {backend!r} (choose from {', '.join(BACKEND_NAMES)})")
    dev = torch.device(device)
    try:
        resolve_backend(backend, dev)
    except (SJDInputError, RuntimeError) as e:
        error(f"argument --backend: {backend!r} cannot run on {dev} here: {e}")


def check_output_dir(error, flag: str, path) -> Path:
    """Check, creating nothing, that the folder ``path`` is one or can be made (its nearest existing
    ancestor is a writable folder); exit naming ``flag`` otherwise. ``make_output_dir`` makes it."""
    path = Path(path)
    q = path
    while not q.exists() and not q.is_symlink() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        error(f"argument {flag}: {q} exists and is not a folder")
    if not os.access(q, os.W_OK | os.X_OK):
        error(f"argument {flag}: the folder {q} is not writable")
    return path


def check_output_file(error, flag: str, path) -> Path:
    """Check, creating nothing, that the file ``path`` can be written once its folder is made."""
    path = Path(path)
    if path.is_dir():
        error(f"argument {flag}: {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        error(f"argument {flag}: {path} exists and is not writable")
    check_output_dir(error, flag, path.parent)
    return path


def make_output_dir(error, flag: str, path) -> Path:
    """Make the folder ``path`` with its parents (after the checks, before the work)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error(f"argument {flag}: cannot make the folder {path}: {e.strerror or e}")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sjd_kernels.demo",
                                 description="Every decoding method on a bundled model: PNG grid and table.")
    ap.add_argument("--model", choices=("mnist", "photo"), default="mnist")
    ap.add_argument("--out", default="demo_out", help="directory for the PNG grid and the table")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--per-class", type=int, default=2, help="images per class in the batch")
    ap.add_argument("--seeds", type=int, default=3, help="batches (seeds) per method, for the spread")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--methods", default=None, help="comma list (default: every method generate offers)")
    ap.add_argument("--permutations", type=int, default=500)
    ap.add_argument("--backend", default="auto", help=f"one of {', '.join(BACKEND_NAMES)}")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    # every check before any work (a mistake must not cost a run of minutes): exit 2 with the flag named
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else None
    check_flags(ap.error, at_least(1, ("--per-class", a.per_class), ("--seeds", a.seeds),
                                   ("--permutations", a.permutations), ("--threads", a.threads)))
    most = real_per_class(a.model)
    check_flags(ap.error, [("--per-class", a.per_class, a.per_class <= most,
                            f"at most {most} (the real {a.model} images per class the real row is drawn from)")])
    check_generation_args(ap.error, a.model, methods=methods or (), window=a.window, cfg=a.cfg,
                          temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, backend=a.backend, device="cpu")
    check_output_dir(ap.error, "--out", a.out)
    if a.json:
        check_output_file(ap.error, "--json", a.json)
    make_output_dir(ap.error, "--out", a.out)
    if a.json:
        make_output_dir(ap.error, "--json", Path(a.json).parent)
    torch.set_num_threads(a.threads)
    run(a.model, per_class=a.per_class, seeds=a.seeds, window=a.window, cfg_scale=a.cfg,
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, methods=methods, permutations=a.permutations,
        out=a.out, json_path=a.json, backend=a.backend)


if __name__ == "__main__":
    main()
