"""jacobi_step grid: check every backend against the reference, then time it (GPU).

    python benchmarks/bench_jacobi_step.py [--quick] [--check] [--out benchmarks/results]

A thin front end of ``python -m sjd_kernels.bench ops --op jacobi_step`` (same machinery, same
files: ops.csv, ops.md, ops_latency.png in --out). Without a GPU it runs the checks only.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the checkout, when not installed

from sjd_kernels.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ops", "--op", "jacobi_step", *sys.argv[1:]]))
