"""``bench ops``: every registered op, every available backend, a grid of shapes; check, then time.

For each case and backend: a correctness check against the reference on fresh random
inputs; then (GPU only) CUDA-event timing with cold L2, eager and replayed from a CUDA
graph, in microseconds (median, p20, p80), beside the fewest bytes the op must move,
the achieved bandwidth, the roofline time and fraction against a device-to-device copy
bandwidth measured in the same run, and the state bytes per request. Speed-ups are
against the graph-captured PyTorch reference of the same case (eager when the reference
cannot be captured; the row says which).
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import Optional

import torch

from . import cases as C
from .timing import L2Flusher, copy_bandwidth, has_gpu, machine_info, time_cuda

COLUMNS = ["op", "case", "backend", "graph", "check", "check_detail", "median_us", "p20_us", "p80_us", "min_us",
           "reps", "bytes_min", "achieved_GBps", "roofline_us", "roofline_frac", "speedup_vs_ref", "ref_baseline",
           "speedup_vs_reference_sjd", "state_bytes_per_req", "note", "params", "gpu", "torch", "triton", "cuda",
           "python", "commit"]


def _params_str(p: dict) -> str:
    return " ".join(f"{k}={C._fmt(v)}" for k, v in p.items())


def _base_row(case: C.Case, backend: str, info: dict, bench: C.OpBench) -> dict:
    r = {k: "" for k in COLUMNS}
    r.update(op=case.op, case=case.name, backend=backend, params=_params_str(case.params),
             bytes_min=bench.bytes_min(case), state_bytes_per_req=bench.state_bytes_per_request(case),
             gpu=info["gpu"], torch=info["torch"], triton=info["triton"], cuda=info["cuda"], python=info["python"],
             commit=info["commit"])
    return r


class CSVSink:
    """Writes rows as they come, so a run stopped by its time box still leaves its numbers."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.rows: list = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, COLUMNS).writeheader()

    def add(self, row: dict):
        self.rows.append(row)
        if self.path:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(row)


def resolve_grid(grid: Optional[str], gpu: bool) -> str:
    """The grid a run uses: without a GPU the GPU grids map to their small CPU twins."""
    if not gpu:
        return {None: "cpu", "full": "cpu", "quick": "cpu-quick"}.get(grid, grid)
    return grid or "full"


def run_ops(ops=None, grid: Optional[str] = None, backends=None, check_only: bool = False, reps: int = 50,
            warmup: int = 5, graph_modes=("eager", "graph"), out_dir: Optional[str] = None,
            csv_path: Optional[str] = None, json_path: Optional[str] = None, budget_s: float = 1e9,
            seed: int = 0, plots: bool = True, command: str = "", log=print, cases=None,
            min_requests: Optional[int] = None, ref_device: Optional[str] = None) -> dict:
    """Run the ops benchmark; returns ``{"rows", "info", "copy", "failed_checks", "refused_timing", "written"}``.

    Files: every file into ``out_dir`` (``csv_path``/``json_path`` moving the CSV / adding the JSON),
    or without ``out_dir`` only the named ones; ``written`` lists the paths written (also logged).

    ``cases``: keep only cases whose name contains one of these strings. ``min_requests``: requests
    each correctness check compares (default 64 on a GPU, 8 on the CPU; fewer keeps a run under
    compute-sanitizer short). ``ref_device``: run the checks' reference there (e.g. ``"cpu"``, so that
    compute-sanitizer instruments only the backend's kernels), for the ops that can; the others
    keep their reference beside the backend."""
    t0 = time.time()
    gpu = has_gpu()
    device = "cuda" if gpu else "cpu"
    refused = False
    if not gpu:
        if not check_only:
            log("no CUDA device visible: timings refused (CPU times do not mean GPU speed); "
                "running the correctness checks only, on the small 'cpu' shapes")
            refused = True
        check_only = True
    grid = resolve_grid(grid, gpu)
    info = machine_info()
    copy = {}
    flusher = None
    if not check_only:
        copy = copy_bandwidth()
        log(f"device-to-device copy: {copy['copy_Bps'] / 1e9:.0f} GB/s (read+write, {copy['copy_bytes'] >> 20} MiB "
            f"in {copy['copy_us']:.0f} us)")
        flusher = L2Flusher()
    if out_dir and not csv_path:
        csv_path = os.path.join(out_dir, "ops.csv")
    sink = CSVSink(csv_path)
    selected = C.select(ops, grid)
    if cases:
        selected = [c for c in selected if any(C.case_matches(k, c.name) for k in cases)]
    failed = []
    skipped_budget = 0
    for case in selected:
        bench = C.OPS[case.op]
        if time.time() - t0 > budget_s:
            skipped_budget += 1
            continue
        cand = [b for b in bench.backends if not backends or b in backends]
        prepared = None
        for be in cand:
            row = _base_row(case, be, info, bench)
            ok, why = bench.available(be, device)
            if not ok:
                row.update(check="skip", note=why)
                sink.add(row)
                continue
            try:
                chk = bench.check(case, be, device, seed + 1,
                                  min_requests=min_requests or (64 if gpu else 8),
                                  ref_device=ref_device if bench.ref_device_ok and be != "torch" else None)
            except ModuleNotFoundError as e:
                if (e.name or "").startswith("sjd_kernels."):     # the backend's kernel is not written yet
                    row.update(check="skip", note=f"{be}: kernel module {e.name} not present")
                    log(f"[check] {case.name:<60} {be:<14} skip  kernel module {e.name} not present")
                    sink.add(row)
                    continue
                chk = {"check": "FAIL", "check_detail": f"{type(e).__name__}: {str(e)[:300]}"}
            except Exception as e:
                chk = {"check": "FAIL", "check_detail": f"{type(e).__name__}: {str(e)[:300]}"}
            row.update(check=chk["check"], check_detail=chk["check_detail"])
            log(f"[check] {case.name:<60} {be:<14} {chk['check']:<5} {chk['check_detail']}")
            if chk["check"] != "pass":
                failed.append((case.name, be, chk["check_detail"]))
            if check_only or chk["check"] != "pass":
                if chk["check"] != "pass" and not check_only:
                    row["note"] = "check failed: not timed"
                sink.add(row)
                continue
            if prepared is None:
                prepared = bench.prepare(case, device, seed)
            try:
                fn = prepared.call(be)
            except Exception as e:
                row.update(note=f"could not build the call: {type(e).__name__}: {e}")
                sink.add(row)
                continue
            for mode in graph_modes:
                r = dict(row, graph=mode)
                if mode == "graph" and be == "reference_sjd":
                    r["note"] = "not capturable: the public loop reads each acceptance decision on the host"
                    sink.add(r)
                    continue
                try:
                    t = time_cuda(fn, reps=reps, warmup=warmup, graph=(mode == "graph"), flush=flusher,
                                  setup=prepared.reset)
                except Exception as e:
                    torch.cuda.synchronize()
                    r["note"] = f"{'graph capture' if mode == 'graph' else 'run'} failed: {type(e).__name__}: " \
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}"
                    sink.add(r)
                    continue
                r.update(t.row())
                r["note"] = t.note
                bmin = r["bytes_min"]
                # significant digits, not decimals: the slow reference's fraction is ~1e-5, not 0
                r["achieved_GBps"] = float(f"{bmin / (t.median * 1e-6) / 1e9:.4g}")
                r["roofline_us"] = float(f"{bmin / copy['copy_Bps'] * 1e6:.4g}")
                r["roofline_frac"] = float(f"{r['roofline_us'] / t.median:.3g}")
                log(f"[time]  {case.name:<60} {be:<14} {mode:<5} median {t.median:10.1f} us  p20 {t.p20:10.1f}  "
                    f"p80 {t.p80:10.1f}  {r['achieved_GBps']:8.1f} GB/s  roofline {r['roofline_us']:8.1f} us "
                    f"({100 * r['roofline_frac']:.1f}%)  state {r['state_bytes_per_req'] / 2**20:.2f} MiB/req")
                sink.add(r)
        del prepared
        if gpu:
            torch.cuda.empty_cache()
    if skipped_budget:
        log(f"budget of {budget_s:.0f} s reached: {skipped_budget} cases not run")
    rows = sink.rows
    _speedups(rows)
    if csv_path:          # rewrite with the speed-up column filled in
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    result = {"rows": rows, "info": info, "copy": copy, "failed_checks": failed, "refused_timing": refused,
              "grid": grid, "check_only": check_only, "skipped_budget": skipped_budget, "command": command,
              "seconds": time.time() - t0}
    written = result["written"] = [p for p in (csv_path, json_path) if p]
    if out_dir:
        written.append(os.path.join(out_dir, "ops.md"))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "ops.md"), "w") as f:
            f.write(summary_markdown(result))
        if plots and not check_only:
            from .plots import plot_ops_latency
            try:
                plot_ops_latency(rows, os.path.join(out_dir, "ops_latency.png"))
                written.append(os.path.join(out_dir, "ops_latency.png"))
            except Exception as e:      # a plot must never lose the numbers
                log(f"plot failed: {type(e).__name__}: {e}")
    log("wrote " + (", ".join(written) or "no files"))
    return result


def _speedups(rows: list) -> None:
    """Fill ``speedup_vs_ref``: reference time / this time, same case, reference graph-captured if it could be."""
    by_case = {}
    for r in rows:
        if r.get("median_us") not in ("", None):
            by_case.setdefault(r["case"], {})[(r["backend"], r["graph"])] = r
    for case, d in by_case.items():
        op = case.split(":")[0]
        refb = C.OPS[op].reference_backend
        base = d.get((refb, "graph")) or d.get((refb, "eager"))
        if base is None:
            continue
        pub = d.get(("reference_sjd", "eager"))
        for r in d.values():
            r["speedup_vs_ref"] = round(base["median_us"] / r["median_us"], 3)
            r["ref_baseline"] = f"{refb} {base['graph']}"
            if pub is not None:
                r["speedup_vs_reference_sjd"] = round(pub["median_us"] / r["median_us"], 3)


def _table(rows: list, cols: list) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def _pivot(timed: list) -> str:
    keys = []
    for r in timed:
        k = f"{r['backend']} {r['graph']}"
        if k not in keys:
            keys.append(k)
    cases = []
    for r in timed:
        if r["case"] not in cases:
            cases.append(r["case"])
    out = ["| case | state MiB/req | roofline us | " + " | ".join(keys) + " | best |",
           "|---|---|---|" + "---|" * len(keys) + "---|"]
    for c in cases:
        rs = {f"{r['backend']} {r['graph']}": r for r in timed if r["case"] == c}
        any_r = next(iter(rs.values()))
        lib = [r for r in rs.values() if r["backend"] in ("triton", "cuda") or r["backend"] in C.VARIANTS]
        best = min(lib, key=lambda r: r["median_us"]) if lib else None
        b = (f"{best['backend']} {best['graph']}: {100 * best['roofline_frac']:.0f}% of roofline, "
             f"{best['speedup_vs_ref']}x vs {best['ref_baseline']}" if best else "")
        if best and best.get("speedup_vs_reference_sjd"):
            b += f", {best['speedup_vs_reference_sjd']}x vs reference SJD"
        peer = rs.get("flashinfer graph") or rs.get("flashinfer eager")
        if best and peer:
            b += f", {peer['median_us'] / best['median_us']:.2f}x vs flashinfer {peer['graph']}"
        out.append(f"| {c.split(':', 1)[1]} | {any_r['state_bytes_per_req'] / 2**20:.2f} | {any_r['roofline_us']} | "
                   + " | ".join(f"{rs[k]['median_us']:.1f}" if k in rs else "" for k in keys) + f" | {b} |")
    return "\n".join(out)


def summary_markdown(result: dict) -> str:
    info = result["info"]
    lines = ["# sjd_kernels ops benchmark", ""]
    if result.get("check_only") and not info.get("sm_count"):
        interp = (" Triton kernels ran under the Triton interpreter (TRITON_INTERPRET=1)."
                  if info.get("triton_interpret") == "1" else "")
        lines += ["**CPU run: correctness checks only. No timing is printed: CPU times do not mean GPU speed."
                  + interp + "**", ""]
    lines += [f"- machine: {info.get('host', '')}; CPU {info.get('cpu', '?')} ({info.get('cpu_count', '?')} logical "
              f"cores); GPU {info['gpu']} (SMs {info.get('sm_count', 0)}, L2 {info.get('l2_bytes', 0) >> 20} MiB, "
              f"driver {info.get('driver', 'n/a')})",
             f"- versions: torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"python {info['python']}; TRITON_INTERPRET={info.get('triton_interpret', '0')}",
             f"- commit: {info.get('commit_full', info['commit'])}",
             f"- command: `{result.get('command', '')}`",
             f"- grid: {result['grid']}; {'checks only' if result['check_only'] else 'checks, then timing'}; "
             f"{result['seconds']:.0f} s"]
    if result.get("refused_timing"):
        lines.append("- no CUDA device: timings refused (CPU times do not mean GPU speed); checks ran on small shapes")
    if result.get("copy"):
        c = result["copy"]
        lines.append(f"- copy bandwidth (same run, device-to-device, bytes read + written): "
                     f"{c['copy_Bps'] / 1e9:.0f} GB/s; roofline = bytes_min / this")
    if not result.get("check_only"):
        lines.append("- timing: CUDA events, cold L2 (a buffer > L2 written between reps, outside the events), state "
                     "restored before every rep, random inputs (never zeros); eager and CUDA-graph replay")
    if result.get("skipped_budget"):
        lines.append(f"- time budget reached: {result['skipped_budget']} cases not run")
    if result["failed_checks"]:
        lines += ["", "## FAILED checks", ""]
        lines += [f"- {c} [{b}]: {d}" for c, b, d in result["failed_checks"]]
    rows = result["rows"]
    timed = [r for r in rows if r.get("median_us") not in ("", None)]
    lines += ["", "## Results", ""]
    if timed:
        lines += ["Median microseconds per call (cold L2); roofline = bytes_min / copy bandwidth; "
                  "best = the fastest library backend's roofline fraction and speed-up over the reference baseline.",
                  "", _pivot(timed), "", "All timed rows:", ""]
    if timed:
        lines.append(_table(timed, ["case", "backend", "graph", "median_us", "p20_us", "p80_us", "achieved_GBps",
                                    "roofline_us", "roofline_frac", "speedup_vs_ref", "speedup_vs_reference_sjd",
                                    "state_bytes_per_req"]))
    else:
        lines.append(_table(rows, ["case", "backend", "check", "check_detail", "note"]))
    notes = [r for r in rows if r.get("note") and r.get("median_us") in ("", None)]
    if notes and timed:
        lines += ["", "## Not timed", "", _table(notes, ["case", "backend", "graph", "check", "note"])]
    return "\n".join(lines) + "\n"
