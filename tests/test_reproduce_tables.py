"""``python/reproduce_tables.py``: its comparisons find a changed field and nothing else (no runs here)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from _util import load_file_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rt():
    return load_file_module("reproduce_tables", ROOT / "python" / "reproduce_tables.py")


def test_recorded_demo_equals_itself_and_a_changed_field_is_named(rt, tmp_path):
    rec = rt.RESULTS / "demo_mnist" / "demo.json"
    shutil.copy(rec, tmp_path / "demo.json")
    n, diffs = rt.TARGETS["demo_mnist"]["compare"](tmp_path, 1e-9)
    assert diffs == [] and n > 50
    d = json.loads(rec.read_text())
    d["methods"]["coupling"]["nfe"] += 1.0
    d["methods"]["sjd"]["two_sample_vs_ar"]["p_value"] *= 1 + 1e-6
    d["methods"]["ar"]["wall_s"] *= 3                     # speed: not compared
    (tmp_path / "demo.json").write_text(json.dumps(d))
    n2, diffs = rt.TARGETS["demo_mnist"]["compare"](tmp_path, 1e-9)
    assert n2 == n
    assert [x.split(":")[0] for x in diffs] == ["coupling.nfe", "sjd.two_sample_vs_ar.p_value"]
    assert rt.TARGETS["demo_mnist"]["compare"](tmp_path, 1e-5)[1] == [x for x in diffs if "nfe" in x]


def test_recorded_e2e_equals_itself_and_a_changed_row_is_named(rt, tmp_path):
    rec = rt.RESULTS / "cpu_e2e_mnist" / "e2e.csv"
    shutil.copy(rec, tmp_path / "e2e.csv")
    n, diffs = rt.TARGETS["cpu_e2e_mnist"]["compare"](tmp_path, 1e-9)
    assert diffs == [] and n > 100
    with open(rec, newline="") as f:
        rows = list(csv.DictReader(f))
    sjd = next(r for r in rows if r["method"] == "sjd" and r["sweep"] == "method")
    sjd["step_compression"] = str(float(sjd["step_compression"]) + 0.01)
    sjd["latency_ms"] = "1"                               # speed: not compared
    dropped = rows.pop(-1)
    with open(tmp_path / "e2e.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _, diffs = rt.TARGETS["cpu_e2e_mnist"]["compare"](tmp_path, 1e-9)
    assert len(diffs) == 2
    assert any(x.startswith("sjd/method/16.step_compression:") for x in diffs)
    assert any(dropped["method"] in x and "missing now" in x for x in diffs)


def test_state_bytes_compare(rt, tmp_path):
    text = (rt.RESULTS / "state_bytes.md").read_text()
    (tmp_path / "state_bytes.md").write_text(text)
    n, diffs = rt.TARGETS["state_bytes"]["compare"](tmp_path, 1e-9)
    assert diffs == [] and n > 10
    (tmp_path / "state_bytes.md").write_text(text.replace("| 7.7x |", "| 7.6x |", 1))
    assert len(rt.TARGETS["state_bytes"]["compare"](tmp_path, 1e-9)[1]) == 1


def test_list_runs_nothing(rt, capsys):
    assert rt.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in rt.TARGETS)


def test_recorded_sjd2_rows_equal_themselves_and_a_change_is_named(rt, tmp_path):
    rec = rt.RESULTS / "sjd2_mnist" / "sjd2_mnist.jsonl"
    lines = rec.read_text().splitlines()
    (tmp_path / "sjd2_mnist.jsonl").write_text("\n".join(lines) + "\n")
    n, diffs = rt.TARGETS["sjd2_mnist"]["compare"](tmp_path, 1e-9)
    assert diffs == [] and n >= 12 * len(lines)
    r = json.loads(lines[-1])
    r["accuracy"] += 0.01
    r["wall_s"] += 5                                      # speed: not compared
    (tmp_path / "sjd2_mnist.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(r)]) + "\n")
    _, diffs = rt.TARGETS["sjd2_mnist"]["compare"](tmp_path, 1e-9)
    assert len(diffs) == 1 and ".accuracy:" in diffs[0]
