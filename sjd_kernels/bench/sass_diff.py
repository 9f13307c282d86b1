"""Compare the sm_90 code of the CUDA kernels between a git revision and the working tree, without a GPU.

A source change meant to leave the machine code alone (a portable spelling, a renamed helper, a
comment) can be checked here: both versions of a ``csrc/`` file are compiled with the build's nvcc
flags for ``sm_<arch>`` and, per kernel, the SASS listings are compared. Each kernel is one of:

- ``identical``: the same instructions in the same order;
- ``reordered``: the same instructions (opcode, modifiers and operands) in another order;
- ``renamed``: the same instructions up to register names and operand-reuse hints (register
  allocation), in any order;
- ``different``: anything else (printed: the opcodes, and the opcodes with modifiers, that each
  side has more of; both empty when only operands changed, e.g. a negation or an immediate).

Registers, stack and static shared memory (``cuobjdump -res-usage``) are compared too. Only
``identical`` proves the change is a no-op on the GPU; ``reordered`` and ``renamed`` issue the same
work per thread but may schedule differently, which only a GPU run can time.

``python -m sjd_kernels.bench.sass_diff --base REV [--file csrc/jacobi_step.cu ...] [--arch 90]``
(exit status 0 when no kernel is ``different`` and the resources match, 1 otherwise).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tarfile
import tempfile

from .sass import CUDA_FLAGS, TARGET_CC, _demangle, find_nvcc, opcode, parse_sass, tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_FILES = ("csrc/jacobi_step.cu", "csrc/tree_verify.cu", "csrc/verify_chain.cu", "csrc/tree_kv_update.cu",
                 "csrc/sjd2_prepare.cu")


def compile_sass(src: str, arch: int = TARGET_CC) -> tuple[dict, dict]:
    """``({kernel: [instruction]}, {kernel: (registers, stack, shared)})``, by demangled kernel name, of one .cu file compiled
    for ``sm_<arch>`` with the build's flags (its own folder on the include path)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDACXX)")
    with tempfile.TemporaryDirectory() as d:
        cub = os.path.join(d, "k.cubin")
        r = subprocess.run([nvcc, *CUDA_FLAGS, f"-arch=sm_{arch}", "-cubin", f"-I{os.path.dirname(os.path.abspath(src))}",
                            src, "-o", cub], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"nvcc failed on {src}:\n{r.stderr[-4000:]}")
        sass = subprocess.run([tool("cuobjdump"), "-sass", cub], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tool("cuobjdump"), "-res-usage", cub], capture_output=True, text=True, check=True).stdout
    funcs: dict = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
        elif cur is not None:
            funcs[cur].extend(s for _, s in parse_sass(line))
    usage = {m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4)))
             for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", res)}
    return {kernel_key(k): v for k, v in funcs.items()}, {kernel_key(k): v for k, v in usage.items()}


def kernel_key(mangled: str) -> str:
    """The demangled name of a kernel with its anonymous namespace made path-independent: a kernel in
    an anonymous namespace carries a hash of the file's path in its mangled name
    (``47_GLOBAL__N__f99d8315_14_tree_verify_cu_53335f52``), which differs between two checkouts."""
    m = re.search(r"(\d+)_GLOBAL__N_", mangled)
    if m:
        end = m.start(1) + len(m.group(1)) + int(m.group(1))
        mangled = mangled[:m.start(1)] + "12_GLOBAL__N_1" + mangled[end:]
    return _demangle(mangled)


def _op_with_modifiers(ins: str) -> str:
    """``@!P0 ISETP.GE.AND P0, ...`` -> ``@ISETP.GE.AND``: the opcode with its modifiers, and whether it
    is predicated (which predicate register is an allocation choice)."""
    parts = ins.split()
    return "@" + parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]


_REG = re.compile(r"\b(?:U?R|U?P|B)(?:\d+|Z|T)\b")


def _registers_renamed(ins: str) -> str:
    """An instruction with every register name (R, UR, P, UP, B; RZ and PT too) replaced by a
    placeholder and the operand-reuse cache hints (``.reuse``) dropped: what is left are the opcode,
    modifiers, immediates, constant-bank operands, operand negations and branch targets."""
    return _REG.sub("%", ins.replace(".reuse", ""))


def classify(a: list, b: list) -> tuple[str, dict]:
    """How two instruction lists of one kernel compare, and for ``different`` the opcode counts each
    side has more of (``{"base": {...}, "new": {...}}``)."""
    if a == b:
        return "identical", {}
    if collections.Counter(a) == collections.Counter(b):
        return "reordered", {}
    if collections.Counter(map(_registers_renamed, a)) == collections.Counter(map(_registers_renamed, b)):
        return "renamed", {}
    ca = collections.Counter(_op_with_modifiers(s) for s in a)
    cb = collections.Counter(_op_with_modifiers(s) for s in b)
    oa = collections.Counter(opcode(s) for s in a)
    ob = collections.Counter(opcode(s) for s in b)
    return "different", {"base": dict(oa - ob), "new": dict(ob - oa), "modifiers_base": dict(ca - cb),
                         "modifiers_new": dict(cb - ca)}


def checkout(rev: str, dest: str) -> None:
    """The tracked files of ``rev`` under ``dest`` (``git archive``; the working tree is not touched)."""
    with tempfile.TemporaryFile() as f:
        subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev], stdout=f, check=True)
        f.seek(0)
        with tarfile.open(fileobj=f) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(dest, filter="data")
            else:
                t.extractall(dest)


def compare_file(base_src: str, new_src: str, arch: int = TARGET_CC) -> list:
    """One dict per kernel of the two compiled versions of a file."""
    fa, ua = compile_sass(base_src, arch)
    fb, ub = compile_sass(new_src, arch)
    rows = []
    for k in sorted(set(fa) | set(fb)):
        if k not in fa or k not in fb:
            rows.append({"kernel": k, "verdict": "only in " + ("new" if k in fb else "base"),
                         "base_instructions": len(fa.get(k, [])), "new_instructions": len(fb.get(k, [])),
                         "resources_same": False, "delta": {}})
            continue
        verdict, delta = classify(fa[k], fb[k])
        rows.append({"kernel": k, "verdict": verdict, "base_instructions": len(fa[k]),
                     "new_instructions": len(fb[k]), "base_resources": ua.get(k), "new_resources": ub.get(k),
                     "resources_same": ua.get(k) == ub.get(k), "delta": delta})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sjd_kernels.bench.sass_diff", description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with (e.g. HEAD)")
    ap.add_argument("--file", action="append", default=[], help="csrc/ file to compare (repeatable; default: "
                    "every kernel source)")
    ap.add_argument("--arch", type=int, default=TARGET_CC, help="sm_ architecture (default 90)")
    args = ap.parse_args(argv)
    files = args.file or list(DEFAULT_FILES)
    bad = 0
    with tempfile.TemporaryDirectory() as d:
        checkout(args.base, d)
        for i, rel in enumerate(files):
            print(f"[{i + 1}/{len(files)}] {rel}: compiling both versions for sm_{args.arch} ...", file=sys.stderr,
                  flush=True)
            rows = compare_file(os.path.join(d, rel), os.path.join(ROOT, rel), args.arch)
            print(f"## {rel} ({args.base} -> working tree, sm_{args.arch})\n")
            print("| kernel | verdict | instructions base / new | registers, stack, shared base / new |\n|---|---|---|---|")
            for r in rows:
                res = f"{r.get('base_resources')} / {r.get('new_resources')}"
                print(f"| {r['kernel']} | {r['verdict']} | {r['base_instructions']} / {r['new_instructions']} | {res} |")
                if r["delta"]:
                    print(f"|  | base has more: {r['delta']['base']}; new has more: {r['delta']['new']} | | |")
                bad += r["verdict"] not in ("identical", "reordered", "renamed") or not r["resources_same"]
            counts = collections.Counter(r["verdict"] for r in rows)
            print(f"\n{len(rows)} kernels: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
