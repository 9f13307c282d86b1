"""Launch one benchmark case of an op a few times on the GPU, for Nsight Compute.

    ncu --clock-control none -k regex:jacobi_rows --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python benchmarks/profile_step.py --case B32_W32_V16384_cfg_bf16_sjd_k1000 --backend cuda

The inputs are the ones ``python -m sjd_kernels.bench ops`` times for that case (same builder,
same seed); the state is restored before every call, as in the benchmark, so each launch solves
the same problem. ``--case`` is matched against the case names of ``bench list`` (exact name, or
the single case that contains the text).

``--listing FILE`` also writes the ``nvdisasm -g -c`` text of the backend's rows kernels as this
process compiled them (Triton) or as the extension holds them (CUDA), for
``python -m sjd_kernels.bench.ncu_source``, which joins Nsight Compute's per-instruction samples
(``--section SourceCounters``) to source lines and functions.
"""
from __future__ import annotations

import argparse
import sys

import torch

from sjd_kernels.bench import cases as C
from sjd_kernels.demo import check_output_file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="jacobi_step", choices=list(C.OPS))
    ap.add_argument("--case", required=True)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--calls", type=int, default=4, help="calls of the op (the profiler picks one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--listing", default=None, help="write the rows kernels' nvdisasm -g -c text here")
    a = ap.parse_args(argv)
    # the arguments first (exit 2 naming the flag), then the device
    if a.calls < 1:
        ap.error(f"argument --calls: must be an int >= 1, got {a.calls}")
    why = C.seed_problem(a.seed)
    if why:
        ap.error(f"argument --seed: {why}")
    bench = C.OPS[a.op]
    if a.backend not in bench.backends:
        ap.error(f"argument --backend: {a.backend!r} is not a backend of {a.op}; choose from "
                 f"{', '.join(bench.backends)}")
    found = [c for c in bench.cases() if c.name in (a.case, f"{a.op}:{a.case}")] or \
        [c for c in bench.cases() if a.case in c.name]
    if len(found) != 1:
        ap.error(f"argument --case: {a.case!r} matches {len(found)} cases of {a.op}: {[c.name for c in found][:8]} "
                 f"(see `python -m sjd_kernels.bench list`)")
    if a.listing:
        check_output_file(ap.error, "--listing", a.listing)
    if not torch.cuda.is_available():
        print("profile_step: needs a CUDA device", file=sys.stderr)
        return 2
    case = found[0]
    ok, why = bench.available(a.backend, "cuda")
    if not ok:
        print(f"profile_step: backend {a.backend} not usable: {why}", file=sys.stderr)
        return 2
    prep = bench.prepare(case, "cuda", a.seed)
    fn = prep.call(a.backend)
    for _ in range(a.calls):
        prep.reset()
        fn()
    torch.cuda.synchronize()
    print(f"profile_step: {case.name} backend {a.backend}: {a.calls} calls done")
    if a.listing:
        from sjd_kernels.bench.ncu_source import kernel_listing
        from sjd_kernels.bench.cases import VARIANTS
        try:
            text = kernel_listing(VARIANTS.get(a.backend, a.backend))
        except Exception as e:  # the profile itself is done; say why the listing is missing
            print(f"profile_step: no listing ({type(e).__name__}: {e})", file=sys.stderr)
            return 3
        with open(a.listing, "w") as f:
            f.write(text)
        print(f"profile_step: listing of the rows kernels in {a.listing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
