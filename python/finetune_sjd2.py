#!/usr/bin/env python
"""Fine-tune a bundled model for SJD2 (next-clean-token prediction) on CPU.

    PYTHONPATH=. python python/finetune_sjd2.py --model mnist

Starts from the committed base model (``sjd_kernels/models/weights/<model>*``), adds the SJD2
parameters (level embedding; frozen normalisation statistics of the image-token embedding
rows), and trains on the base model's training images with segment-noised inputs and the
plain next-clean-token cross-entropy (``sjd_kernels.sjd2.train``). The level embedding gets
its own, larger learning rate. Writes ``<model>_sjd2.safetensors`` (every GPT tensor plus
``sjd2.*``) and ``<model>_sjd2.json`` (configs, schedule, SHA-256 of the weights and of the
base model's GPT file, command, seed, timings, losses) beside the base model, and logs to
``benchmarks/results/finetune_sjd2_<model>.log``. Load with ``sjd_kernels.sjd2.checkpoint.load_finetuned``.

The training state is saved every ``--checkpoint-minutes`` and on Ctrl-C / SIGTERM
(``sjd_kernels.models.resume``); the same command with ``--resume`` continues it. ``--max-minutes``
counts the training time of every session.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
from sjd_kernels.bench.timing import cpu_capability  # noqa: E402
from sjd_kernels.demo import (at_least, check_flags, check_output_dir, check_output_file, in_int64,  # noqa: E402
                              model_manifest)
from sjd_kernels.models import bundled, resume  # noqa: E402
from sjd_kernels.sjd2 import checkpoint  # noqa: E402
from sjd_kernels.sjd2.noise import EmbedNorm, NoiseSchedule, SJD2Embedding  # noqa: E402
from sjd_kernels.sjd2.train import next_clean_token_loss, param_groups, sample_levels_like  # noqa: E402


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


class Log:
    def __init__(self, path: Path, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a" if append else "w")
        self.t0 = time.time()

    def __call__(self, msg: str):
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def lr_scale(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def evaluate(gpt, sjd2, tokens, labels, level: int | None, g: torch.Generator, batch: int = 100) -> float:
    """Mean next-clean-token cross-entropy on ``tokens`` with every image input at ``level``
    (None: levels drawn as in training)."""
    gpt.eval()
    tot, n = 0.0, 0
    for i in range(0, len(tokens), batch):
        x, c = tokens[i:i + batch], labels[i:i + batch]
        lv = sample_levels_like(x, sjd2.levels, generator=g) if level is None else torch.full_like(x, level)
        logits = checkpoint.noisy_logits(gpt, sjd2, c, x, lv, generator=g)
        tot += float(next_clean_token_loss(logits, x)) * x.numel()
        n += x.numel()
    gpt.train()
    return tot / n


def finetune_fingerprint(args, base_man) -> dict:
    """What the fine-tune's outcome depends on (``training_data`` is added once the data are encoded): a
    saved state of another run is not resumed. Threads, time cap and output paths are left out."""
    keep = ("model", "levels", "s_min", "s_max", "rho", "max_segments", "p_rising", "steps", "batch", "lr", "new_lr",
            "warmup", "weight_decay", "cfg_drop", "seed")
    fp = {"script": "finetune_sjd2", **{k: getattr(args, k) for k in keep},
          "base_gpt_sha256": base_man.get("files", {}).get("gpt", {}).get("sha256")}
    return fp


def restore(ckpt, gpt, sjd2, opt, g) -> dict:
    """Load ``ckpt``'s state into the model, the SJD2 parameters, the optimiser and the generators;
    returns the loop state ``train_loop`` continues from."""
    st = ckpt.load()
    gpt.load_state_dict(st["model"])
    sjd2.load_state_dict(st["sjd2"])
    opt.load_state_dict(st["optimizer"])
    g.set_state(st["generator"])
    torch.set_rng_state(st["torch_rng"])
    return dict(perm=st["perm"], pi=st["pi"], step=st["step"], ema=st["ema"], loss=st["loss"],
                history=st["history"], spent=st["train_s"])


def train_loop(args, gpt, sjd2, opt, params, g, tok_tr, lab_tr, n_cls, log, ckpt, st) -> dict:
    """Steps ``st["step"]`` .. ``args.steps - 1`` (fewer when the time cap, counted over every session of
    the run, ends them), from the loop state ``st`` (data order, losses, training time so far). At each
    step boundary ``ckpt`` saves the state when due and stops the loop on a signal
    (``resume.Interrupted``). Returns the last step done, the training time and the loss history."""
    perm, pi, ema, lv_, history = st["perm"], st["pi"], st["ema"], st["loss"], st["history"]
    t0 = time.time() - st["spent"]
    step = st["step"]

    def state():
        return {"model": gpt.state_dict(), "sjd2": sjd2.state_dict(), "optimizer": opt.state_dict(),
                "generator": g.get_state(), "torch_rng": torch.get_rng_state(), "perm": perm, "pi": pi, "step": step,
                "ema": ema, "loss": lv_, "history": history, "train_s": time.time() - t0}

    last = step - 1
    for step in range(st["step"], args.steps):
        ckpt.boundary(step, state)
        if pi + args.batch > len(perm):
            perm, pi = torch.randperm(len(tok_tr), generator=g), 0
        idx = perm[pi:pi + args.batch]
        pi += args.batch
        x = tok_tr[idx]
        c = checkpoint.drop_condition(lab_tr[idx], args.cfg_drop, n_cls, generator=g)
        lv = sample_levels_like(x, args.levels, generator=g, max_segments=args.max_segments, p_rising=args.p_rising)
        s = lr_scale(step, args.steps, args.warmup)
        for grp in opt.param_groups:
            grp["lr"] = grp["base_lr"] * s
        loss = next_clean_token_loss(checkpoint.noisy_logits(gpt, sjd2, c, x, lv, generator=g), x)
        if not math.isfinite(float(loss.detach())):
            # a diverged run (e.g. a too large --lr / --new-lr) used to go on and save NaN weights, which
            # decoding then reported as a device error about non-finite logits
            log(f"step {step}: the loss is {float(loss.detach())}: training diverged; nothing was saved "
                f"(lower --lr / --new-lr)")
            raise SystemExit(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lv_ = float(loss.detach())
        ema = lv_ if ema is None else 0.98 * ema + 0.02 * lv_
        last = step
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t0
            left = min(el / (step + 1) * (args.steps - step - 1), max(0.0, args.max_minutes * 60 - el))
            log(f"step {step:5d}/{args.steps} loss {lv_:.4f} ema {ema:.4f} lr x{s:.3f} {el:.0f} s "
                f"({el / (step + 1):.2f} s/step, about {left:.0f} s left)")
            history.append([step, round(lv_, 4), round(ema, 4), round(el, 1)])
        if time.time() - t0 > args.max_minutes * 60:
            log(f"stopping at step {step}: time cap of {args.max_minutes} min reached")
            break
    return {"step": last, "train_s": time.time() - t0, "history": history}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", choices=bundled.MODELS, default="mnist", help="bundled base model to fine-tune")
    ap.add_argument("--levels", type=int, default=8, help="K: noise levels 1..K (0 = SJD)")
    ap.add_argument("--s-min", type=float, default=0.2, help="smallest noise std s_1 of the Karras schedule")
    ap.add_argument("--s-max", type=float, default=1.0, help="noise std s_K of the top level (1 = pure noise)")
    ap.add_argument("--rho", type=float, default=7.0, help="Karras exponent of the schedule")
    ap.add_argument("--max-segments", type=int, default=8, help="most noise segments per training sequence")
    ap.add_argument("--p-rising", type=float, default=0.5,
                    help="share of sequences with levels rising along the sequence (clean prefix, K at the end)")
    ap.add_argument("--steps", type=int, default=700, help="optimiser steps (fewer if --max-minutes ends them)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step (at most the training set's size)")
    ap.add_argument("--lr", type=float, default=3e-4, help="learning rate of the base model's weights")
    ap.add_argument("--new-lr", type=float, default=3e-3, help="learning rate of the new SJD2 parameters")
    ap.add_argument("--warmup", type=int, default=30, help="linear learning-rate warm-up steps, then cosine to 1/10")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of the base model's matrices")
    ap.add_argument("--cfg-drop", type=float, default=0.1, help="class-dropout rate (as the base model's training)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data order, noise and class dropout")
    ap.add_argument("--max-minutes", type=float, default=15.0,
                    help="cap on the training loop's time, checked after each step (the held-out evaluations "
                         "before and after it come on top)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=bundled.WEIGHTS_DIR,
                    help="folder of the fine-tune's files; it must hold the base model's <model>.json naming the "
                         "bundled GPT (the base weights are always read from the bundled folder)")
    ap.add_argument("--log", type=Path, default=None,
                    help="log file (None: benchmarks/results/finetune_sjd2_<model>.log)")
    resume.add_flags(ap, "finetune_sjd2")
    args = ap.parse_args(argv)
    # every check before any work or output: a mistake exits 2 naming its flag
    K, fin = args.levels, math.isfinite
    check_flags(ap.error, at_least(0, ("--levels", K), ("--warmup", args.warmup))
                + at_least(1, ("--max-segments", args.max_segments), ("--steps", args.steps), ("--batch", args.batch),
                           ("--threads", args.threads))
                + in_int64(("--seed", args.seed)) + [
        ("--s-max", args.s_max, fin(args.s_max) and (K == 0 or 0 < args.s_max <= 1), "in (0, 1]"),
        ("--s-min", args.s_min, fin(args.s_min) and (K == 0 or 0 < args.s_min <= args.s_max),
         f"in (0, --s-max = {args.s_max}]"),
        ("--rho", args.rho, fin(args.rho) and args.rho > 0, "a finite number > 0"),
        ("--p-rising", args.p_rising, 0 <= args.p_rising <= 1, "a probability in [0, 1]"),
        ("--lr", args.lr, fin(args.lr) and args.lr >= 0, "a finite number >= 0"),
        ("--new-lr", args.new_lr, fin(args.new_lr) and args.new_lr >= 0, "a finite number >= 0"),
        ("--weight-decay", args.weight_decay, fin(args.weight_decay) and args.weight_decay >= 0,
         "a finite number >= 0"),
        ("--cfg-drop", args.cfg_drop, 0 <= args.cfg_drop <= 1, "a probability in [0, 1]"),
        ("--max-minutes", args.max_minutes, fin(args.max_minutes) and args.max_minutes > 0, "a finite number > 0")])
    ckpt_path = resume.check_flags(ap.error, args, "finetune_sjd2")
    base_man = model_manifest(ap.error, args.model)     # the base model is there (its weights load later)
    log_path = args.log or ROOT / "benchmarks" / "results" / f"finetune_sjd2_{args.model}.log"
    check_output_dir(ap.error, "--out", args.out)
    try:                                                # checkpoint.save reads the base manifest in --out
        out_man = bundled.manifest(args.model, args.out)
    except bundled.BundledModelError as e:
        ap.error(f"argument --out: the fine-tune is written beside its base model's manifest: {e}")
    if out_man.get("files", {}).get("gpt") != base_man.get("files", {}).get("gpt"):
        ap.error(f"argument --out: its {args.model}.json names another base GPT than the bundled one this script "
                 f"fine-tunes (the fine-tune would record the wrong base checksum)")
    if out_man.get("gpt") != base_man.get("gpt"):      # checkpoint.save records (and refuses) that config
        ap.error(f"argument --out: its {args.model}.json gives another GPT config than the bundled base model's "
                 f"(the fine-tune is recorded with it and would not load)")
    check_output_file(ap.error, "--log", log_path)
    fingerprint = finetune_fingerprint(args, base_man)
    if args.resume:                                     # the settings, before the data and evaluations
        try:
            resume.Checkpointer(ckpt_path, fingerprint).load(only=[k for k in fingerprint if k != "training_data"])
        except resume.ResumeError as e:
            ap.error(f"argument --resume: {e}")
    Xtr, ytr = data.real_images(args.model, "train")   # before the log is opened: --batch is checked against it
    if args.batch > len(Xtr):                           # the sampler would silently take fewer sequences
        ap.error(f"argument --batch: {args.batch} exceeds the {len(Xtr)} training sequences of {args.model}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    log = Log(log_path, append=args.resume)             # a resumed run continues the interrupted run's log
    command = "PYTHONPATH=. python python/finetune_sjd2.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    log(f"command: {command}")
    log(f"torch {torch.__version__}, numpy {np.__version__}, {platform.platform()}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, torch CPU kernels "
        f"{cpu_capability()}; seed {args.seed}")

    base = bundled.load(args.model)
    gpt, vq = base.gpt, base.tokenizer
    gpt.train()
    Xte, yte = data.real_images(args.model, "test")
    tok_tr, tok_te = vq.encode(Xtr), vq.encode(Xte)
    lab_tr, lab_te = torch.as_tensor(ytr), torch.as_tensor(yte)
    n_cls = base.num_classes
    schedule = NoiseSchedule(levels=args.levels, s_min=args.s_min, s_max=args.s_max, rho=args.rho)
    sjd2 = SJD2Embedding(schedule, EmbedNorm.from_embedding(checkpoint.image_embedding(gpt)))
    log(f"base {args.model}: {sum(p.numel() for p in gpt.parameters())} parameters, {len(tok_tr)} training "
        f"sequences of {tok_tr.shape[1]} tokens; schedule {schedule.to_dict()}; s = "
        f"{[round(v, 4) for v in schedule.sigmas64().tolist()]}")

    ev_g = torch.Generator().manual_seed(args.seed + 1)
    before = {"clean": evaluate(gpt, sjd2, tok_te, lab_te, 0, ev_g),
              "segments": evaluate(gpt, sjd2, tok_te, lab_te, None, ev_g)}
    log(f"before: held-out ce clean {before['clean']:.4f}, segment-noised {before['segments']:.4f}")

    groups = param_groups(gpt, sjd2, args.lr, args.new_lr, args.weight_decay)
    for grp in groups:
        grp["base_lr"] = grp["lr"]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    params = [p for grp in groups for p in grp["params"]]
    fingerprint["training_data"] = resume.digest(tok_tr, lab_tr)
    ckpt = resume.Checkpointer(ckpt_path, fingerprint, every_s=args.checkpoint_minutes * 60)
    with resume.exits(log):
        if args.resume:
            loop_state = restore(ckpt, gpt, sjd2, opt, g)
            log(f"resumed from {ckpt_path}: step {loop_state['step']}, {loop_state['spent']:.0f} s of training "
                f"done")
        else:
            loop_state = dict(perm=torch.randperm(len(tok_tr), generator=g), pi=0, step=0, ema=None,
                              loss=float("nan"), history=[], spent=0.0)
        with ckpt.signals():                            # only the loop: a signal after it ends the run as usual
            done = train_loop(args, gpt, sjd2, opt, params, g, tok_tr, lab_tr, n_cls, log, ckpt, loop_state)
    train_s, history, step = done["train_s"], done["history"], done["step"]
    gpt.eval()
    ev_g = torch.Generator().manual_seed(args.seed + 1)
    after = {"clean": evaluate(gpt, sjd2, tok_te, lab_te, 0, ev_g),
             "segments": evaluate(gpt, sjd2, tok_te, lab_te, None, ev_g)}
    n_lv = min(200, len(tok_te))
    per_level = {k: round(evaluate(gpt, sjd2, tok_te[:n_lv], lab_te[:n_lv], k, ev_g), 4) for k in range(args.levels + 1)}
    log(f"after {step + 1} steps in {train_s:.0f} s: held-out ce clean {after['clean']:.4f} (base "
        f"{before['clean']:.4f}), segment-noised {after['segments']:.4f} (base {before['segments']:.4f})")
    log(f"held-out ce with every input at one level ({n_lv} images): {json.dumps(per_level)}")
    training = {"command": command, "seed": args.seed, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(args).items()},
                "steps_done": step + 1, "train_s": round(train_s, 1), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "history": history, "resumed": bool(args.resume),
                "heldout_ce": {"before": before, "after": after, "after_per_level": per_level}}
    man = checkpoint.save(args.model, gpt, sjd2, out=args.out, training=training)
    log(f"wrote {args.out}/{man['file']} sha256 {man['sha256'][:12]} ({man['bytes']} bytes) and "
        f"{args.model}_sjd2.json")
    resume.finish(ckpt_path, log)


if __name__ == "__main__":
    main()
