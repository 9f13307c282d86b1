"""tree_verify: check every backend against the reference, then time it (GPU).

    python benchmarks/bench_tree_verify.py [--quick] [--reps 50] [--csv benchmarks/results/tree_verify.csv]

Grid: B in {1, 8, 32}, V in {16384, 65536} (bf16 logits), a K=4 depth-3 tree (85 nodes) and an
8-level chain (9 nodes). Every (backend, shape) is first run on the same inputs as the PyTorch
reference and must agree token for token (rare float-rounding flips are reported, not hidden);
then it is timed with CUDA events (warm-up, median and p20/p80 of the repetitions, warm L2: the
logits were just written by the model's head) next to the bytes it must read (all N x V logits for
the row check, plus the q rows of the walked nodes) and the roofline time at the GPU's copy
bandwidth. Exits 1 if any check differs (the rows are still printed and written). Without a GPU
it runs the correctness check on a small CPU grid (Triton interpreter when TRITON_INTERPRET=1),
refuses to print timings and writes no ``--csv``; it exits 2 when no backend can be checked there
(no Triton interpreter).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                       # the checkout, when not installed
sys.path.insert(0, str(ROOT / "tests"))             # the case builder of the kernel tests

import torch  # noqa: E402

from sjd_kernels.bench.timing import copy_bandwidth, has_gpu, machine_info, time_cuda  # noqa: E402
from sjd_kernels.demo import check_output_file  # noqa: E402
from sjd_kernels.reference import tree as ref  # noqa: E402
from test_tree_verify_kernels import ORDER, make_case, run  # noqa: E402

SHAPES = {"K4-d3": dict(K=4, depth=3), "chain8": dict(K=1, depth=0, window=8)}


def backends(dev: str) -> dict:
    out = {}
    try:
        from sjd_kernels.triton.tree_verify import tree_verify_triton
        if dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            out["triton"] = tree_verify_triton
    except Exception as e:                          # pragma: no cover - reported
        print(f"# triton backend unavailable: {e}")
    if dev == "cuda":
        try:
            from sjd_kernels._ext import cuda_status
            ok, why = cuda_status()
            if ok:
                from sjd_kernels.cuda.tree_verify import tree_verify_cuda
                out["cuda"] = tree_verify_cuda
            else:
                print(f"# {why}")
        except Exception as e:                      # pragma: no cover - reported
            print(f"# cuda backend unavailable: {e}")
    return out


def check(fn, kw) -> tuple[int, int, bool]:
    """(requests that differ from the reference, requests, status equal)."""
    (nr, pr, tr), sr = run(ref.tree_verify, kw)
    (nb, pb, tb), sb = run(fn, kw)
    diff = sum(int(not (torch.equal(nr[b], nb[b]) and torch.equal(pr[b], pb[b]) and torch.equal(tr[b], tb[b])))
               for b in range(nr.shape[0]))
    return diff, int(nr.shape[0]), bool(torch.equal(sr[0], sb[0]))


def bytes_read(kw) -> int:
    """Lower bound of the bytes one call reads: every node's logits (row check) and, per request,
    the q rows of the nodes a full-depth walk visits (tree tensors are negligible)."""
    B, N, V = kw["logits"].shape
    n_rows = 2 if kw["uncond"] is not None else 1
    logits = n_rows * B * N * V * kw["logits"].element_size()
    q = B * (kw["max_depth"] + 1) * V * 4
    return logits + q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="B in {1, 8}, V 16384 only")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--csv", default="")
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error(f"argument --reps: must be an int >= 1, got {a.reps}")
    if a.csv:
        check_output_file(ap.error, "--csv", a.csv)
    gpu = has_gpu()
    dev = "cuda" if gpu else "cpu"
    info = machine_info()
    bes = backends(dev)
    if not gpu:
        print("# no GPU: correctness check only (small CPU grid); timings are refused on the CPU")
        bad = 0
        for name, shape in SHAPES.items():
            kw = make_case(B=2, V=64, dtype=torch.bfloat16, noise=0.1, seed=1, **shape)
            for be, fn in bes.items():
                diff, n, st = check(fn, kw)
                print(f"check {be:7s} {name:6s} B=2 V=64: {n - diff}/{n} requests equal, status equal: {st}")
                bad += int(diff > 0 or not st)
        if a.csv:
            print(f"# --csv {a.csv}: nothing written (no timings without a GPU)")
        if not bes:             # nothing was checked: not a success
            print("# nothing checked: no backend to check here (set TRITON_INTERPRET=1 for the Triton "
                  "interpreter)", file=sys.stderr)
            return 2
        return 1 if bad else 0

    bw = copy_bandwidth()
    peak = bw["copy_Bps"]
    print(f"# {info['gpu']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit']}, "
          f"copy bandwidth {peak / 1e9:.0f} GB/s")
    Bs = (1, 8) if a.quick else (1, 8, 32)
    Vs = (16384,) if a.quick else (16384, 65536)
    rows = []
    print(f"{'backend':8s} {'shape':7s} {'B':>3s} {'V':>6s} {'N':>3s} {'equal':>7s} {'median_us':>10s} "
          f"{'p20':>8s} {'p80':>8s} {'MB':>8s} {'roof_us':>8s}")
    for name, shape in SHAPES.items():
        for V in Vs:
            for B in Bs:
                kw = make_case(B=B, V=V, dtype=torch.bfloat16, noise=0.05, seed=B + V, device="cuda", **shape)
                nbytes = bytes_read(kw)
                roof = nbytes / peak * 1e6 if peak else float("nan")
                N = kw["logits"].shape[1]
                for be, fn in bes.items():
                    diff, n, st = check(fn, kw)
                    args = [kw[k] for k in ORDER]
                    status = kw["status"].clone()
                    args[ORDER.index("status")] = status
                    t = time_cuda(lambda: fn(*args), reps=a.reps, warmup=5)
                    row = dict(op="tree_verify", backend=be, shape=name, B=B, V=V, N=N, dtype="bf16",
                               equal=f"{n - diff}/{n}", status_equal=st, **t.row(), bytes=nbytes,
                               roofline_us=round(roof, 2), gpu=info["gpu"], torch=info["torch"],
                               triton=info["triton"], commit=info["commit"])
                    rows.append(row)
                    print(f"{be:8s} {name:7s} {B:3d} {V:6d} {N:3d} {n - diff:3d}/{n:<3d} {t.median:10.1f} "
                          f"{t.p20:8.1f} {t.p80:8.1f} {nbytes / 1e6:8.2f} {roof:8.1f}"
                          + ("" if st else "  STATUS DIFFERS"))
    if a.csv and rows:
        Path(a.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    bad = failed(rows)
    if bad:
        print(f"{len(bad)} of {len(rows)} (backend, shape) checks differ from the reference: "
              + ", ".join(f"{r['backend']} {r['shape']} B={r['B']} V={r['V']}" for r in bad))
    return 1 if bad else 0


def failed(rows) -> list:
    """The rows whose check differs from the reference (a request or the status)."""
    return [r for r in rows if not r["status_equal"] or r["equal"].split("/")[0] != r["equal"].split("/")[1]]


if __name__ == "__main__":
    sys.exit(main())
