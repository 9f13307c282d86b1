#!/usr/bin/env python
"""Two-sample check of one method's tokens against AR's on a bundled model (larger n than the demo).

    PYTHONPATH=. python benchmarks/two_sample_check.py --model photo --method coupling --n 400 \\
        --ar-seed 4242 --seed 31337

Generates ``n`` class-balanced images with AR (seed ``--ar-seed``) and with ``--method`` (seed
``--seed``), window ``--window`` (default 16), guidance scale ``--cfg`` (default 3), and prints the
demo's stratified permutation test (``sjd_kernels.demo.two_sample_test``, 1000 permutations) and
the zero-mass counters.
"""
import argparse
import sys

import torch

from sjd_kernels.decoding import generate
from sjd_kernels.demo import at_least, check_flags, check_generation_args, in_int64, model_manifest, two_sample_test
from sjd_kernels.models import bundled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="photo")
    ap.add_argument("--method", default="coupling")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--ar-seed", type=int, default=4242)
    ap.add_argument("--seed", type=int, default=31337)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    # every check before any generation: a mistake exits 2 naming its flag
    check_flags(ap.error, at_least(1, ("--n", args.n), ("--threads", args.threads))
                + in_int64(("--ar-seed", args.ar_seed), ("--seed", args.seed)))
    if args.method == "sjd2":
        ap.error("argument --method: 'sjd2' samples the SJD2 fine-tune, not the base model AR samples here")
    man = model_manifest(ap.error, args.model)
    check_generation_args(ap.error, args.model, methods=(args.method,), method_flag="--method", window=args.window,
                          cfg=args.cfg, manifest=man)
    torch.set_num_threads(args.threads)
    m = bundled.load(args.model)
    classes = torch.arange(args.n) % m.num_classes
    a = generate(m.gpt, classes, m.tokens_per_image, method="ar", seed=args.ar_seed, cfg_scale=args.cfg,
                 progress=False)
    b = generate(m.gpt, classes, m.tokens_per_image, method=args.method, window=args.window, seed=args.seed,
                 cfg_scale=args.cfg, progress=False)
    stat, p = two_sample_test(b.tokens.numpy(), a.tokens.numpy(), classes.numpy(), m.tokenizer.num_codes,
                              permutations=1000)
    print(f"{args.model} {args.method} vs ar, n={args.n}: statistic {stat:.1f}, p {p:.3f}; zero-mass residuals "
          f"{b.stats.zero_mass_residuals}, coupling {b.stats.zero_mass_coupling}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
