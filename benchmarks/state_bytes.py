"""Jacobi state memory, dense against sparse, at the SPEC section 8 shapes (no GPU needed).

    python benchmarks/state_bytes.py [--out benchmarks/results/state_bytes.md]
    python benchmarks/state_bytes.py --floors      # the HBM-floor table of benchmarks/NOTES.md

The numbers are ``JacobiState.state_bytes()`` of states allocated on the ``meta`` device with the
library's own ``JacobiState.create`` (so they follow the real layouts), and the minimal bytes one
``jacobi_step`` must move from ``bench`` (``bytes_min``: logits read once, law rows as the step
needs them). Sparse capacity: the family's top-k + 64 (room for ties at the threshold).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the checkout, when not installed

from sjd_kernels.bench.cases import Case, JacobiStepBench, _jacobi_params  # noqa: E402
from sjd_kernels.demo import check_output_file  # noqa: E402
from sjd_kernels.ops.jacobi_step import JacobiState  # noqa: E402

# (family, image codes V, top-k) of SPEC section 8
FAMILIES = [("LlamaGen / Janus-Pro", 16384, 1000), ("Lumina-mGPT / Anole", 8192, 2000), ("Emu3", 32768, 2048)]
SHAPES = [(1, 32), (32, 32), (64, 128)]          # (requests B, window W)


def state_bytes(B, W, V, vp, capacity=None) -> int:
    st = JacobiState.create(B, W, V, list(range(B)), device="meta", vp=vp, capacity=capacity)
    return st.state_bytes()


def rows():
    bench = JacobiStepBench()
    for fam, V, k in FAMILIES:
        C = k + 64
        for B, W in SHAPES:
            for vp in (False, True):
                mode = "sjd, beta 0.5" if vp else "sjd"
                kw = dict(top_k=k, beta=0.5 if vp else 0.0)
                dense = bench.bytes_min(Case("jacobi_step", _jacobi_params(B, W, V, **kw), ("full",)))
                sparse = bench.bytes_min(Case("jacobi_step", _jacobi_params(B, W, V, capacity=C, **kw), ("full",)))
                yield dict(family=fam, V=V, top_k=k, C=C, B=B, W=W, mode=mode,
                           state_dense=state_bytes(B, W, V, vp), state_sparse=state_bytes(B, W, V, vp, C),
                           step_dense=dense, step_sparse=sparse)


# vendor datasheet peak HBM bandwidths (bytes/s): H100 SXM5 80 GB, H200 141 GB
PEAK_BW = (("3.35 TB/s", 3.35e12), ("4.8 TB/s", 4.8e12))


def floor_table() -> str:
    """``bytes_min`` of the issue's target shapes (the first ``bench ops`` cases: B 1 and 32, W 32,
    V 16384, dense and sparse) divided by each peak bandwidth."""
    bench = JacobiStepBench()
    head = "| case | bytes_min | " + " | ".join(f"floor at {n}" for n, _ in PEAK_BW) + " |"
    lines = [head, "|" + "---|" * (2 + len(PEAK_BW))]
    for case in bench.cases()[:6]:
        b = bench.bytes_min(case)
        lines.append(f"| {case.params['label']} | {mib(b)} MiB | "
                     + " | ".join(f"{b / bw * 1e6:.1f} us" for _, bw in PEAK_BW) + " |")
    return "\n".join(lines)


def mib(x: int) -> str:
    return f"{x / 2**20:,.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown table here as well")
    ap.add_argument("--floors", action="store_true", help="print the HBM-floor table of benchmarks/NOTES.md instead")
    args = ap.parse_args(argv)
    if args.floors and args.out:
        ap.error("argument --out: it writes the state table; --floors prints the HBM-floor table instead (drop one)")
    if args.out:
        check_output_file(ap.error, "--out", args.out)
    if args.floors:
        print(floor_table())
        return 0
    lines = ["| family | V | top-k | C | B | W | mode | state dense MiB | state sparse MiB | ratio | "
             "step bytes dense MiB | step bytes sparse MiB | ratio |", "|" + "---|" * 13]
    for r in rows():
        lines.append(f"| {r['family']} | {r['V']} | {r['top_k']} | {r['C']} | {r['B']} | {r['W']} | {r['mode']} | "
                     f"{mib(r['state_dense'])} | {mib(r['state_sparse'])} | "
                     f"{r['state_dense'] / r['state_sparse']:.1f}x | {mib(r['step_dense'])} | "
                     f"{mib(r['step_sparse'])} | {r['step_dense'] / r['step_sparse']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        head = ("# Jacobi state memory: dense against sparse\n\n"
                "Computed, not timed: `python benchmarks/state_bytes.py --out benchmarks/results/state_bytes.md`. "
                "State: `JacobiState.state_bytes()` of a state allocated on the meta device (ring W + 1 slots "
                "per request; with VP the previous target rows too). Step bytes: the minimal bytes one "
                "`jacobi_step` moves (`bench list`'s `bytes_min`: bf16 logits with CFG read once, the law rows "
                "the step needs, the state written). Sparse capacity C = top-k + 64.\n\n")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(head + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
