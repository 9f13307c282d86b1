"""Defects found by an audit of the scripts under ``benchmarks/``, run as a user would on CPU: each test
failed before its fix. Nothing here writes under ``benchmarks/results``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the script loader, the past-the-checks stand-in and the autouse thread fixture of test_script_args
from test_script_args import keep_threads, reached, script  # noqa: F401
from test_script_args import usage_error as any_usage_error

ROOT = Path(__file__).resolve().parents[1]


def usage_error(main, args, flag, capsys):
    """A usage error about ``flag`` itself (argparse's usage line names every flag, so it must be the error's)."""
    err = any_usage_error(main, args, flag, capsys)
    assert f"argument {flag}:" in err, err
    return err


# ----------------------------------------------------------------------------- benchmarks/ci_time_by_file.py
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="0"
failures="0" skipped="1" tests="5" time="1.3">
<testcase classname="tests.test_a.TestK" name="test_x" time="0.30" />
<testcase classname="tests.test_a.TestK.TestInner" name="test_w" time="0.05" />
<testcase classname="tests.test_a" name="test_y" time="0.20" />
<testcase classname="tests.cuda_host.test_b" name="test_s" time="0.000"><skipped message="skip"/></testcase>
<testcase classname="tests.cuda_host.test_b" name="test_z" time="0.74" />
</testsuite></testsuites>"""


def test_ci_time_by_file_sums_a_files_classes_into_the_file(tmp_path, capsys):
    """Tests in a ``Test*`` class were a row of their own (``tests.test_a.TestK``), split from their file;
    and every time under 0.5 s printed as 0."""
    m = script("benchmarks/ci_time_by_file.py")
    (tmp_path / "r.xml").write_text(JUNIT)
    secs, count = m.by_file(str(tmp_path / "r.xml"))
    assert dict(count) == {"tests/test_a.py": 3, "tests/cuda_host/test_b.py": 2}
    assert secs["tests/test_a.py"] == pytest.approx(0.55) and secs["tests/cuda_host/test_b.py"] == pytest.approx(0.74)
    m.main([str(tmp_path / "r.xml"), "--top", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "total 1.3 s over 5 tests in 2 files"
    assert out[1:] == ["| seconds | tests | file |", "|---|---|---|", "| 0.7 | 2 | tests/cuda_host/test_b.py |"]


def test_ci_time_by_file_uses_the_file_attribute_of_xunit1():
    m = script("benchmarks/ci_time_by_file.py")
    assert m.file_of("tests.test_a.TestK", "tests/test_a.py") == "tests/test_a.py"
    assert m.file_of("test_top") == "test_top.py"


@pytest.mark.parametrize("top", ["0", "-1"])
def test_ci_time_by_file_top_below_one(tmp_path, capsys, top):
    """--top 0 / -1 printed an empty table."""
    m = script("benchmarks/ci_time_by_file.py")
    (tmp_path / "r.xml").write_text(JUNIT)
    usage_error(m.main, [str(tmp_path / "r.xml"), "--top", top], "--top", capsys)


@pytest.mark.parametrize("content", [None, "not xml", '<testsuite><testcase classname="a" time="x"/></testsuite>'])
def test_ci_time_by_file_unreadable_report(tmp_path, capsys, content):
    """A missing or malformed report was a raw FileNotFoundError / ParseError / ValueError traceback."""
    m = script("benchmarks/ci_time_by_file.py")
    f = tmp_path / "r.xml"
    if content is not None:
        f.write_text(content)
    usage_error(m.main, [str(f)], "report", capsys)


# ----------------------------------------------------------------------------- benchmarks/two_sample_check.py
def test_two_sample_check_help_keeps_its_line_continuation():
    """The docstring's ``\\`` joined the two lines of its command (``--n 400         --ar-seed``)."""
    m = script("benchmarks/two_sample_check.py")
    assert "--n 400 \\\n        --ar-seed 4242 --seed 31337" in m.__doc__
    assert "``--window`` (default 16)" in m.__doc__ and "``--cfg`` (default 3)" in m.__doc__


# ----------------------------------------------------------------------------- benchmarks/bench_tree_kv_update.py
def test_bench_tree_kv_update_cpu_check_can_fail(monkeypatch, tmp_path, capsys):
    """A wrong reference failed an ``assert`` (a traceback; nothing at all under ``python -O``): now a
    MISMATCH line and exit 1, naming each layout and dtype."""
    m = script("benchmarks/bench_tree_kv_update.py")
    assert m.cpu_check() == []
    assert m.cpu_check(stacked=lambda kv, path, cl, st: None) == ["stacked bf16", "stacked fp16", "stacked fp32"]

    def list_sets_status(keys, values, path, cl, st):
        m.ref.tree_kv_update_list(keys, values, path, cl, st)
        st[0] = 1
    assert m.cpu_check(listed=list_sets_status) == ["list bf16", "list fp16", "list fp32"]
    monkeypatch.setattr(m.ref, "tree_kv_update", lambda *a: None)
    assert m.main(["--out", str(tmp_path / "kv")]) == 1
    assert "MISMATCH against a sequential copy: stacked bf16" in capsys.readouterr().out
    assert not (tmp_path / "kv").exists()


def test_bench_tree_kv_update_no_usable_backend_writes_nothing(monkeypatch, tmp_path, capsys):
    """On a GPU without the CUDA extension, ``--backends cuda`` timed nothing and wrote an empty csv/md, exit 0."""
    import sjd_kernels.bench.timing as timing
    m = script("benchmarks/bench_tree_kv_update.py")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(m, "backends_available", lambda: {"torch": None})
    monkeypatch.setattr(timing, "machine_info", reached)
    assert m.main(["--backends", "cuda", "--quick", "--out", str(tmp_path / "kv")]) == 1
    assert "none of the backends cuda is usable here" in capsys.readouterr().out
    assert not (tmp_path / "kv").exists()


def test_bench_tree_kv_update_unknown_backend_names_the_argument(capsys):
    m = script("benchmarks/bench_tree_kv_update.py")
    err = usage_error(m.main, ["--backends", "torch,foo", "--out", "/nonexistent-audit/kv"], "--backends", capsys)
    assert "argument --backends: unknown names ['foo']" in err


# ----------------------------------------------------------------------------- benchmarks/bench_tree_verify.py
def test_bench_tree_verify_cpu_check_can_fail(monkeypatch, tmp_path, capsys):
    """The CPU check compares a backend with the reference: a wrong backend exits 1; --csv says it wrote nothing."""
    m = script("benchmarks/bench_tree_verify.py")
    monkeypatch.setattr(m, "has_gpu", lambda: False)

    def wrong(*args):
        n, p, t = m.ref.tree_verify(*args)
        return n + 1, p, t
    monkeypatch.setattr(m, "backends", lambda dev: {"wrong": wrong, "ref": m.ref.tree_verify})
    assert m.main(["--csv", str(tmp_path / "tv.csv")]) == 1
    out = capsys.readouterr().out
    assert "check wrong   K4-d3  B=2 V=64: 0/2 requests equal, status equal: True" in out
    assert "check ref     chain8 B=2 V=64: 2/2 requests equal, status equal: True" in out
    assert f"--csv {tmp_path / 'tv.csv'}: nothing written" in out and not (tmp_path / "tv.csv").exists()


def test_bench_tree_verify_without_a_backend_to_check_is_not_a_success(monkeypatch, capsys):
    """Without a GPU and without the Triton interpreter nothing was checked, and the run exited 0."""
    m = script("benchmarks/bench_tree_verify.py")
    monkeypatch.setattr(m, "has_gpu", lambda: False)
    monkeypatch.setattr(m, "backends", lambda dev: {})
    assert m.main([]) == 2
    assert "nothing checked" in capsys.readouterr().err


def test_bench_tree_verify_gpu_rows_that_differ_fail_the_run():
    """On a GPU a differing request or status was printed (``STATUS DIFFERS``) but the run exited 0."""
    m = script("benchmarks/bench_tree_verify.py")
    rows = [dict(backend="cuda", shape="K4-d3", B=8, V=16384, equal="8/8", status_equal=True),
            dict(backend="triton", shape="K4-d3", B=8, V=16384, equal="7/8", status_equal=True),
            dict(backend="cuda", shape="chain8", B=1, V=16384, equal="1/1", status_equal=False)]
    assert m.failed(rows) == rows[1:]
    assert m.failed(rows[:1]) == []


# ----------------------------------------------------------------------------- benchmarks/bench_jacobi_step.py
def test_bench_jacobi_step_refuses_another_op(tmp_path, capsys):
    """``--op tree_verify`` ran tree_verify's rows too, into the files of this jacobi_step script."""
    m = script("benchmarks/bench_jacobi_step.py")
    for args in (["--op", "tree_verify"], ["--op=verify_only"]):
        assert m.main(args + ["--check", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "error: argument --op: this script runs jacobi_step only" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- benchmarks/bench_sjd2.py
@pytest.mark.skipif(not (ROOT / "sjd_kernels" / "models" / "weights" / "mnist_sjd2.json").exists(),
                    reason="needs the bundled MNIST SJD2 fine-tune")
def test_bench_sjd2_more_images_than_the_real_floor_has(monkeypatch, tmp_path, capsys):
    """--images 600 on MNIST (500 held-out images) compared 600 generated images with 500 real ones for
    the FD real floor, silently, after the models were loaded."""
    m = script("benchmarks/bench_sjd2.py")
    monkeypatch.setattr(m.bundled, "load", reached)
    usage_error(m.main, ["--images", "600", "--out", str(tmp_path / "bs")], "--images", capsys)
    assert not (tmp_path / "bs").exists()


@pytest.mark.skipif(not (ROOT / "sjd_kernels" / "models" / "weights" / "mnist_sjd2.json").exists(),
                    reason="needs the bundled MNIST SJD2 fine-tune")
def test_bench_sjd2_rows_record_the_commit(monkeypatch, tmp_path, capsys):
    import json
    m = script("benchmarks/bench_sjd2.py")
    keys = ("step_compression", "steps_mean", "accuracy", "fd", "fd_real", "n", "noisy_kv_tokens", "refed_tokens")
    monkeypatch.setattr(m, "run", lambda *a, **k: dict.fromkeys(keys, 1))
    monkeypatch.setattr(m, "git_commit", lambda: "abc123+dirty")
    m.main(["--images", "2", "--seeds", "0", "--skip", "base_ar", "ar", "sjd", "--out", str(tmp_path / "bs")])
    rows = [json.loads(x) for x in (tmp_path / "bs" / "sjd2_mnist.jsonl").read_text().splitlines()]
    assert [(r["method"], r["commit"]) for r in rows] == [("SJD2 K8 W16 keep", "abc123+dirty")]
    assert "# commit abc123+dirty, torch " in capsys.readouterr().out


# ----------------------------------------------------------------------------- every script
SCRIPTS = ["bench_jacobi_step", "bench_sjd2", "bench_tree_kv_update", "bench_tree_verify", "ci_time_by_file",
           "cuda_sim_parity", "pilot_sjd2_standin", "profile_step", "state_bytes", "two_sample_check"]


def test_every_script_help_exits_zero():
    """``--help`` of each script, as one process (imports shared): exit 0, a usage line, no traceback."""
    code = ("import runpy, sys, io, contextlib\n"
            "bad = []\n"
            f"for s in {SCRIPTS!r}:\n"
            "    sys.argv = [s + '.py', '--help']\n"
            "    buf = io.StringIO()\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(buf):\n"
            "            runpy.run_path(f'benchmarks/{s}.py', run_name='__main__')\n"
            "        bad.append((s, 'no exit'))\n"
            "    except SystemExit as e:\n"
            "        if e.code not in (0, None) or 'usage:' not in buf.getvalue():\n"
            "            bad.append((s, e.code, buf.getvalue()[:200]))\n"
            "print(bad)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", (r.stdout[-2000:], r.stderr[-2000:])


# ----------------------------------------------------------------------------- benchmarks/profile_step.py
@pytest.mark.parametrize("seed", [str(2 ** 62), str(-(2 ** 62)), str(2 ** 64)])
def test_profile_step_seed_outside_int64(capsys, seed):
    """The case builders seed requests with seed * 1009 + request: an overflow on the GPU, after the
    checks (without a GPU: 'needs a CUDA device' instead of the usage error)."""
    m = script("benchmarks/profile_step.py")
    usage_error(m.main, ["--case", "B32_W32_V16384_cfg_bf16_sjd_k1000", "--seed", seed], "--seed", capsys)


def test_bench_tree_kv_update_path_of_one_entry_moves_nothing(monkeypatch, capsys):
    """--path 1 is the root alone: every row would time a no-op (0 bytes, 0 GB/s)."""
    m = script("benchmarks/bench_tree_kv_update.py")
    assert m.moved_bytes(m.make_path(2, 1), 36, 20, 64, 2) == 0
    assert m.moved_bytes(m.make_path(2, 8), 36, 20, 64, 2) == 2 * (2 * 7) * 36 * 2 * 20 * 64 * 2
    monkeypatch.setattr(m, "cpu_check", reached)
    usage_error(m.main, ["--path", "1", "--out", "/nonexistent-audit/kv"], "--path", capsys)
