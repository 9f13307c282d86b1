"""jacobi_step grid: check every backend against the reference, then time it (GPU).

    python benchmarks/bench_jacobi_step.py [--quick] [--check] [--out benchmarks/results]

A thin front end of ``python -m sjd_kernels.bench ops --op jacobi_step`` (same machinery, same
files: ops.csv, ops.md, ops_latency.png in --out; every other ``bench ops`` option but ``--op``).
Without a GPU it runs the checks only.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the checkout, when not installed

from sjd_kernels.bench.__main__ import main as bench_main  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--op" or a.startswith("--op=") for a in argv):
        # `bench ops` would add that op to jacobi_step's rows (files named as this script's)
        print("usage: python benchmarks/bench_jacobi_step.py [--quick] [--check] [--out DIR] [bench ops options]\n"
              "bench_jacobi_step.py: error: argument --op: this script runs jacobi_step only; use "
              "`python -m sjd_kernels.bench ops --op OP` for other ops", file=sys.stderr)
        return 2
    return bench_main(["ops", "--op", "jacobi_step", *argv])


if __name__ == "__main__":
    sys.exit(main())
