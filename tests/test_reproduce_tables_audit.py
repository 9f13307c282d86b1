"""``python/reproduce_tables.py`` run end to end with its runs stubbed (no model runs here): where its
outputs go, what it does when a run writes nothing or garbage, what its summary says, progress."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from _util import load_file_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rt():
    return load_file_module("reproduce_tables_audit", ROOT / "python" / "reproduce_tables.py")


def _arg(cmd, flag):
    return Path(cmd[cmd.index(flag) + 1])


def fake_run(calls, write=None, rc=0, sleep=0.0):
    """A stand-in for ``subprocess.run``: records (cmd, cwd), optionally writes its output, exits ``rc``."""
    def run(cmd, cwd=None, stdout=None, **k):
        if cmd[0] == "git":                                # the summary's provenance
            return subprocess.CompletedProcess(cmd, 0, stdout="0123abcd\n" if "rev-parse" in cmd else "")
        if cmd[1:2] == ["-c"]:                             # which CPU kernels torch uses
            return subprocess.CompletedProcess(cmd, 0, stdout="AVX2\n")
        calls.append((list(cmd), cwd))
        if stdout is not None:
            stdout.write("step 1 of 3\nstep 2 of 3\n")
            stdout.flush()
        if sleep:
            time.sleep(sleep)
        if write is not None:
            write(cmd)
        return subprocess.CompletedProcess(cmd, rc)
    return run


def copy_recorded_state_bytes(rt):
    def write(cmd):
        shutil.copy(rt.RESULTS / "state_bytes.md", _arg(cmd, "--out"))
    return write


def copy_recorded_demo(rt):
    def write(cmd):
        shutil.copy(rt.RESULTS / "demo_mnist" / "demo.json", _arg(cmd, "--json"))
    return write


def test_relative_out_is_where_the_runs_write(rt, tmp_path, monkeypatch, capsys):
    """The runs' cwd is the repository root: a relative --out used to send their files there (and the
    comparison then read the caller's folder)."""
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(rt.subprocess, "run", fake_run(calls, copy_recorded_state_bytes(rt)))
    assert rt.main(["--only", "state_bytes", "--out", "rel"]) == 0
    cmd, cwd = calls[0]
    assert Path(cwd) == rt.ROOT
    assert _arg(cmd, "--out") == tmp_path / "rel" / "state_bytes" / "state_bytes.md"
    summary = (tmp_path / "rel" / "summary.md").read_text()
    assert "| state_bytes | reproduced | 20 |" in summary
    assert "- torch CPU kernels: AVX2 (--cpu-capability native)\n" in summary


def test_run_that_writes_nothing_is_a_failed_run_not_a_traceback(rt, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(rt.subprocess, "run", fake_run(calls))
    assert rt.main(["--only", "demo_mnist", "--only", "state_bytes", "--out", str(tmp_path / "o")]) == 2
    assert len(calls) == 2                                 # the second target still ran
    out = capsys.readouterr().out
    assert "Traceback" not in out and "demo.json" in out
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "| demo_mnist | no result:" in summary and "| state_bytes | no result:" in summary


def test_unreadable_result_is_reported_not_a_traceback(rt, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(rt.subprocess, "run",
                        fake_run(calls, lambda cmd: _arg(cmd, "--json").write_text('{"methods": ')))
    assert rt.main(["--only", "demo_mnist", "--out", str(tmp_path / "o")]) == 2
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "| demo_mnist | no result: demo.json unreadable (JSONDecodeError" in summary


def test_stale_result_in_a_reused_out_is_not_compared(rt, tmp_path, monkeypatch, capsys):
    """A demo.json left by an earlier run into the same --out used to be compared as if new."""
    d = tmp_path / "o" / "demo_mnist"
    d.mkdir(parents=True)
    shutil.copy(rt.RESULTS / "demo_mnist" / "demo.json", d / "demo.json")
    (d / "diffs.txt").write_text("old\n")
    monkeypatch.setattr(rt.subprocess, "run", fake_run([]))          # exits 0, writes nothing
    assert rt.main(["--only", "demo_mnist", "--out", str(tmp_path / "o")]) == 2
    assert "reproduced" not in (tmp_path / "o" / "summary.md").read_text()
    assert not (d / "diffs.txt").exists()


def test_fresh_result_is_compared(rt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rt.subprocess, "run", fake_run([], copy_recorded_demo(rt)))
    assert rt.main(["--only", "demo_mnist", "--out", str(tmp_path / "o")]) == 0
    assert "| demo_mnist | reproduced | 158 |" in (tmp_path / "o" / "summary.md").read_text()
    assert (tmp_path / "o" / "demo_mnist" / "diffs.txt").read_text() == ""


@pytest.mark.parametrize("sub", ["", "demo_mnist"])
def test_out_in_the_recorded_results_is_refused(rt, tmp_path, monkeypatch, capsys, sub):
    """--out benchmarks/results used to run each target into its recorded folder: the run overwrote
    the committed file, then compared it with itself ("reproduced")."""
    results = tmp_path / "results"
    (results / "demo_mnist").mkdir(parents=True)
    monkeypatch.setattr(rt, "RESULTS", results)
    calls = []
    monkeypatch.setattr(rt.subprocess, "run", fake_run(calls))
    with pytest.raises(SystemExit) as e:
        rt.main(["--only", "demo_mnist", "--out", str(results / sub)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --out:" in err and "Traceback" not in err
    assert calls == []
    assert sorted(p.name for p in results.rglob("*")) == ["demo_mnist"]


def test_out_beside_the_recorded_results_is_allowed(rt, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    (results / "demo_mnist").mkdir(parents=True)
    monkeypatch.setattr(rt, "RESULTS", results)
    monkeypatch.setattr(rt.subprocess, "run", fake_run([]))
    assert rt.main(["--only", "demo_mnist", "--out", str(results / "reproduce_new")]) == 2   # ran (wrote nothing)


def test_summary_says_what_produced_it_and_is_a_wellformed_table(rt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rt.subprocess, "run", fake_run([], copy_recorded_state_bytes(rt)))
    assert rt.main(["--only", "state_bytes", "--out", str(tmp_path / "o"), "--rtol", "1e-6"]) == 0
    text = (tmp_path / "o" / "summary.md").read_text()
    cmd = "`python python/reproduce_tables.py --only state_bytes --out " + str(tmp_path / "o") + " --rtol 1e-6`"
    assert cmd in text
    assert "rtol 1e-06" in text and "- commit: 0123abcd\n" in text
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert table[0] == "| target | result | values compared | run time |"
    assert {ln.count("|") for ln in table} == {5}
    assert table[2].startswith("| state_bytes | reproduced | 20 | ")


def test_long_run_shows_progress(rt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rt, "PROGRESS_S", 0.2)
    monkeypatch.setattr(rt.subprocess, "run", fake_run([], copy_recorded_state_bytes(rt), sleep=0.9))
    assert rt.main(["--only", "state_bytes", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    beats = [ln for ln in out.splitlines() if "still running" in ln]
    assert len(beats) >= 2 and beats[-1].endswith("step 2 of 3")


def test_failed_run_keeps_the_log_tail_visible(rt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rt.subprocess, "run", fake_run([], rc=3))
    assert rt.main(["--only", "state_bytes", "--out", str(tmp_path / "o")]) == 2
    out = capsys.readouterr().out
    assert "failed (exit 3)" in out and "step 2 of 3" in out
    assert "| state_bytes | run failed (exit 3) |" in (tmp_path / "o" / "summary.md").read_text()


def test_values_compared_count_each_value_a_difference_can_name(rt, tmp_path, monkeypatch, capsys):
    """The summary said "29 differ" beside "90 fields compared" for a run whose 29 differing values
    were 19 fields: a dict field (quality, two_sample_vs_ar, real) counted once but differed key by key."""
    rec = json.loads((rt.RESULTS / "demo_mnist" / "demo.json").read_text())
    shutil.copy(rt.RESULTS / "demo_mnist" / "demo.json", tmp_path / "demo.json")
    n, diffs = rt.TARGETS["demo_mnist"]["compare"](tmp_path, 1e-9)
    m = rec["methods"]["sjd"]
    per_method = sum(len(m[f]) if isinstance(m[f], dict) else 1 for f in rt.DEMO_FIELDS)
    assert per_method == 7 + 5 + 4
    assert diffs == [] and n == 8 + 1 + per_method * len(rec["methods"]) + len(rec["real"]) == 158
    for meth in rec["methods"].values():                   # every key of a dict field differs
        for f in ("quality", "two_sample_vs_ar"):
            meth[f] = {k: v + 1 for k, v in meth[f].items()}
    (tmp_path / "demo.json").write_text(json.dumps(rec))
    n2, diffs = rt.TARGETS["demo_mnist"]["compare"](tmp_path, 1e-9)
    assert n2 == n and len(diffs) == 9 * 9

    def run(cmd, **k):
        if cmd[1:2] == ["-c"]:                             # which CPU kernels torch uses
            return subprocess.CompletedProcess(cmd, 0, stdout="AVX2\n")
        shutil.copy(tmp_path / "demo.json", _arg(cmd, "--json"))
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(rt.subprocess, "run", run)
    monkeypatch.setattr(rt, "LISTED", 80)
    assert rt.main(["--only", "demo_mnist", "--out", str(tmp_path / "o")]) == 1
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "| demo_mnist | 81 of 158 differ | 158 |" in summary
    listed = [ln for ln in summary.splitlines() if ln.startswith("- ar.") or ln.startswith("- sjd.")]
    assert listed[0].startswith("- ar.quality.accuracy: recorded 0.799") and len(listed) == 18
    assert "- ... 1 more in `demo_mnist/diffs.txt`" in summary
    assert len((tmp_path / "o" / "demo_mnist" / "diffs.txt").read_text().splitlines()) == 81


def test_missing_row_is_one_compared_value(rt, tmp_path):
    rec = (rt.RESULTS / "cpu_e2e_mnist" / "e2e.csv").read_text().splitlines()
    (tmp_path / "e2e.csv").write_text("\n".join(rec) + "\n")
    n, diffs = rt.TARGETS["cpu_e2e_mnist"]["compare"](tmp_path, 1e-9)
    assert diffs == [] and n == len(rt.E2E_FIELDS) * (len(rec) - 1)
    (tmp_path / "e2e.csv").write_text("\n".join(rec[:-1]) + "\n")
    n2, diffs = rt.TARGETS["cpu_e2e_mnist"]["compare"](tmp_path, 1e-9)
    assert len(diffs) == 1 and "missing now" in diffs[0] and n2 == n - len(rt.E2E_FIELDS) + 1


def test_out_that_cannot_be_made_is_a_usage_error(rt, monkeypatch, capsys):
    """/proc passes the write check as root, then mkdir failed with a traceback."""
    calls = []
    monkeypatch.setattr(rt.subprocess, "run", fake_run(calls))
    with pytest.raises(SystemExit) as e:
        rt.main(["--only", "state_bytes", "--out", "/proc/sjd_reproduce_audit/x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --out" in err and "Traceback" not in err
    assert calls == []


def test_e2e_state_bytes_are_compared(rt, tmp_path):
    """The docs list byte counts among the compared fields; the e2e CSV's state_bytes column was not."""
    import csv
    with open(rt.RESULTS / "cpu_e2e_mnist" / "e2e.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sjd = next(r for r in rows if r["method"] == "sjd" and r["sweep"] == "method")
    assert sjd["state_bytes"] == "139808"
    sjd["state_bytes"] = "139809"
    with open(tmp_path / "e2e.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    n, diffs = rt.TARGETS["cpu_e2e_mnist"]["compare"](tmp_path, 1e-9)
    assert diffs == ["sjd/method/16.state_bytes: recorded 139808.0, now 139809.0"] and n == 17 * len(rows)


def perturbed_demo(rt, field: str, rel: float):
    """The recorded demo JSON with the AR method's ``field`` (``quality.fd`` or a top-level one) moved by ``rel``."""
    def write(cmd):
        d = json.loads((rt.RESULTS / "demo_mnist" / "demo.json").read_text())
        m = d["methods"]["ar"]
        parent, key = (m["quality"], field.split(".")[1]) if field.startswith("quality.") else (m, field)
        parent[key] = parent[key] * (1 + rel)
        _arg(cmd, "--json").write_text(json.dumps(d))
    return write


@pytest.mark.parametrize("field,rel,extra,want", [
    ("quality.fd", 7.5e-7, [], 0),                          # float32 features: another CPU model's drift
    ("entropy", 7.5e-7, [], 0),
    ("quality.fd", 7.5e-7, ["--rtol-features", "0"], 1),    # the feature tolerance is what let it pass
    ("quality.fd", 1e-3, [], 1),                            # a real change is still found
    ("nfe", 7.5e-7, [], 1),                                 # token-derived values stay at --rtol
])
def test_feature_values_have_their_own_tolerance(rt, tmp_path, monkeypatch, capsys, field, rel, extra, want):
    """Fréchet distances and entropy come from float32 network arithmetic, which moved by up to 7.5e-7
    relative on another CPU with every token equal: the default 1e-9 failed every such run."""
    monkeypatch.setattr(rt.subprocess, "run", fake_run([], perturbed_demo(rt, field, rel)))
    assert rt.main(["--only", "demo_mnist", "--out", str(tmp_path / "o"), *extra]) == want
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "rtol 1e-09 (entropy, fd, fd_real, fd_std: " in summary
    assert (f"ar.{field}" in summary) == bool(want)


@pytest.mark.parametrize("args", [["--rtol-features", "nan"], ["--rtol-features", "-1"],
                                  ["--list", "--rtol-features", "1e-3"]])
def test_bad_feature_tolerance_is_a_usage_error(rt, capsys, args):
    with pytest.raises(SystemExit) as e:
        rt.main(args)
    flag = "--list" if "--list" in args else "--rtol-features"      # --list: "--rtol-features does not apply"
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}:" in err and "--rtol-features" in err, err


def test_summary_names_the_commit_the_runs_started_on(rt, tmp_path, monkeypatch, capsys):
    """The commit was read when the summary was written: a checkout that moved during hours of runs was
    recorded as the code of all of them."""
    commits = iter(["aaaa111", "bbbb222"])
    monkeypatch.setattr(rt, "_commit", lambda: next(commits))
    monkeypatch.setattr(rt.subprocess, "run", fake_run([], copy_recorded_state_bytes(rt)))
    assert rt.main(["--only", "state_bytes", "--out", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "summary.md").read_text()
    assert "- commit: aaaa111 when the runs started, bbbb222 when they ended\n" in text
    commits = iter(["cccc333", "cccc333"])
    assert rt.main(["--only", "state_bytes", "--out", str(tmp_path / "p")]) == 0
    assert "- commit: cccc333\n" in (tmp_path / "p" / "summary.md").read_text()
