"""``python -m sjd_kernels.bench``: metric directions, output locations, e2e argument checks, ops request counts."""
from __future__ import annotations

import csv
import json
import os

import pytest

from sjd_kernels.bench import cases as C
from sjd_kernels.bench import e2e as e2e_mod
from sjd_kernels.bench.compare import compare
from test_bench import bench_main  # noqa: F401  (the fixture: bench's main with the runs replaced)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))




# ----------------------------------------------------------------------------------------- 1. compare --metric
def _e2e_row(**v):
    return dict(model="mnist", method="sjd", window="16", beta="", vp_form="", batch="8", **v)


@pytest.mark.parametrize("metric,base,cur", [("nfe", 10, 20), ("step_ms", 1.0, 2.0), ("nfe_prefill", 1, 2),
                                             ("state_overflows", 1, 5), ("speedup_latency", 2.0, 1.0),
                                             ("tokens_per_step", 3.0, 1.5)])
def test_compare_knows_each_metrics_direction(metric, base, cur):
    """A doubled NFE / step time is a regression, a halved speed-up too (before: every metric but
    median_us/latency_ms counted as higher-is-better)."""
    res = compare([_e2e_row(**{metric: cur})], [_e2e_row(**{metric: base})], tol=0.1, metrics=[metric])
    assert res["compared"] == 1
    assert [r["metric"] for r in res["regressions"]] == [metric] and not res["improvements"], res
    res = compare([_e2e_row(**{metric: base})], [_e2e_row(**{metric: cur})], tol=0.1, metrics=[metric])
    assert not res["regressions"] and [r["metric"] for r in res["improvements"]] == [metric], res


def test_compare_matches_e2e_rows_of_the_same_image_length_only():
    """Runs over 20 and 196 tokens are different rows (a 20-token run's NFE is no improvement on a
    196-token one); with no row in common nothing is compared, and that is exit 2, not a pass."""
    short, full = _e2e_row(num_tokens="20", nfe="20"), _e2e_row(num_tokens="196", nfe="196")
    res = compare([short], [full], tol=0.1, metrics=["nfe"])
    assert res["matched"] == 0 and res["compared"] == 0 and not res["improvements"], res
    assert compare([short], [dict(short, nfe="40")], tol=0.1, metrics=["nfe"])["improvements"]
    assert compare([short], [short], tol=0.1, metrics=["nfe"])["matched"] == 1


def test_compare_with_no_row_in_common_exits_2(tmp_path, capsys):
    from sjd_kernels.bench.__main__ import main as bench
    e2e, ops = tmp_path / "e2e.json", tmp_path / "ops.json"
    e2e.write_text(json.dumps({"rows": [_e2e_row(num_tokens="196", nfe="100")]}))
    ops.write_text(json.dumps({"rows": [dict(op="jacobi_step", case="B1", backend="torch", graph="0",
                                             median_us="10")]}))
    for cur, base in ((e2e, ops), (ops, e2e)):
        assert bench(["compare", str(cur), str(base)]) == 2
        assert "nothing was compared" in capsys.readouterr().out
    assert bench(["compare", str(e2e), str(e2e)]) == 0


def test_every_direction_is_a_column_of_the_results():
    from sjd_kernels.bench.compare import DIRECTION
    from sjd_kernels.bench.ops import COLUMNS as OPS
    assert set(DIRECTION) <= set(OPS) | set(e2e_mod.COLUMNS)
    assert set(DIRECTION.values()) == {"lower", "higher"}


@pytest.mark.parametrize("metric,text", [("foo", "not a column"), ("law_p", "no better direction"),
                                         ("nfe_sd", "no better direction")])
def test_compare_refuses_a_metric_without_direction(bench_main, tmp_path, capsys, metric, text):
    cur = tmp_path / "cur.csv"
    cur.write_text("op,case,backend,graph,median_us\n")
    with pytest.raises(SystemExit) as e:
        bench_main(["compare", str(cur), str(cur), "--metric", "nfe", "--metric", metric])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--metric" in err and text in err and "Traceback" not in err, err


def test_compare_help_states_the_directions(bench_main, capsys):
    with pytest.raises(SystemExit):
        bench_main(["compare", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Lower is better:" in out and "Higher is better:" in out and "nfe," in out and "speedup_latency" in out


# ----------------------------------------------------------------------------------------- e2e: argument checks
@pytest.mark.parametrize("args,text", [
    (["--methods", "reference_sjd", "--windows", "0", "4"], "reference_sjd"),          # 3: W=0 ran W=1
    (["--windows", "0", "16"], "window 0"),                                               # default methods
    (["--methods", "pac", "--windows", "2", "8"], "window 2: pac puts its tree of depth 3"),   # 6
])
def test_e2e_refuses_windows_a_method_cannot_take(bench_main, tmp_path, capsys, args, text):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        bench_main(["e2e", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--windows" in err and text in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("cmd", [["e2e", "--model", "tiny", "--quick"],
                                 ["ops", "--check", "--quick", "--backend", "torch"]])
@pytest.mark.parametrize("seed", [2 ** 64, -(2 ** 62)])
def test_a_seed_that_overflows_the_request_seeds_is_a_usage_error(bench_main, tmp_path, capsys, cmd, seed):
    """Request seeds are int64 products of --seed: a seed of 2**64 failed every row ("Overflow when
    unpacking long long") and wrote the failed rows, where it is an argument error."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        bench_main([*cmd, "--seed", str(seed), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed" in err and "Traceback" not in err, err
    assert not out.exists()


def test_windows_that_the_methods_take_still_pass():
    e2e_mod.check_settings(methods=["sjd", "pac", "reference_sjd"], windows=[3, 16])
    e2e_mod.check_settings(methods=["sjd", "ar"], windows=[0, 16])          # sjd at W=0 is a valid row
    with pytest.raises(e2e_mod.SettingsError, match="^windows: window 1: pac puts its tree of depth 3 .*got 1"):
        e2e_mod.run_e2e(methods=["pac"], windows=[1], log=lambda *a: None)


def test_reference_sjd_never_clamps_window_zero_silently():
    from sjd_kernels.models.gpt import GPT, GPTConfig
    import torch
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_image_tokens=8, num_classes=2)).eval()
    with pytest.raises(ValueError, match="window >= 1"):
        e2e_mod.generate_reference_sjd(gpt, torch.tensor([0]), 8, window=0)
    r = e2e_mod.generate_reference_sjd(gpt, torch.tensor([0]), 8, window=2)
    assert r["tokens"].shape == (1, 8)


# ----------------------------------------------------------------------------------------- 5. --quick
def test_quick_honours_an_explicit_num_tokens(monkeypatch):
    seen = []

    def fake_config(models, *, method, num_tokens, **k):
        seen.append(num_tokens)
        return {"method": method, "nfe": num_tokens, "latency_ms": 1.0}
    monkeypatch.setattr(e2e_mod, "run_config", fake_config)
    res = e2e_mod.run_e2e(model="mnist", methods=["ar"], quick=True, num_tokens=100, law_samples=0,
                          log=lambda *a: None)
    assert res["status"] == "ok" and seen == [100] and res["settings"]["num_tokens"] == 100
    seen.clear()
    e2e_mod.run_e2e(model="mnist", methods=["ar"], quick=True, law_samples=0, log=lambda *a: None)
    assert seen == [64]                                   # the quick default


# ----------------------------------------------------------------------------------------- 4. output locations
def test_without_outputs_named_each_run_writes_a_new_folder(tmp_path, capsys, monkeypatch):
    """No --out/--csv/--json: the files go to sjd_bench_out/<command>_<date>-<time> in the working directory,
    a new folder per run (a second run in the same second gets a suffix), never benchmarks/results."""
    from sjd_kernels.bench.__main__ import main as bench_main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20261202-120000")
    cmd = ["ops", "--check", "--op", "tree_kv_update", "--backend", "torch", "--grid", "cpu-quick", "--min-requests",
           "1"]
    for _ in range(2):
        assert bench_main(cmd) == 0
    runs = sorted(p.name for p in (tmp_path / "sjd_bench_out").iterdir())
    assert runs == ["ops_20261202-120000", "ops_20261202-120000-2"], runs
    for r in runs:
        assert (tmp_path / "sjd_bench_out" / r / "ops.csv").is_file()
    assert not (tmp_path / "benchmarks").exists()
    assert f"sjd_bench_out/{runs[1]}/ops.csv" in capsys.readouterr().out


def test_a_default_folder_another_run_took_meanwhile_is_not_shared(tmp_path, monkeypatch):
    """The default name is chosen during the checks; a run that started in the same second may create it
    before this one writes: the folder is claimed with an atomic mkdir just before the run, taking the next
    suffix, and removed after a run that wrote nothing into it."""
    import argparse
    from sjd_kernels.bench.__main__ import _DefaultOut, _out_dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20261202-120000")
    args = argparse.Namespace(out=None, csv=None, json=None, cmd="e2e")
    chosen = _out_dir(args)
    assert chosen == os.path.join("sjd_bench_out", "e2e_20261202-120000") and not os.path.exists(chosen)
    os.makedirs(chosen)                                     # the other run
    os.mkdir(chosen + "-2")                                 # and a third
    with _DefaultOut(args) as d:
        assert d.path == chosen + "-3" and _out_dir(args) == d.path and os.path.isdir(d.path)
        (tmp_path / d.path / "e2e.csv").write_text("x")
    assert (tmp_path / d.path / "e2e.csv").is_file()       # kept: the run wrote there
    args2 = argparse.Namespace(out=None, csv=None, json=None, cmd="e2e")
    with _DefaultOut(args2) as d2:
        assert d2.path == chosen + "-4" and os.path.isdir(d2.path)
    assert not os.path.exists(d2.path)                      # a run that wrote nothing leaves no folder
    args3 = argparse.Namespace(out=str(tmp_path / "mine"), csv=None, json=None, cmd="e2e")
    with _DefaultOut(args3) as d3:
        assert d3.path is None and _out_dir(args3) == str(tmp_path / "mine")
    assert not (tmp_path / "mine").exists()                 # --out: the run makes it, not the claim


def test_a_blocked_default_folder_is_refused_before_the_run(bench_main, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sjd_bench_out").write_text("not a folder")
    for cmd in (["e2e", "--model", "tiny"], ["ops", "--check", "--op", "tree_kv_update", "--grid", "cpu-quick"]):
        with pytest.raises(SystemExit) as e:
            bench_main(cmd)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--out (default" in err and "not a folder" in err and "Traceback" not in err, err


def test_a_default_file_that_is_a_folder_is_refused_before_the_run(bench_main, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "e2e.md").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        bench_main(["e2e", "--model", "tiny", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "e2e.md is a folder" in err, err


def test_named_outputs_are_the_only_files_written(tmp_path, monkeypatch, capsys):
    """--csv/--json without --out: nothing goes to ./benchmarks/results; the paths written are printed."""
    from sjd_kernels.bench.__main__ import main
    monkeypatch.chdir(tmp_path)
    out_csv, out_json = tmp_path / "x" / "run.csv", tmp_path / "y" / "run.json"
    rc = main(["e2e", "--model", "tiny", "--methods", "ar", "--num-tokens", "4", "--batch", "1", "--samples", "1",
               "--csv", str(out_csv), "--json", str(out_json)])
    assert rc == 0
    assert out_csv.exists() and out_json.exists() and not (tmp_path / "benchmarks").exists()
    stdout = capsys.readouterr().out
    assert f"wrote {out_csv}, {out_json}" in stdout, stdout[-2000:]
    assert json.loads(out_json.read_text())["written"] == [str(out_csv), str(out_json)]
    rc = main(["ops", "--check", "--op", "tree_kv_update", "--backend", "torch", "--grid", "cpu-quick",
               "--min-requests", "1", "--csv", str(tmp_path / "ops.csv")])
    assert rc == 0 and not (tmp_path / "benchmarks").exists()
    assert f"wrote {tmp_path / 'ops.csv'}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- 2. state overflows
def test_state_overflows_are_reported_and_warned(tmp_path):
    logs = []
    out = tmp_path / "e2e"
    res = e2e_mod.run_e2e(model="tiny", methods=["ar", "sjd"], windows=[4], num_tokens=8, batch=1, samples=1,
                          state_capacity=1, out_dir=str(out), log=logs.append)
    assert not res.get("failed"), logs
    rows = {r["method"]: r for r in _read_csv(out / "e2e.csv") if r["sweep"] == "method"}
    assert int(rows["sjd"]["state_overflows"]) > 0, rows["sjd"]
    assert rows["ar"]["state_overflows"] in ("", "0")
    assert any("WARNING" in line and "sparse-state overflows" in line for line in logs), logs
    assert "sparse-state overflows" in (out / "e2e.md").read_text()
    js = json.loads((out / "e2e.json").read_text())
    assert any(r["method"] == "sjd" and r["state_overflows"] for r in js["rows"])


# ----------------------------------------------------------------------------------------- 7. ops request counts
def _case(op, pred):
    return next(c for c in C.OPS[op].cases() if "cpu" in c.grids and pred(c.params))


def test_verify_only_check_honours_min_requests_and_does_not_compare_torch_with_itself():
    bench = C.OPS["verify_only"]
    case = _case("verify_only", lambda p: True)
    assert case.params["B"] == 3
    for be, ref in (("torch", "step"), ("chain_torch", "verify_chain")):
        r = bench.check(case, be, "cpu", 1, min_requests=12)
        assert r["check"] == "pass", r
        assert r["check_detail"].startswith(f"reference itself (the torch {ref}; no comparison); 12 requests"), r
    r = bench.check(case, "torch_verify", "cpu", 1, min_requests=12)
    assert r["check"] == "pass" and "12 requests" in r["check_detail"], r


def test_verify_only_library_backend_counts_every_request():
    ok, why = C.OPS["verify_only"].available("triton", "cpu")
    if not ok:
        pytest.skip(why)
    r = C.OPS["verify_only"].check(_case("verify_only", lambda p: True), "triton", "cpu", 1, min_requests=6)
    assert r["check"] == "pass" and "vs the torch step: 0/6 requests differ" in r["check_detail"], r


def test_tree_kv_update_check_honours_min_requests():
    case = _case("tree_kv_update", lambda p: p["R"] == 1)
    r = C.OPS["tree_kv_update"].check(case, "torch", "cpu", 1, min_requests=3)
    assert r["check"] == "pass" and "3 trials" in r["check_detail"] and "over 3 rows" in r["check_detail"], r


def test_case_text_with_a_trailing_dollar_matches_the_name_end():
    """`--case NAME$` keeps NAME and leaves out its _sparse1064 twin (a substring keeps both), so a
    GPU run's case list holds the cases meant and its time box reaches the last of them."""
    names = [c.name for c in C.select(None, "quick")]
    plain = [n for n in names if C.case_matches("B1_W32_V16384_cfg_bf16_sjd_k1000", n)]
    exact = [n for n in names if C.case_matches("B1_W32_V16384_cfg_bf16_sjd_k1000$", n)]
    assert len(plain) == 2 and exact == ["jacobi_step:B1_W32_V16384_cfg_bf16_sjd_k1000"], (plain, exact)
    assert C.case_matches("verify_only:B1_W16_V16384$", "verify_only:B1_W16_V16384")
    assert not C.case_matches("k1000$", "jacobi_step:B1_W32_V16384_cfg_bf16_sjd_k1000_sparse1064")
