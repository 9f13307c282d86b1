"""Static sm_90 code metrics of the Triton kernels, without a GPU.

An instruction-bound kernel (``benchmarks/NOTES.md``: the rows kernel at B 32) pays for the
instructions each thread issues. Triton compiles for sm_90 on any machine (``triton.compile`` with
``GPUTarget("cuda", 90, 32)`` runs ptxas), and its bundled ``cuobjdump`` prints the SASS, so the
instruction counts of each phase of a row can be read here and compared between two versions of
a device function. A row tile of 16384 lanes over 16 warps gives each thread 32 lanes, and the row
code is straight-line except the threshold searches' loops, so for a straight-line probe the
static count is the count each thread executes; a loop is reported with its body size and the
barriers in it (the search runs it once per reduction round: ``sjd_kernels.bench.topk_model``).

What this measures: registers, stack (spills), SASS instructions per thread, barriers, loops.
What it does not: time. Latency, occupancy and memory traffic need a GPU run
(``benchmarks/gpu_run.sh``); these numbers only rank code variants by the work they issue.

``python -m sjd_kernels.bench.sass [--out DIR] [--rows]`` prints the phase table (and with
``--rows`` the full rows kernels of ``triton.jacobi_step.codegen_cases``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl

from ..triton import sampling as ts
from ..triton.jacobi_step import _sparse_find
from ..triton.rng import counter_word, lane_words, lane_words_at, seed_key

TARGET_CC = 90
V_PROBE = 16384
WARPS = 16


def tool(name: str) -> str:
    """Path of a CUDA binary tool bundled with Triton (``cuobjdump``), else the one on PATH."""
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return p if os.path.exists(p) else name


def parse_sass(text: str) -> list:
    """``[(address, instruction)]`` of a ``cuobjdump -sass`` listing (predicates kept, ``;`` dropped)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def opcode(ins: str) -> str:
    """Opcode without predicate or modifiers: ``@!P0 ISETP.GE.AND P0, ...`` -> ``ISETP``."""
    parts = ins.split()
    op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    return op.split(".")[0]


def loops(ins: list) -> list:
    """Backward branches: one dict per loop with its body (instructions between target and branch),
    the barriers and the local-memory loads and stores (spills) in it.

    An unconditional backward branch over an ``EXIT`` is not a loop: it is the return of an
    out-of-line block (a slow path placed after the function's exit) into the code that called it.
    """
    out = []
    for addr, s in ins:
        m = re.search(r"\bBRA\s+(?:`?\(?[!]?P\d+,\s*)?(0x[0-9a-f]+)", s)
        if m and opcode(s) == "BRA" and int(m.group(1), 16) < addr:
            t = int(m.group(1), 16)
            body = [x for x in ins if t <= x[0] <= addr]
            if not s.startswith("@") and any(opcode(x[1]) == "EXIT" for x in body):
                continue
            out.append({"start": hex(t), "end": hex(addr), "instructions": len(body),
                        "barriers": sum(opcode(x[1]) == "BAR" for x in body),
                        "spills": sum(opcode(x[1]) in ("LDL", "STL") for x in body)})
    return out


def metrics(cubin: bytes) -> dict:
    """Registers, stack bytes, SASS instruction count, opcode histogram and loops of a cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line: {res[:300]}")
    ins = parse_sass(sass)
    hist: dict = {}
    for _, s in ins:
        hist[opcode(s)] = hist.get(opcode(s), 0) + 1
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "shared_static": int(m.group(3)),
            "instructions": len(ins), "barriers": hist.get("BAR", 0), "local_loads": hist.get("LDL", 0),
            "local_stores": hist.get("STL", 0), "opcodes": dict(sorted(hist.items(), key=lambda kv: -kv[1])),
            "loops": loops(ins)}


def compile_metrics(fn, signature: dict, constexprs: dict, num_warps: int = WARPS, **options) -> dict:
    """Compile a ``triton.jit`` function for sm_90 (no GPU needed) and return ``metrics`` of it."""
    from triton.backends.compiler import GPUTarget
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    opts = dict(num_warps=num_warps, enable_fp_fusion=False)
    opts.update(options)
    ck = triton.compile(src, target=GPUTarget("cuda", TARGET_CC, 32), options=opts)
    return metrics(ck.asm["cubin"])


# ----------------------------------------------------------------------------- phase probes
# Each probe loads a row tile, runs one phase of the rows kernel with the package's device
# functions, and stores something that depends on the result (so nothing is optimised away).

@triton.jit
def _probe_load_cfg(l_ptr, u_ptr, out_ptr, V, s, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    x = tl.load(l_ptr + lanes, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + lanes, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + lanes, u + s * (x - u), mask=valid)


@triton.jit
def _probe_target(l_ptr, u_ptr, out_ptr, V, s, inv_t, k, top_p, DO_TOPK: tl.constexpr, DO_TOPP: tl.constexpr,
                  BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    x = tl.load(l_ptr + lanes, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + lanes, mask=valid, other=0.0).to(tl.float32)
    x = u + s * (x - u)
    P, bad = ts.target_row(x, lanes, valid, V, inv_t, k, top_p, False, DO_TOPK, DO_TOPP, False)
    tl.store(out_ptr + lanes, P, mask=valid)


@triton.jit
def _probe_nonfinite(x_ptr, out_ptr, V, inv_t, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    x = tl.load(x_ptr + lanes, mask=valid, other=0.0)
    tl.store(out_ptr, ts.row_nonfinite(x, valid, inv_t, False).to(tl.int32))


@triton.jit
def _probe_kth(x_ptr, out_ptr, V, k, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    key = ts.float_key(tl.load(x_ptr + lanes, mask=valid, other=float("-inf")))
    tl.store(out_ptr, ts.kth_largest_key(key, valid, k))


@triton.jit
def _probe_scan(x_ptr, out_ptr, V, PREFIX: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    keep = valid & (tl.load(x_ptr + lanes, mask=valid, other=0.0) > 0.0)
    if PREFIX:
        at = ts.prefix_count(keep, BLOCK)
    else:
        at = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(out_ptr + lanes, at, mask=valid)


@triton.jit
def _probe_race(p_ptr, ids_ptr, out_ptr, seed, n, LIST: tl.constexpr, BLOCK: tl.constexpr):
    # over the row (n = V lanes, noise per group of 4) or over a list of lane ids (noise per id)
    li = tl.arange(0, BLOCK)
    ok = li < n
    P = tl.load(p_ptr + li, mask=ok, other=0.0)
    k0, k1 = seed_key(seed)
    c = counter_word(seed + 1)
    if LIST:
        ids = tl.load(ids_ptr + li, mask=ok, other=0)
        r = ts.race(P, ts.exponential(lane_words_at(k0, k1, c, c, 3, ids)), ids, ok)
    else:
        r = ts.race(P, ts.exponential(lane_words(k0, k1, c, c, 3, BLOCK)), li, ok)
    tl.store(out_ptr, r)


@triton.jit
def _probe_rounds(x_ptr, out_ptr, V, k, hi0, NR: tl.constexpr, BLOCK: tl.constexpr, ROW_START: tl.constexpr = True):
    # the search's start from the row maximum (kth_init_row; hi0 stands for the maximum's key, which
    # the kernels get from the row check) and NR counting rounds, unrolled (a round of the loop
    # that takes the counting branch; the loop body in the kernels also holds the shrink and finish)
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    key = ts.float_key(tl.load(x_ptr + lanes, mask=valid, other=0.0))
    if ROW_START:
        key, lo, hi, kmin, cge, cgt, gap = ts.kth_init_row(key, valid, hi0, V)
    else:                                  # kth_largest_key's start: 4 reductions
        key, lo, hi, kmin, cge, cgt, gap = ts.kth_init(key, valid)
    for _ in tl.static_range(NR):
        a = ts.key_value(tl.maximum(lo, kmin))
        piv = ts.float_key(a + (ts.key_value(hi) - a) * 0.5)
        piv = tl.minimum(tl.maximum(piv, lo + 1), hi)
        c = tl.sum((key >= piv).to(tl.int32), 0)
        lo, hi, cge, cgt, gap = ts._bracket_step(c >= k, piv, c, lo, hi, cge, cgt)
    tl.store(out_ptr, lo + hi + cge + cgt + gap.to(tl.int32))


@triton.jit
def _probe_hist(x_ptr, out_ptr, V, lo, scale, NB: tl.constexpr, BLOCK: tl.constexpr):
    # tl.histogram of value-spaced bins (the CUDA hist_topk path's first pass, in Triton's terms)
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    y = tl.load(x_ptr + lanes, mask=valid, other=0.0)
    b = tl.minimum(tl.maximum(((y - lo) * scale).to(tl.int32), 0), NB - 1)
    tl.store(out_ptr + tl.arange(0, NB), tl.histogram(b, NB, mask=valid))


@triton.jit
def _probe_softmax(x_ptr, out_ptr, V, mx, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    y = tl.load(x_ptr + lanes, mask=valid, other=float("-inf"))
    tl.store(out_ptr + lanes, ts.softmax_top_p(y, valid, mx, 1.0, False, False), mask=valid)


@triton.jit
def _probe_sparse_find(p_ptr, ids_ptr, idx_ptr, q_ptr, out_ptr, n, C, LIST: tl.constexpr, BLOCK: tl.constexpr,
                       NSTEPS: tl.constexpr):
    # the old law from a sparse slot of C entries: over the row tile (a search masked to the lanes
    # with P > 0, as the row path does) or over a list of lane ids (the candidate-list path)
    li = tl.arange(0, BLOCK)
    ok = li < n
    if LIST:
        keys = tl.load(ids_ptr + li, mask=ok, other=0)
        want = ok
    else:
        keys = li
        want = ok & (tl.load(p_ptr + li, mask=ok, other=0.0) > 0.0)
    at, found = _sparse_find(idx_ptr, keys, want, C, NSTEPS)
    tl.store(out_ptr + li, tl.load(q_ptr + at, mask=found, other=0.0), mask=ok)


@triton.jit
def _probe_copy(x_ptr, out_ptr, V, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    valid = lanes < V
    tl.store(out_ptr + lanes, tl.load(x_ptr + lanes, mask=valid, other=0.0), mask=valid)


def phase_probes(V: int = V_PROBE, list_k: int = 1024) -> list:
    """``(name, fn, signature, constexprs, note)`` of every phase probe at a row of V lanes.

    The candidate list of the rows kernel's top-k search is BLOCK / 8 lanes here (2048 at V 16384,
    the launcher's size for top-k 1000)."""
    B = {"BLOCK": triton.next_power_of_2(V)}
    nc = max(64, B["BLOCK"] // 8)
    C = {"BLOCK": nc}
    rounds = {"x_ptr": "*fp32", "out_ptr": "*i32", "V": "i32", "k": "i32", "hi0": "i32"}
    soft = {"x_ptr": "*fp32", "out_ptr": "*fp32", "V": "i32", "mx": "fp32"}
    hist = {"x_ptr": "*fp32", "out_ptr": "*i32", "V": "i32", "lo": "fp32", "scale": "fp32"}
    row = {"l_ptr": "*bf16", "u_ptr": "*bf16", "out_ptr": "*fp32", "V": "i32", "s": "fp32"}
    tgt = dict(row, inv_t="fp32", k="i32", top_p="fp32")
    f32 = {"x_ptr": "*fp32", "out_ptr": "*fp32", "V": "i32"}
    race = {"p_ptr": "*fp32", "ids_ptr": "*i32", "out_ptr": "*i32", "seed": "i64", "n": "i32"}
    find = {"p_ptr": "*fp32", "ids_ptr": "*i32", "idx_ptr": "*i32", "q_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
            "C": "i32"}
    return [
        ("copy fp32 row (load + store)", _probe_copy, f32, B, "the floor every probe contains"),
        ("load bf16 + CFG + store", _probe_load_cfg, row, B, ""),
        ("row check (NaN / inf)", _probe_nonfinite, {"x_ptr": "*fp32", "out_ptr": "*i32", "V": "i32", "inv_t": "fp32"},
         B, "row_nonfinite"),
        ("target row, no top-k", _probe_target, tgt, dict(B, DO_TOPK=False, DO_TOPP=False),
         "load + CFG + check + softmax + store"),
        ("target row, top-k", _probe_target, tgt, dict(B, DO_TOPK=True, DO_TOPP=False),
         "the loop is the top-k search round"),
        ("target row, top-k + top-p", _probe_target, tgt, dict(B, DO_TOPK=True, DO_TOPP=True), ""),
        ("top-k search alone", _probe_kth, {"x_ptr": "*fp32", "out_ptr": "*i32", "V": "i32", "k": "i32"}, B,
         "kth_largest_key"),
        ("scan: tl.cumsum", _probe_scan, {"x_ptr": "*fp32", "out_ptr": "*i32", "V": "i32"}, dict(B, PREFIX=False), ""),
        ("scan: prefix_count", _probe_scan, {"x_ptr": "*fp32", "out_ptr": "*i32", "V": "i32"}, dict(B, PREFIX=True),
         "list / sparse compaction"),
        ("top-k rounds: kth_init over the row", _probe_rounds, rounds, dict(B, NR=0, ROW_START=False),
         "kth_largest_key's start: 4 reductions"),
        ("top-k rounds: start over the row", _probe_rounds, rounds, dict(B, NR=0, ROW_START=True),
         "kth_init_row: 1-2 reductions"),
        ("top-k rounds: start + 4 rounds over the row", _probe_rounds, rounds, dict(B, NR=4, ROW_START=True),
         "counting rounds, unrolled"),
        ("histogram of 64 bins over the row", _probe_hist, hist, dict(B, NB=64),
         "tl.histogram: one ballot per bin bit and a popcount per bin"),
        ("histogram of 256 bins over the row", _probe_hist, hist, dict(B, NB=256), ""),
        (f"top-k rounds: start over a list of {nc}", _probe_rounds, rounds, dict(C, NR=0, ROW_START=True), ""),
        (f"top-k rounds: start + 4 rounds over a list of {nc}", _probe_rounds, rounds, dict(C, NR=4, ROW_START=True),
         "the candidate list"),
        ("softmax over the row", _probe_softmax, soft, B, "exp, sum, IEEE division"),
        (f"softmax over a list of {nc}", _probe_softmax, soft, C, ""),
        (f"compaction over a list of {nc}", _probe_scan, {"x_ptr": "*fp32", "out_ptr": "*i32", "V": "i32"},
         dict(C, PREFIX=True), "prefix_count"),
        ("sparse lookup over the row", _probe_sparse_find, find, dict(B, LIST=False, NSTEPS=11),
         "binary search in 1064 entries, masked to P > 0"),
        (f"sparse lookup over a list of {list_k}", _probe_sparse_find, find,
         {"LIST": True, "BLOCK": list_k, "NSTEPS": 11}, ""),
        ("race over the row", _probe_race, race, dict(B, LIST=False), "Philox + exponential + race"),
        (f"race over a list of {list_k}", _probe_race, race, {"LIST": True, "BLOCK": list_k}, ""),
    ]


def _wanted(name: str, only) -> bool:
    only = [only] if isinstance(only, str) else list(only or [])
    return not [o for o in only if o] or any(o in name for o in only if o)


def _progress(i: int, n: int, name: str, quiet: bool) -> None:
    if not quiet:
        print(f"[{i}/{n}] compiling {name}", file=sys.stderr, flush=True)


def run_phases(V: int = V_PROBE, warps: int = WARPS, only=(), quiet: bool = True) -> list:
    rows = []
    todo = [p for p in phase_probes(V) if _wanted(p[0], only)]
    for i, (name, fn, sig, ce, note) in enumerate(todo, 1):
        _progress(i, len(todo), name, quiet)
        m = compile_metrics(fn, sig, ce, num_warps=warps)
        rows.append(dict(m, name=name, note=note, V=V, warps=warps))
    return rows


def run_rows_kernels(V: int = V_PROBE, only=(), quiet: bool = True) -> list:
    from ..triton import jacobi_step as tj
    rows = []
    todo = [c for c in tj.codegen_cases(V) if _wanted(c["name"], only)]
    for i, case in enumerate(todo, 1):
        _progress(i, len(todo), case["name"], quiet)
        opts = dict(case.get("options", {}))
        nw = opts.pop("num_warps", 4)
        m = compile_metrics(getattr(tj, case["kernel"]), case["signature"], case["constexprs"], num_warps=nw, **opts)
        rows.append(dict(m, name=case["name"], note="", V=V, warps=nw))
    return rows


# ----------------------------------------------------------------------------- CUDA kernels
CUDA_FLAGS = ["-std=c++17", "-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false", "-lineinfo"]


def find_nvcc() -> str | None:
    """nvcc as the build looks for it: $CUDACXX, $CUDA_HOME/bin, /usr/local/cuda/bin, then PATH."""
    import shutil
    for c in (os.environ.get("CUDACXX"), os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.exists(c):
            return c
    return shutil.which("nvcc")


def parse_nvdisasm(text: str) -> dict:
    """``{function: [(address, instruction, "file:line")]}`` of ``nvdisasm -g -c`` output."""
    funcs: dict = {}
    cur, where, pending, labels = None, "?", [], {}
    for line in text.splitlines():
        m = re.match(r"^\.text\.(\S+):\s*$", line)
        if m:
            cur, where = m.group(1), "?"
            funcs[cur] = []
            continue
        m = re.match(r"^(\.L_x_\d+):\s*$", line)
        if m:
            pending.append(m.group(1))              # a branch target: the address of the next instruction
            continue
        m = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
        if m:
            where = f"{os.path.basename(m.group(1))}:{m.group(2)}"
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", line)
        if m and cur is not None:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            funcs[cur].append((addr, m.group(2).strip(), where))
    # branch targets as addresses, as cuobjdump prints them (``BRA `(.L_x_7)`` -> ``BRA 0x1f0``)
    sub = re.compile(r"`\((\.L_x_\d+)\)")
    return {f: [(a, sub.sub(lambda m: hex(labels.get(m.group(1), 0)), s), w) for a, s, w in ins]
            for f, ins in funcs.items()}


def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        out = name
    out = re.sub(r"\(anonymous namespace\)::|sjd::", "", out or name)
    return out.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def cuda_metrics(src: str, arch: int = TARGET_CC, only: str = "jacobi_rows_kernel") -> list:
    """Compile a .cu file of ``csrc/`` to a cubin for ``sm_<arch>`` (the build's flags) and return one
    dict per kernel whose name contains ``only``: registers, stack, instructions, barriers, and
    the loops with the source line of their branch and the lines most of their body comes from."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDACXX)")
    inc = os.path.dirname(os.path.abspath(src))
    with tempfile.TemporaryDirectory() as d:
        cub = os.path.join(d, "k.cubin")
        subprocess.run([nvcc, *CUDA_FLAGS, f"-arch=sm_{arch}", "-cubin", f"-I{inc}", src, "-o", cub],
                       check=True, capture_output=True, text=True)
        res = subprocess.run([tool("cuobjdump"), "-res-usage", cub], capture_output=True, text=True, check=True).stdout
        dis = subprocess.run([tool("nvdisasm"), "-g", "-c", cub], capture_output=True, text=True, check=True).stdout
    usage = {m.group(1): m for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", res)}
    rows = []
    for fname, ins in parse_nvdisasm(dis).items():
        if only not in fname:
            continue
        u = usage.get(fname)
        plain = [(a, s) for a, s, _ in ins]
        lp = []
        for x in loops(plain):
            a0, a1 = int(x["start"], 16), int(x["end"], 16)
            body = [w for a, _, w in ins if a0 <= a <= a1]
            top: dict = {}
            for w in body:
                top[w] = top.get(w, 0) + 1
            x["branch_at"] = next(w for a, _, w in ins if a == a1)
            x["lines"] = [w for w, _ in sorted(top.items(), key=lambda kv: -kv[1])[:3]]
            lp.append(x)
        rows.append({"name": _demangle(fname), "registers": int(u.group(2)) if u else -1,
                     "stack": int(u.group(3)) if u else -1, "instructions": len(ins),
                     "barriers": sum(opcode(s) == "BAR" for _, s, _ in ins),
                     # generic-address loads, stores and atomics: the compiler could not tell shared
                     # from global memory (a shared-memory row should never need them)
                     "generic_mem": sum(opcode(s) in ("LD", "ST", "ATOM") for _, s, _ in ins),
                     # 16-byte global loads and stores (LDG.E.128 / STG.E.128)
                     "wide_mem": sum(opcode(s) in ("LDG", "STG") and ".128" in s for _, s, _ in ins), "loops": lp})
    return rows


def cuda_table(rows: list) -> str:
    out = []
    for r in rows:
        out.append(f"{r['name']}: {r['registers']} registers, {r['stack']} B stack, {r['instructions']} SASS "
                   f"instructions, {r['barriers']} barriers, {r['generic_mem']} generic loads/stores/atomics, "
                   f"{len(r['loops'])} loops\n")
        out.append("| loop branch at | body instr. | barriers | body mostly from |\n|---|---|---|---|")
        for x in sorted(r["loops"], key=lambda x: int(x["start"], 16)):
            out.append(f"| {x['branch_at']} | {x['instructions']} | {x['barriers']} | {', '.join(x['lines'])} |")
        out.append("")
    return "\n".join(out)


def table(rows: list, lanes_per_thread: int | None = None) -> str:
    head = ("| code | registers | stack B | SASS / thread | per lane | barriers | loops (body instr., barriers, spills if any) | "
            "note |\n|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        lpt = lanes_per_thread or max(1, triton.next_power_of_2(r["V"]) // (32 * r["warps"]))
        lp = "; ".join(f"{x['instructions']} / {x['barriers']}" + (f" / {x['spills']} spills" if x.get("spills") else "")
                       for x in r["loops"]) or "-"
        out.append(f"| {r['name']} | {r['registers']} | {r['stack']} | {r['instructions']} | "
                   f"{r['instructions'] / lpt:.0f} | {r['barriers']} | {lp} | {r['note']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sjd_kernels.bench.sass", description=__doc__.split("\n")[0])
    ap.add_argument("--V", type=int, default=V_PROBE, help="row width of the probes (default 16384)")
    ap.add_argument("--warps", type=int, default=WARPS, help="warps of the phase probes (the rows kernel's: 16)")
    ap.add_argument("--rows", action="store_true", help="also the full rows kernels of the codegen cases")
    ap.add_argument("--only", action="append", default=[], help="substring filter on the names (repeatable)")
    ap.add_argument("--cuda", action="store_true", help="also the CUDA rows kernels (csrc/jacobi_step.cu, nvcc)")
    ap.add_argument("--cuda-src", default=os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "csrc", "jacobi_step.cu"), help="the .cu file for --cuda (a source checkout's)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--out", default=None, help="folder for sass_sm90.md and sass_sm90.json")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("TRITON_INTERPRET is set: unset it (the interpreter does not compile)", file=sys.stderr)
        return 2
    if a.cuda and not os.path.exists(a.cuda_src):
        print(f"--cuda: {a.cuda_src} not found (installed package: pass --cuda-src from a source checkout)",
              file=sys.stderr)
        return 2
    if a.cuda and find_nvcc() is None:
        print("--cuda: nvcc not found (set CUDACXX)", file=sys.stderr)
        return 2
    rows = run_phases(a.V, a.warps, a.only, a.quiet)
    text = (f"Static sm_90 code of phase probes (row of {a.V} lanes, {a.warps} warps, "
            f"{max(1, triton.next_power_of_2(a.V) // (32 * a.warps))} lanes per thread), Triton {triton.__version__}; "
            "compile-time counts, not timings.\n\n" + table(rows))
    if a.rows:
        rk = run_rows_kernels(a.V, a.only, a.quiet)
        rows += rk
        text += "\n\nFull rows kernels (`triton.jacobi_step.codegen_cases`); straight-line code of branches a row " \
                "does not take is counted too.\n\n" + table(rk)
    if a.cuda:
        if not a.quiet:
            print(f"compiling {a.cuda_src} with nvcc", file=sys.stderr, flush=True)
        cr = cuda_metrics(a.cuda_src)
        rows += [dict(r, kind="cuda") for r in cr]
        text += ("\n\nCUDA rows kernel (`csrc/jacobi_step.cu`, nvcc with the build's flags, -lineinfo): every loop "
                 "of the kernel (one iteration per lane or group of 4 lanes of a thread, or one search round), "
                 "the source line of its branch and the lines most of its body comes from.\n\n" + cuda_table(cr))
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        cmd = "python -m sjd_kernels.bench.sass " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(os.path.join(a.out, "sass_sm90.md"), "w") as f:
            f.write(f"Command: `{cmd}`\n\n{text}\n")
        with open(os.path.join(a.out, "sass_sm90.json"), "w") as f:
            json.dump({"command": cmd, "triton": triton.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
