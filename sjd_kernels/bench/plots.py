"""PNG plots of benchmark rows (matplotlib, Agg backend): no display needed."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _short(case: str) -> str:
    """A compact tick label: the shape and whatever departs from the defaults (CFG, bf16, sjd)."""
    body = case.split(":", 1)[-1]
    drop = {"cfg", "bf16", "sjd", "dtypebfloat16"}
    keep = [t for t in body.split("_") if t not in drop and not (t.startswith("k") and t[1:].isdigit())
            and not t.startswith("K")]
    return " ".join(keep)


def plot_ops_latency(rows: list, path: str) -> str:
    """Median latency (p20-p80 bars) against shape, one line per backend and eager/graph; dashed: roofline."""
    timed = [r for r in rows if _num(r.get("median_us")) is not None]
    ops = sorted({r["op"] for r in timed})
    if not ops:
        raise ValueError("no timed rows to plot")
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8, 0.45 * max(
        len({r["case"] for r in timed if r["op"] == o}) for o in ops) + 4), 4.5 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rs = [r for r in timed if r["op"] == op]
        cases = sorted({r["case"] for r in rs}, key=lambda c: (_num(next(r["bytes_min"] for r in rs if r["case"] == c)), c))
        xi = {c: i for i, c in enumerate(cases)}
        for key in sorted({(r["backend"], r["graph"]) for r in rs}):
            pts = sorted(((xi[r["case"]], _num(r["median_us"]), _num(r["p20_us"]), _num(r["p80_us"]))
                          for r in rs if (r["backend"], r["graph"]) == key))
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            lo = [p[1] - p[2] for p in pts]
            hi = [p[3] - p[1] for p in pts]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=3, capsize=2, lw=1,
                        ls="-" if key[1] == "graph" else ":", label=f"{key[0]} ({key[1]})")
        roof = {}
        for r in rs:
            if _num(r.get("roofline_us")):
                roof[xi[r["case"]]] = _num(r["roofline_us"])
        if roof:
            xs = sorted(roof)
            ax.plot(xs, [roof[i] for i in xs], "k--", lw=1, label="roofline (bytes_min / copy BW)")
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([_short(c) for c in cases], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("latency, us (median; bars p20-p80)")
        gpu = rs[0].get("gpu", "")
        ax.set_title(f"{op} on {gpu}: latency against shape (cold L2)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedup_vs_window(rows: list, path: str, model: str = "") -> str:
    """e2e: against window size, one line per method: step compression (left) and latency speed-up over AR
    (right; labelled as CPU wall clock when the rows were timed on the CPU)."""
    rs = [r for r in rows if _num(r.get("speedup_latency")) is not None and _num(r.get("window")) is not None
          and r.get("sweep", "method") in ("method", "window")]
    multi = {m for m in {r["method"] for r in rs} if len({_num(r["window"]) for r in rs if r["method"] == m}) > 1}
    if multi:                       # a window sweep ran: plot the swept methods only
        rs = [r for r in rs if r["method"] in multi]
    if not rs:
        raise ValueError("no e2e rows with a window and a speed-up")
    cpu = any(r.get("clock") == "cpu" for r in rs)
    fig, (ax_c, ax_l) = plt.subplots(1, 2, figsize=(11, 4.5))
    for m in sorted({r["method"] for r in rs}):
        pts = sorted((_num(r["window"]), _num(r["speedup_latency"]), _num(r.get("step_compression")))
                     for r in rs if r["method"] == m)
        line, = ax_l.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        if all(p[2] is not None for p in pts):
            ax_c.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", color=line.get_color(), label=m)
    for ax in (ax_c, ax_l):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("window W")
        ax.grid(True, alpha=0.3)
    ax_c.set_ylabel("step compression (tokens / NFE)")
    ax_c.set_title("step compression (device-independent)", fontsize=10)
    ax_l.set_ylabel("latency speed-up over AR" + (" (CPU wall clock)" if cpu else ""))
    ax_l.set_title("latency speed-up: CPU wall clock, NOT GPU speed" if cpu else "latency speed-up over AR",
                   fontsize=10, color="darkred" if cpu else "black")
    ax_l.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"speed-up against window size{(' (' + model + ')') if model else ''}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_acceptance_vs_beta(rows: list, path: str, model: str = "") -> str:
    """e2e beta sweep: mean tokens committed per step (and its 95% interval) against beta, per VP form."""
    rs = [r for r in rows if r.get("sweep") == "beta" and _num(r.get("beta")) is not None
          and _num(r.get("tokens_per_step")) is not None]
    if not rs:
        raise ValueError("no beta-sweep rows")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for form in sorted({r.get("vp_form", "add") for r in rs}):
        pts = sorted((_num(r["beta"]), _num(r["tokens_per_step"]), _num(r.get("tokens_per_step_ci")) or 0.0)
                     for r in rs if r.get("vp_form", "add") == form)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=f"vp_form={form}")
    ax.set_xlabel("beta (0 = SJD)")
    ax.set_ylabel("tokens committed per step (acceptance)")
    ax.set_title(f"acceptance against beta{(' (' + model + ')') if model else ''}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
