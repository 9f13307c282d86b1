"""``python -m sjd_kernels.bench {list,ops,e2e,compare}``.

  list                         the registered op cases (works anywhere)
  ops [--check] [--quick]      check every op/backend against the reference, then time it (GPU)
  e2e [--model NAME]           decoding on a model: NFE, compression, tokens/s, latency, split, laws
                               (bundled models run on the CPU too, times labelled as CPU wall clock)
  compare CURRENT BASELINE     exit 1 when CURRENT regresses beyond --tol against BASELINE
                               (exit 2 when no row of CURRENT matches a row of BASELINE)

A mistake on the command line (an unknown op, backend or method, a value out of range, a file
that cannot be read or written) exits 2 with a one-line message naming the argument, before any
work.

Outputs of ops and e2e: with none named, every file goes to a new folder
sjd_bench_out/<ops|e2e>_<date>-<time> under the working directory (one per run, so runs never
overwrite each other or a recorded results folder); --out FOLDER puts every file there (--csv/--json then move just those two); --csv/--json
without --out write only the files named (no markdown, no plots). Every output location is
checked before the run, and the paths written are printed at the end.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time

DEFAULT_OUT = "sjd_bench_out"


def _command() -> str:
    return "python -m sjd_kernels.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _error(args, msg: str):
    """The subcommand's parser error: usage, ``msg``, exit 2."""
    args._parser.error(msg)


def _check_ops_named(args) -> None:
    from . import cases as C
    unknown = [o for o in args.op or () if o not in C.OPS]
    if unknown:
        _error(args, f"argument --op: unknown op {', '.join(map(repr, unknown))}; choose from {', '.join(C.OPS)}")


def _check_budget(args) -> None:
    if not args.budget_s > 0:
        _error(args, f"argument --budget-s: must be a number of seconds > 0, got {args.budget_s}")


OUTPUTS_HELP = ("with none of --out/--csv/--json, every file goes to a new folder {d}/<command>_<date>-<time>; "
                "--out: every file in that folder "
                "(--csv/--json then move just those two); --csv/--json without --out: only the files named "
                "(no markdown, no plots)").format(d=DEFAULT_OUT)


def _out_dir(args):
    """The folder of the run's files: ``--out``; else a new folder under ``DEFAULT_OUT`` (named once per run,
    by command and start time, with a suffix when that name exists) unless ``--csv``/``--json`` named the
    outputs (then only those are written)."""
    if args.out:
        return args.out
    if args.csv or args.json:
        return None
    if getattr(args, "_default_out", None) is None:
        base = os.path.join(DEFAULT_OUT, f"{args.cmd}_{time.strftime('%Y%m%d-%H%M%S')}")
        path, i = base, 1
        while os.path.lexists(path):
            i += 1
            path = f"{base}-{i}"
        args._default_out, args._default_base, args._default_i = path, base, i
    return args._default_out


class _DefaultOut:
    """Around a run: claim the default folder (``_out_dir``) with an atomic ``mkdir``, taking the next
    suffix when another run started in the same second took it between the name's choice and now; after
    the run, remove it if the run wrote nothing there (a refused run)."""

    def __init__(self, args):
        self.args, self.path = args, None

    def __enter__(self):
        a = self.args
        if a.out or a.csv or a.json:
            return self
        path = _out_dir(a)
        base, i = a._default_base, a._default_i
        os.makedirs(DEFAULT_OUT, exist_ok=True)
        while True:
            try:
                os.mkdir(path)
                break
            except FileExistsError:
                i += 1
                path = f"{base}-{i}"
        a._default_out = self.path = path
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            try:
                os.rmdir(self.path)                         # only when empty
            except OSError:
                pass
        return False


def _check_outputs(args, files=()) -> None:
    """Output locations that cannot be written are refused now, not after the run (nothing is created):
    the folder (``_out_dir``, the default one included) and the ``files`` the run writes there, and the
    named ``--csv``/``--json``."""
    from ..demo import check_output_dir, check_output_file
    out = _out_dir(args)
    if out:
        flag = "--out" if args.out else f"--out (default {out})"
        check_output_dir(args._parser.error, flag, out)
        for name in files:
            if not ((name.endswith(".csv") and args.csv) or (name.endswith(".json") and args.json)):
                check_output_file(args._parser.error, flag, os.path.join(out, name))
    for flag in ("--csv", "--json"):
        path = getattr(args, flag[2:])
        if path:
            check_output_file(args._parser.error, flag, path)


def cmd_list(args) -> int:
    from . import cases as C
    _check_ops_named(args)
    grids = [args.grid] if args.grid else list(C.GRIDS)
    for name, bench in C.OPS.items():
        if args.op and name not in args.op:
            continue
        print(f"{name}: {bench.doc}")
        print(f"  backends: {', '.join(bench.backends)}  (reference: {bench.reference_backend})")
        for c in bench.cases():
            g = [x for x in c.grids if x in grids]
            if not g:
                continue
            print(f"  {c.name:<72} grids={','.join(c.grids):<16} bytes_min={bench.bytes_min(c) / 2**20:10.2f} MiB"
                  f"  state/req={bench.state_bytes_per_request(c) / 2**20:8.2f} MiB")
    from .e2e import MODELS, decoding_methods
    print("e2e models: " + ", ".join(MODELS) + "  (bundled = mnist; llamagen-xl and chameleon-7b: GPU only)")
    print("e2e methods (this build): " + ", ".join(decoding_methods()))
    return 0


def _check_ops_args(args, grid) -> list:
    """Every check of ``bench ops``'s arguments, before any work: exit 2 naming the argument. Returns
    the selected ``(op, backend)`` pairs."""
    from . import cases as C
    from .ops import resolve_grid
    from .timing import has_gpu
    _check_ops_named(args)
    known = list(dict.fromkeys(b for bench in C.OPS.values() for b in bench.backends))
    unknown = [b for b in args.backend or () if b not in known]
    if unknown:
        _error(args, f"argument --backend: unknown backend {', '.join(map(repr, unknown))}; choose from "
                     f"{', '.join(known)}")
    from ..demo import at_least, check_flags
    check_flags(args._parser.error, at_least(1, ("--reps", args.reps)) + at_least(0, ("--warmup", args.warmup))
                + at_least(1, ("--min-requests", args.min_requests)))
    _check_budget(args)
    why = C.seed_problem(args.seed)           # a larger seed failed each check
    if why:
        _error(args, f"argument --seed: {why}")
    if args.ref_device == "cuda" and not has_gpu():
        _error(args, "argument --ref-device: 'cuda' needs a CUDA device; none is visible here")
    if args.cuda_sim and (has_gpu() or not args.check):
        _error(args, "argument --cuda-sim: it runs the CUDA kernels on CPU tensors: use it with --check on a "
                     "machine without a CUDA device")
    g = resolve_grid(grid, has_gpu())
    selected = C.select(args.op, g)
    ops = ", ".join(args.op) if args.op else "any op"
    if not selected:
        _error(args, f"argument --grid: nothing to run: the {g} grid has no case of {ops} (see `bench list`)")
    if args.case:
        selected = [c for c in selected if any(C.case_matches(k, c.name) for k in args.case)]
        if not selected:
            _error(args, f"argument --case: {args.case}: no case of this grid matches (grid {g}; see `bench list`)")
    pairs = list(dict.fromkeys((c.op, b) for c in selected for b in C.OPS[c.op].backends
                               if not args.backend or b in args.backend))
    if not pairs:
        offered = ", ".join(dict.fromkeys(b for c in selected for b in C.OPS[c.op].backends))
        _error(args, f"argument --backend: nothing to run: {', '.join(args.backend)} is not a backend of the "
                     f"selected cases of {ops} (they offer: {offered})")
    _check_outputs(args, ("ops.csv", "ops.md", "ops_latency.png"))
    return pairs


def cmd_ops(args) -> int:
    from .ops import run_ops
    grid = args.grid or ("quick" if args.quick else None)
    pairs = _check_ops_args(args, grid)
    import contextlib
    sim_ctx = contextlib.nullcontext()
    if args.cuda_sim:
        from ..cuda import sim
        try:
            sim.load()
        except sim.SimUnavailable as e:
            print(f"--cuda-sim: {e}", file=sys.stderr)
            return 2
        sim_ctx = sim.simulate(order=args.cuda_sim)
    with sim_ctx:
        from . import cases as C
        from .timing import has_gpu
        device = "cuda" if has_gpu() else "cpu"
        why = {(op, be): C.OPS[op].available(be, device) for op, be in pairs}
        if not any(ok for ok, _ in why.values()):            # every row would be a skip: say so, write nothing
            whys = "; ".join(dict.fromkeys(f"{be}: {w}" for (_, be), (_, w) in why.items()))
            print(f"nothing to run: no selected backend is available here ({whys})", file=sys.stderr)
            return 2
        with _DefaultOut(args):
            res = run_ops(ops=args.op, grid=grid, backends=args.backend, check_only=args.check, reps=args.reps,
                          warmup=args.warmup, graph_modes=tuple(args.modes), out_dir=_out_dir(args),
                          csv_path=args.csv, json_path=args.json, budget_s=args.budget_s, seed=args.seed,
                          plots=not args.no_plots, command=_command(), cases=args.case,
                          min_requests=args.min_requests, ref_device=args.ref_device)
    if res["failed_checks"]:
        print(f"{len(res['failed_checks'])} checks FAILED", file=sys.stderr)
        return 1
    if res["refused_timing"]:
        print("checks passed; no timings (no CUDA device)")
    return 0


def cmd_e2e(args) -> int:
    from .e2e import SettingsError, check_settings, run_e2e

    def flag(key):
        return {"backend": "--backend"}.get(key, "--" + key.replace("_", "-"))
    try:
        check_settings(model=args.model, methods=args.methods, windows=args.windows, betas=args.betas,
                       num_tokens=args.num_tokens, batch=args.batch, samples=args.samples,
                       law_samples=args.law_samples, threads=args.threads, state_capacity=args.state_capacity,
                       backend=args.backend_name, budget_s=args.budget_s, name=flag)
    except SettingsError as e:
        _error(args, f"argument {e}")
    for given, name in ((args.betas, "--betas"), (args.vp_forms, "--vp-forms")):
        if given is not None and args.methods is not None and "sjd_vp" not in args.methods:
            _error(args, f"argument {name}: the beta sweep runs sjd_vp only, which is not among --methods "
                         f"{' '.join(args.methods)}")
    if args.vp_forms is None:
        args.vp_forms = ["add"]
    if not abs(args.seed) <= 2 ** 40:
        # request seeds are (seed + offset) * 100003 + request in int64: a larger seed failed every row
        _error(args, f"argument --seed: must be an int with |seed| <= 2**40, got {args.seed}")
    _check_outputs(args, ("e2e.csv", "e2e.json", "e2e.md", "e2e_speedup.png", "e2e_beta.png"))
    with _DefaultOut(args):
        res = run_e2e(model=args.model, methods=args.methods, windows=args.windows, betas=args.betas,
                      vp_forms=args.vp_forms, num_tokens=args.num_tokens, batch=args.batch, samples=args.samples,
                      law_samples=args.law_samples, seed=args.seed, out_dir=_out_dir(args), csv_path=args.csv,
                      json_path=args.json, budget_s=args.budget_s, quick=args.quick, backend=args.backend_name,
                      command=_command(), threads=args.threads, state_capacity=args.state_capacity,
                      write_when_not_run=bool(args.out or args.csv or args.json))
    if res.get("status") == "refused":
        return 2
    return 1 if res.get("failed") else 0


def cmd_compare(args) -> int:
    from .compare import ResultsFileError, UnknownMetricError, check_metrics, main_compare
    if not (math.isfinite(args.tol) and args.tol >= 0):
        _error(args, f"argument --tol: must be a finite number >= 0 (0.10 = 10%), got {args.tol}")
    try:
        check_metrics(args.metric)
    except UnknownMetricError as e:
        _error(args, f"argument --metric: {e}")
    names = {"current": args.current, "baseline": args.baseline}
    for name, path in names.items():
        if not os.path.exists(path):
            _error(args, f"argument {name}: {path}: no such file")
        if not os.path.isfile(path):
            _error(args, f"argument {name}: {path} is not a file")
    try:
        return main_compare(args.current, args.baseline, tol=args.tol, metrics=args.metric,
                            allow_gpu_mismatch=args.allow_gpu_mismatch)
    except ResultsFileError as e:
        name = next((n for n, p in names.items() if p == e.path), "current")
        _error(args, f"argument {name}: {e}")


def _metric_help() -> str:
    from .compare import DIRECTION, HIGHER_BETTER, LOWER_BETTER
    low = ", ".join(m for m, d in DIRECTION.items() if d == "lower")
    high = ", ".join(m for m, d in DIRECTION.items() if d == "higher")
    return (f"metric to compare (repeatable; default {', '.join(LOWER_BETTER + HIGHER_BETTER)}). Lower is better: "
            f"{low}. Higher is better: {high}. Any other name is refused")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sjd_kernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("list", help="list the registered cases")
    s.add_argument("--op", action="append")
    s.add_argument("--grid", choices=["full", "quick", "cpu", "cpu-quick"])
    s.set_defaults(func=cmd_list, _parser=s)

    s = sub.add_parser("ops", help="op benchmark: check, then time (GPU)")
    s.add_argument("--op", action="append", help="op name (repeatable); default all")
    s.add_argument("--backend", action="append", help="backend name (repeatable); default all available")
    s.add_argument("--check", action="store_true", help="only the correctness checks")
    s.add_argument("--quick", action="store_true", help="the small grid")
    s.add_argument("--grid", choices=["full", "quick", "cpu", "cpu-quick"])
    s.add_argument("--case", action="append",
                   help="keep cases whose name contains this text (repeatable), e.g. sparse1064; a trailing $ "
                        "anchors it to the name's end (B1_W32_V16384_cfg_bf16_sjd_k1000$ leaves out the _sparse1064 "
                        "twin)")
    s.add_argument("--min-requests", type=int,
                   help="requests per correctness check (default 64 on a GPU, 8 on the CPU)")
    s.add_argument("--ref-device", choices=["cpu", "cuda"],
                   help="run the checks' PyTorch reference on this device (jacobi_step, tree_verify); "
                        "e.g. cpu under compute-sanitizer")
    s.add_argument("--cuda-sim", choices=["forward", "reverse", "shuffle"],
                   help="with --check and no GPU: run the cuda backends' kernels in the CPU simulator "
                        "(sjd_kernels.cuda.sim) with this thread order")
    s.add_argument("--reps", type=int, default=50)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    s.add_argument("--out", help="folder for ops.csv, ops.md, ops_latency.png; " + OUTPUTS_HELP)
    s.add_argument("--csv", help="the CSV of the rows (without --out: the only file written besides --json)")
    s.add_argument("--json", help="the rows and run settings as JSON (without --out: only the named files)")
    s.add_argument("--budget-s", type=float, default=1e9, help="start no new case after this many seconds")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-plots", action="store_true")
    s.set_defaults(func=cmd_ops, _parser=s)

    s = sub.add_parser("e2e", help="decoding benchmark on a model",
                       description="Decoding benchmark. Exit status: 0 done (or a bundled model without weights "
                                   "skipped), 1 a configuration or law test failed, 2 refused (a GPU-only model "
                                   "without a CUDA device).")
    s.add_argument("--model", default="mnist", choices=["mnist", "bundled", "photo", "llamagen-xl", "chameleon-7b",
                                                        "tiny"],
                   help="mnist (default; alias bundled), photo, llamagen-xl / chameleon-7b (random weights, GPU "
                        "only, latency only), tiny (random, smoke tests)")
    s.add_argument("--methods", nargs="+", help="default: all methods the loop offers")
    s.add_argument("--windows", nargs="+", type=int)
    s.add_argument("--betas", nargs="+", type=float,
                   help="verification-prediction strengths of the sjd_vp beta sweep (needs sjd_vp among the methods)")
    s.add_argument("--vp-forms", nargs="+", choices=["add", "log"],
                   help="VP forms of the sjd_vp beta sweep (default add; needs sjd_vp among the methods)")
    s.add_argument("--num-tokens", type=int)
    s.add_argument("--batch", type=int, help="requests per generation (default: 1 on a GPU, 8 on the CPU)")
    s.add_argument("--samples", type=int, help="generations per timed configuration")
    s.add_argument("--law-samples", type=int, help="generations per method for the two-sample test against AR")
    s.add_argument("--backend", dest="backend_name", default="auto",
                   help="op backend for the loop: auto, torch, triton or cuda")
    s.add_argument("--quick", action="store_true",
                   help="smaller defaults (1 timed sample, window 16, 2 betas, 32 law samples, at most 64 tokens); "
                        "an explicit --num-tokens, --windows, ... is honoured")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: 1 without a GPU)")
    s.add_argument("--state-capacity", type=int,
                   help="sparse Jacobi state with this many entries per position for the windowed chain methods "
                        "(e.g. top-k + 64; default: dense)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="folder for e2e.csv, e2e.json, e2e.md, e2e_speedup.png, e2e_beta.png; "
                                 + OUTPUTS_HELP)
    s.add_argument("--csv", help="the CSV of the rows (without --out: the only file written besides --json)")
    s.add_argument("--json", help="rows, settings and notes as JSON (without --out: only the named files)")
    s.add_argument("--budget-s", type=float, default=1e9, help="start no new configuration after this many seconds")
    s.set_defaults(func=cmd_e2e, _parser=s)

    s = sub.add_parser("compare", help="compare a run with a saved baseline (exit 1 on regression, "
                                           "2 when no row matches)")
    s.add_argument("current")
    s.add_argument("baseline")
    s.add_argument("--tol", type=float, default=0.10, help="relative tolerance (0.10 = 10%%)")
    s.add_argument("--metric", action="append", help=_metric_help())
    s.add_argument("--allow-gpu-mismatch", action="store_true")
    s.set_defaults(func=cmd_compare, _parser=s)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..triton import interp
    interp.speed_up()               # a no-op unless the Triton kernels run under the interpreter
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
