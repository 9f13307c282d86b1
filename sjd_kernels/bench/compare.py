"""``bench compare``: a run against a saved baseline; exit 1 on a regression beyond a tolerance.

Rows are matched by key: ``(op, case, backend, graph)`` for ops results, ``(model, method,
window, beta, vp_form, batch, num_tokens)`` for e2e results. Every metric has an explicit direction
(``DIRECTION``): lower is better for times, counts of forwards, bytes, overflows and the
post-head share; higher for rates, compressions, speed-ups, bandwidths and roofline fractions.
Columns without a meaningful direction (spreads, p-values, sample counts, settings) and names
in neither CSV are refused (``UnknownMetricError``). The default metrics are ``median_us``,
``latency_ms`` (lower) and ``tokens_per_s``, ``step_compression`` (higher). A row regresses when
it is worse than the baseline by more than ``tol`` (relative). Rows present in only one file
are listed, not failed; a row whose check passed in the baseline and fails now is a regression.
Files without a row in common (other ops, another model or image length) compare nothing: exit 2,
so that a regression gate never passes having checked nothing.
Comparing runs from different GPUs is refused unless ``--allow-gpu-mismatch``.
"""
from __future__ import annotations

import csv
import json
from typing import Optional

LOWER_BETTER = ("median_us", "latency_ms")            # the default metrics
HIGHER_BETTER = ("tokens_per_s", "step_compression")

# every comparable column of the ops (ops.COLUMNS) and e2e (e2e.COLUMNS) CSVs: "lower" or "higher" is better
DIRECTION = {
    # ops
    "median_us": "lower", "p20_us": "lower", "p80_us": "lower", "min_us": "lower", "bytes_min": "lower",
    "state_bytes_per_req": "lower", "achieved_GBps": "higher", "roofline_frac": "higher",
    "speedup_vs_ref": "higher", "speedup_vs_reference_sjd": "higher",
    # e2e
    "nfe": "lower", "nfe_prefill": "lower", "latency_ms": "lower", "latency_p20_ms": "lower",
    "latency_p80_ms": "lower", "step_ms": "lower", "step_cost_vs_ar": "lower", "forward_ms_per_step": "lower",
    "post_head_ms_per_step": "lower", "post_head_frac": "lower", "state_bytes": "lower",
    "state_overflows": "lower", "step_compression": "higher", "tokens_per_step": "higher",
    "tokens_per_step_law": "higher", "tokens_per_s": "higher", "speedup_latency": "higher",
}


class UnknownMetricError(ValueError):
    """A metric ``compare`` cannot judge: not a column of either CSV, or one without a better direction."""


def check_metrics(metrics) -> None:
    """Raise ``UnknownMetricError`` for the first metric without a known direction (``DIRECTION``)."""
    from .e2e import COLUMNS as E2E
    from .ops import COLUMNS as OPS
    for m in metrics or ():
        if m in DIRECTION:
            continue
        if m in E2E or m in OPS:
            raise UnknownMetricError(f"{m!r} has no better direction (a spread, p-value, count or setting); "
                                     f"choose from {', '.join(sorted(DIRECTION))}")
        raise UnknownMetricError(f"{m!r} is not a column of the ops or e2e results; choose from "
                                 f"{', '.join(sorted(DIRECTION))}")


class ResultsFileError(ValueError):
    """A file that cannot be read as ``bench ops`` / ``bench e2e`` results; ``path`` names it."""

    def __init__(self, path: str, msg: str):
        super().__init__(f"{path}: {msg}")
        self.path = path


def load_rows(path: str) -> list:
    """The result rows of a CSV or JSON file written by ``bench ops`` or ``bench e2e``; a file that is
    not one raises ``ResultsFileError`` naming it."""
    what = "not results of `bench ops` or `bench e2e`"
    try:
        if path.endswith(".json"):
            with open(path) as f:
                d = json.load(f)
            rows = d["rows"] if isinstance(d, dict) else d
        else:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
    except OSError as e:
        raise ResultsFileError(path, f"cannot read it: {e.strerror or e}") from e
    except (ValueError, KeyError, csv.Error) as e:          # broken JSON or CSV, a JSON object without rows
        raise ResultsFileError(path, f"{what} ({type(e).__name__}: {e})") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ResultsFileError(path, f"{what} (expected a list of rows)")
    for r in rows:
        if not (r.get("op") and "case" in r and "backend" in r) and "method" not in r:
            raise ResultsFileError(path, f"{what}: a row without op/case/backend (ops) or method (e2e) columns")
    return rows


def _key(r: dict) -> tuple:
    if r.get("op"):
        return ("ops", r["op"], r["case"], r["backend"], r.get("graph", ""))
    return ("e2e", r.get("model", ""), r.get("method", ""), str(r.get("window", "")), str(r.get("beta", "")),
            r.get("vp_form", ""), str(r.get("batch", "")), str(r.get("num_tokens", "")))


def _f(x) -> Optional[float]:
    try:
        v = float(x)
        return v if v == v else None
    except (TypeError, ValueError):
        return None


def compare(current: list, baseline: list, tol: float = 0.10, metrics=None, allow_gpu_mismatch: bool = False) -> dict:
    """Returns ``{"regressions", "improvements", "only_current", "only_baseline", "matched", "compared",
    "gpu_mismatch"}`` (``matched``: rows in both files; ``compared``: metric values judged).

    ``metrics`` must be keys of ``DIRECTION`` (``UnknownMetricError`` otherwise)."""
    check_metrics(metrics)
    base = {_key(r): r for r in baseline}
    cur = {_key(r): r for r in current}
    gb = {r.get("gpu") for r in baseline if r.get("gpu")}
    gc = {r.get("gpu") for r in current if r.get("gpu")}
    mismatch = bool(gb and gc and gb != gc)
    out = {"regressions": [], "improvements": [], "only_current": sorted(set(cur) - set(base)),
           "only_baseline": sorted(set(base) - set(cur)), "matched": len(set(cur) & set(base)), "compared": 0,
           "gpu_mismatch": mismatch,
           "gpus": (sorted(gb), sorted(gc))}
    if mismatch and not allow_gpu_mismatch:
        return out
    for k in sorted(set(cur) & set(base)):
        b, c = base[k], cur[k]
        if b.get("check") == "pass" and c.get("check") not in ("pass", None, ""):
            out["regressions"].append({"key": k, "metric": "check", "baseline": "pass", "current": c.get("check"),
                                       "change": "check now fails"})
            continue
        for m in metrics or (LOWER_BETTER + HIGHER_BETTER):
            vb, vc = _f(b.get(m)), _f(c.get(m))
            if vb is None or vc is None or vb <= 0:
                continue
            out["compared"] += 1
            worse = (vc - vb) / vb if DIRECTION[m] == "lower" else (vb - vc) / vb
            rec = {"key": k, "metric": m, "baseline": vb, "current": vc, "change": f"{100 * worse:+.1f}% worse"}
            if worse > tol:
                out["regressions"].append(rec)
            elif worse < -tol:
                rec["change"] = f"{-100 * worse:.1f}% better"
                out["improvements"].append(rec)
    return out


def report(res: dict, tol: float) -> str:
    lines = []
    if res["gpu_mismatch"]:
        lines.append(f"GPU differs: baseline {res['gpus'][0]} vs current {res['gpus'][1]}")
    lines.append(f"compared {res['compared']} metrics at tolerance {100 * tol:.0f}%: "
                 f"{len(res['regressions'])} regressions, {len(res['improvements'])} improvements")
    for r in res["regressions"]:
        lines.append(f"REGRESSION {' / '.join(map(str, r['key'][1:]))}: {r['metric']} {r['baseline']} -> "
                     f"{r['current']} ({r['change']})")
    for r in res["improvements"]:
        lines.append(f"improved   {' / '.join(map(str, r['key'][1:]))}: {r['metric']} {r['baseline']} -> "
                     f"{r['current']} ({r['change']})")
    if res["only_baseline"]:
        lines.append(f"{len(res['only_baseline'])} baseline rows missing from the current run")
    if res["only_current"]:
        lines.append(f"{len(res['only_current'])} new rows not in the baseline")
    return "\n".join(lines)


def main_compare(current_path: str, baseline_path: str, tol: float = 0.10, metrics=None,
                 allow_gpu_mismatch: bool = False, log=print) -> int:
    res = compare(load_rows(current_path), load_rows(baseline_path), tol, metrics, allow_gpu_mismatch)
    log(report(res, tol))
    if res["gpu_mismatch"] and not allow_gpu_mismatch:
        log("refusing to compare timings from different GPUs (pass --allow-gpu-mismatch to force)")
        return 2
    if not res["matched"]:
        log("nothing was compared: no row of the current run has the key of a baseline row (ops: op, case, "
            "backend, graph; e2e: model, method, window, beta, vp_form, batch, num_tokens)")
        return 2
    return 1 if res["regressions"] else 0
