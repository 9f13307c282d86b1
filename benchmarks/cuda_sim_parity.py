"""Every CUDA jacobi_step parity case of ``tests/test_cuda_jacobi_step.py`` in the CPU simulator.

    PYTHONPATH=. python benchmarks/cuda_sim_parity.py [--orders forward,reverse] [--sparse PATHS] > LOG

Runs each configuration and each optional-path case (``FEATURE_CASES``) under each thread order
(``sjd_kernels.cuda.sim``), then the global-memory row path and V 65541, with the GPU tests' check
(``check_config``: requests that differ from the reference, at most one per 200 rows), then every
tree_verify case of ``tests/test_tree_verify_kernels.py`` (V up to 16384) with the default top-k
search, the bracket selection and the hist_topk path (requests: at most one in 50 may differ). One line per run: order or op,
paths, case, ok/FAIL, target rows (tree_verify: requests), differing requests, seconds. Exits 1
if any failed.
The suite runs a faster subset (``tests/test_cuda_sim.py``); this is the whole list. With
``SJD_SIM_RACE=1`` in the environment every launch also runs the race and initcheck checks
(``sim.simulate(race=True)``): a report fails the run it belongs to.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import test_cuda_jacobi_step as t  # noqa: E402

from sjd_kernels.cuda import sim  # noqa: E402
from sjd_kernels.cuda.jacobi_step import kernel_features  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", default="forward,reverse")
    ap.add_argument("--no-tree", dest="tree", action="store_false",
                    help="skip tree_verify's cases (tests/test_tree_verify_kernels.py, V up to 16384)")
    ap.add_argument("--sparse", action="append", default=[], metavar="PATHS",
                    help="also the 25 CUDA sparse-state cases of tests/test_sparse_state_kernels.py with these "
                         "optional paths ('default' or names joined by '+'; repeatable); about 15 min each")
    args = ap.parse_args(argv)
    # every check before the first run (the whole list takes hours): exit 2 naming the flag
    orders = args.orders.split(",")
    if not set(orders) <= set(sim.ORDERS):
        ap.error(f"argument --orders: {args.orders!r}: give a comma list of {', '.join(sim.ORDERS)}")
    for paths in args.sparse:
        try:
            kernel_features(*(() if paths == "default" else paths.split("+")))
        except ValueError as e:
            ap.error(f"argument --sparse: {paths!r}: {e} ('default' or names joined by '+')")
    t.DEV = "cpu"
    jobs = [((), n) for n in t.CONFIGS] + [(f, n) for f, ns in t.FEATURE_CASES.items() for n in ns]
    failed = 0
    start = time.time()

    def one(label, fn):
        nonlocal failed
        t0 = time.time()
        try:
            r = fn()
            extra = f"{r['rows']} {r['diffs']} " if isinstance(r, dict) else ""
            print(f"{label} ok {extra}{time.time() - t0:.1f}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            failed += 1
            print(f"{label} FAIL {type(e).__name__} {str(e)[:300]} {time.time() - t0:.1f}", flush=True)

    for order in orders:
        for feats, name in jobs:
            cfg = dict(t.CONFIGS[name])
            reps = cfg.pop("reps", 3)
            with sim.simulate(order), kernel_features(*feats):
                one(f"{order} {'+'.join(feats) or 'default'} {name}", lambda: t.check_config(reps=reps, **cfg))
    with sim.simulate("reverse"):
        for name in ["sjd-bf16-cfg-topk-topp", "coupling+vp", "gumbel_jacobi", "tail-left"]:
            cfg = dict(t.CONFIGS[name])
            cfg.pop("reps", None)
            one(f"global {name}", lambda: t.check_config(reps=2, force_global=True, **cfg))
        one("V65541", t.test_vocabulary_larger_than_shared_memory)
    if args.tree:
        import test_tree_verify_kernels as ttv
        from sjd_kernels.cuda.tree_verify import tree_verify_cuda
        for name in list(ttv.CASES) + list(ttv.LARGE):
            for feats in ((), ("bracket_topk",), ("hist_topk",)):
                def run(name=name):
                    m, n = ttv.check_against_reference(tree_verify_cuda, name, "cpu", reps=3)
                    return {"rows": n, "diffs": m}
                with sim.simulate("reverse"), kernel_features(*feats):
                    one(f"tree_verify {'+'.join(feats) or 'default'} {name}", run)
    for paths in args.sparse:
        import test_sparse_state_kernels as tss
        feats = () if paths == "default" else tuple(paths.split("+"))
        runs = [(spec, dict(V=6, L=6, n=64, W=3, k=k, cap=cap)) for spec in tss.SPECS
                for k, cap in ((0, 6), (2, 2), (0, 1))]
        runs += [(spec, dict(V=3000, L=24, n=64, W=8, k=200, cap=cap)) for spec in
                 ("sjd", "vp_log_b1", "coupling_vp_add_b0.5", "gumbel") for cap in (256, 150)]
        for spec, kw in runs:
            def run(spec=spec, kw=kw):
                status = tss._compare(spec, device="cpu", backend="cuda", **kw)
                if kw["cap"] in (1, 150):
                    assert status[3] > 0, "the overflow path did not run"
            with sim.simulate("reverse"), kernel_features(*feats):
                one(f"sparse {paths} {spec} V{kw['V']} k{kw['k']} C{kw['cap']}", run)
    print(f"total {time.time() - start:.0f} s, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
