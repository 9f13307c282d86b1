"""``sjd_kernels.bench.ncu_source``: Nsight Compute's per-instruction samples joined to source lines.

No GPU here, so the Nsight Compute export is made up: a CSV in the source page's shape (a title
line, then ``Address``, ``Source`` and the sampling columns) over real sm_90 code (a phase probe
of the Triton rows kernel compiled here, disassembled with line info), with samples placed on
chosen instructions. The tests check that they come back under the function the line table says,
whichever way the rows are joined, and that a listing of other code is refused.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from sjd_kernels.bench import ncu_source as N  # noqa: E402
from sjd_kernels.bench import sass as S  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SUPPORTED_HINTS = ("ptxas", "no module named 'triton.backends.nvidia'", "cuda backend", "libcuda", "nvdisasm")
HEAD = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
        "Instructions Executed", "stall_wait"]

# Subprocess body (the suite runs with TRITON_INTERPRET=1, which never compiles): two phase probes
# for sm_90, their nvdisasm -g listings, and kernel_listing('triton') over a stand-in JIT cache.
_COMPILE = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from sjd_kernels.bench import sass, ncu_source
from sjd_kernels.triton import jacobi_step as tj
out = {}
probes = {p[0]: p for p in sass.phase_probes(4096)}
cks = {}
for key, name in (("race", "race over the row"), ("softmax", "softmax over the row")):
    _, fn, sig, ce, _ = probes[name]
    src = triton.compiler.ASTSource(fn=fn, signature=dict(sig, **{k: "constexpr" for k in ce}), constexprs=ce)
    cks[key] = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, enable_fp_fusion=False))
    out[key] = ncu_source._disassemble(cks[key].asm["cubin"])
class _Jit:       # what kernel_listing reads of a JITFunction: device -> (kernel cache, ...)
    device_caches = {0: ({"spec": cks["race"]}, None, None, None, None)}
class _Tuner:     # an autotuner wraps the JITFunction as .fn
    fn = _Jit()
tj._jacobi_rows_kernel = _Tuner()
out["triton_listing"] = ncu_source.kernel_listing("triton")
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def listings():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    if p.returncode != 0:
        msg = (p.stderr or p.stdout)[-3000:]
        if any(h in msg.lower() for h in NOT_SUPPORTED_HINTS):
            pytest.skip(f"cannot compile / disassemble sm_90 code here: {msg[-300:]}")
        pytest.fail(f"compile subprocess failed (rc {p.returncode}):\n{msg}")
    return json.loads(p.stdout)


def _def_range(path: str, name: str) -> tuple:
    """Lines of a Python function's definition, from the source (independent of ncu_source)."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node.lineno, node.end_lineno
    raise AssertionError(name)


def _csv(ins: list, samples, *, base=0x7F3A_0000_0000, address=True, shuffle=False, title=True,
         fmt=hex) -> str:
    """A source-page CSV over listing instructions ``ins`` with ``samples[i]`` on instruction i."""
    rows = [([fmt(base + a)] if address else []) + [s + " ;", str(n), str(n // 2), f"{n * 1000:,}", str(n // 3)]
            for (a, s, _), n in zip(ins, samples)]
    if shuffle:
        random.Random(5).shuffle(rows)
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    if title:
        w.writerow(['"_probe_race" (32, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0'])
    w.writerow(HEAD if address else HEAD[1:])
    w.writerows(rows)
    return buf.getvalue()


def _race_samples(ins: list) -> list:
    lo, hi = _def_range(os.path.join(ROOT, "sjd_kernels", "triton", "sampling.py"), "race")
    out = []
    for _, _, where in ins:
        f, _, ln = where.rpartition(":")
        out.append(7 if f == "sampling.py" and lo <= int(ln) <= hi else 0)
    return out


ADDRESS_FORMATS = {"0x": hex, "bare-hex-digits": lambda a: f"{a:016x}"}


@pytest.mark.parametrize("how,fmt", [("address", "0x"), ("address", "bare-hex-digits"), ("order", "0x")])
def test_samples_come_back_under_the_function_of_their_line(listings, how, fmt):
    """(bare-hex-digits: addresses printed in hex without a prefix, from a base whose digits are all
    decimal ones, so only the hex reading lines up.)"""
    text = listings["race"]
    (fname, ins), = S.parse_nvdisasm(text).items()
    samples = _race_samples(ins)
    n = sum(samples)
    assert n > 0, "the race probe has no instruction located in sampling.race"
    data = N.read_source_csv(_csv(ins, samples, address=how == "address", shuffle=how == "address",
                                  base=0x1000_0000 if fmt != "0x" else 0x7F3A_0000_0000, fmt=ADDRESS_FORMATS[fmt]))
    assert len(data["rows"]) == len(ins)
    assert data["columns"]["samples"] == HEAD[2] and data["columns"]["executed"] == HEAD[4]
    assert data["columns"]["stalls"] == ["stall_wait"]
    al = N.align(data["rows"], {fname: ins})
    assert al["how"] == how and al["agree"] == 1.0
    s = N.split(data["rows"], ins, al["index"], data["columns"])
    race = s["by_function"]["sampling.py:race"]
    assert race[HEAD[2]] == n and race[HEAD[4]] == n * 1000          # thousands separators read
    assert s["total"][HEAD[2]] == n
    assert all(v[HEAD[2]] == 0 for k, v in s["by_function"].items() if k != "sampling.py:race")
    md, js = N.report(_csv(ins, samples), text)
    assert "| sampling.py:race | 100.0 |" in md and js["agree"] == 1.0


def test_a_listing_of_other_code_is_refused(listings):
    (_, ins), = S.parse_nvdisasm(listings["race"]).items()
    samples = [random.Random(i).randint(0, 9) for i in range(len(ins))]
    md, js = N.report(_csv(ins, samples), listings["softmax"])
    assert js["agree"] < N.MIN_AGREE
    assert "does not match" in md and "by_function" not in js and len(js["hottest"]) > 0


def test_kernel_listing_reads_the_triton_jit_caches(listings):
    f = S.parse_nvdisasm(listings["triton_listing"])
    assert list(f) == ["_probe_race#0"]
    assert any(w.startswith("sampling.py:") for _, _, w in f["_probe_race#0"])


LISTING = """
.text._jacobi_rows_kernel:
\t//## File "/x/sjd_kernels/triton/jacobi_step.py", line {kline}
        /*0000*/                   S2R R0, SR_TID.X ;
\t//## File "/x/sjd_kernels/triton/sampling.py", line {race_line}
        /*0010*/                   FMUL R1, R0, R0 ;
\t//## File "/venv/triton/language/standard.py", line 170
        /*0020*/                   FMNMX R2, R1, R0, !PT ;
        /*0030*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
\t//## File "/x/sjd_kernels/triton/jacobi_step.py", line {kline2}
        /*0040*/                   STG.E [R4.64], R3 ;
        /*0050*/                   EXIT ;
"""


def test_code_outside_the_package_is_charged_to_its_call_site():
    jpath = os.path.join(ROOT, "sjd_kernels", "triton", "jacobi_step.py")
    src = open(jpath).read().splitlines()
    kline = next(i + 1 for i, ln in enumerate(src) if ln.startswith("def _jacobi_rows_kernel("))
    kline2 = next(i + 1 for i, ln in enumerate(src) if "# ---- verification" in ln) + 1
    race_line = _def_range(os.path.join(ROOT, "sjd_kernels", "triton", "sampling.py"), "race")[0] + 2
    text = LISTING.format(kline=kline, kline2=kline2, race_line=race_line)
    (_, ins), = S.parse_nvdisasm(text).items()
    samples = [1, 10, 100, 1000, 10000, 0]
    md, js = N.report(_csv(ins, samples), text)
    bf = {k: v[HEAD[2]] for k, v in js["by_function"].items()}
    # the two standard.py instructions (tl.max's body) follow a line of race: they count there
    assert bf["sampling.py:race"] == 1110 and bf["jacobi_step.py:_jacobi_rows_kernel"] == 1
    assert bf["jacobi_step.py:_jacobi_rows_kernel / verification and the row's commit candidate"] == 10000
    # by kernel section: race was called from the kernel's first line
    bs = {k: v[HEAD[2]] for k, v in js["by_section"].items()}
    assert bs == {"_jacobi_rows_kernel": 1111, "_jacobi_rows_kernel / verification and the row's commit candidate": 10000}


def _line_of(path: str, text: str, after: int = 0) -> int:
    src = open(path).read().splitlines()
    return next(i + 1 for i, ln in enumerate(src) if i >= after and text in ln)


def test_cpp_functions_and_kernel_sections():
    tgt = os.path.join(ROOT, "csrc", "target.cuh")
    js = os.path.join(ROOT, "csrc", "jacobi_step.cu")
    smp = os.path.join(ROOT, "csrc", "sampling.cuh")
    a = _line_of(tgt, "void count_keys_at_least(")
    assert N.enclosing_function(tgt, a + 2) == "count_keys_at_least"
    sec = _line_of(js, "// ---- 4.")
    assert N.enclosing_function(js, sec + 3) == "jacobi_rows_kernel / 4. one pass over the vocabulary"
    assert N.enclosing_function(js, _line_of(js, "// ---- 3.") + 1) == "jacobi_rows_kernel / 3. row scalars"
    # a kernel declared with __launch_bounds__ is named by the kernel, not the attribute
    assert all(not name.startswith("__") for _, _, name in N._functions(js))
    op = _line_of(smp, "operator()", _line_of(smp, "struct OpMaxU64"))
    assert N.enclosing_function(smp, op) == "struct OpMaxU64"


def test_bad_csv_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "x.csv"
    f.write_text('"==PROF== nothing profiled"\n"a","b"\n')
    with pytest.raises(ValueError, match="Source"):
        N.read_source_csv(f.read_text())
    lst = tmp_path / "l.txt"
    lst.write_text(LISTING)
    assert N.main(["--csv", str(f), "--listing", str(lst)]) == 2
    assert "ncu_source:" in capsys.readouterr().err
    # a kernel filter that leaves no listing function
    good = tmp_path / "g.csv"
    good.write_text(_csv(S.parse_nvdisasm(LISTING)["_jacobi_rows_kernel"], [1] * 6))
    assert N.main(["--csv", str(good), "--listing", str(lst), "--kernel", "tree_verify"]) == 2
    assert "no function whose name contains 'tree_verify'" in capsys.readouterr().err


def test_kernel_listing_of_the_built_extension():
    """The extension is built with -lineinfo: its rows kernels disassemble with csrc line info."""
    from sjd_kernels._ext import _C
    if _C is None:
        if os.environ.get("SJD_REQUIRE_EXT") == "1":
            pytest.fail("SJD_REQUIRE_EXT=1 but the extension is not importable")
        pytest.skip("extension not built")
    try:
        text = N.kernel_listing("cuda")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"CUDA binary tools cannot read the extension here: {e}")
    f = S.parse_nvdisasm(text)
    rows = [k for k in f if "jacobi_rows_kernel" in k]
    assert rows, list(f)[:5]
    files = {w.rpartition(":")[0] for k in rows for _, _, w in f[k]}
    assert {"jacobi_step.cu", "target.cuh"} <= files, files


FAKE_NCU = r"""#!/usr/bin/env bash
# stand-in for Nsight Compute's CLI, enough for gpu_run.sh's profile stage: the profiling call
# writes the report and the listing profile_step.py would write; --import prints the pages
here=$(dirname "$0")
if [[ " $* " == *" --import "* ]]; then
  if [[ " $* " == *" --page source "* ]]; then cat "$here/sass.csv"; else echo "details page of $*"; fi
  exit 0
fi
rep=""; listing=""; prev=""
for a in "$@"; do
  [ "$prev" = "-o" ] && rep=$a
  [ "$prev" = "--listing" ] && listing=$a
  prev=$a
done
[ -n "$rep" ] && [ -n "$listing" ] || { echo "fake ncu: no -o or --listing in: $*"; exit 9; }
touch "$rep.ncu-rep"
# FAKE_NO_LISTING: the profiled process could not write its listing (profile_step.py exits 3)
if [ -n "${FAKE_NO_LISTING:-}" ]; then exit 3; fi
cp "$here/listing.txt" "$listing"
"""


@pytest.mark.parametrize("listing", [True, False])
def test_gpu_run_profile_stage_writes_the_split(tmp_path, listing):
    """gpu_run.sh's profile stage with a stand-in ncu: the command it builds carries the report,
    SourceCounters and the listing path, and the split of the exported page reaches summary.md.
    Without a listing the stage fails but still exports the report's pages."""
    import tarfile
    race_line = _def_range(os.path.join(ROOT, "sjd_kernels", "triton", "sampling.py"), "race")[0] + 2
    src = open(os.path.join(ROOT, "sjd_kernels", "triton", "jacobi_step.py")).read().splitlines()
    kline = next(i + 1 for i, ln in enumerate(src) if ln.startswith("def _jacobi_rows_kernel("))
    text = LISTING.format(kline=kline, kline2=kline + 1, race_line=race_line)
    (_, ins), = S.parse_nvdisasm(text).items()
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "listing.txt").write_text(text)
    (bin_ / "sass.csv").write_text(_csv(ins, [0, 5, 0, 0, 0, 0]))
    (bin_ / "ncu").write_text(FAKE_NCU)
    (bin_ / "ncu").chmod(0o755)
    env = dict(os.environ, STAGES="profile", PROFILE_BACKENDS="triton", TOTAL_S="90", PY=sys.executable,
               WHEELS=str(tmp_path / "no_wheels"), TMPDIR=str(tmp_path), PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}",
               **({} if listing else {"FAKE_NO_LISTING": "1"}))
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    row = "| profile-triton-B32_W32_V16384_cfg_bf16_sjd_k1000 | "
    assert (row + "ok | 0 |" if listing else row + "FAILED | 1 |") in summary, summary
    assert ("| sampling.py:race | 100.0 |" in summary) == listing, summary
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tf:
        names = tf.getnames()
        log = tf.extractfile("logs/ncu-triton-B32_W32_V16384_cfg_bf16_sjd_k1000.log").read().decode()
    d = "logs/ncu/triton-B32_W32_V16384_cfg_bf16_sjd_k1000/"
    want = {d + "sass.csv", d + "listing.txt", d + "split.md", d + "split.json"} if listing else {d + "sass.csv"}
    assert want <= set(names), names
    assert "details page of" in log and "--page details" in log
