#!/usr/bin/env python
"""Generate images with one decoding method on a bundled model and save them as a PNG.

    PYTHONPATH=. python python/generate.py --model mnist --method coupling --classes 0 1 2 3 --out samples.png
    PYTHONPATH=. python python/generate.py --method gumbel_jacobi --classes 7 7 7 --with-ar   # + AR's row

Prints the forwards the batch needed (NFE), the step compression against AR (tokens / NFE), the
mean over requests of the tokens each committed per step and the wall time, and writes the images (one row per method, one
column per requested class) and, with ``--tokens``, the token ids as ``.npy``. ``--with-ar`` also
samples plain AR of the same model with the same seed (for ``sjd2``, AR of its fine-tune;
``ar_gumbel`` for the Gumbel methods, whose images are then token-identical to ``gumbel_jacobi``'s)
and adds its row: the lossless methods draw from AR's
law, so their images differ from AR's sample by chance only, except ``gumbel_jacobi``; with
``--method ar`` it adds nothing (that row is AR's). ``--out``'s extension picks the image format
(one matplotlib writes; none: ``.png`` is appended), ``--tokens`` gets ``.npy`` appended unless
its name ends with it, and the paths printed are the files written.
The sampling options are ``generate``'s (``--window``, ``--cfg``, ``--temperature``, ``--top-k``,
``--top-p``, ``--backend``, ``--beta`` for ``sjd_vp``/``coupling``). Runs on the CPU (the
``torch`` backend) or, with ``--device cuda``, on a GPU. Arguments are checked before the model
loads (exit 2 naming the flag); the folders of ``--out`` and ``--tokens`` are made then.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sjd_kernels.decoding import available_methods, generate  # noqa: E402
from sjd_kernels.demo import (BACKEND_NAMES, check_device, check_flags, check_generation_args,  # noqa: E402
                              check_output_file, in_int64, make_output_dir, model_manifest, save_grid)
from sjd_kernels.models import bundled  # noqa: E402

BETA_METHODS = ("sjd_vp", "coupling")       # the methods generate() takes a nonzero beta for


def image_path(error, flag: str, path: Path) -> Path:
    """The file ``save_grid`` (matplotlib, Agg) writes for ``path``: with no extension matplotlib adds
    ``.png``; an extension must name a format it writes here (``.pgf`` only with its TeX program;
    exit 2 naming ``flag`` otherwise)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    ext = os.path.splitext(str(path))[1][1:]
    if ext == "":
        return Path(str(path).rstrip(".") + ".png")
    formats = set(FigureCanvasAgg.get_supported_filetypes())
    tex = matplotlib.rcParams["pgf.texsystem"]
    if shutil.which(tex) is None:      # matplotlib writes .pgf through a TeX program: none here
        formats.discard("pgf")
    if ext.lower() not in formats:
        why = f"it needs {tex}, which is not installed" if ext.lower() == "pgf" else "matplotlib cannot write them"
        error(f"argument {flag}: no {ext!r} images ({path}): {why}; give a file name ending in one of "
              f"{', '.join('.' + f for f in sorted(formats))}, or none for .png")
    return path


def npy_path(path: Path) -> Path:
    """The file ``np.save`` writes for ``path``: ``.npy`` is appended unless the name ends with it."""
    return path if str(path).endswith(".npy") else Path(str(path) + ".npy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", choices=bundled.MODELS, default="mnist")
    ap.add_argument("--method", default="coupling", help=f"one of {', '.join(available_methods())}")
    ap.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="one image per class id")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1: no guidance)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=None, help="VP strength (sjd_vp, coupling)")
    ap.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--with-ar", action="store_true", help="also sample AR with the same seed and show its row")
    ap.add_argument("--out", type=Path, default=Path("samples.png"),
                    help="the image file; its extension picks the format (none: .png is appended)")
    ap.add_argument("--tokens", type=Path, default=None,
                    help="also save the token ids here (.npy, appended if the name does not end with it)")
    args = ap.parse_args(argv)

    # every check before the model loads: a mistake exits 2 naming its flag, never after a generation
    if args.method not in available_methods():
        ap.error(f"--method {args.method!r}: choose one of {', '.join(available_methods())}")
    device = check_device(ap.error, args.device)
    man = model_manifest(ap.error, args.model)
    num_classes = man["quality"]["num_classes"]
    if min(args.classes) < 0 or max(args.classes) >= num_classes:
        ap.error(f"--classes must lie in [0, {num_classes}) for the {args.model} model")
    check_generation_args(ap.error, args.model, methods=(args.method,), method_flag="--method", window=args.window,
                          cfg=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          backend=args.backend, device=device, manifest=man)
    check_flags(ap.error, in_int64(("--seed", args.seed)))
    if args.beta is not None:
        if not math.isfinite(args.beta):
            ap.error(f"argument --beta: must be a finite number, got {args.beta!r}")
        if args.beta != 0.0 and args.method not in BETA_METHODS:
            ap.error(f"argument --beta: beta (verification prediction) applies to {' and '.join(BETA_METHODS)}, "
                     f"not {args.method!r}")
    # the files that are really written (matplotlib and np.save add an extension), checked and printed;
    # a folder given as the file is refused as such, not turned into a sibling file 'folder.png'
    for flag, path in (("--out", args.out), ("--tokens", args.tokens)):
        if path is not None:
            check_output_file(ap.error, flag, path)
    args.out = image_path(ap.error, "--out", args.out)
    if args.tokens is not None:
        args.tokens = npy_path(args.tokens)
    outputs = [("--out", args.out)] + ([("--tokens", args.tokens)] if args.tokens is not None else [])
    for flag, path in outputs:
        check_output_file(ap.error, flag, path)
    for flag, path in outputs:                       # made only once every check passed
        make_output_dir(ap.error, flag, path.parent)

    b = bundled.load(args.model, device=args.device)
    gpt = b.gpt
    if args.method == "sjd2":
        from sjd_kernels.sjd2.checkpoint import load_finetuned
        gpt = load_finetuned(args.model)[0].to(args.device)
    cond = torch.tensor(args.classes, dtype=torch.int64, device=args.device)
    N = b.tokens_per_image
    kw = dict(window=args.window, cfg_scale=args.cfg, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, backend=args.backend, seed=args.seed)
    if args.beta is not None:
        kw["beta"] = args.beta

    rows, tokens = {}, {}
    runs = [(args.method, gpt)]
    if args.with_ar:
        ar = "ar_gumbel" if args.method.startswith("gumbel") else "ar"
        if ar == args.method:       # the method's own row is AR's: run it once
            print(f"--with-ar: --method {args.method} is AR itself; its row is not repeated")
        else:
            runs.append((ar, gpt))  # the model the method decodes: for sjd2 its fine-tune, whose AR law it keeps
    for method, model in runs:
        t0 = time.perf_counter()
        out = generate(model, cond, N, method=method, **(kw if method == args.method else
                                                         {k: v for k, v in kw.items() if k not in ("window", "beta")}))
        secs = time.perf_counter() - t0
        st = out.stats
        print(f"{method:14s} NFE {st.nfe:4d}  step compression {st.tokens_per_step:.2f}x  "
              f"tokens/step per request {st.mean_tokens_per_step:.2f}  wall {secs:.2f} s ({args.device})")
        toks = out.tokens[:, :N].cpu()
        tokens[method] = toks.numpy()
        rows[method] = b.tokenizer.decode(toks).numpy()
    if args.with_ar and len(runs) == 2 and np.array_equal(tokens[runs[0][0]], tokens[runs[1][0]]):
        print(f"{runs[0][0]} and {runs[1][0]} drew the same tokens")
    if args.tokens is not None:        # first: the ids are the run's result, the picture is a view of them
        np.save(args.tokens, tokens[args.method])
        print(f"wrote {args.tokens}")
    save_grid(args.out, rows, f"{args.model}: classes {args.classes}, seed {args.seed}, window {args.window}, "
                              f"cfg {args.cfg}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
