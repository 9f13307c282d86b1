"""The benchmark harness: CLI, CPU checks, refusal to time without a GPU, regression compare,
and the law of the "reference SJD" baseline (it must be a correct SJD to be a fair baseline)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from sjd_kernels.bench import cases as C
from sjd_kernels.bench.compare import compare, main_compare
from sjd_kernels.bench.reference_sjd import ReferenceSJD, warp_probs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GPU = not torch.cuda.is_available()


def _run(args, env_extra=None, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "sjd_kernels.bench", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_list_runs_anywhere():
    r = _run(["list"])
    assert r.returncode == 0, r.stderr
    for op in ("jacobi_step", "sjd2_prepare", "verify_only", "tree_verify", "tree_kv_update"):
        assert op in r.stdout
    assert "B32_W64_V32768_cfg_bf16_sjd" in r.stdout      # SPEC section 8 grid is registered
    assert "state/req" in r.stdout
    assert "e2e models: mnist, photo, llamagen-xl, chameleon-7b" in r.stdout
    offered = {x.strip(",") for x in r.stdout.split("e2e methods (this build):")[1].split()}
    assert {"ar", "sjd", "sjd_vp", "reference_sjd"} <= offered


def test_grid_covers_spec_shapes():
    names = {c.name for c in C.select(["jacobi_step"], "full")}
    for B in (1, 32):
        for W in (16, 32, 64):
            for V in (8192, 16384, 32768):
                assert any(f"B{B}_W{W}_V{V}_cfg_bf16_sjd" in n for n in names), (B, W, V)
    assert C.select(["jacobi_step"], "quick") and len(C.select(None, "quick")) < len(C.select(None, "full"))


def test_ops_case_filter_and_request_count(tmp_path):
    """`--case` keeps the matching cases only (a sparse state without VP here); no match is exit 2."""
    r = _run(["ops", "--check", "--op", "jacobi_step", "--case", "sparse20", "--backend", "torch",
              "--min-requests", "4", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _read_csv(tmp_path / "ops.csv")
    assert rows and {row["case"] for row in rows} == {"jacobi_step:B2_W4_V64_cfg_bf16_sjd_k16_sparse20"}
    assert all(row["check"] == "pass" for row in rows)
    assert "4 requests well-formed" in rows[0]["check_detail"]
    bad = _run(["ops", "--check", "--case", "no-such-case", "--out", str(tmp_path / "none")])
    assert bad.returncode == 2 and "no case of this grid matches" in bad.stderr


def test_ops_check_with_the_reference_on_another_device(tmp_path):
    """`--ref-device cpu` (what compute-sanitizer runs use): the checks of jacobi_step and tree_verify
    copy their inputs to that device for the reference and compare there; the other ops refuse it in
    their check and run_ops does not pass it to them."""
    r = _run(["ops", "--check", "--case", "sparse20", "--case", "sparse40", "--case", "tree_verify",
              "--case", "tree_kv", "--ref-device", "cpu", "--min-requests", "4", "--out", str(tmp_path)],
             {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _read_csv(tmp_path / "ops.csv")
    assert {row["op"] for row in rows} == {"jacobi_step", "tree_verify", "tree_kv_update"}
    assert all(row["check"] == "pass" for row in rows if row["check"] != "skip")
    triton = {row["op"]: row["check_detail"] for row in rows if row["backend"] == "triton"}
    assert triton["jacobi_step"].startswith("vs torch on cpu:") and triton["tree_verify"].startswith("vs torch on cpu:")
    assert "on cpu" not in triton["tree_kv_update"]
    # the sparse case on the Triton candidate-list path (V 257), with and without the candidate list
    sp = {row["backend"]: row["check"] for row in rows if row["case"].endswith("_sparse40")}
    assert sp.get("triton") == "pass" and sp.get("triton_rowsearch") == "pass", sp
    with pytest.raises(ValueError, match="reference beside the backend"):
        C.OPS["tree_kv_update"].check(C.select(["tree_kv_update"], "cpu")[0], "torch", "cpu", 0, ref_device="cpu")


def test_moved_copies_every_tensor_of_nested_inputs():
    from sjd_kernels.ops.jacobi_step import JacobiOutput, JacobiState
    from sjd_kernels.reference.tree import TreeLayout
    st = JacobiState.create(2, 3, 8, seed=[1, 2], capacity=4)
    out = JacobiOutput(torch.zeros(2), torch.zeros(2, 4), torch.zeros(2, 3))
    moved = C._moved({"state": st, "out": out, "xs": [torch.ones(1), None], "k": 3}, "meta")
    assert isinstance(moved["state"], JacobiState) and moved["state"].q_idx.device.type == "meta"
    assert moved["state"].vocab_size == st.vocab_size and st.q_state.device.type == "cpu"   # the original stays
    assert isinstance(moved["out"], JacobiOutput) and moved["out"].tokens.device.type == "meta"
    assert moved["xs"][0].device.type == "meta" and moved["xs"][1] is None and moved["k"] == 3
    z = torch.zeros(1, 3, dtype=torch.int64)
    tree = C._moved(TreeLayout(z, z - 1, z, z, z, 2), "meta")
    assert isinstance(tree, TreeLayout) and tree.parent.device.type == "meta" and tree.max_depth == 2


def test_ops_check_quick_on_cpu(tmp_path):
    """`ops --check --quick` runs here: the reference (and Triton under the interpreter) on small shapes."""
    r = _run(["ops", "--check", "--quick", "--out", str(tmp_path)], {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _read_csv(tmp_path / "ops.csv")
    assert rows and (tmp_path / "ops.md").exists()
    md = (tmp_path / "ops.md").read_text()
    assert "command: `python -m sjd_kernels.bench ops --check --quick" in md and "commit: " in md
    if NO_GPU:
        assert "CPU times do not mean GPU speed" in md
    assert all(row["median_us"] == "" for row in rows)           # checks only: no times
    checked = [row for row in rows if row["check"] == "pass"]
    assert {"torch", "reference_sjd"} <= {row["backend"] for row in checked}
    assert {"tree_verify", "tree_kv_update"} <= {row["op"] for row in checked}
    assert not [row for row in rows if row["check"] == "FAIL"]
    for row in rows:
        assert int(row["bytes_min"]) > 0 and row["commit"]


def test_tree_ops_listed_and_checked_quick():
    """The tree ops are registered with SPEC shapes and their small cases are checked (and pass) in quick mode."""
    names = {c.name for c in C.select(["tree_verify", "tree_kv_update"], "full")}
    assert {f"tree_verify:B{B}_V{V}_K4_d3_W32_{c}_bf16" for B in (1, 8, 32) for V in (16384, 32768)
            for c in ("cfg", "nocfg")} <= {n.rsplit("_k", 1)[0] for n in names if n.startswith("tree_verify")}
    for m in ("llamagen-xl_L36_H20_D64_S2048", "7b_L32_H32_D128_S4096"):
        for R in (1, 8):
            for lay in ("stacked", "list"):
                assert f"tree_kv_update:{m}_R{R}_P8_{lay}_bf16" in names
    grid = "cpu-quick" if NO_GPU else "quick"
    cases = C.select(["tree_verify", "tree_kv_update"], grid)
    assert {c.op for c in cases} == {"tree_verify", "tree_kv_update"}
    if not NO_GPU:
        return                                  # full-size checks run in `bench ops` on the GPU
    for case in cases:
        bench = C.OPS[case.op]
        assert bench.bytes_min(case) > 0 and bench.state_bytes_per_request(case) > 0
        res = bench.check(case, "torch", "cpu", 1, min_requests=8)
        assert res["check"] == "pass", (case.name, res)


@pytest.mark.skipif(not NO_GPU, reason="the refusal applies to machines without a CUDA device")
def test_ops_refuses_timings_without_gpu(tmp_path):
    r = _run(["ops", "--quick", "--op", "jacobi_step", "--backend", "torch", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert "timings refused" in r.stdout
    rows = _read_csv(tmp_path / "ops.csv")
    assert rows and all(row["median_us"] == "" and row["roofline_frac"] == "" for row in rows)
    assert "timings refused" in (tmp_path / "ops.md").read_text()
    from sjd_kernels.bench.timing import NoGPUError, time_cuda
    with pytest.raises(NoGPUError):
        time_cuda(lambda: None)


@pytest.mark.skipif(not NO_GPU, reason="the refusal applies to machines without a CUDA device")
def test_e2e_refuses_gpu_only_models_without_gpu(tmp_path):
    """The random 7B/XL-shaped models are built on the GPU only: a clean refusal (exit 2), no traceback."""
    e = _run(["e2e", "--model", "chameleon-7b", "--out", str(tmp_path / "c")])
    assert e.returncode == 2, e.stdout + e.stderr
    assert "refused" in e.stdout and "no CUDA device" in e.stdout and "Traceback" not in e.stderr
    assert "status: refused" in (tmp_path / "c" / "e2e.md").read_text()
    from sjd_kernels.bench.e2e import run_e2e
    res = run_e2e(model="llamagen-xl", log=lambda *a: None)
    assert res["status"] == "refused" and not res["rows"]


def test_e2e_skips_a_bundled_model_without_weights(tmp_path, monkeypatch):
    from sjd_kernels.bench.e2e import run_e2e
    from sjd_kernels.models import bundled
    monkeypatch.setattr(bundled, "WEIGHTS_DIR", tmp_path / "no_weights")
    logs = []
    res = run_e2e(model="photo", out_dir=str(tmp_path / "out"), log=logs.append)
    assert res["status"] == "skipped" and not res["failed"] and not res["rows"]
    assert any("skipped" in x and "photo" in x for x in logs)
    assert "status: skipped" in (tmp_path / "out" / "e2e.md").read_text()


E2E_TINY = ["--model", "mnist", "--num-tokens", "12", "--batch", "2", "--samples", "2", "--law-samples", "8",
            "--windows", "4", "8", "--betas", "0", "0.5", "--methods", "ar", "sjd", "sjd_vp", "gumbel_jacobi",
            "reference_sjd"]


def test_e2e_tiny_on_bundled_model_and_compare(tmp_path):
    """`e2e` on the bundled model (tiny settings) writes CSV, JSON, markdown and both plots; its numbers
    come from the loop (NFE, per-step split); `compare` passes against itself and fails on a regression."""
    out = tmp_path / "e2e"
    r = _run(["e2e", *E2E_TINY, "--out", str(out), "--json", str(tmp_path / "run.json")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("e2e.csv", "e2e.md", "e2e_speedup.png", "e2e_beta.png"):     # e2e.json: at --json instead
        assert (out / f).exists(), f
    for f in ("e2e_speedup.png", "e2e_beta.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    res = json.loads((tmp_path / "run.json").read_text())
    assert res["status"] == "ok" and res["settings"]["batch"] == 2 and len(res["rows"]) >= 9
    assert res["info"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    rows = _read_csv(out / "e2e.csv")
    by = {(row["sweep"], row["method"], row["window"], row["beta"]): row for row in rows}
    assert {("method", m) for m in ("ar", "sjd", "sjd_vp", "gumbel_jacobi", "reference_sjd")} <= \
        {(row["sweep"], row["method"]) for row in rows}
    assert {("window", "sjd", "4"), ("window", "reference_sjd", "4")} <= {(r_["sweep"], r_["method"], r_["window"])
                                                                          for r_ in rows}
    assert {row["beta"] for row in rows if row["sweep"] == "beta"} == {"0.0", "0.5"}
    ar = by[("method", "ar", "", "")]
    assert float(ar["nfe"]) == 12 and float(ar["step_compression"]) == 1.0     # AR: one token per forward
    for row in rows:
        assert row["clock"] == ("cpu" if NO_GPU else "cuda") and row["commit"]
        T, nfe, comp = 12, float(row["nfe"]), float(row["step_compression"])
        assert 1 <= nfe <= T and abs(comp - T / nfe) < 1e-2
        f, p, frac = float(row["forward_ms_per_step"]), float(row["post_head_ms_per_step"]), float(row["post_head_frac"])
        assert f > 0 and p > 0 and abs(frac - p / (f + p)) < 2e-3       # measured by the loop, per step
        assert float(row["latency_ms"]) > 0 and float(row["tokens_per_s"]) > 0
    for m in ("sjd", "sjd_vp", "reference_sjd", "gumbel_jacobi"):
        row = next(r_ for r_ in rows if r_["sweep"] == "method" and r_["method"] == m)
        assert row["law_test"] == "pass", row
        assert int(row["law_n"]) == 8 and 1 <= float(row["tokens_per_step_law"]) <= 12
    md = (out / "e2e.md").read_text()
    assert "E2E".lower() in md.lower() and "commit: " in md and "command: `python -m sjd_kernels.bench e2e" in md
    if NO_GPU:
        assert "NOT GPU speed" in md
    # the vector kernels torch's CPU ops used: seeded CPU runs sample differently with other widths
    assert f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}," in md
    # compare: the run against itself passes; against a baseline twice as fast it fails
    assert _run(["compare", str(out / "e2e.csv"), str(out / "e2e.csv")]).returncode == 0
    fast = [dict(row, latency_ms=str(float(row["latency_ms"]) / 2)) for row in rows]
    base = tmp_path / "base.csv"
    with open(base, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(fast)
    c = _run(["compare", str(out / "e2e.csv"), str(base), "--tol", "0.2"])
    assert c.returncode == 1 and "REGRESSION" in c.stdout and "latency_ms" in c.stdout


def test_check_detects_a_wrong_backend():
    """The pre-timing check can fail: a 'backend' that ignores top-k is caught."""
    class Broken(C.JacobiStepBench):
        def _call(self, p, inp, state, backend):
            if backend == "broken":
                q = dict(p, top_k=0)
                return super()._call(q, inp, state, "torch")
            return super()._call(p, inp, state, backend)

    b = Broken()
    case = next(c for c in b.cases() if "cpu" in c.grids and c.params["top_k"] > 0)
    assert b.check(case, "torch", "cpu", 3)["check"] == "pass"
    res = b.check(case, "broken", "cpu", 3)
    assert res["check"] == "FAIL" and res["mismatch_rate"] > 0.02


def test_verify_only_runs_the_fused_step_and_its_check_can_fail(monkeypatch):
    """verify_only's library backends run jacobi_step on log(target) with the drafts' laws stored:
    they pass against the torch step, and a step that returns the drafts unverified fails. The torch
    step is that reference: its row checks well-formedness only."""
    b = C.VerifyOnlyBench()
    case = next(c for c in b.cases() if "cpu" in c.grids)
    res = b.check(case, "torch", "cpu", 5, min_requests=3)
    assert res["check"] == "pass" and "reference itself" in res["check_detail"], res
    inp = b._inputs(case.params, "cpu", 5)
    lib = b._library_inputs(inp, 5)
    assert torch.allclose(torch.softmax(lib["logits"], -1), inp["target"], atol=1e-6)
    assert torch.equal(lib["state"].q_state[:, :case.params["W"]], inp["draft"])
    ok, why = b.available("triton", "cpu")
    if not ok:
        pytest.skip(why)
    res = b.check(case, "triton", "cpu", 5, min_requests=3)
    assert res["check"] == "pass" and "0/3 requests differ" in res["check_detail"], res

    real = C.VerifyOnlyBench._library_call

    def accept_all(libin, backend):
        out = real(libin, backend)
        if backend == "triton":
            B, W = libin["drafts"].shape
            tok = torch.cat([libin["drafts"], torch.zeros(B, 1, dtype=torch.int64)], 1)
            return type(out)(torch.full_like(out.num_accepted, W), tok, out.next_drafts)
        return out

    monkeypatch.setattr(C.VerifyOnlyBench, "_library_call", staticmethod(accept_all))
    bad = b.check(case, "triton", "cpu", 5, min_requests=3)
    assert bad["check"] == "FAIL", bad


def test_variant_backends_run_their_library_backend_in_their_context():
    import sjd_kernels.cuda.jacobi_step as cj
    import sjd_kernels.triton.jacobi_step as tj
    for name, feats in C.CUDA_VARIANTS.items():
        be, ctx = C._variant(name)
        with ctx:
            assert be == "cuda" and cj.FEATURES == frozenset(feats)
        assert cj.FEATURES == frozenset()
    default = tj.kernel_config(16384, 32)["num_warps_rows"]
    assert tj.CAND_LIST and tj.cand_size(16384, 1000, 1024) == 2048
    for name, opts in C.TRITON_VARIANTS.items():
        be, ctx = C._variant(name)
        with ctx:
            assert be == "triton"
            assert tj.kernel_config(16384, 32)["num_warps_rows"] == opts.get("warps", default)
            assert tj.kernel_config(1000, 32)["num_warps_rows"] == 4        # small rows keep theirs
            assert tj.CAND_LIST == opts.get("cand_list", True)
            assert (tj.cand_size(16384, 1000, 1024) > 0) == opts.get("cand_list", True)
        assert tj.kernel_config(16384, 32)["num_warps_rows"] == default == 16
        assert tj.CAND_LIST
    be, ctx = C._variant("triton")
    with ctx:
        assert be == "triton" and cj.FEATURES == frozenset() and tj.ROWS_WARPS_LARGE == 16
    assert set(C.VARIANTS) <= set(C.JacobiStepBench.backends)
    with pytest.raises(ValueError):
        with tj.rows_warps(12):
            pass


@pytest.mark.parametrize("name,what", [("triton_w32", "32 warps"), ("triton_rowsearch", "the candidate list off")])
def test_triton_variants_check_against_the_reference_on_cpu(name, what):
    """The bench plumbing of the variants: the check runs the Triton op inside ``rows_warps`` /
    ``cand_list`` and passes. (The interpreter ignores warps; the compiled 32-warp kernel is
    checked on a GPU by test_jacobi_step_parity.py::test_parity_gpu_rows_kernel_with_32_warps.)"""
    import sjd_kernels.triton.jacobi_step as tj
    b = C.OPS["jacobi_step"]
    # V 257, top-k 40: the default kernel takes the candidate list (128 lanes), the variant does not
    case = [c for c in b.cases() if "cpu-quick" in c.grids and "V257" in c.name][0]
    assert tj.cand_size(257, 40, tj.list_size(257, 40, False, False, False, 0, 0.0)) == 128
    ok, why = b.available(name, "cpu")
    if not ok:
        pytest.skip(why)
    assert what in why
    r = b.check(case, name, "cpu", 3)
    assert r["check"] == "pass", r


def test_summary_names_the_flashinfer_ratio():
    from sjd_kernels.bench.ops import _pivot, _speedups
    base = {"op": "verify_only", "case": "verify_only:B32_W16_V16384", "graph": "graph", "roofline_us": 1.0,
            "state_bytes_per_req": 2**20, "roofline_frac": 0.1}
    rows = [dict(base, backend="torch_verify", median_us=400.0), dict(base, backend="flashinfer", median_us=50.0),
            dict(base, backend="cuda", median_us=40.0), dict(base, backend="triton", median_us=80.0)]
    _speedups(rows)
    table = _pivot(rows)
    assert "cuda graph: 10% of roofline, 10.0x vs torch_verify graph, 1.25x vs flashinfer graph" in table


def _rows(median):
    base = {"op": "jacobi_step", "backend": "cuda", "graph": "graph", "check": "pass", "gpu": "NVIDIA H100"}
    return [dict(base, case="jacobi_step:a", median_us=str(median[0])),
            dict(base, case="jacobi_step:b", median_us=str(median[1]))]


def test_compare_flags_regressions(tmp_path):
    res = compare(_rows([130.0, 50.0]), _rows([100.0, 50.0]), tol=0.10)
    assert len(res["regressions"]) == 1 and res["regressions"][0]["key"][2] == "jacobi_step:a"
    assert not compare(_rows([105.0, 45.0]), _rows([100.0, 50.0]), tol=0.10)["regressions"]
    failing = _rows([100.0, 50.0])
    failing[1]["check"] = "FAIL"
    assert compare(failing, _rows([100.0, 50.0]))["regressions"]
    # through files and exit codes, CSV and JSON
    cur, base = tmp_path / "cur.csv", tmp_path / "base.json"
    with open(cur, "w", newline="") as f:
        w = csv.DictWriter(f, list(_rows([1, 1])[0]))
        w.writeheader()
        w.writerows(_rows([130.0, 50.0]))
    base.write_text(json.dumps({"rows": _rows([100.0, 50.0])}))
    assert main_compare(str(cur), str(base), tol=0.10, log=lambda *a: None) == 1
    assert main_compare(str(cur), str(base), tol=0.50, log=lambda *a: None) == 0
    r = _run(["compare", str(cur), str(base), "--tol", "0.1"])
    assert r.returncode == 1 and "REGRESSION" in r.stdout
    other = [dict(r_, gpu="NVIDIA H200") for r_ in _rows([100.0, 50.0])]
    assert compare(_rows([130.0, 50.0]), other)["gpu_mismatch"]


def test_plots_write_pngs(tmp_path):
    from sjd_kernels.bench.plots import plot_acceptance_vs_beta, plot_ops_latency, plot_speedup_vs_window
    ops = []
    for i, case in enumerate(["jacobi_step:B1_W16_V8192_cfg_bf16_sjd_k2000", "jacobi_step:B32_W16_V8192_cfg_bf16_sjd_k2000"]):
        for be in ("torch", "cuda"):
            ops.append({"op": "jacobi_step", "case": case, "backend": be, "graph": "graph", "median_us": 10.0 * (i + 1),
                        "p20_us": 9.0 * (i + 1), "p80_us": 11.0 * (i + 1), "bytes_min": 1000 * (i + 1),
                        "roofline_us": 2.0 * (i + 1), "gpu": "test"})
    e2e = [{"method": m, "window": w, "beta": "", "speedup_latency": 1 + w / 64, "step_compression": 1 + w / 32}
           for m in ("sjd", "coupling") for w in (8, 16, 32)]
    e2e += [{"sweep": "beta", "beta": b, "vp_form": "add", "tokens_per_step": 2 - b / 4, "tokens_per_step_ci": 0.1}
            for b in (0, 0.5, 1)]
    for fn, rows, name in ((plot_ops_latency, ops, "a.png"), (plot_speedup_vs_window, e2e, "b.png"),
                           (plot_acceptance_vs_beta, e2e, "c.png")):
        fn(rows, str(tmp_path / name))
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- reference SJD law
def _law64(c, u, s, k):
    """Float64 target law of one row, computed independently of the code under test."""
    x = u.double() + s * (c.double() - u.double())
    if 0 < k < x.numel():
        kth = torch.sort(x, descending=True).values[k - 1]
        x = torch.where(x >= kth, x, torch.tensor(float("-inf"), dtype=torch.float64))
    return torch.softmax(x, 0).numpy()


def _first_token_counts(cls, n=40000, V=6, W=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = (2.0 * torch.randn(V, generator=g)).to(torch.bfloat16)
    u = (c.float() + torch.randn(V, generator=g)).to(torch.bfloat16)
    s = 3.0
    law = _law64(c, u, s, k)
    logits = c.float().view(1, 1, V).expand(n, W + 1, V).to(torch.bfloat16)
    unc = u.float().view(1, 1, V).expand(n, W + 1, V).to(torch.bfloat16)
    # adversarial stored laws: far from P, zero where P is positive (and mass where P is zero), one-hot
    q = torch.empty(n, W, V)
    third = n // 3
    q[:third] = torch.distributions.Dirichlet(torch.full((V,), 0.3)).sample((third, W))
    off = torch.tensor(law < law.max(), dtype=torch.float32) + 1e-3 * torch.tensor(law == law.max())
    q[third:2 * third] = (off / off.sum()).view(1, 1, V)
    d_onehot = torch.randint(0, V, (n - 2 * third, W), generator=g)
    q[2 * third:] = torch.nn.functional.one_hot(d_onehot, V).float()
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(n, W)
    r = cls(n, W, V, top_k=k, generator=torch.Generator().manual_seed(seed + 1))
    r.set_window(drafts, q)
    _, committed, nd = r.step(logits, unc, torch.full((n,), s))
    first = np.array([int(t[0]) for t in committed])
    assert ((nd >= 0) & (nd < V)).all()
    return np.bincount(first, minlength=V), law


def _chisq_p(counts, law):
    n = counts.sum()
    if counts[law == 0].sum() > 0:
        return 0.0
    sup = law > 0
    return stats.chisquare(counts[sup], n * law[sup]).pvalue


def test_reference_sjd_first_token_law():
    """The baseline is a correct SJD: its first committed token follows the float64 target law (alpha 1e-6)."""
    counts, law = _first_token_counts(ReferenceSJD)
    p = _chisq_p(counts, law)
    assert p > 1e-6, (counts / counts.sum(), law, p)


def test_reference_sjd_law_test_can_fail():
    """The same test rejects the known-biased 'residual falls back to P' variant."""
    class FallbackToP(ReferenceSJD):
        def residual(self, p, q):
            return p

    counts, law = _first_token_counts(FallbackToP, n=20000)
    assert _chisq_p(counts, law) < 1e-6


def test_reference_sjd_target_rows_match_library_law():
    from sjd_kernels.reference.target import combine_logits, target_probs
    g = torch.Generator().manual_seed(5)
    c = torch.randn(2, 5, 300, generator=g).to(torch.bfloat16)
    u = torch.randn(2, 5, 300, generator=g).to(torch.bfloat16)
    s = torch.tensor([3.0, 7.5])
    a = warp_probs(c, u, s, 1.0, 50)
    b = target_probs(combine_logits(c, u, s), 1.0, 50, 1.0)
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_two_sample_test_separates_laws():
    from sjd_kernels.bench.e2e import two_sample_test
    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, (400, 20))
    b = rng.integers(0, 8, (400, 20))
    assert two_sample_test(a, b)["law_test"] == "pass"
    c = np.minimum(rng.integers(0, 8, (400, 20)), rng.integers(0, 8, (400, 20)))
    assert two_sample_test(a, c)["law_test"] == "FAIL"


# ----------------------------------------------------------------------------- GPU paths (gpu_run.sh runs these)
@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device")
def test_gpu_timing_paths(tmp_path):
    """Events, cold L2, graph replay, copy bandwidth and one timed jacobi_step case end to end."""
    from sjd_kernels.bench.ops import run_ops
    from sjd_kernels.bench.timing import L2Flusher, copy_bandwidth, time_cuda
    bw = copy_bandwidth(nbytes=256 << 20, reps=5)
    assert 1e11 < bw["copy_Bps"] < 2e13
    x = torch.rand(1 << 22, device="cuda")
    fl = L2Flusher()
    for graph in (False, True):
        t = time_cuda(lambda: x.mul_(1.0000001), reps=10, warmup=2, graph=graph, flush=fl)
        assert 0 < t.p20 <= t.median <= t.p80 and len(t.samples_us) == 10
    res = run_ops(ops=["jacobi_step"], grid="quick", backends=["torch", "reference_sjd"], reps=3, warmup=1,
                  out_dir=str(tmp_path), budget_s=5, plots=True)
    timed = [r for r in res["rows"] if r["median_us"] != ""]
    assert timed and not res["failed_checks"]
    for r in timed:
        assert r["median_us"] > 0 and 0 < r["roofline_frac"] and r["achieved_GBps"] > 0 and r["state_bytes_per_req"] > 0
    assert any(r["backend"] == "torch" and r["speedup_vs_ref"] == 1.0 for r in timed)
    assert (tmp_path / "ops_latency.png").exists() and (tmp_path / "ops.csv").exists()


def test_e2e_sparse_state_option(tmp_path):
    """`--state-capacity` runs the windowed chain methods with the sparse state: their rows report its
    smaller state bytes, AR's row stays dense, the e2e law check still passes (40 samples: it catches
    gross bias only; the sparse state's exact law is tested in test_sparse_state.py) and the setting
    is recorded."""
    out = tmp_path / "e2e"
    r = _run(["e2e", "--model", "mnist", "--quick", "--methods", "ar", "sjd", "coupling", "--windows", "4",
              "--num-tokens", "12", "--batch", "2", "--samples", "1", "--law-samples", "40", "--state-capacity", "8",
              "--out", str(out), "--json", str(tmp_path / "run.json")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "run.json").read_text())
    assert res["settings"]["state_capacity"] == 8
    assert "Jacobi state sparse, capacity 8" in (out / "e2e.md").read_text()
    rows = {row["method"]: row for row in _read_csv(out / "e2e.csv") if row["sweep"] == "method"}
    V, W, B = 512, 4, 2                                  # the bundled MNIST model's codebook
    assert int(rows["sjd"]["state_bytes"]) == B * (W + 1) * (8 * 8 + 4)      # ids + values, kinds
    assert int(rows["coupling"]["state_bytes"]) == B * (W + 1) * (8 * 8 + 4)
    assert int(rows["ar"]["state_bytes"]) < B * 1 * V * 4 + 64                 # W 0: one dense slot
    for m in ("sjd", "coupling"):
        assert rows[m]["law_test"] == "pass", rows[m]


def test_state_bytes_table(tmp_path):
    """benchmarks/state_bytes.py: one row per family, shape and mode; sparse is smaller wherever C < V / 2."""
    out = tmp_path / "state_bytes.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "state_bytes.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "family" not in line]
    assert len(rows) == 3 * 3 * 2
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        dense, sparse = float(cells[7].replace(",", "")), float(cells[8].replace(",", ""))
        assert sparse < dense


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal without a GPU")
def test_tree_kv_bench_script_checks_on_cpu_and_refuses_timings(tmp_path):
    """`benchmarks/bench_tree_kv_update.py`: its CPU oracle check runs, timings are refused, nothing is
    written; an unknown backend name is a usage error (exit 2)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = os.path.join(ROOT, "benchmarks", "bench_tree_kv_update.py")
    r = subprocess.run([sys.executable, script, "--backends", "cuda,triton", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "equal a sequential copy (bf16, fp16, fp32): ok" in r.stdout and "refusing to time" in r.stdout
    assert not (tmp_path / "o").exists()
    bad = subprocess.run([sys.executable, script, "--backends", "cuda,nope"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=240)
    assert bad.returncode == 2 and "unknown names ['nope']" in bad.stderr


@pytest.mark.skipif(not NO_GPU, reason="--cuda-sim is for machines without a CUDA device")
def test_ops_check_runs_the_cuda_kernels_in_the_simulator(tmp_path):
    """``bench ops --check --cuda-sim ORDER``: the cuda backends' kernels on CPU tensors in the
    simulator, checked like the other backends (dense and sparse jacobi_step, tree_verify, KV)."""
    from _util import sim_module
    sim_module()
    r = _run(["ops", "--check", "--grid", "cpu", "--cuda-sim", "shuffle", "--backend", "cuda",
              "--backend", "cuda_lists", "--backend", "cuda_hist", "--case", "sparse40", "--case", "K4_d3",
              "--case", "small_L3",
              "--out", str(tmp_path)], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("[check]")]
    passed = {(l.split()[1].split(":")[0], l.split()[2]) for l in lines if " pass " in l}
    assert {("jacobi_step", "cuda"), ("jacobi_step", "cuda_lists"), ("jacobi_step", "cuda_hist"),
            ("tree_verify", "cuda"), ("tree_kv_update", "cuda")} <= passed, r.stdout[-3000:]
    assert not any(" FAIL" in l for l in lines)
    # checks only: timing the simulator would mean nothing
    r = _run(["ops", "--cuda-sim", "forward", "--grid", "cpu", "--out", str(tmp_path)])
    assert r.returncode == 2 and "--check" in r.stderr


# ----------------------------------------------------------------------------- the GPU run script
def test_gpu_run_scripts_parse_and_package_a_stage(tmp_path):
    """gpu_run.sh and fetch_wheels.sh parse (`bash -n`), and an info-only run of gpu_run.sh here
    writes its summary with the stage's row and a logs.tar.gz holding the stage's log: the frame
    every GPU run relies on (time boxes, status table, packaging) works before device time is
    spent on it."""
    import tarfile
    for script in ("gpu_run.sh", "fetch_wheels.sh"):
        r = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"
    env = dict(os.environ, STAGES="info", TOTAL_S="90", WHEELS=str(tmp_path / "no_wheels"), PY=sys.executable,
               TMPDIR=str(tmp_path), E2E_S="123", XDIST="3")
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| info | ok | 0 |" in summary, summary
    assert "python " in summary and "torch " in summary, summary          # the info stage's versions
    # the command line names every knob (the stage boxes too), so the run can be repeated from it
    assert 'STAGES="info" TOTAL_S="90"' in summary and 'E2E_S="123"' in summary and 'XDIST="3"' in summary, summary
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tf:
        assert "logs/info.txt" in tf.getnames()


# ----------------------------------------------------------------------------- command-line mistakes
@pytest.fixture
def bench_main(monkeypatch):
    """``bench``'s ``main`` in-process, with the runs replaced: a bad argument must stop it before any work."""
    from sjd_kernels.bench import __main__ as M
    from sjd_kernels.bench import compare as cmp_mod
    from sjd_kernels.bench import e2e as e2e_mod
    from sjd_kernels.bench import ops as ops_mod

    def boom(*a, **k):
        raise AssertionError("the benchmark started before its arguments were checked")
    monkeypatch.setattr(ops_mod, "run_ops", boom)
    monkeypatch.setattr(e2e_mod, "run_e2e", boom)
    monkeypatch.setattr(cmp_mod, "compare", boom)
    return M.main


BAD_CLI = [
    (["ops", "--check", "--backend", "nope", "--op", "tree_kv_update", "--grid", "cpu-quick"], "--backend",
     "cuda_lists"),                                                  # the known names are listed
    (["ops", "--check", "--op", "tree_kv_update", "--backend", "flashinfer", "--grid", "cpu-quick"], "--backend",
     "nothing to run"),                                              # a known backend, but not of this op
    (["ops", "--check", "--op", "nope"], "--op", "jacobi_step"),
    (["ops", "--check", "--reps", "0"], "--reps", ">= 1"),
    (["ops", "--check", "--min-requests", "0"], "--min-requests", ">= 1"),
    (["ops", "--check", "--budget-s", "0"], "--budget-s", "> 0"),
    (["list", "--op", "nope"], "--op", "tree_verify"),
    (["e2e", "--methods", "nope"], "--methods", "reference_sjd"),
    (["e2e", "--methods", "sjd", "nope"], "--methods", "'nope'"),
    (["e2e", "--num-tokens", "0"], "--num-tokens", ">= 1"),
    (["e2e", "--num-tokens", "197"], "--num-tokens", "196"),       # the mnist model's image has 196 tokens
    (["e2e", "--windows", "-3"], "--windows", "-3"),
    (["e2e", "--betas", "nan"], "--betas", "finite"),
    (["e2e", "--methods", "coupling", "--betas", "1.0"], "--betas", "sjd_vp only"),     # was silently ignored
    (["e2e", "--methods", "sjd", "--vp-forms", "log"], "--vp-forms", "sjd_vp only"),
    (["e2e", "--batch", "0"], "--batch", ">= 1"),
    (["e2e", "--samples", "0"], "--samples", ">= 1"),
    (["e2e", "--law-samples", "-1"], "--law-samples", ">= 0"),
    (["e2e", "--threads", "0"], "--threads", ">= 1"),
    (["e2e", "--state-capacity", "0"], "--state-capacity", ">= 1"),
    (["e2e", "--backend", "nope"], "--backend", "auto"),
    (["e2e", "--budget-s", "-1"], "--budget-s", "> 0"),
    (["compare", "/nonexistent_sjd.csv", "/nonexistent_sjd2.csv"], "current", "/nonexistent_sjd.csv"),
    (["compare", "CUR", "/nonexistent_sjd2.csv"], "baseline", "/nonexistent_sjd2.csv"),
    (["compare", "CUR", "CUR", "--tol", "-0.1"], "--tol", ">= 0"),
]


@pytest.mark.parametrize("args,flag,text", BAD_CLI, ids=[" ".join(a) for a, _, _ in BAD_CLI])
def test_bad_argument_is_a_usage_error_before_any_work(bench_main, tmp_path, capsys, args, flag, text):
    cur = tmp_path / "cur.csv"
    cur.write_text("op,case,backend,graph,median_us\n")
    args = [str(cur) if a == "CUR" else a for a in args]
    out = tmp_path / "out"
    if args[0] in ("ops", "e2e"):
        args += ["--out", str(out)]
    with pytest.raises(SystemExit) as e:
        bench_main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "error: " in err and flag in err and text in err and "Traceback" not in err, err
    assert not out.exists()                                        # nothing written


def test_bad_compare_inputs_are_clean_errors(bench_main, tmp_path, capsys):
    """Files that are not results (a folder, broken JSON, a CSV of other columns): exit 2 naming the file."""
    bad_json, other = tmp_path / "bad.json", tmp_path / "other.csv"
    bad_json.write_text("{not json")
    other.write_text("a,b\n1,2\n")
    for cur in (tmp_path, bad_json, other):
        with pytest.raises(SystemExit) as e:
            bench_main(["compare", str(cur), str(cur)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(cur) in err and "Traceback" not in err, err


def test_ops_with_only_unavailable_backends_is_an_error(bench_main, tmp_path, capsys):
    """A selection whose every backend is unavailable here would only write 'skip' rows: exit 2, nothing written."""
    device = "cpu" if NO_GPU else "cuda"
    ok, why = C.OPS["tree_kv_update"].available("cuda", device)
    if ok:
        pytest.skip("the cuda backend runs here")
    assert bench_main(["ops", "--check", "--backend", "cuda", "--op", "tree_kv_update", "--grid", "cpu-quick",
                       "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nothing to run" in err and why in err
    assert not (tmp_path / "out").exists()


def test_run_e2e_refuses_bad_settings_before_building_a_model(monkeypatch):
    from sjd_kernels.bench import e2e

    def boom(*a, **k):
        raise AssertionError("a model was built before the settings were checked")
    monkeypatch.setattr(e2e, "Models", boom)
    for kw, key in ((dict(methods=["nope"]), "methods"), (dict(num_tokens=0), "num_tokens"),
                    (dict(windows=[-3]), "windows"), (dict(betas=[float("nan")]), "betas"),
                    (dict(threads=0), "threads")):
        with pytest.raises(e2e.SettingsError, match=f"^{key}: "):
            e2e.run_e2e(log=lambda *a: None, **kw)
