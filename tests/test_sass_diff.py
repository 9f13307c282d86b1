"""The SASS comparison tool (``sjd_kernels.bench.sass_diff``): its verdicts on fixed listings, and on
two versions of a small kernel compiled for sm_90 with nvcc (no GPU needed; skipped without nvcc)."""
from __future__ import annotations

import os
import subprocess

import pytest

pytest.importorskip("triton")

from sjd_kernels.bench import sass_diff as D  # noqa: E402

BASE = ["IMAD.MOV.U32 R12, RZ, RZ, R4", "IMAD.MOV.U32 R14, RZ, RZ, R6", "FADD R0, R12, R14", "EXIT"]


def test_classify_verdicts():
    assert D.classify(BASE, list(BASE)) == ("identical", {})
    swapped = [BASE[1], BASE[0]] + BASE[2:]
    assert D.classify(BASE, swapped) == ("reordered", {})
    renamed = ["IMAD.MOV.U32 R13, RZ, RZ, R4", "IMAD.MOV.U32 R14, RZ, RZ, R6", "FADD R0, R13, R14", "EXIT"]
    assert D.classify(BASE, renamed) == ("renamed", {})
    reuse = BASE[:2] + ["FADD R0, R12.reuse, R14", "EXIT"]
    assert D.classify(BASE, reuse) == ("renamed", {})
    # a changed modifier is more than a renaming, even with the same opcode counts
    modifier = ["IMAD.MOV.U32 R12, RZ, RZ, R4", "IMAD.MOV.U32 R14, RZ, RZ, R6", "FADD.FTZ R0, R12, R14", "EXIT"]
    verdict, delta = D.classify(BASE, modifier)
    assert verdict == "different" and delta["base"] == {} and delta["new"] == {}
    assert delta["modifiers_base"] == {"FADD": 1} and delta["modifiers_new"] == {"FADD.FTZ": 1}
    more = BASE[:3] + ["FMUL R0, R0, R0", "EXIT"]
    verdict, delta = D.classify(BASE, more)
    assert verdict == "different" and delta["new"] == {"FMUL": 1} and delta["base"] == {}
    # predicating an instruction is a change; which predicate register it reads is a renaming
    verdict, delta = D.classify(BASE, BASE[:3] + ["@!P0 EXIT"])
    assert verdict == "different" and delta["modifiers_new"] == {"@EXIT": 1}
    assert D.classify(BASE[:3] + ["@!P0 EXIT"], BASE[:3] + ["@!P1 EXIT"])[0] == "renamed"
    assert D.classify(BASE[:3] + ["@!P0 EXIT"], BASE[:3] + ["@P0 EXIT"])[0] == "different"
    # an operand change that keeps every opcode and modifier (a negation, an immediate) is a change
    for other in ("FADD R0, R12, -R14", "FADD R0, R12, 0x3f800000"):
        verdict, delta = D.classify(BASE, BASE[:2] + [other, "EXIT"])
        assert verdict == "different" and delta["base"] == delta["new"] == {}, (other, delta)


KERNEL = r"""
// %s
__global__ void axpy(const float* __restrict__ x, float* __restrict__ y, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = %s;
}
"""


def test_compare_file_on_real_code(tmp_path):
    if D.find_nvcc() is None:
        pytest.skip("nvcc not found")
    base = tmp_path / "base.cu"
    comment = tmp_path / "comment.cu"
    changed = tmp_path / "changed.cu"
    base.write_text(KERNEL % ("base", "a * x[i] + y[i]"))
    comment.write_text(KERNEL % ("only this comment differs", "a * x[i] + y[i]"))
    changed.write_text(KERNEL % ("base", "a * x[i] + y[i] * y[i]"))
    try:
        same = D.compare_file(str(base), str(comment))
        diff = D.compare_file(str(base), str(changed))
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"CUDA tools cannot compile/disassemble here: {e}")
    assert [r["verdict"] for r in same] == ["identical"] and same[0]["resources_same"]
    assert "axpy" in same[0]["kernel"] and same[0]["base_instructions"] > 4
    assert [r["verdict"] for r in diff] == ["different"]
    # the build's flags keep multiply and add separate (--fmad=false): one more FMUL
    assert diff[0]["delta"]["new"].get("FMUL", 0) >= 1, diff[0]["delta"]


def test_main_reports_a_changed_kernel(tmp_path, monkeypatch, capsys):
    """The CLI compares a revision's file with the working tree's and exits 1 on a changed kernel."""
    if D.find_nvcc() is None:
        pytest.skip("nvcc not found")
    base_dir = tmp_path / "rev"
    new_dir = tmp_path / "tree"
    for d, expr in ((base_dir, "a * x[i] + y[i]"), (new_dir, "a * x[i] - y[i]")):
        (d / "csrc").mkdir(parents=True)
        (d / "csrc" / "k.cu").write_text(KERNEL % ("k", expr))

    def fake_checkout(rev, dest):
        assert rev == "REV"
        os.makedirs(os.path.join(dest, "csrc"))
        with open(os.path.join(dest, "csrc", "k.cu"), "w") as f:
            f.write((base_dir / "csrc" / "k.cu").read_text())

    monkeypatch.setattr(D, "checkout", fake_checkout)
    monkeypatch.setattr(D, "ROOT", str(new_dir))
    try:
        rc = D.main(["--base", "REV", "--file", "csrc/k.cu"])
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"CUDA tools cannot compile/disassemble here: {e}")
    out = capsys.readouterr().out
    # a * x - y: the same opcodes as a * x + y, one operand negated
    assert rc == 1 and "| different |" in out and "1 kernels: 1 different" in out, out
    (new_dir / "csrc" / "k.cu").write_text(KERNEL % ("another comment", "a * x[i] + y[i]"))
    assert D.main(["--base", "REV", "--file", "csrc/k.cu"]) == 0
    assert "1 kernels: 1 identical" in capsys.readouterr().out


def test_kernel_key_ignores_the_anonymous_namespace_hash():
    """A kernel in an anonymous namespace is named after a hash of its file's path: two checkouts of
    one file must still pair their kernels."""
    a = "_ZN3sjd47_GLOBAL__N__f99d8315_14_tree_verify_cu_53335f5218tree_verify_kernelI13__nv_bfloat16Lb1EEEvNS0_6ParamsE"
    b = "_ZN3sjd47_GLOBAL__N__0123abcd_14_tree_verify_cu_9876fedc18tree_verify_kernelI13__nv_bfloat16Lb1EEEvNS0_6ParamsE"
    other = a.replace("Lb1E", "Lb0E")
    assert D.kernel_key(a) == D.kernel_key(b) != D.kernel_key(other)
    assert "tree_verify_kernel" in D.kernel_key(a)
