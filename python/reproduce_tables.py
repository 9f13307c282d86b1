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
given thread count, so a recorded table reproduces to the last digit; a larger difference means
the code or the environment changed what is computed). The summary lists every differing field.
Exit status 0 when every compared field agrees, 1 otherwise, 2 on a failed run.

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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                       # sjd_kernels (the --out check), when not installed
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable

# Fields of the demo's JSON that do not depend on the machine's speed (per method; "quality" and
# "two_sample_vs_ar" are dicts compared key by key).
DEMO_FIELDS = ("nfe", "nfe_std", "nfe_prefill", "step_compression", "speedup_nfe_vs_ar", "quality", "entropy",
               "two_sample_vs_ar", "zero_mass_residuals")
# Columns of bench e2e's CSV that do not depend on the machine's speed, and the key of a row.
E2E_KEY = ("model", "method", "sweep", "window", "beta", "vp_form")
E2E_FIELDS = ("batch", "num_tokens", "samples", "nfe", "nfe_sd", "nfe_prefill", "step_compression",
              "tokens_per_step", "tokens_per_step_sd", "tokens_per_step_ci", "law_test", "law_p", "law_detail",
              "law_n", "tokens_per_step_law", "tokens_per_step_law_sd")


def _demo(model: str, threads: int | None):
    def cmd(out: Path) -> list[str]:
        c = [PY, "-m", "sjd_kernels.demo", "--model", model, "--out", str(out), "--json", str(out / "demo.json")]
        return c + (["--threads", str(threads)] if threads else [])

    def compare(out: Path, rtol: float) -> tuple[int, list[str]]:
        rec = json.loads((RESULTS / f"demo_{model}" / "demo.json").read_text())
        new = json.loads((out / "demo.json").read_text())
        diffs, n = [], 0
        for key in ("batch", "seeds", "window", "cfg_scale", "temperature", "top_k", "top_p", "tokens_per_image"):
            n += 1
            diffs += _diff(f"settings.{key}", rec.get(key), new.get(key), rtol)
        if set(rec["methods"]) != set(new["methods"]):
            diffs.append(f"methods: recorded {sorted(rec['methods'])}, now {sorted(new['methods'])}")
        for m in sorted(set(rec["methods"]) & set(new["methods"])):
            for f in DEMO_FIELDS:
                if f in rec["methods"][m] or f in new["methods"][m]:
                    n += 1
                    diffs += _diff(f"{m}.{f}", rec["methods"][m].get(f), new["methods"][m].get(f), rtol)
        n += 1
        diffs += _diff("real", rec.get("real"), new.get("real"), rtol)
        return n, diffs

    folder = f"demo_{model}"
    return dict(folder=folder, cmd=cmd, compare=compare,
                note=f"`python -m sjd_kernels.demo --model {model}" + (f" --threads {threads}`" if threads else "`"))


def _e2e(model: str):
    def cmd(out: Path) -> list[str]:
        return [PY, "-m", "sjd_kernels.bench", "e2e", "--model", model, "--out", str(out)]

    def rows(path: Path) -> dict:
        with open(path, newline="") as f:
            return {tuple(r[k] for k in E2E_KEY): r for r in csv.DictReader(f)}

    def compare(out: Path, rtol: float) -> tuple[int, list[str]]:
        return _compare_rows(rows(RESULTS / f"cpu_e2e_{model}" / "e2e.csv"), rows(out / "e2e.csv"), E2E_FIELDS,
                             lambda k: "/".join(x for x in k[1:] if x), rtol, _num)

    return dict(folder=f"cpu_e2e_{model}", cmd=cmd, compare=compare,
                note=f"`python -m sjd_kernels.bench e2e --model {model}`")


def _state_bytes():
    def cmd(out: Path) -> list[str]:
        return [PY, str(ROOT / "benchmarks" / "state_bytes.py"), "--out", str(out / "state_bytes.md")]

    def compare(out: Path, rtol: float) -> tuple[int, list[str]]:
        table = lambda p: [ln for ln in p.read_text().splitlines() if ln.startswith("|")]  # noqa: E731
        rec, new = table(RESULTS / "state_bytes.md"), table(out / "state_bytes.md")
        diffs = [f"line {i}: recorded {a!r}, now {b!r}" for i, (a, b) in enumerate(zip(rec, new)) if a != b]
        if len(rec) != len(new):
            diffs.append(f"{len(rec)} table lines recorded, {len(new)} now")
        return max(len(rec), len(new)), diffs

    return dict(folder="state_bytes.md", cmd=cmd, compare=compare, note="`python benchmarks/state_bytes.py`")


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

    def compare(out: Path, rtol: float) -> tuple[int, list[str]]:
        return _compare_rows(rows(RESULTS / f"sjd2_{model}" / f"sjd2_{model}.jsonl"), rows(out / f"sjd2_{model}.jsonl"),
                             fields, lambda k: " ".join(str(x) for x in k), rtol)

    return dict(folder=f"sjd2_{model}", cmd=cmd, compare=compare,
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


def _compare_rows(rec: dict, new: dict, fields, name_of, rtol: float, value=lambda x: x) -> tuple[int, list[str]]:
    """Rows keyed alike (recorded, new): a missing row is a difference, then ``fields`` of each row."""
    diffs, n = [], 0
    for k in sorted(set(rec) | set(new), key=str):
        name = name_of(k)
        if k not in new or k not in rec:
            diffs.append(f"{name}: row {'missing now' if k not in new else 'not recorded'}")
            continue
        for f in fields:
            n += 1
            diffs += _diff(f"{name}.{f}", value(rec[k].get(f)), value(new[k].get(f)), rtol)
    return n, diffs


def _num(x):
    if x is None or x == "":
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return x


def _diff(name: str, a, b, rtol: float) -> list[str]:
    """Differences between a recorded value a and a new one b (dicts key by key; numbers to rtol)."""
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
        if math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b)):
            return []
        return [f"{name}: recorded {a!r}, now {b!r}"]
    return [] if a == b else [f"{name}: recorded {a!r}, now {b!r}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(TARGETS), help="a target (repeatable; default all)")
    ap.add_argument("--out", type=Path, help="scratch folder for the new runs (default: a new temporary folder)")
    ap.add_argument("--rtol", type=float, default=1e-9, help="relative tolerance of numbers (default 1e-9)")
    ap.add_argument("--list", action="store_true", help="list the targets and their commands, run nothing")
    args = ap.parse_args(argv)
    if not (math.isfinite(args.rtol) and args.rtol >= 0):
        ap.error(f"argument --rtol: must be a finite number >= 0, got {args.rtol}")
    if args.out is not None and not args.list:
        from sjd_kernels.demo import check_output_dir
        check_output_dir(ap.error, "--out", args.out)
    names = list(dict.fromkeys(args.only)) if args.only else list(TARGETS)     # a repeated --only runs once
    if args.list and (args.out is not None or args.rtol != ap.get_default("rtol")):
        ap.error("argument --list: it runs nothing, so --out and --rtol do not apply")
    if args.list:
        for n in names:
            t = TARGETS[n]
            print(f"{n:14s} benchmarks/results/{t['folder']:18s} {t['note']}")
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="sjd_reproduce_"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    lines, status = [], 0
    for i, n in enumerate(names, 1):
        t = TARGETS[n]
        d = out / n
        d.mkdir(parents=True, exist_ok=True)
        cmd = t["cmd"](d)
        print(f"[{i}/{len(names)}] {n}: {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        with open(d / "run.log", "w") as log:
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        secs = time.time() - t0
        if r.returncode != 0:
            print(f"    failed (exit {r.returncode}) after {secs:.0f} s; log: {d / 'run.log'}", flush=True)
            lines.append(f"| {n} | run failed (exit {r.returncode}) | | {secs:.0f} s |")
            status = 2
            continue
        n_cmp, diffs = t["compare"](d, args.rtol)
        verdict = "reproduced" if not diffs else f"{len(diffs)} differ"
        print(f"    {verdict}: {n_cmp} fields compared, {secs:.0f} s", flush=True)
        for x in diffs[:20]:
            print(f"      {x}", flush=True)
        if len(diffs) > 20:
            print(f"      ... {len(diffs) - 20} more in {d / 'diffs.txt'}", flush=True)
        (d / "diffs.txt").write_text("".join(x + "\n" for x in diffs))
        lines.append(f"| {n} | {verdict} | {n_cmp} | {secs:.0f} s |")
        status = max(status, 1 if diffs else 0)
    summary = ("| target | result | fields compared | run time |\n|---|---|---|---|\n" + "\n".join(lines) + "\n")
    (out / "summary.md").write_text(summary)
    print("\n" + summary + f"\nruns and diffs under {out}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
