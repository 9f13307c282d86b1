"""The main demo: every decoding method on a bundled model, on CPU, in a few minutes.

    python -m sjd_kernels.demo                     # MNIST model
    python -m sjd_kernels.demo --model photo --json demo.json --out demo_out

Generates the same class-conditioned batch (same classes, same per-request seeds) with every
method that ``sjd_kernels.decoding`` offers, saves a PNG grid (one labelled row per method and
seed 0), and prints one table row per method:

- ``NFE``: model forwards per batch after the prefill (a CFG pair counts once), mean over seeds;
  ``compress``: image tokens / NFE, and ``vs AR``: AR's NFE / the method's NFE.
- ``wall s``: generation time per batch (mean over seeds; CPU, reference op).
- ``acc`` and ``FD``: class accuracy and Frechet distance of the decoded images in the bundled
  classifier's feature space (``sjd_kernels.quality``), mean ± std over seeds; the ``real`` row
  gives the same numbers for real images at the same set size (the floor of FD).
- ``H``: mean entropy (nats) of the target rows the method sampled from, i.e. of the CFG-combined
  law at each position given the tokens before it, evaluated along the method's own samples.
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
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_METHODS = ("ar", "sjd", "sjd_vp", "coupling", "gumbel_jacobi", "pac", "sjd2")


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
    """PNG grid: one row of images ``[k, H, W]`` per label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rows)
    k = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(names), k, figsize=(0.8 * k + 1.4, 0.85 * len(names) + 0.5), squeeze=False)
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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
