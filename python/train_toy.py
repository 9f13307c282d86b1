#!/usr/bin/env python
"""Train a bundled model on CPU: VQ patch tokenizer, quality classifier, class-conditional GPT.

    PYTHONPATH=. python python/train_toy.py --model mnist     # MNIST digits, 196 tokens, 256 codes
    PYTHONPATH=. python python/train_toy.py --model photo     # photo crops, 256 tokens, 512 codes

Writes ``sjd_kernels/models/weights/<model>_{vq,quality,gpt}.safetensors`` and ``<model>.json``
(configs, SHA-256 of every file, the command, seed, timings, losses, round-trip errors, target
entropy, quality numbers), and logs to ``benchmarks/results/train_<model>.log``. Everything is
seeded; the data ships inside pip packages (see ``sjd_kernels.data``). ``--stages`` re-runs a
subset (vq, clf, gpt) reusing the other parts' files in ``--out`` (by default the committed ones).

The bundled MNIST GPT is the recipe run to its end rather than to the 20-minute box (which stopped it
at step 630 of 1600 on a busy machine; `benchmarks/results/cpu_retrain_probe_2026-12-01/`):

    PYTHONPATH=. python python/train_toy.py --model mnist --stages gpt --budget-minutes 0 --steps 1600 --threads 1

The GPT stage saves its training state every ``--checkpoint-minutes`` and on Ctrl-C / SIGTERM
(``sjd_kernels.models.resume``); the same command with ``--resume`` continues it (the stages before
it run again: they are seeded, and a digest of the training tokens checks that they gave the same
codes). A time-boxed run counts the training time of every session against its budget.
"""
from __future__ import annotations

import argparse
import contextlib
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sjd_kernels import data  # noqa: E402
from sjd_kernels.bench.timing import cpu_capability  # noqa: E402
from sjd_kernels.demo import at_least, check_flags, check_output_dir, check_output_file  # noqa: E402
from sjd_kernels.models import bundled, resume  # noqa: E402
from sjd_kernels.models.tokenizer import PatchVQ  # noqa: E402
from sjd_kernels.quality import train_classifier  # noqa: E402

# Per-model recipe. The GPT stage is time-boxed (budget_minutes): on 2 CPU cores shared with
# other jobs a step took from 0.4 s to 3 s depending on the hour. The photo classifier sees 80000
# images per epoch and reaches 99 % training accuracy by its third epoch, so it stops there
# (8 epochs took 17 minutes on a shared CPU and pushed the whole run past 30 minutes).
RECIPES = {
    "mnist": dict(num_codes=256, patch=2, num_classes=10, clf_epochs=8,
                  gpt=dict(n_layer=4, n_head=4, n_kv_head=4, d_model=128),
                  budget_minutes=20, steps=1600, batch=24, lr=3e-3, cond_lr_mult=5.0, warmup=50, weight_decay=0.05,
                  cfg_drop=0.1, train_crops=None),
    "photo": dict(num_codes=512, patch=2, num_classes=len(data.PHOTO_NAMES), clf_epochs=3,
                  gpt=dict(n_layer=4, n_head=4, n_kv_head=4, d_model=128),
                  budget_minutes=20, steps=1200, batch=24, lr=3e-3, cond_lr_mult=5.0, warmup=50,
                  weight_decay=0.05, cfg_drop=0.1, train_crops=40000),
}
STAGES = ("vq", "clf", "gpt")


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


def train_data(model: str, recipe: dict, seed: int):
    if model == "mnist":
        Xtr, ytr = data.mnist("train")
        Xte, yte = data.mnist("test")
    else:
        Xtr, ytr = data.photo_crops(recipe["train_crops"], "train", seed=seed)
        Xte, yte = data.photo_crops(1000, "test", seed=seed + 1)
    return Xtr, ytr, Xte, yte


def stage_vq(model, recipe, Xtr, Xte, seed, log):
    t = time.time()
    vq = PatchVQ.fit(Xtr, recipe["num_codes"], patch=recipe["patch"], seed=seed)
    info = {"fit_s": round(time.time() - t, 1), **vq.fit_info,
            "train": vq.roundtrip(Xtr), "test": vq.roundtrip(Xte)}
    # the same fit on raw patches, for comparison (on at most 4000 images, to keep it short)
    sub = Xtr[:4000]
    raw = PatchVQ.fit(sub, recipe["num_codes"], patch=recipe["patch"], seed=seed, dedup=False, n_init=1)
    info["raw_patch_fit_for_comparison"] = {"images": len(sub), "train": raw.roundtrip(sub)}
    log(f"vq: {vq.num_codes} codes of {vq.patch}x{vq.patch} patches, {vq.tokens_per_image} tokens/image, "
        f"fitted on {info['distinct_patches']} distinct of {info['all_patches']} patches in {info['fit_s']} s")
    log(f"vq round trip: train mse {info['train']['mse']:.5f} ({info['train']['psnr_db']:.2f} dB, "
        f"{info['train']['codes_used']} codes used), test mse {info['test']['mse']:.5f} "
        f"({info['test']['psnr_db']:.2f} dB, {info['test']['codes_used']} codes used)")
    r = info["raw_patch_fit_for_comparison"]["train"]
    log(f"vq fitted on raw (not de-duplicated) patches instead: {r['codes_used']} codes used, mse {r['mse']:.5f}")
    return vq, info


def stage_clf(model, recipe, vq, Xtr, ytr, Xte, yte, seed, log):
    t = time.time()
    Xr = vq.decode(vq.encode(Xtr)).numpy()
    q = train_classifier(np.concatenate([Xtr, Xr]), np.concatenate([ytr, ytr]), recipe["num_classes"],
                         epochs=recipe["clf_epochs"], seed=seed, log=log)
    info = {"train_s": round(time.time() - t, 1), "test_accuracy": q.accuracy(Xte, yte),
            "test_accuracy_vq_roundtrip": q.accuracy(vq.decode(vq.encode(Xte)), yte)}
    if model == "photo":
        Xf, yf = data.photo_crops(1000, "train", seed=seed + 1000)
        info["fresh_train_region_accuracy"] = q.accuracy(Xf, yf)
    log(f"classifier: {json.dumps(info)}")
    return q, info


def lr_at(step, progress, recipe):
    """Linear warm-up over ``warmup`` steps, then cosine from lr to lr/10 as ``progress`` goes 0 -> 1."""
    if step < recipe["warmup"]:
        return recipe["lr"] * (step + 1) / recipe["warmup"]
    p = min(1.0, max(0.0, progress))
    return recipe["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def eval_gpt(gpt, tokens, labels, batch=100):
    """Held-out cross-entropy and mean entropy of the model's target rows (conditional, T = 1)."""
    gpt.eval()
    ce, ent, n = 0.0, 0.0, 0
    for i in range(0, len(tokens), batch):
        x, c = tokens[i:i + batch], labels[i:i + batch]
        logits = gpt.forward_train(c, x).float()
        lp = logits.log_softmax(-1)
        ce += float(F.nll_loss(lp.reshape(-1, lp.shape[-1]), x.reshape(-1), reduction="sum"))
        ent += float(-(lp.exp() * lp).sum(-1).sum())
        n += x.numel()
    gpt.train()
    return ce / n, ent / n


def gpt_fingerprint(model, recipe, seed, budget_minutes, tok_tr, lab_tr) -> dict:
    """What the GPT stage's outcome depends on: a checkpoint of another run is not resumed."""
    return {"script": "train_toy", "model": model, "recipe": json.dumps(recipe, sort_keys=True), "seed": seed,
            "budget_minutes": float(budget_minutes),
            "training_data": None if tok_tr is None else resume.digest(tok_tr, lab_tr)}


def stage_gpt(model, recipe, vq, Xtr, ytr, Xte, yte, seed, log, budget_minutes, ckpt=None, resume_run=False):
    """Train the GPT. With ``budget_minutes`` the run is time-boxed: the cosine schedule follows
    elapsed time / budget and training stops when the budget is spent (the CPU is shared, so a
    fixed step count can take 3x longer from one hour to the next); the steps done are logged,
    and ``--steps N --budget-minutes 0`` repeats a run with a step-based schedule.

    ``ckpt`` (a ``resume.Checkpointer`` without its fingerprint, set here): the loop's state is saved
    at step boundaries when due and on a stop request (then ``resume.Interrupted``); ``resume_run``:
    continue from it (the training time already spent counts against the budget)."""
    from sjd_kernels.models.gpt import GPT, GPTConfig, drop_condition
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tok_tr, tok_te = vq.encode(Xtr), vq.encode(Xte)
    lab_tr, lab_te = torch.as_tensor(ytr), torch.as_tensor(yte)
    cfg = GPTConfig(vocab_size=vq.num_codes, max_image_tokens=vq.tokens_per_image,
                    num_classes=recipe["num_classes"], **recipe["gpt"])
    gpt = GPT(cfg)
    n_params = sum(p.numel() for p in gpt.parameters())
    log(f"gpt: {cfg}, {n_params} parameters; {len(tok_tr)} training sequences of {tok_tr.shape[1]} tokens")
    # The class embedding gets a larger learning rate: the class carries only log(10) nats per
    # image (~0.01 nats per token), so with the common rate a short run learns shapes but barely
    # uses the condition (measured: 450 steps at d 128 gave held-out CE 0.949 with the true
    # class vs 0.952 with a wrong one, and samples the classifier could not tell apart).
    cond = [p for n, p in gpt.named_parameters() if n.startswith(("cls_emb", "cond_proj", "null_cond"))]
    rest = [(n, p) for n, p in gpt.named_parameters() if not n.startswith(("cls_emb", "cond_proj", "null_cond"))]
    groups = [{"params": [p for n, p in rest if p.dim() >= 2], "weight_decay": recipe["weight_decay"], "mult": 1.0},
              {"params": [p for n, p in rest if p.dim() < 2], "weight_decay": 0.0, "mult": 1.0},
              {"params": cond, "weight_decay": 0.0, "mult": recipe.get("cond_lr_mult", 1.0)}]
    opt = torch.optim.AdamW(groups, lr=recipe["lr"], betas=(0.9, 0.95))
    perm, pi, ema = torch.randperm(len(tok_tr), generator=g), 0, None
    history = []
    step, progress, spent, lv = 0, 0.0, 0.0, float("nan")
    if ckpt is not None:
        ckpt.fingerprint = gpt_fingerprint(model, recipe, seed, budget_minutes, tok_tr, lab_tr)
        if resume_run:
            st = ckpt.load()
            gpt.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            g.set_state(st["generator"])
            torch.set_rng_state(st["torch_rng"])
            perm, pi, step, ema, lv = st["perm"], st["pi"], st["step"], st["ema"], st["loss"]
            history, spent = st["history"], st["train_s"]
            log(f"resumed from {ckpt.path}: step {step}, {spent:.0f} s of training done")
    t0 = time.time() - spent

    def state():
        return {"model": gpt.state_dict(), "optimizer": opt.state_dict(), "generator": g.get_state(),
                "torch_rng": torch.get_rng_state(), "perm": perm, "pi": pi, "step": step, "ema": ema,
                "loss": lv, "history": history, "train_s": time.time() - t0}

    with ckpt.signals() if ckpt is not None else contextlib.nullcontext():   # only the loop: see resume.py
        while True:
            if ckpt is not None:
                ckpt.boundary(step, state)
            el = time.time() - t0
            progress = el / (budget_minutes * 60) if budget_minutes else step / recipe["steps"]
            if progress >= 1.0 and step > 0:    # at least one step: a budget spent before the first one (a tiny
                break                           # --budget-minutes) used to end in an UnboundLocalError, nothing saved
            if pi + recipe["batch"] > len(perm):
                perm, pi = torch.randperm(len(tok_tr), generator=g), 0
            idx = perm[pi:pi + recipe["batch"]]
            pi += recipe["batch"]
            x = tok_tr[idx]
            c = drop_condition(lab_tr[idx], recipe["cfg_drop"], recipe["num_classes"], generator=g)
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, progress, recipe) * grp["mult"]
            logits = gpt.forward_train(c, x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x.reshape(-1))
            if not math.isfinite(float(loss.detach())):
                log(f"step {step}: the loss is {float(loss.detach())}: training diverged; nothing was saved")
                raise SystemExit(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
            opt.step()
            lv = float(loss.detach())
            ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            if step % 25 == 0:
                el = time.time() - t0
                log(f"step {step:5d} loss {lv:.4f} ema {ema:.4f} lr {lr_at(step, progress, recipe):.2e} "
                    f"progress {progress:.3f} {el:.0f} s ({el / (step + 1):.2f} s/step)")
                history.append([step, round(lv, 4), round(ema, 4), round(el, 1)])
            step += 1
    step -= 1
    train_s = time.time() - t0
    log(f"step {step:5d} loss {lv:.4f} ema {ema:.4f}: stopped ({'time budget' if budget_minutes else 'steps'} done)")
    te_ce, te_ent = eval_gpt(gpt, tok_te, lab_te)
    sub = torch.randperm(len(tok_tr), generator=torch.Generator().manual_seed(seed))[:len(tok_te)]
    tr_ce, tr_ent = eval_gpt(gpt, tok_tr[sub], lab_tr[sub])
    te_ce_wrong, _ = eval_gpt(gpt, tok_te, (lab_te + 1) % recipe["num_classes"])
    info = {"config": {k: getattr(cfg, k) for k in vars(cfg)} if hasattr(cfg, "__dict__") else str(cfg),
            "parameters": n_params, "steps_done": step + 1, "train_s": round(train_s, 1),
            "final_train_loss_ema": round(ema, 4), "train_subset_ce": round(tr_ce, 4),
            "test_ce": round(te_ce, 4),
            "test_ce_wrong_class": round(te_ce_wrong, 4), "mean_target_entropy_nats": round(te_ent, 4), "history": history}
    log(f"gpt trained {step + 1} steps in {train_s:.0f} s: train ce {tr_ce:.4f}, held-out ce {te_ce:.4f} "
        f"(with a wrong class {te_ce_wrong:.4f}), "
        f"mean target entropy (held-out prefixes, conditional, T=1) {te_ent:.4f} nats/token")
    return gpt, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(RECIPES), default="mnist", help="which recipe and data set")
    ap.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    ap.add_argument("--stages", default="vq,clf,gpt", help="comma list of vq, clf, gpt (default: all; the parts "
                    "left out are loaded from --out)")
    ap.add_argument("--steps", type=int, default=None, help="GPT steps for a step-based schedule (with "
                    "--budget-minutes 0; default: the recipe's, " + ", ".join(f"{k} {r['steps']}" for k, r in
                                                                            sorted(RECIPES.items())) + ")")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="time-box the GPT stage (default: the recipe's; 0 = run --steps steps)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--out", type=Path, default=bundled.WEIGHTS_DIR,
                    help="folder of the model's files (default: the bundled weights)")
    ap.add_argument("--log", type=Path, default=None, help="log file (default: benchmarks/results/train_<model>.log)")
    resume.add_flags(ap, "train_toy", "the GPT stage")
    args = ap.parse_args(argv)
    # every check before any work or output: a mistake exits 2 naming its flag
    stages = set(s.strip() for s in args.stages.split(",") if s.strip())
    if not stages or not stages <= set(STAGES):
        ap.error(f"argument --stages: {args.stages!r}: give a comma list of {', '.join(STAGES)}")
    budget = args.budget_minutes
    check_flags(ap.error, at_least(1, ("--threads", args.threads), ("--steps", args.steps)) + [
        ("--seed", args.seed, 0 <= args.seed < 2 ** 32, "an int in [0, 2**32) (k-means' seed)"),
        ("--budget-minutes", budget, budget is None or (math.isfinite(budget) and budget >= 0),
         "a finite number >= 0 (0 = run --steps steps)")])
    if args.steps is not None and budget != 0:
        ap.error("argument --steps: the step-based schedule needs --budget-minutes 0 (otherwise the time budget "
                 "ends the GPT stage)")
    if "gpt" not in stages and (args.steps is not None or budget is not None):
        ap.error("argument --steps/--budget-minutes: they set the gpt stage, which --stages leaves out")
    ckpt_path = resume.check_flags(ap.error, args, "train_toy", trains="gpt" in stages)
    if "vq" in stages and "gpt" not in stages:
        ap.error("argument --stages: a new tokenizer (vq) gives new image codes, and the GPT in --out was trained "
                 "on the old ones: add gpt (and clf, whose round-trip images come from the tokenizer)")
    log_path = args.log or ROOT / "benchmarks" / "results" / f"train_{args.model}.log"
    check_output_dir(ap.error, "--out", args.out)
    check_output_file(ap.error, "--log", log_path)
    try:                                    # the stages left out reuse the files in --out
        vq = None if "vq" in stages else bundled.load_tokenizer(args.model, args.out)
        q = None if "clf" in stages else bundled.load_quality(args.model, args.out)
    except bundled.BundledModelError as e:
        ap.error(f"argument --stages: the stages left out are loaded from --out, which cannot be: {e}")
    torch.set_num_threads(args.threads)
    recipe = dict(RECIPES[args.model])
    if args.steps is not None:
        recipe["steps"] = args.steps
    if budget is not None:                  # the recipe recorded in the manifest is the one that ran
        recipe["budget_minutes"] = budget
    if args.resume:                         # the settings now, before the stages that come first run again
        known = gpt_fingerprint(args.model, recipe, args.seed, recipe["budget_minutes"], None, None)
        known.pop("training_data")
        try:
            resume.Checkpointer(ckpt_path, known).load(only=known)
        except resume.ResumeError as e:
            ap.error(f"argument --resume: {e}")
    log = Log(log_path, append=args.resume)             # a resumed run continues the interrupted log
    command = "PYTHONPATH=. python python/train_toy.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    log(f"command: {command}")
    log(f"torch {torch.__version__}, numpy {np.__version__}, {platform.platform()}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, torch CPU kernels "
        f"{cpu_capability()}; seed {args.seed}; recipe {json.dumps(recipe)}")
    t_all = time.time()
    Xtr, ytr, Xte, yte = train_data(args.model, recipe, args.seed)
    log(f"data: train {Xtr.shape}, test {Xte.shape}")
    prev = bundled.manifest(args.model, args.out) if (args.out / f"{args.model}.json").exists() else {}
    info = {k: prev.get("info", {}).get(k) for k in ("vq", "quality", "gpt")}

    if "vq" in stages:
        vq, info["vq"] = stage_vq(args.model, recipe, Xtr, Xte, args.seed, log)
    if "clf" in stages:
        q, info["quality"] = stage_clf(args.model, recipe, vq, Xtr, ytr, Xte, yte, args.seed, log)
    gpt = None
    if "gpt" in stages:
        budget = recipe["budget_minutes"]
        ckpt = resume.Checkpointer(ckpt_path, {}, every_s=args.checkpoint_minutes * 60)
        with resume.exits(log):
            gpt, info["gpt"] = stage_gpt(args.model, recipe, vq, Xtr, ytr, Xte, yte, args.seed, log, budget,
                                         ckpt=ckpt, resume_run=args.resume)
        info["gpt"]["budget_minutes"] = budget

    man = bundled.save(args.model, out=args.out, tokenizer=vq, quality=q, gpt=gpt, info=info,
                       training={"command": command, "seed": args.seed, "stages": sorted(stages),
                                 "recipe": recipe, "total_s": round(time.time() - t_all, 1),
                                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "resumed": bool(args.resume)})
    log(f"wrote {args.out}/{args.model}.json: " + ", ".join(f"{k} {v['file']} sha256 {v['sha256'][:12]}"
                                                              for k, v in man["files"].items()))
    if gpt is not None:
        resume.finish(ckpt_path, log)
    log(f"total {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
