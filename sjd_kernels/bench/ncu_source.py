"""Where a kernel's time goes, by source function: Nsight Compute's PC samples joined to line info.

The rows kernels are instruction-bound at B 32 (``benchmarks/NOTES.md``), and the aggregate
sections (SpeedOfLight, WarpStateStats) do not say which phase of a row takes the time. With the
``SourceCounters`` section Nsight Compute samples warp program counters and reports, per SASS
instruction, how many samples landed there (issued or stalled, by stall reason) and how often it
executed. This module joins those rows to the line table of the same code (``nvdisasm -g -c`` of
the kernel's cubin: Triton kernels carry Python line info, the extension is built with
``-lineinfo``) and sums them per source line and per enclosing function of this package
(``kth_rounds``, ``race``, ``count_keys_at_least``, ...).

Inputs, both written on the GPU machine by ``benchmarks/gpu_run.sh``'s ``profile`` stage:
- ``ncu --import R.ncu-rep --page source --csv --print-source sass`` (the CSV);
- ``benchmarks/profile_step.py --listing FILE`` (the ``nvdisasm -g -c`` text of the backend's rows
  kernels).

The join is by instruction order within the function whose opcode sequence matches the CSV best,
or by address offset when the CSV's addresses line up better; the report states the share of
instructions whose opcodes agree, and refuses to attribute (it prints the hottest SASS instead)
when that share is below ``MIN_AGREE``. Instructions located in code outside this package
(Triton's ``triton/language/*.py``: the bodies of ``tl.sum`` and ``tl.max``; CUDA's headers: warp
shuffles, atomics) are charged to the last package line before them in address order, which is
the call site in straight-line code.

``python -m sjd_kernels.bench.ncu_source --csv SASS.csv --listing LISTING.txt [--out SPLIT.md]``
"""
from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import os
import re
import sys

from .sass import opcode, parse_nvdisasm

MIN_AGREE = 0.9
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_COLS = (r"^Warp Stall Sampling \(All", r"^# Samples$", r"^Sampling Data \(All\)", r"^Samples$")
NOT_ISSUED_COLS = (r"^Warp Stall Sampling \(Not[- ]issued", r"^Sampling Data \(Not Issued\)")
EXECUTED_COLS = (r"^Instructions Executed$", r"^inst_executed$")


def _num(s: str) -> float | None:
    s = (s or "").strip().replace(",", "")
    if s in ("", "-", "n/a"):
        return None
    try:
        return float(s)
    except ValueError:
        return None


def _first(header: list, patterns) -> str | None:
    for p in patterns:
        for h in header:
            if re.search(p, h.strip()):
                return h
    return None


def read_source_csv(text: str) -> dict:
    """Instruction rows of a ``--page source --csv --print-source sass`` export.

    Returns ``{"columns": {"samples", "not_issued", "executed": column name or None, "stalls":
    [stall columns]}, "rows": [{"address": int | None, "sass": str, "m": {column: float}}]}``.
    The header is the first row holding a ``Source`` column and a sample or executed-instruction
    column (exports put a kernel title line above it); a second header (another kernel) ends the
    block. Numbers may carry thousands separators.
    """
    recs = list(csv.reader(io.StringIO(text)))
    head, start = None, 0
    for i, r in enumerate(recs):
        cells = [c.strip() for c in r]
        if "Source" in cells and (_first(cells, SAMPLE_COLS) or _first(cells, EXECUTED_COLS)):
            head, start = cells, i + 1
            break
    if head is None:
        raise ValueError("no header row with a 'Source' column and a sample or executed-instruction column: "
                         "is this `ncu --import R --page source --csv --print-source sass` output?")
    src = head.index("Source")
    addr = head.index("Address") if "Address" in head else None
    cols = {"samples": _first(head, SAMPLE_COLS), "not_issued": _first(head, NOT_ISSUED_COLS),
            "executed": _first(head, EXECUTED_COLS),
            "stalls": [h for h in head if h.startswith("stall_") or "pcsamp_warps_issue_stalled_" in h]}
    rows = []
    for r in recs[start:]:
        if len(r) != len(head):
            continue
        if r[src].strip() == "Source":
            break
        sass = r[src].strip().rstrip(";").strip()
        if not sass or not re.match(r"^(@!?U?P\w+\s+)?[A-Z]", sass):
            continue
        m = {h: v for h, c in zip(head, r) if h not in ("Source", "Address") and (v := _num(c)) is not None}
        rows.append({"address": r[addr].strip() if addr is not None else None, "sass": sass, "m": m})
    return {"columns": cols, "rows": rows}


def _addresses(rows: list, base: int) -> list | None:
    """The rows' address strings as integers in ``base`` (16 or 10), None when one does not parse."""
    out = []
    for r in rows:
        s = (r["address"] or "").lower()
        if base == 10 and s.startswith("0x"):
            return None
        try:
            out.append(int(s, base))
        except ValueError:
            return None
    return out


def align(rows: list, listing: dict) -> dict:
    """Match the CSV's instruction rows to one function of a ``parse_nvdisasm`` listing.

    Tries, for every function, the join by order (same instruction count) and by address offset
    (CSV addresses minus their smallest, read as hex and, when they are all digits, as decimal);
    keeps the join with the most rows whose opcodes agree. Returns ``{"function", "how", "agree"
    (share of CSV rows matched with the same opcode), "index": [listing index or None per CSV row]}``.
    """
    best = {"function": None, "how": "none", "agree": 0.0, "index": [None] * len(rows)}
    ops = [opcode(r["sass"]) for r in rows]
    parsed = [a for a in (_addresses(rows, 16), _addresses(rows, 10)) if a] if rows else []
    for fname, ins in listing.items():
        cands = []
        if len(ins) == len(rows):
            cands.append(("order", list(range(len(rows)))))
        at = {a: i for i, (a, _, _) in enumerate(ins)}
        for addrs in parsed:
            base = min(addrs)
            cands.append(("address", [at.get(a - base) for a in addrs]))
        for how, idx in cands:
            ok = sum(1 for k, i in enumerate(idx) if i is not None and opcode(ins[i][1]) == ops[k])
            agree = ok / max(1, len(rows))
            if agree > best["agree"]:
                best = {"function": fname, "how": how, "agree": agree, "index": idx}
    return best


def _find_source(base: str, root: str) -> str | None:
    for sub in ("csrc", os.path.join("sjd_kernels", "triton"), "sjd_kernels"):
        d = os.path.join(root, sub)
        for dirpath, _, files in os.walk(d):
            if base in files:
                return os.path.join(dirpath, base)
    return None


_FUNC_CACHE: dict = {}


def _functions(path: str) -> list:
    """``[(first line, last line, name)]`` of the functions defined in a source file."""
    if path in _FUNC_CACHE:
        return _FUNC_CACHE[path]
    text = "\n".join(_lines(path))
    out = []
    if path.endswith(".py"):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.lineno, node.end_lineno or node.lineno, node.name))
    else:
        # C++: a definition starts at column 0 (or after `template <...>`), names a function before
        # its first '(' and opens a body; it ends at the next line that is a lone '}' at column 0
        lines = _lines(path)
        i = 0
        while i < len(lines):
            ln = lines[i]
            # the first `name(` that is not an attribute macro (`__launch_bounds__(1024)`) or a keyword
            names = [n for n in re.findall(r"([A-Za-z_]\w*)\s*\(", ln)
                     if not n.startswith("__") and n not in ("if", "for", "while", "switch", "return", "sizeof")]
            if names and not ln.startswith(("#", "//", "}", " ", "\t", "/*", "*")):
                j = i
                while j < len(lines) and "{" not in lines[j] and ";" not in lines[j]:
                    j += 1
                if j < len(lines) and "{" in lines[j]:
                    k = j
                    while k + 1 < len(lines) and not lines[k].startswith("}") and not (
                            k > j and lines[k].rstrip() == "}"):
                        k += 1
                    if lines[j].rstrip().endswith("}") and lines[j].count("{") == lines[j].count("}"):
                        k = j
                    out.append((i + 1, k + 1, names[0]))
                    i = k + 1
                    continue
            i += 1
    _FUNC_CACHE[path] = out
    return out


_SECTION = re.compile(r"^\s*(?://|#) ----\s*(.*)$")


def enclosing_function(path: str | None, line: int) -> str:
    """Name of the innermost function of ``path`` whose definition spans ``line`` ('?' if none).

    Inside a function whose body is cut into sections by ``// ---- title`` (C++) or ``# ---- title``
    (Python) comments, as the rows kernels are, the name carries the section: ``kernel / 3. row
    scalars`` (the title's first words)."""
    if path is None:
        return "?"
    best = None
    for a, b, name in _functions(path):
        if a <= line <= b and (best is None or b - a < best[1] - best[0]):
            best = (a, b, name)
    if best is None:
        # a member of a struct (C++ functors such as a reduction's operator()): the struct's name
        src = _lines(path)
        for k in range(min(line, len(src)) - 1, -1, -1):
            m = re.match(r"^(?:template\s*<.*>\s*)?(struct|class)\s+(\w+)", src[k])
            if m:
                return f"{m.group(1)} {m.group(2)}"
            if src[k].startswith("}"):
                break
        return "(file scope)"
    src = _lines(path)
    for k in range(line - 1, best[0] - 1, -1):
        m = _SECTION.match(src[k]) if k < len(src) else None
        if m:
            title = re.split(r"[(:;,]", m.group(1))[0].strip()
            return f"{best[2]} / {' '.join(title.split()[:6])}"
    return best[2]


_LINES: dict = {}


def _lines(path: str) -> list:
    if path not in _LINES:
        _LINES[path] = open(path, encoding="utf-8", errors="replace").read().splitlines()
    return _LINES[path]


def split(rows: list, ins: list, index: list, columns: dict, root: str = ROOT) -> dict:
    """Sum the CSV's metrics per source line and per function. ``ins``: the matched listing function."""
    metric_cols = [c for c in (columns["samples"], columns["not_issued"], columns["executed"]) if c] + columns["stalls"]
    by_line: dict = {}
    by_site: dict = {}
    carry = None
    # the kernel's own file: where its first instruction comes from (its entry)
    kfile = next((w.rpartition(":")[0] for _, _, w in ins if w != "?"), "")
    site = None
    paths: dict = {}
    order = sorted(range(len(rows)), key=lambda k: (index[k] if index[k] is not None else 1 << 60))
    for k in order:
        i = index[k]
        where = ins[i][2] if i is not None else "?"
        base, _, ln = where.rpartition(":")
        if base not in paths:
            paths[base] = _find_source(base, root) if base and base != "?" else None
        library = base not in ("", "?") and paths[base] is None
        if library and carry is not None:
            where = carry
        elif base and not library:
            carry = where
        if base == kfile:
            site = where
        for table, key in ((by_line, where), (by_site, site or "?")):
            d = table.setdefault(key, {c: 0.0 for c in metric_cols})
            for c in metric_cols:
                d[c] += rows[k]["m"].get(c, 0.0)
    by_section: dict = {}
    kpath = _find_source(kfile, root) if kfile else None
    for where, d in by_site.items():
        ln = where.rpartition(":")[2]
        key = enclosing_function(kpath, int(ln)) if kpath and ln.isdigit() else "?"
        f = by_section.setdefault(key, {c: 0.0 for c in metric_cols})
        for c in metric_cols:
            f[c] += d[c]
    by_func: dict = {}
    lines_out = []
    for where, d in by_line.items():
        base, _, ln = where.rpartition(":")
        if base not in paths:
            paths[base] = _find_source(base, root) if base and base != "?" else None
        p = paths[base]
        func = enclosing_function(p, int(ln)) if p and ln.isdigit() else "?"
        key = f"{base}:{func}" if base else "?"
        f = by_func.setdefault(key, {c: 0.0 for c in metric_cols})
        for c in metric_cols:
            f[c] += d[c]
        text = ""
        if p and ln.isdigit():
            src = _lines(p)
            text = src[int(ln) - 1].strip() if 0 < int(ln) <= len(src) else ""
        lines_out.append({"where": where, "function": key, "text": text, **d})
    total = {c: sum(d[c] for d in by_line.values()) for c in metric_cols}
    return {"total": total, "by_function": by_func, "by_section": by_section, "kernel_file": kfile,
            "by_line": lines_out, "metrics": metric_cols}


def _pct(x: float, t: float) -> str:
    return f"{100.0 * x / t:.1f}" if t > 0 else "-"


def report(csv_text: str, listing_text: str, kernel: str = "", top: int = 25, root: str = ROOT) -> tuple:
    """(markdown, json-able dict) for one profiled kernel."""
    data = read_source_csv(csv_text)
    rows, cols = data["rows"], data["columns"]
    listing = {f: ins for f, ins in parse_nvdisasm(listing_text).items() if kernel in f}
    if not listing:
        raise ValueError(f"the listing has no function whose name contains {kernel!r}")
    al = align(rows, listing)
    sc = cols["samples"] or cols["executed"]
    out = {"instructions": len(rows), "columns": cols, "function": al["function"], "join": al["how"],
           "agree": round(al["agree"], 4)}
    md = [f"SASS rows in the CSV: {len(rows)}; sample column: `{cols['samples']}`; executed: `{cols['executed']}`; "
          f"stall columns: {len(cols['stalls'])}.",
          f"Listing function: `{al['function']}`, joined by {al['how']}, opcodes agree on "
          f"{100 * al['agree']:.1f} % of the rows (attribution needs {100 * MIN_AGREE:.0f} %)."]
    if sc is None:
        md.append("\nNo sample or executed-instruction column: nothing to attribute.")
        return "\n".join(md), out
    if al["agree"] < MIN_AGREE:
        hot = sorted(rows, key=lambda r: -r["m"].get(sc, 0.0))[:top]
        tot = sum(r["m"].get(sc, 0.0) for r in rows)
        md.append(f"\nThe listing does not match this kernel's code: no source attribution. Hottest SASS by `{sc}`:\n")
        md.append("| % | address | SASS |\n|---|---|---|")
        md += [f"| {_pct(r['m'].get(sc, 0.0), tot)} | {r['address'] or '-'} | `{r['sass']}` |" for r in hot]
        out["hottest"] = [{"sass": r["sass"], sc: r["m"].get(sc, 0.0)} for r in hot]
        return "\n".join(md), out
    s = split(rows, listing[al["function"]], al["index"], cols, root)
    tot = s["total"]
    ni, ex = cols["not_issued"], cols["executed"]
    stall_tot = {c: tot[c] for c in cols["stalls"]}
    top_stalls = [c for c, v in sorted(stall_tot.items(), key=lambda kv: -kv[1]) if v > 0][:4]
    md.append(f"\nTotal `{sc}`: {tot[sc]:.0f}" + (f"; instructions executed (warp level): {tot[ex]:.0f}" if ex else ""))
    md.append("\nBy function (source file: enclosing function; library code charged to its call site):\n")
    hdr = "| function | % samples |" + (" % not issued |" if ni else "") + (" % executed |" if ex else "") + \
        "".join(f" {c} |" for c in top_stalls)
    md.append(hdr)
    md.append("|" + "---|" * (hdr.count("|") - 1))
    for key, d in sorted(s["by_function"].items(), key=lambda kv: -kv[1][sc]):
        if d[sc] <= 0 and (not ex or d[ex] <= 0):
            continue
        md.append(f"| {key} | {_pct(d[sc], tot[sc])} |" + (f" {_pct(d[ni], tot[ni])} |" if ni else "") +
                  (f" {_pct(d[ex], tot[ex])} |" if ex else "") + "".join(f" {_pct(d[c], tot[sc])} |" for c in top_stalls))
    md.append(f"\nBy section of the kernel (`{s['kernel_file']}`; every instruction charged to the last line of that "
              "file before it in address order, so inlined helpers count where they are called):\n")
    md.append("| section | % samples |" + (" % executed |" if ex else "") + "\n|---|---|" + ("---|" if ex else ""))
    for key, d in sorted(s["by_section"].items(), key=lambda kv: -kv[1][sc]):
        if d[sc] > 0 or (ex and d[ex] > 0):
            md.append(f"| {key} | {_pct(d[sc], tot[sc])} |" + (f" {_pct(d[ex], tot[ex])} |" if ex else ""))
    md.append(f"\nTop {top} source lines:\n")
    md.append("| % samples |" + (" % executed |" if ex else "") + " line | function | code |\n|---|" +
              ("---|" if ex else "") + "---|---|---|")
    for d in sorted(s["by_line"], key=lambda d: -d[sc])[:top]:
        code = d["text"].replace("|", "\\|")[:90]
        md.append(f"| {_pct(d[sc], tot[sc])} |" + (f" {_pct(d[ex], tot[ex])} |" if ex else "") +
                  f" {d['where']} | {d['function'].rpartition(':')[2]} | `{code}` |")
    out.update(total=tot, by_function=s["by_function"], by_section=s["by_section"], by_line=sorted(s["by_line"], key=lambda d: -d[sc])[:100])
    return "\n".join(md), out


def _disassemble(cubin: bytes, rename: str | None = None) -> str:
    """``nvdisasm -g -c`` of a cubin; ``rename`` replaces the functions' section names' suffix."""
    import subprocess
    import tempfile
    from .sass import tool
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool("nvdisasm"), "-g", "-c", path], capture_output=True, text=True, check=True).stdout
    if rename:
        text = re.sub(r"^\.text\.(\S+):", lambda m: f".text.{m.group(1)}{rename}:", text, flags=re.M)
    return text


def kernel_listing(backend: str, kernel: str = "jacobi_rows", module: str | None = None) -> str:
    """The ``nvdisasm -g -c`` text of the rows kernels a backend has compiled in this process.

    Triton backends: every compiled specialisation of the rows kernel (from the JIT's caches, so
    call the op first), each function renamed ``name#i``. CUDA backends: the cubins of the
    extension module (or of ``module``: any file ``cuobjdump -xelf`` reads), functions whose name
    contains ``kernel``.
    """
    import subprocess
    import tempfile
    from .sass import tool
    if backend.startswith("triton"):
        from ..triton import jacobi_step as tj
        fn = tj._jacobi_rows_kernel
        while not hasattr(fn, "device_caches") and hasattr(fn, "fn"):
            fn = fn.fn                                     # autotuner / heuristics wrappers
        out, i = [], 0
        for caches in getattr(fn, "device_caches", {}).values():
            for ck in caches[0].values():
                out.append(_disassemble(ck.asm["cubin"], rename=f"#{i}"))
                i += 1
        if not out:
            raise RuntimeError("no compiled Triton rows kernel in this process (run the op on a GPU first)")
        return "\n".join(out)
    if module is None:
        from .._ext import ext
        module = ext().__file__
    so = os.path.abspath(module)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([tool("cuobjdump"), "-xelf", "all", so], cwd=d, capture_output=True, text=True, check=True)
        out = []
        for f in sorted(os.listdir(d)):
            if f.endswith(".cubin"):
                text = _disassemble(open(os.path.join(d, f), "rb").read(), rename=f"#{f}")
                keep = {k for k in parse_nvdisasm(text) if kernel in k}
                if keep:
                    out.append(text)
    if not out:
        raise RuntimeError(f"no function containing {kernel!r} in the cubins of {so}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sjd_kernels.bench.ncu_source", description=__doc__.split("\n")[0])
    ap.add_argument("--csv", required=True, help="ncu --import R --page source --csv --print-source sass output")
    ap.add_argument("--listing", required=True, help="nvdisasm -g -c text of the kernel (profile_step.py --listing)")
    ap.add_argument("--kernel", default="", help="only listing functions whose name contains this")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--title", default="", help="a heading line for the report")
    ap.add_argument("--out", default=None, help="write the report here (markdown); .json beside it")
    a = ap.parse_args(argv)
    try:
        md, js = report(open(a.csv, encoding="utf-8", errors="replace").read(),
                        open(a.listing, encoding="utf-8", errors="replace").read(), a.kernel, a.top)
    except (OSError, ValueError) as e:
        print(f"ncu_source: {e}", file=sys.stderr)
        return 2
    if a.title:
        md = f"## {a.title}\n\n{md}"
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(js, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
