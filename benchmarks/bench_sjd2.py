#!/usr/bin/env python
"""SJD2 on a bundled model: step compression and image quality next to AR, several seeds.

    PYTHONPATH=. python benchmarks/bench_sjd2.py --model mnist --images 64 --seeds 0 1 2

For the SJD2 fine-tune of the model (``python/finetune_sjd2.py``) it decodes the same classes
with AR (window 0), SJD (0 levels, same weights) and SJD2 for every configuration of
``--configs`` (``K:W:kv``), and reports per method the mean and spread over seeds of the step
compression (image tokens / forwards, prefill excluded) and of the quality measures of
``sjd_kernels.quality`` (class accuracy, Frechet distance of the classifier features against
the real held-out images). The base model decoded with AR is the quality reference.
Rows go to ``<--out>/sjd2_<model>.jsonl`` (``--out`` defaults to ``benchmarks/results``; the file is
replaced, so it holds one run, as its rows' ``command`` and ``commit`` say) and a table to stdout.
``--images`` is at most the held-out set (500 MNIST images, 4000 photo crops): the FD real floor
compares as many real images as generated ones.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sjd_kernels import data  # noqa: E402
from sjd_kernels.bench.timing import cpu_capability, git_commit  # noqa: E402
from sjd_kernels.demo import at_least, check_flags, check_generation_args, check_output_file  # noqa: E402
from sjd_kernels.models import bundled  # noqa: E402
from sjd_kernels.sjd2 import checkpoint  # noqa: E402
from sjd_kernels.sjd2.decode import KV_POLICIES, generate_sjd2  # noqa: E402
from sjd_kernels.sjd2.noise import SJD2Embedding  # noqa: E402


def with_levels(sjd2: SJD2Embedding, levels: int) -> SJD2Embedding | None:
    """The fine-tune's SJD2 embedding, or None (SJD) for 0 levels; other K must match the fine-tune."""
    if levels == 0:
        return None
    if levels != sjd2.levels:
        raise SystemExit(f"the fine-tune has K = {sjd2.levels} levels, a config asks for {levels}")
    return sjd2


def run(gpt, sjd2, vq, quality, real_ref, real_same, classes, seed, *, levels, window, kv, cfg_scale, top_k,
        temperature, batch):
    T = vq.tokens_per_image
    toks, steps, t0, noisy_kv, refed = [], [], time.time(), 0, 0
    for i in range(0, len(classes), batch):
        c = classes[i:i + batch]
        seeds = [seed * 1_000_003 + i + j for j in range(len(c))]
        res = generate_sjd2(gpt, c, T, sjd2=with_levels(sjd2, levels) if sjd2 is not None else None,
                            window=window, seed=seeds, cfg_scale=cfg_scale, top_k=top_k, temperature=temperature,
                            kv=kv).stats.sjd2
        toks.append(res.tokens)
        steps.append(res.steps)
        noisy_kv += int(res.noisy_kv.sum())
        refed += int(res.refed.sum())
    tokens = torch.cat(toks)
    steps = torch.cat(steps).double()
    images = vq.decode(tokens).numpy()
    q = quality.evaluate(images, classes.numpy(), real_ref, real=real_same)
    return {"step_compression": float(T / steps.mean()), "steps_mean": float(steps.mean()),
            "accuracy": q["accuracy"], "fd": q["fd"], "fd_real": q.get("fd_real"), "n": q["n"],
            "noisy_kv_tokens": noisy_kv, "refed_tokens": refed, "wall_s": round(time.time() - t0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=bundled.MODELS, default="mnist")
    ap.add_argument("--images", type=int, default=64, help="images per seed (classes balanced)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=["8:16:keep"], help="SJD2 configs K:W:kv")
    ap.add_argument("--window", type=int, default=16, help="SJD's window")
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip: base_ar ar sjd")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    # every check before any work or output: a mistake exits 2 naming its flag
    check_flags(ap.error, at_least(1, ("--images", args.images), ("--batch", args.batch), ("--threads", args.threads)))
    if not math.isfinite(args.cfg_scale):
        ap.error(f"argument --cfg-scale: the guidance scale must be a finite number, got {args.cfg_scale}")
    check_generation_args(ap.error, args.model, window=args.window, temperature=args.temperature, top_k=args.top_k)
    try:
        levels = checkpoint.manifest(args.model)["schedule"]["levels"]
    except bundled.BundledModelError as e:
        ap.error(f"argument --model: SJD2 runs the fine-tune of the {args.model} model, which is not there ({e})")
    bad = [s for s in args.seeds if not abs(s) * 1_000_003 + args.images < 2 ** 63]
    if bad:
        ap.error(f"argument --seeds: {bad}: the per-image seeds (seed * 1000003 + image) must fit in int64")
    unknown = sorted(set(args.skip) - {"base_ar", "ar", "sjd"})
    if unknown:
        ap.error(f"argument --skip: unknown {', '.join(unknown)}; choose from base_ar, ar, sjd")
    configs = []
    for cfg in args.configs:
        try:
            K, W, kv = cfg.split(":")
            K, W = int(K), int(W)
        except ValueError:
            ap.error(f"argument --configs: {cfg!r} is not K:W:kv (e.g. 8:16:keep)")
        if K not in (0, levels) or W < 0 or kv not in KV_POLICIES:
            ap.error(f"argument --configs: {cfg!r}: K must be 0 (SJD) or the fine-tune's {levels} levels, W an int "
                     f">= 0, kv one of {', '.join(KV_POLICIES)}")
        configs.append((K, W, kv))
    rows_path = check_output_file(ap.error, "--out", args.out / f"sjd2_{args.model}.jsonl")
    Xte, _ = data.real_images(args.model, "test")
    if args.images > len(Xte):
        # the FD real floor compares as many held-out images as generated ones: there are no more
        ap.error(f"argument --images: at most {len(Xte)} (the held-out {args.model} images the FD real floor "
                 f"uses), got {args.images}")
    torch.set_num_threads(args.threads)
    command = "PYTHONPATH=. python benchmarks/bench_sjd2.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    commit = git_commit()
    base = bundled.load(args.model)
    gpt, sjd2 = checkpoint.load_finetuned(args.model)
    vq, quality = base.tokenizer, base.quality
    n_cls = base.num_classes
    classes = torch.arange(args.images) % n_cls
    real_same = Xte[np.random.default_rng(0).permutation(len(Xte))[:args.images]]
    methods = []
    if "base_ar" not in args.skip:
        methods.append(("base AR", base.gpt, None, dict(levels=0, window=0, kv="keep")))
    if "ar" not in args.skip:
        methods.append(("AR (fine-tuned)", gpt, None, dict(levels=0, window=0, kv="keep")))
    if "sjd" not in args.skip:
        methods.append((f"SJD W{args.window} (fine-tuned)", gpt, None, dict(levels=0, window=args.window, kv="keep")))
    for K, W, kv in configs:
        methods.append((f"SJD2 K{K} W{W} {kv}", gpt, sjd2, dict(levels=K, window=W, kv=kv)))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# {command}\n# commit {commit}, torch {torch.__version__}, {platform.platform()}, "
          f"{torch.get_num_threads()} threads, torch CPU kernels {cpu_capability()}")
    summary = []
    with open(rows_path, "w") as f:
        for name, model, emb, kw in methods:
            per_seed = []
            for seed in args.seeds:
                r = run(model, emb, vq, quality, Xte, real_same, classes, seed, cfg_scale=args.cfg_scale,
                        top_k=args.top_k, temperature=args.temperature, batch=args.batch, **kw)
                row = {"method": name, "seed": seed, **kw, "images": args.images, "cfg_scale": args.cfg_scale,
                       "top_k": args.top_k, "temperature": args.temperature, **r, "command": command,
                       "torch": torch.__version__, "cpu_capability": cpu_capability(), "commit": commit}
                f.write(json.dumps(row) + "\n")
                f.flush()
                per_seed.append(r)
                print(json.dumps(row), flush=True)
            agg = {k: (float(np.mean([r[k] for r in per_seed])), float(np.std([r[k] for r in per_seed])))
                   for k in ("step_compression", "accuracy", "fd", "fd_real")}
            summary.append((name, agg, sum(r["noisy_kv_tokens"] for r in per_seed),
                            sum(r["refed_tokens"] for r in per_seed)))
    print("\n| method | step compression | class accuracy | FD | FD real floor | noisy KV kept | re-fed |")
    print("|---|---|---|---|---|---|---|")
    for name, a, nk, rf in summary:
        print(f"| {name} | {a['step_compression'][0]:.2f} ± {a['step_compression'][1]:.2f} | "
              f"{a['accuracy'][0]:.3f} ± {a['accuracy'][1]:.3f} | {a['fd'][0]:.2f} ± {a['fd'][1]:.2f} | "
              f"{a['fd_real'][0]:.2f} | {nk} | {rf} |")
    print(f"\n(mean ± std over seeds {args.seeds}, {args.images} images per seed; rows in {rows_path})")


if __name__ == "__main__":
    main()
