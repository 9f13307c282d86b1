#!/usr/bin/env python
"""Re-run the recorded CPU result tables and compare them with the committed ones.

    PYTHONPATH=. python python/reproduce_tables.py                      # every target (about 30 min on 2 cores)
    PYTHONPATH=. python python/reproduce_tables.py --only demo_mnist --only state_bytes
    PYTHONPATH=. python python/reproduce_tables.py --list

Each target runs the command its results folder records, into a scratch folder (``--out``, default
a new temporary one), then compares what does not depend on the machine's speed: NFE, step
compression, tokens per step, acceptance, quality, entropy, the law tests' outcomes and p-values,
byte counts. Wall-clock columns are not compared (they are CPU times of a shared machine). Numbers
must agree to ``--rtol`` (default 1e-9: the runs are seeded and the CPU path is deterministic for a
given thread count, so on the recording machine a recorded table reproduces to the last digit; a
larger difference means the code or the environment changed what is computed).

torch's CPU kernels come in several vector widths (AVX2, AVX-512, ...) that round float sums
differently; torch picks the widest the CPU has, and MKL, oneDNN and numpy's OpenBLAS pick their
own kernels per CPU model. A sampled token that sits at a rounding boundary follows the kernels, so
a table recorded on another CPU model can differ in a few sampled values with the code unchanged.
Seen on an Intel Xeon with AVX-512 (2026-12-02, ``benchmarks/results/cpu_reproduce_2026-12-02_isa/``):
``cpu_e2e_photo`` (recorded on an AMD EPYC) reproduced except the law-run values of gumbel,
reference_sjd and sjd_vp with torch's own choice, and except pac's with ``ATEN_CPU_CAPABILITY=avx2``;
``demo_photo`` reproduced with torch's own choice, but not pac's row with avx2; the recording's
commit gave the same values as the later code on that machine. No single setting reproduced every
recording. ``--cpu-capability`` (default ``native``: torch's own choice) asks torch for a width
through ``ATEN_CPU_CAPABILITY``; recordings made since name the kernels they used
(``cpu_capability`` in their provenance), and ``summary.md`` names those of the re-run. The values
computed through float32 network arithmetic on the generated images (``fd``, ``fd_std``,
``fd_real``, ``entropy``) moved by up to 7.5e-7 relative on that Xeon with every token equal, with
every kernel setting tried; they are compared to ``--rtol-features`` (default 1e-5).

"Values compared" counts each compared value once (a dict field such as ``quality`` key by key; a
missing row once), so "k of n differ" counts like with like. ``<out>/summary.md`` says what produced
it (command, commit, rtol, torch's CPU kernels) and lists the differing values (all of them in
``<out>/<target>/diffs.txt``). A run prints a progress line every minute (its time and its log's
last line). ``--out`` may not lie in the recorded results.
Exit status 0 when every compared value agrees, 1 otherwise, 2 on a failed run or one that wrote
no readable result.

GPU results (``benchmarks/results/h200_*``) are not reproduced here: they need the GPU machine
(``benchmarks/gpu_run.sh``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                       # sjd_kernels (the --out check), when not installed
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable
# the last part of a value's name: computed from float32 network features of the images, not from tokens
FEATURE_FIELDS = frozenset({"fd", "fd_std", "fd_real", "entropy"})
# torch's vector kernels for the runs (see the docstring); ``native``: leave torch's choice.
CPU_CAPABILITIES = ("native", "avx2", "avx512", "default")
WIDTHS = {"avx2": 1, "avx512": 2}                  # x86 widths: one above the CPU's own is refused
PROGRESS_S = 60.0                                   # seconds between progress lines of a run
LISTED = 200                                        # differing values listed per target in summary.md

# Fields of the demo's JSON that do not depend on the machine's speed (per method; "quality" and
# "two_sample_vs_ar" are dicts compared key by key).
DEMO_FIELDS = ("nfe", "nfe_std", "nfe_prefill", "step_compression", "speedup_nfe_vs_ar", "quality", "entropy",
               "two_sample_vs_ar", "zero_mass_residuals")
# Columns of bench e2e's CSV that do not depend on the machine's speed, and the key of a row.
E2E_KEY = ("model", "method", "sweep", "window", "beta", "vp_form")
E2E_FIELDS = ("batch", "num_tokens", "samples", "nfe", "nfe_sd", "nfe_prefill", "step_compression",
              "tokens_per_step", "tokens_per_step_sd", "tokens_per_step_ci", "law_test", "law_p", "law_detail",
              "law_n", "tokens_per_step_law", "tokens_per_step_law_sd", "state_bytes")


def _demo(model: str, threads: int | None):
    def cmd(out: Path) -> list[str]:
        c = [PY, "-m", "sjd_kernels.demo", "--model", model, "--out", str(out), "--json", str(out / "demo.json")]
        return c + (["--threads", str(threads)] if threads else [])

    def compare(out: Path, rtol) -> tuple[int, list[str]]:
        rec = json.loads((RESULTS / f"demo_{model}" / "demo.json").read_text())
        new = json.loads((out / "demo.json").read_text())
        diffs, n = [], 0
        for key in ("batch", "seeds", "window", "cfg_scale", "temperature", "top_k", "top_p", "tokens_per_image"):
            n += _values(rec.get(key), new.get(key))
            diffs += _diff(f"settings.{key}", rec.get(key), new.get(key), rtol)
        n += 1                                          # the set of methods
        if set(rec["methods"]) != set(new["methods"]):
            diffs.append(f"methods: recorded {sorted(rec['methods'])}, now {sorted(new['methods'])}")
        for m in sorted(set(rec["methods"]) & set(new["methods"])):
            for f in DEMO_FIELDS:
                if f in rec["methods"][m] or f in new["methods"][m]:
                    n += _values(rec["methods"][m].get(f), new["methods"][m].get(f))
                    diffs += _diff(f"{m}.{f}", rec["methods"][m].get(f), new["methods"][m].get(f), rtol)
        n += _values(rec.get("real"), new.get("real"))
        diffs += _diff("real", rec.get("real"), new.get("real"), rtol)
        return n, diffs

    folder = f"demo_{model}"
    return dict(folder=folder, cmd=cmd, compare=compare, output="demo.json",
                note=f"`python -m sjd_kernels.demo --model {model}" + (f" --threads {threads}`" if threads else "`"))


def _e2e(model: str):
    def cmd(out: Path) -> list[str]:
        return [PY, "-m", "sjd_kernels.bench", "e2e", "--model", model, "--out", str(out)]

    def rows(path: Path) -> dict:
        with open(path, newline="") as f:
            return {tuple(r[k] for k in E2E_KEY): r for r in csv.DictReader(f)}

    def compare(out: Path, rtol) -> tuple[int, list[str]]:
        return _compare_rows(rows(RESULTS / f"cpu_e2e_{model}" / "e2e.csv"), rows(out / "e2e.csv"), E2E_FIELDS,
                             lambda k: "/".join(x for x in k[1:] if x), rtol, _num)

    return dict(folder=f"cpu_e2e_{model}", cmd=cmd, compare=compare, output="e2e.csv",
                note=f"`python -m sjd_kernels.bench e2e --model {model}`")


def _state_bytes():
    def cmd(out: Path) -> list[str]:
        return [PY, str(ROOT / "benchmarks" / "state_bytes.py"), "--out", str(out / "state_bytes.md")]

    def compare(out: Path, rtol) -> tuple[int, list[str]]:
        table = lambda p: [ln for ln in p.read_text().splitlines() if ln.startswith("|")]  # noqa: E731
        rec, new = table(RESULTS / "state_bytes.md"), table(out / "state_bytes.md")
        diffs = [f"line {i}: recorded {a!r}, now {b!r}" for i, (a, b) in enumerate(zip(rec, new)) if a != b]
        if len(rec) != len(new):
            diffs.append(f"{len(rec)} table lines recorded, {len(new)} now")
        return max(len(rec), len(new)), diffs

    return dict(folder="state_bytes.md", cmd=cmd, compare=compare, output="state_bytes.md",
                note="`python benchmarks/state_bytes.py`")


def _sjd2(model: str):
    key = ("method", "seed", "levels", "window", "kv")
    fields = ("images", "cfg_scale", "top_k", "temperature", "step_compression", "steps_mean", "accuracy", "fd",
              "fd_real", "n", "noisy_kv_tokens", "refed_tokens")

    def cmd(out: Path) -> list[str]:
        return [PY, str(ROOT / "benchmarks" / "bench_sjd2.py"), "--model", model, "--images", "64", "--seeds", "0",
                "1", "2", "--cfg-scale", "3.0", "--threads", "1", "--configs", "8:16:recompute", "8:16:keep",
                "8:32:recompute", "--out", str(out)]

    def rows(path: Path) -> dict:
        out = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out[tuple(r[k] for k in key)] = r
        return out

    def compare(out: Path, rtol) -> tuple[int, list[str]]:
        return _compare_rows(rows(RESULTS / f"sjd2_{model}" / f"sjd2_{model}.jsonl"), rows(out / f"sjd2_{model}.jsonl"),
                             fields, lambda k: " ".join(str(x) for x in k), rtol)

    return dict(folder=f"sjd2_{model}", cmd=cmd, compare=compare, output=f"sjd2_{model}.jsonl",
                note=f"`python benchmarks/bench_sjd2.py --model {model} ...` (the command in its log)")


# The recorded commands (each results folder's README): the MNIST demo ran with one thread, the
# photo demo with the default two.
TARGETS = {
    "state_bytes": _state_bytes(),
    "demo_mnist": _demo("mnist", threads=1),
    "demo_photo": _demo("photo", threads=None),
    "cpu_e2e_mnist": _e2e("mnist"),
    "cpu_e2e_photo": _e2e("photo"),
    "sjd2_mnist": _sjd2("mnist"),
}


def _compare_rows(rec: dict, new: dict, fields, name_of, rtol, value=lambda x: x) -> tuple[int, list[str]]:
    """Rows keyed alike (recorded, new): a missing row is one difference (its fields are not compared),
    then ``fields`` of each row. Returns (values compared, one line per differing value)."""
    diffs, n = [], 0
    for k in sorted(set(rec) | set(new), key=str):
        name = name_of(k)
        if k not in new or k not in rec:
            n += 1
            diffs.append(f"{name}: row {'missing now' if k not in new else 'not recorded'}")
            continue
        for f in fields:
            a, b = value(rec[k].get(f)), value(new[k].get(f))
            n += _values(a, b)
            diffs += _diff(f"{name}.{f}", a, b, rtol)
    return n, diffs


def _values(a, b) -> int:
    """How many values ``_diff(a, b)`` compares, each of which gives at most one line: a dict's keys
    one by one (recursively), anything else one."""
    if isinstance(a, dict) and isinstance(b, dict):
        return sum(_values(a.get(k), b.get(k)) for k in set(a) | set(b))
    return 1


def _num(x):
    if x is None or x == "":
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return x


class Tol:
    """Relative tolerances: ``exact`` (``--rtol``) for every value, ``features`` (``--rtol-features``)
    for those named in ``FEATURE_FIELDS`` (the larger of the two applies to them)."""

    def __init__(self, exact: float, features: float):
        self.exact, self.features = float(exact), float(features)

    def of(self, name: str) -> float:
        return max(self.exact, self.features) if name.rsplit(".", 1)[-1] in FEATURE_FIELDS else self.exact

    def __str__(self) -> str:
        return f"rtol {self.exact:g} ({', '.join(sorted(FEATURE_FIELDS))}: {max(self.exact, self.features):g})"


def _diff(name: str, a, b, rtol) -> list[str]:
    """Differences between a recorded value a and a new one b (dicts key by key; numbers to ``rtol``,
    a float or a ``Tol``, which picks the tolerance by the value's name)."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return [f"{name}: recorded {a!r}, now {b!r}"]
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(f"{name}.{k}", a.get(k), b.get(k), rtol)
        return out
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return []
        r = rtol.of(name) if isinstance(rtol, Tol) else rtol
        if math.isfinite(a) and math.isfinite(b) and abs(a - b) <= r * max(abs(a), abs(b)):
            return []
        return [f"{name}: recorded {a!r}, now {b!r}"]
    return [] if a == b else [f"{name}: recorded {a!r}, now {b!r}"]


def _check_out(error, out: Path) -> None:
    """Refuse an ``--out`` whose runs would write into the recorded results: with ``--out
    benchmarks/results`` each run overwrote its committed file and then compared it with itself."""
    out, results = out.resolve(), RESULTS.resolve()
    recorded = [results / t["folder"] for t in TARGETS.values()]
    written = [out / "summary.md"] + [out / n for n in TARGETS]
    for w in written:
        for r in recorded:
            if w == r or r in w.parents or w in r.parents:
                error(f"argument --out: {out} would write into the recorded results ({r}); "
                      "give a folder outside them (the default is a new temporary folder)")


def _last_line(path: Path, width: int = 100) -> str:
    """The last non-empty line of the log ``path`` (its last carriage-return part), shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [x.split("\r")[-1].strip() for x in tail.splitlines()]
    lines = [x for x in lines if x]
    line = lines[-1] if lines else ""
    return line if len(line) <= width else line[:width - 3] + "..."


def _progress(log: Path, t0: float, stop: threading.Event) -> None:
    """Every ``PROGRESS_S`` seconds until ``stop``: the run's time so far and its log's last line."""
    while not stop.wait(PROGRESS_S):
        last = _last_line(log)
        print(f"    still running, {time.time() - t0:.0f} s" + (f": {last}" if last else ""), flush=True)


def _run(cmd: list[str], log_path: Path, env: dict) -> int:
    """Run ``cmd`` in the repository root, its output into ``log_path``, showing progress."""
    t0, stop = time.time(), threading.Event()
    beat = threading.Thread(target=_progress, args=(log_path, t0, stop), daemon=True)
    with open(log_path, "w") as log:
        beat.start()
        try:
            return subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        finally:
            stop.set()
            beat.join()


def _commit() -> str:
    try:
        from sjd_kernels.bench.timing import git_commit_full
        return git_commit_full(str(ROOT))
    except Exception as e:                                  # noqa: BLE001 (provenance is best effort)
        return f"unknown ({type(e).__name__})"


def _capability(env: dict) -> str:
    """The vector kernels torch uses under ``env`` (what the runs get). On x86 torch takes an
    ``ATEN_CPU_CAPABILITY`` of ``avx2`` or ``avx512`` without checking the CPU, so ``main`` refuses a
    width above the CPU's own before it sets one."""
    try:
        r = subprocess.run([PY, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
        return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _header(argv: list[str], out: Path, rtol, started: str | None = None, kernels: str = "") -> str:
    """What produced the summary: the command, when, on what code (``started``: the commit when the runs
    began; named as well when the checkout moved during them), and torch's CPU kernels (``kernels``)."""
    commit = _commit()
    if started is not None and started != commit:
        commit = f"{started} when the runs started, {commit} when they ended"
    cmd = shlex.join(["python", "python/reproduce_tables.py", *argv])
    return (f"# Recorded CPU tables re-run and compared (python/reproduce_tables.py)\n\n"
            f"- command: `{cmd}`\n- finished: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
            f"- commit: {commit}\n- python {sys.version.split()[0]}; compared to "
            f"{rtol if isinstance(rtol, Tol) else f'rtol {rtol:g}'} with "
            f"`benchmarks/results/` (wall-clock times are not compared); runs under {out}\n"
            + (f"- torch CPU kernels: {kernels}\n" if kernels else "") + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(TARGETS), help="a target (repeatable; default all)")
    ap.add_argument("--out", type=Path, help="scratch folder for the new runs (default: a new temporary folder)")
    ap.add_argument("--rtol", type=float, default=1e-9, help="relative tolerance of numbers (default 1e-9)")
    ap.add_argument("--rtol-features", type=float, default=1e-5,
                    help="relative tolerance of " + ", ".join(sorted(FEATURE_FIELDS)) + " (float32 network "
                         "arithmetic, which differs between CPU models; default 1e-5)")
    ap.add_argument("--cpu-capability", choices=CPU_CAPABILITIES, default="native",
                    help="torch's CPU vector kernels for the runs: native (default, torch's own choice), or avx2, "
                         "avx512, default (no vector kernels) through ATEN_CPU_CAPABILITY")
    ap.add_argument("--list", action="store_true", help="list the targets and their commands, run nothing")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    for flag, v in (("--rtol", args.rtol), ("--rtol-features", args.rtol_features)):
        if not (math.isfinite(v) and v >= 0):
            ap.error(f"argument {flag}: must be a finite number >= 0, got {v}")
    tol = Tol(args.rtol, args.rtol_features)
    if args.out is not None and not args.list:
        from sjd_kernels.demo import check_output_dir
        check_output_dir(ap.error, "--out", args.out)
        _check_out(ap.error, args.out)
    names = list(dict.fromkeys(args.only)) if args.only else list(TARGETS)     # a repeated --only runs once
    if args.list and (args.out is not None or args.rtol != ap.get_default("rtol")
                      or args.rtol_features != ap.get_default("rtol_features")
                      or args.cpu_capability != ap.get_default("cpu_capability")):
        ap.error("argument --list: it runs nothing, so --out, --rtol, --rtol-features and --cpu-capability "
                 "do not apply")
    if args.list:
        for n in names:
            t = TARGETS[n]
            print(f"{n:14s} benchmarks/results/{t['folder']:18s} {t['note']}")
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ATEN_CPU_CAPABILITY", None)                 # native: torch's own choice, not an inherited one
    if args.cpu_capability in WIDTHS:
        # torch would run kernels the CPU lacks (SIGILL in every run): refuse a width above its own
        own = _capability(env)
        if WIDTHS.get(own.lower(), -1) < WIDTHS[args.cpu_capability]:
            ap.error(f"argument --cpu-capability: torch's own CPU kernels here are {own}, so {args.cpu_capability} "
                     f"kernels cannot run on this CPU")
    if args.cpu_capability != "native":
        env["ATEN_CPU_CAPABILITY"] = args.cpu_capability
    # Absolute: the runs' working folder is the repository root, not the caller's.
    out = (args.out or Path(tempfile.mkdtemp(prefix="sjd_reproduce_"))).resolve()
    from sjd_kernels.demo import make_output_dir
    make_output_dir(ap.error, "--out", out)              # a refusal here, not a traceback
    used = _capability(env)
    kernels = f"{used} (--cpu-capability {args.cpu_capability}" + (
        f", ATEN_CPU_CAPABILITY={env['ATEN_CPU_CAPABILITY']}" if env.get("ATEN_CPU_CAPABILITY") else "") + ")"
    if args.cpu_capability != "native" and used.lower() != args.cpu_capability:
        kernels += (f"; NOT the {args.cpu_capability} kernels asked for (this torch build lacks them), so "
                    "values from float sums may differ from the recordings")
    print(f"torch CPU kernels: {kernels}", flush=True)
    lines, listed, status = [], [], 0
    started = _commit()
    for i, n in enumerate(names, 1):
        t = TARGETS[n]
        d = out / n
        d.mkdir(parents=True, exist_ok=True)
        for old in (d / t["output"], d / "diffs.txt"):    # left by an earlier run into the same --out
            old.unlink(missing_ok=True)
        cmd = t["cmd"](d)
        print(f"[{i}/{len(names)}] {n}: {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        rc = _run(cmd, d / "run.log", env)
        secs = time.time() - t0
        if rc != 0:
            last = _last_line(d / "run.log", 300)
            print(f"    failed (exit {rc}) after {secs:.0f} s; log: {d / 'run.log'}"
                  + (f"\n      {last}" if last else ""), flush=True)
            lines.append(f"| {n} | run failed (exit {rc}) | | {secs:.0f} s |")
            status = 2
            continue
        try:
            if not (d / t["output"]).is_file():
                raise FileNotFoundError(f"the run wrote no {t['output']}")
            n_cmp, diffs = t["compare"](d, tol)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = str(e) if isinstance(e, FileNotFoundError) and not e.filename else \
                f"{t['output']} unreadable ({type(e).__name__}: {e})"
            why = why.replace("|", "/").replace("\n", " ")
            print(f"    no result: {why}; log: {d / 'run.log'}", flush=True)
            lines.append(f"| {n} | no result: {why} | | {secs:.0f} s |")
            status = 2
            continue
        verdict = "reproduced" if not diffs else f"{len(diffs)} of {n_cmp} differ"
        print(f"    {verdict}: {n_cmp} values compared, {secs:.0f} s", flush=True)
        for x in diffs[:20]:
            print(f"      {x}", flush=True)
        if len(diffs) > 20:
            print(f"      ... {len(diffs) - 20} more in {d / 'diffs.txt'}", flush=True)
        (d / "diffs.txt").write_text("".join(x + "\n" for x in diffs))
        lines.append(f"| {n} | {verdict} | {n_cmp} | {secs:.0f} s |")
        if diffs:
            listed.append(f"\n## {n}: {len(diffs)} differing values (all in `{n}/diffs.txt`)\n\n"
                          + "".join(f"- {x}\n" for x in diffs[:LISTED])
                          + (f"- ... {len(diffs) - LISTED} more in `{n}/diffs.txt`\n" if len(diffs) > LISTED else ""))
        status = max(status, 1 if diffs else 0)
    summary = (_header(argv, out, tol, started, kernels) + "| target | result | values compared | run time |\n|---|---|---|---|\n"
               + "\n".join(lines) + "\n" + "".join(listed))
    (out / "summary.md").write_text(summary)
    print("\n" + summary + f"\nruns and diffs under {out}", flush=True)
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: no summary written", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:                                 # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
