"""The static code metrics tool (``sjd_kernels.bench.sass``): its parsers on fixed listings, and on
real sm_90 code (Triton's compiler and nvcc run here without a GPU; skipped where they cannot)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from sjd_kernels.bench import sass as S  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SUPPORTED_HINTS = ("ptxas", "no module named 'triton.backends.nvidia'", "cuda backend", "libcuda", "cuobjdump")

# a cuobjdump-style listing: a counted loop with a barrier, a conditional forward branch, and an
# out-of-line slow path after the exit that branches back into the body (not a loop)
CUOBJDUMP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA 0x60 ;
        /*0020*/                   ISETP.GE.AND P1, PT, R2, R3, PT ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0050*/               @P1 BRA 0x20 ;
        /*0060*/                   CALL.REL.NOINC 0xa0 ;
        /*0070*/                   STG.E [R4.64], R2 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90 ;
        /*00a0*/                   FCHK P0, R5, R6 ;
        /*00b0*/                   BRA 0x70 ;
"""

NVDISASM = """
.text._Z3fooPf:
        .type           _Z3fooPf,@function
_Z3fooPf:
\t//## File "/src/x.cu", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
\t//## File "/src/y.cuh", line 7
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
\t//## File "/src/x.cu", line 12
        /*0030*/              @!P0 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
.L_x_1:
        /*0050*/                   BRA `(.L_x_1);
"""


def test_listing_parsers_find_loops_and_skip_out_of_line_returns():
    ins = S.parse_sass(CUOBJDUMP)
    assert len(ins) == 12 and ins[1] == (0x10, "@!P0 BRA 0x60")
    assert S.opcode("@!P0 ISETP.GE.AND P0, PT, R2, R3, PT") == "ISETP" and S.opcode("BAR.SYNC 0x0") == "BAR"
    lp = S.loops(ins)
    # the loop 0x20..0x50 (4 instructions, one barrier); the slow path's return (0xb0 -> 0x70)
    # jumps back over the EXIT and the self-branch at 0x90 jumps to itself: neither is a loop
    assert lp == [{"start": "0x20", "end": "0x50", "instructions": 4, "barriers": 1, "spills": 0}]
    # local-memory loads and stores inside a loop body are counted as its spills
    assert S.loops([(0x0, "LDL R1, [R2]"), (0x10, "STL [R3], R1"), (0x20, "@P0 BRA 0x0")])[0]["spills"] == 2


def test_nvdisasm_parser_resolves_labels_and_source_lines():
    f = S.parse_nvdisasm(NVDISASM)
    assert list(f) == ["_Z3fooPf"]
    ins = f["_Z3fooPf"]
    assert [a for a, _, _ in ins] == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50]
    assert ins[3][1] == "@!P0 BRA 0x10" and ins[3][2] == "x.cu:12" and ins[1][2] == "y.cuh:7"
    lp = S.loops([(a, s) for a, s, _ in ins])
    assert lp == [{"start": "0x10", "end": "0x30", "instructions": 3, "barriers": 0, "spills": 0}]


@pytest.fixture(scope="module")
def probe_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)                    # real code generation
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "sjd_kernels.bench.sass", "--V", "4096", "--only", "scan",
                        "--only", "search", "--only", "rounds", "--only", "sparse lookup", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if p.returncode != 0:
        msg = (p.stderr or "")[-3000:]
        if any(h in msg.lower() for h in NOT_SUPPORTED_HINTS):
            pytest.skip(f"this Triton build cannot generate sm_90 code here: {msg[-300:]}")
        pytest.fail(f"sass tool failed (rc {p.returncode}):\n{msg}")
    data = json.load(open(out / "sass_sm90.json"))
    assert (out / "sass_sm90.md").read_text().startswith("Command: `python -m sjd_kernels.bench.sass")
    return {r["name"]: r for r in data["rows"]}


def test_compiled_probes_report_the_search_loop_and_the_cheaper_scan(probe_rows):
    assert set(probe_rows) >= {"top-k search alone", "scan: tl.cumsum", "scan: prefix_count"}
    for r in probe_rows.values():
        assert 0 < r["registers"] <= 255 and r["instructions"] > 50
    # the top-k search is one loop (its round) with the block reduction's barriers in it
    search = probe_rows["top-k search alone"]
    assert len(search["loops"]) == 1 and search["loops"][0]["barriers"] >= 1
    # the scan on the [BLOCK // 32, 32] view issues fewer instructions than tl.cumsum over the tile
    assert probe_rows["scan: prefix_count"]["instructions"] < probe_rows["scan: tl.cumsum"]["instructions"]


def test_a_search_round_over_the_candidate_list_issues_fewer_instructions_than_over_the_row(probe_rows):
    # V 4096 over 16 warps: 8 lanes per thread on the row, one on the candidate list of 512
    r = {name.split(": ", 1)[1]: m["instructions"] for name, m in probe_rows.items() if name.startswith("top-k rounds")}
    assert set(r) == {"kth_init over the row", "start over the row", "start + 4 rounds over the row",
                      "start over a list of 512", "start + 4 rounds over a list of 512"}
    # starting from the row maximum and V takes fewer instructions than kth_init's 4 reductions
    assert r["start over the row"] < r["kth_init over the row"]
    row = r["start + 4 rounds over the row"] - r["start over the row"]
    lst = r["start + 4 rounds over a list of 512"] - r["start over a list of 512"]
    assert 0 < lst < row, (lst, row)


def test_a_sparse_lookup_over_the_race_list_issues_fewer_instructions_than_over_the_row(probe_rows):
    # the row path searches the slot with a binary search masked over the row tile; the
    # candidate-list path searches at the listed lanes only (1024 here against a row of 4096)
    row, lst = probe_rows["sparse lookup over the row"], probe_rows["sparse lookup over a list of 1024"]
    assert 0 < lst["instructions"] < row["instructions"], (lst["instructions"], row["instructions"])
    assert lst["loops"] == [] and row["loops"] == []         # the halvings are unrolled


def _cuda_metrics(source: str, **kw) -> list:
    """``S.cuda_metrics`` of ``csrc/<source>`` for sm_90; skips where nvcc or the CUDA tools cannot run."""
    if S.find_nvcc() is None:
        pytest.skip("nvcc not found")
    try:
        return S.cuda_metrics(os.path.join(ROOT, "csrc", source), **kw)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"CUDA tools cannot compile/disassemble here: {e}")


def test_cuda_rows_kernel_metrics():
    rows = _cuda_metrics("jacobi_step.cu")
    names = [r["name"] for r in rows]
    # per dtype one instantiation for rows in shared memory and one for rows in the global buffer
    assert len(rows) == 6 and any("bf16" in n for n in names) and any("fp16" in n for n in names), names
    assert sum("false>" in n for n in names) == 3, names
    # the row pointer's address space is known in both instantiations: shared or global, never generic
    assert all(r["generic_mem"] == 0 for r in rows), [(r["name"], r["generic_mem"]) for r in rows]
    for r in rows:
        # __launch_bounds__(1024): at most 64 registers; the pivot searches and lane passes are loops
        assert 0 < r["registers"] <= 64 and r["instructions"] > 1000
        assert any(x["branch_at"].startswith("target.cuh:") for x in r["loops"])
        assert all(x["instructions"] < r["instructions"] for x in r["loops"])


def test_cuda_verify_chain_kernel_fits_its_launch_bound():
    """``csrc/verify_chain.cu`` launches up to 1024 threads per block: each instantiation must fit in
    64 registers without spilling to the stack, and read the laws through global (not generic)
    addresses."""
    rows = _cuda_metrics("verify_chain.cu", only="verify_chain_kernel")
    assert sorted(r["name"] for r in rows) == ["void verify_chain_kernel<bf16>(Params)",
                                               "void verify_chain_kernel<float>(Params)",
                                               "void verify_chain_kernel<fp16>(Params)"]
    for r in rows:
        assert 0 < r["registers"] <= 64 and r["stack"] == 0 and r["generic_mem"] == 0, r


def test_cuda_sjd2_prepare_kernel_fits_and_moves_16_bytes():
    """``csrc/sjd2_prepare.cu`` launches up to 256 threads per block: every instantiation fits, reads
    through global addresses and keeps no stack beyond the 32 bytes of ``cosf``'s reduction of large
    arguments (a path the noise never takes: its argument is below 2 pi); the 16-byte path's table
    row, output and float32 rows move in 16-byte accesses, the one-lane path's do not."""
    rows = _cuda_metrics("sjd2_prepare.cu", only="sjd2_prepare_kernel")
    by = {r["name"]: r for r in rows}
    assert sorted(by) == sorted(f"void sjd2_prepare_kernel<{t}, {v}>(Sjd2PrepareArgs)" for t, vs in
                                (("float", (4, 1)), ("fp16", (8, 1)), ("bf16", (8, 1))) for v in vs), sorted(by)
    for name, r in by.items():
        assert 0 < r["registers"] <= 255 and r["stack"] <= 32 and r["generic_mem"] == 0, r
        if name.endswith(", 1>(Sjd2PrepareArgs)"):
            assert r["wide_mem"] == 0, r
        else:
            # loads: table row, mean, std, latent, level row; stores: output, latent (in both the
            # noisy and the clean branch); an 8-lane pack of a float32 row takes two accesses
            assert r["wide_mem"] >= 10, r
