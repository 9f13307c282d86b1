"""The CUDA kernels on the CPU, in the simulator (``sjd_kernels.cuda.sim``), against the reference.

``csrc/`` compiled as C++ with ``csrc/sim/`` first on the include path runs every thread of a block
as a fiber with the block's shared memory, barriers and warp exchanges, so the kernels' logic is
checked here without a GPU: the parity checks of ``test_cuda_jacobi_step``, ``test_sparse_state_kernels``
and ``test_tree_verify_kernels`` (which otherwise run only on a GPU) on CPU tensors, under thread
orders that move the warps apart in both directions (``forward``, ``reverse``) and at random
(``shuffle``). The tree KV kernels run in ``test_tree_kv_kernels`` (backend ``cuda_sim``).

The simulator's float library is the host's (expf, logf within an ulp or two of CUDA's), so, as on
the GPU, a rare sample may cross a boundary; the bounds are the GPU tests' own. The last tests
build the simulator from mutated kernel sources and assert that it catches a missing barrier, a
reused reduction buffer and a barrier under divergent control flow.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import sim_module  # noqa: E402

import test_cuda_jacobi_step as tcj  # noqa: E402

from sjd_kernels import rng  # noqa: E402

ORDERS = ("forward", "reverse", "shuffle")


@pytest.fixture
def cpu_cases(monkeypatch):
    """test_cuda_jacobi_step's case builders on CPU tensors; the simulator built."""
    sim_module()
    monkeypatch.setattr(tcj, "DEV", "cpu")


def simulate(order="forward", seed=0):
    from sjd_kernels.cuda import sim
    return sim.simulate(order=order, seed=seed)


# ---------------------------------------------------------------- Philox

@pytest.mark.parametrize("seed,position,step,stream,n", [
    (0, 0, 0, 0, 1), (123456789, 17, 4, rng.STREAM_DRAFT, 1000),
    (-1, 2**31 + 5, 2**32 - 1, rng.STREAM_GUMBEL, 16387), (-(2**63), 0, 7, rng.STREAM_COUPLE_RES, 33)])
def test_philox_bit_for_bit(seed, position, step, stream, n):
    sim_module()
    from sjd_kernels.cuda import philox_words
    with simulate():
        got = philox_words(seed, position, step, stream, n, device="cpu")
    assert torch.equal(got, rng.lane_words(torch.tensor(seed), position, step, stream, n))


# ---------------------------------------------------------------- jacobi_step

# Every draft mode and VP form, greedy, filters, ragged and degenerate shapes, forced rows, tail
# init, unaligned slices, mixed dtypes and the rows built for the top-k searches; V up to 8192.
# Each runs under one of the three orders (the next test runs one case under all three).
JACOBI = ["sjd-bf16-cfg-topk-topp", "sjd-fp32-plain-8192", "vp_add-0.5", "vp_log-0.5", "vp_log-generic-1.3",
          "vp_log-rsqrt", "vp_add-negative", "coupling-bf16-cfg", "coupling+vp", "coupling+vp_log", "gumbel",
          "gumbel-fp16", "gumbel_jacobi", "vp-state-in-gumbel", "greedy-sjd", "greedy-coupling-fp16",
          "temp-1.6-topp", "topk-1", "topk-V", "W1-B1", "W0-plain-AR", "V-7", "V-1", "forced-sjd",
          "forced-coupling-vp", "forced-gumbel_jacobi", "tail-left", "tail-left-coupling", "slice-bf16-cfg",
          "slice-fp16", "slice-fp32-cfg", "mixed-dtype-cfg", "topk-ties", "topk-masked", "topk-outlier-cfg",
          "topk-band", "topk-flat", "topk-wide", "topk-low-outlier", "vp_add-negative-topk", "vp_log-topk"]


@pytest.mark.parametrize("name,order", [(n, ORDERS[i % 3]) for i, n in enumerate(JACOBI)])
def test_jacobi_step_matches_reference(cpu_cases, name, order):
    with simulate(order, seed=len(name)):
        tcj.check_named(name)


def test_jacobi_step_large_vocabulary(cpu_cases):
    """V 16387 with top-k 1000 and top-p (1024 threads per row): one repetition per path."""
    from sjd_kernels.cuda.jacobi_step import kernel_features
    cfg = dict(tcj.CONFIGS["V-16384+3-topk1000"], B=1, W=8)
    for features in ((), ("bracket_topk", "list_races"), ("hist_topk", "list_races")):
        with simulate("reverse"), kernel_features(*features):
            tcj.check_config(reps=1, **cfg)


# The rows kernel's optional paths (bench backends cuda_bracket, cuda_lists and cuda_hist), each on the
# configurations that exercise it.
OPTIONAL = [(("bracket_topk",), n) for n in ("sjd-bf16-cfg-topk-topp", "coupling+vp", "temp-0.7-topk", "topk-1",
                                             "forced-sjd", "topk-ties", "topk-masked", "topk-outlier-cfg")]
OPTIONAL += [(("list_races",), n) for n in ("sjd-bf16-cfg-topk-topp", "vp_log-0.5", "vp_add-negative",
                                           "coupling-bf16-cfg", "coupling+vp_log", "gumbel", "gumbel_jacobi",
                                           "greedy-sjd", "forced-coupling-vp", "W0-plain-AR", "topk-masked",
                                           "sjd-fp32-plain-8192")]
OPTIONAL += [(("bracket_topk", "list_races"), n) for n in ("sjd-bf16-cfg-topk-topp", "coupling+vp", "topk-ties")]
OPTIONAL += [(("hist_topk",), n) for n in ("sjd-bf16-cfg-topk-topp", "vp_add-0.5", "temp-0.7-topk", "topk-1",
                                          "forced-sjd", "topk-ties", "topk-masked", "topk-outlier-cfg", "topk-band",
                                          "topk-low-outlier", "topk-flat", "topk-wide")]
OPTIONAL += [(("hist_topk", "list_races"), n) for n in ("sjd-bf16-cfg-topk-topp", "coupling+vp", "gumbel",
                                                       "topk-band", "vp_add-negative-topk", "vp_log-topk")]


@pytest.mark.parametrize("features,name", OPTIONAL, ids=lambda x: "+".join(x) if isinstance(x, tuple) else x)
def test_optional_kernel_paths_match_reference(cpu_cases, features, name):
    from sjd_kernels.cuda.jacobi_step import kernel_features
    cfg = dict(tcj.CONFIGS[name])
    reps = cfg.pop("reps", 3)
    with simulate(ORDERS[len(name) % 3]), kernel_features(*features):
        tcj.check_config(reps=reps, **cfg)


@pytest.mark.parametrize("name", ["sjd-bf16-cfg-topk-topp", "coupling+vp", "gumbel_jacobi", "tail-left"])
def test_global_row_path_matches_reference(cpu_cases, name):
    cfg = dict(tcj.CONFIGS[name])
    cfg.pop("reps", None)
    with simulate("reverse"):
        tcj.check_config(reps=2, force_global=True, **cfg)


def test_same_bits_under_every_thread_order(cpu_cases):
    """The kernels' float sums go through fixed reduction trees, so outputs and state are bitwise
    the same whichever order the threads run in (the default and the optional paths)."""
    from sjd_kernels.cuda.jacobi_step import jacobi_step_cuda, kernel_features
    case = tcj.build_case(B=4, W=8, V=1000, seed=42, cfg=True, top_k=100, top_p=0.9, mode="coupling", vp=True,
                          beta=0.5, forced=True)
    for features in ((), ("bracket_topk", "list_races"), ("hist_topk", "list_races")):
        runs = []
        for order, seed in (("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
            st = tcj._fresh_state(case)
            with simulate(order, seed), kernel_features(*features):
                out = jacobi_step_cuda(*tcj._args(case, st))
            runs.append((out, st))
        for out, st in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(out, runs[0][0]))
            assert all(torch.equal(st[k], runs[0][1][k]) for k in tcj.STATE)


@pytest.mark.parametrize("race", [False, True], ids=["plain", "race-checked"])
def test_launches_from_several_threads_take_turns(cpu_cases, race):
    """The bindings release the GIL, while the kernels' static ``__shared__`` arrays and the state of
    the running launch are process-wide: launches from several Python threads must take turns
    (``g_launch_mutex`` in ``sjd_sim.h``). Three threads run the step twice each, at once; every
    result equals the one-thread run. In the race-checked build the other threads' instrumented
    host code (the wrappers' argument checks) runs during a launch and must not be checked as the
    launch's threads. (The thread order is per thread, set by ``simulate``: the workers run
    "forward", like the one-thread run.)"""
    from concurrent.futures import ThreadPoolExecutor

    from sjd_kernels.cuda.jacobi_step import jacobi_step_cuda
    case = tcj.build_case(B=4, W=8, V=1000, seed=42, cfg=True, top_k=100, top_p=0.9, mode="coupling", vp=True,
                          beta=0.5, forced=True)

    def run(_=None):
        st = tcj._fresh_state(case)
        return jacobi_step_cuda(*tcj._args(case, st)), st

    from sjd_kernels.cuda import sim
    with sim.simulate("forward", module=sim_module(race=race)):
        out0, st0 = run()
        with ThreadPoolExecutor(3) as ex:
            runs = list(ex.map(run, range(6)))
    for out, st in runs:
        assert all(torch.equal(a, b) for a, b in zip(out, out0))
        assert all(torch.equal(st[k], st0[k]) for k in tcj.STATE)


@pytest.mark.parametrize("name", ["sjd-bf16-cfg-topk-topp", "coupling+vp", "topk-band", "topk-low-outlier"])
def test_hist_topk_path_equals_default_path(cpu_cases, name):
    """The hist_topk path (with the list races) against the default kernels on the same inputs, a
    NaN row and a +inf row among them: the same tokens, counts and drafts, and the same state up to
    the rounding of sums taken in list order instead of lane order."""
    from sjd_kernels.cuda.jacobi_step import jacobi_step_cuda, kernel_features
    cfg = dict(tcj.CONFIGS[name])
    cfg.pop("reps", None)
    case = tcj.build_case(seed=7, **cfg)
    case["logits"][0, 1, 3] = float("nan")
    case["logits"][-1, 2, 5] = float("inf")
    runs = []
    for features in ((), ("hist_topk", "list_races")):
        st = tcj._fresh_state(case)
        with simulate("reverse"), kernel_features(*features):
            out = jacobi_step_cuda(*tcj._args(case, st))
        runs.append((out, st))
    (out0, st0), (out1, st1) = runs
    assert all(torch.equal(a, b) for a, b in zip(out0, out1))
    assert torch.equal(st0["q_kind"], st1["q_kind"]) and torch.equal(st0["status"], st1["status"])
    assert int(st0["status"][0]) != 0                     # the poisoned rows were reported
    for k in ("q_state", "p_prev"):
        if st0[k] is not None and st0[k].numel():
            assert torch.allclose(st0[k], st1[k], rtol=1e-4, atol=1e-6), k


def test_zero_mass_counters_and_errors(cpu_cases):
    with simulate("shuffle"):
        tcj.test_zero_mass_counters_are_exercised()
        tcj.test_errors_reported_per_request()


def test_public_op_with_cuda_backend(cpu_cases):
    with simulate():
        tcj.test_public_op_with_cuda_backend()


def test_cuda_backend_refuses_cpu_tensors_outside_the_simulator():
    import sjd_kernels as sk
    from sjd_kernels.ops._common import SJDInputError
    st = sk.JacobiState.create(1, 2, 10, seed=[1])
    drafts = sk.init_window(st, torch.zeros(1, dtype=torch.int64), 2)
    with pytest.raises((SJDInputError, RuntimeError), match="CUDA"):
        sk.jacobi_step(torch.randn(1, 3, 10), drafts, torch.tensor([2]), torch.tensor([0]), st, backend="cuda")


# ---------------------------------------------------------------- sparse state

@pytest.mark.parametrize("k,cap", [(0, 6), (2, 2), (0, 1)], ids=["fits", "topk2-ties", "overflow"])
def test_sparse_state_matches_reference(cpu_cases, k, cap):
    """Every draft mode, multi-step through the prefix-to-row table (tokens, counts, kinds and entry
    ids exact; values to rounding), as ``test_sparse_cuda_matches_reference`` on a GPU."""
    import test_sparse_state_kernels as tsk
    from test_sparse_state import SPECS
    for i, spec in enumerate(SPECS):
        with simulate(ORDERS[i % 3]):
            status = tsk._compare(spec, V=6, L=6, n=64, W=3, k=k, cap=cap, device="cpu", backend="cuda")
        if cap == 1:
            assert status[3] > 0, "the overflow path did not run"


def test_sparse_state_block_compaction(cpu_cases):
    """V 3000, top-k 200: the block-wide compaction over several chunks; capacity 256 (fits) and 150
    (every row overflows)."""
    import test_sparse_state_kernels as tsk
    with simulate("reverse"):
        tsk._compare("coupling_vp_add_b0.5", V=3000, L=12, n=8, W=8, k=200, cap=256, device="cpu", backend="cuda")
        status = tsk._compare("sjd", V=3000, L=12, n=8, W=8, k=200, cap=150, device="cpu", backend="cuda")
    assert status[3] > 0


# ---------------------------------------------------------------- tree verify

def _tree_cases():
    import test_tree_verify_kernels as ttv
    return list(ttv.CASES) + ["V2048-bf16-cfg-topk"]


@pytest.mark.parametrize("name", _tree_cases())
def test_tree_verify_matches_reference(name):
    sim_module()
    import test_tree_verify_kernels as ttv
    from sjd_kernels.cuda.jacobi_step import kernel_features
    from sjd_kernels.cuda.tree_verify import tree_verify_cuda
    # the default top-k search, the bracket selection or the hist_topk path, by turns
    features = ((), ("bracket_topk",), ("hist_topk",))[_tree_cases().index(name) % 3]
    with simulate(ORDERS[len(name) % 3]), kernel_features(*features):
        ttv.check_against_reference(tree_verify_cuda, name, "cpu", reps=2)


@pytest.mark.parametrize("name", ["topk-topp", "V2048-bf16-cfg-topk"])
def test_tree_verify_hist_topk_matches_reference(name):
    sim_module()
    import test_tree_verify_kernels as ttv
    from sjd_kernels.cuda.jacobi_step import kernel_features
    from sjd_kernels.cuda.tree_verify import tree_verify_cuda
    with simulate("reverse"), kernel_features("hist_topk"):
        ttv.check_against_reference(tree_verify_cuda, name, "cpu", reps=2)


# ---------------------------------------------------------------- the simulator catches kernel bugs

MUTANTS = {
    # block_allreduce without the barrier between the per-warp partials and their reduction
    "missing-barrier": ("sampling.cuh", "    for (int k = 0; k < N; ++k) b[warp * N + k] = v[k];\n  }\n  __syncthreads();",
                        "    for (int k = 0; k < N; ++k) b[warp * N + k] = v[k];\n  }\n"),
    # the ping-pong buffers of back-to-back reductions collapsed into one
    "reused-buffer": ("sampling.cuh", "  parity ^= 1;\n}", "  parity = 0;\n}"),
    # the reduction's barrier reached by the first warp only
    "divergent-barrier": ("sampling.cuh", "    for (int k = 0; k < N; ++k) b[warp * N + k] = v[k];\n  }\n  __syncthreads();",
                          "    for (int k = 0; k < N; ++k) b[warp * N + k] = v[k];\n  }\n  if (warp == 0) __syncthreads();"),
}


def _mutant_module(tmp_path, fname, old, new, race=False):
    """The simulator built from a copy of csrc/ with ``old`` replaced by ``new`` in ``fname``
    (``race``: the race-checking build)."""
    from sjd_kernels.cuda import sim
    src = tmp_path / "csrc"
    shutil.copytree(sim.CSRC, src)
    text = (src / fname).read_text()
    assert text.count(old) == 1, f"mutation site not found in {fname}"
    (src / fname).write_text(text.replace(old, new))
    return sim.load(src, race=race)


def test_build_cache_follows_the_includes():
    """The object cache's key covers every csrc header a source includes, directly or through
    another header (a header it missed would let a mutant reuse the unmutated object), and no more
    than the sources need (bindings.cpp, which includes no sampling code, is reused by the
    sampling mutants)."""
    from sjd_kernels.cuda import sim
    dirs = sim.include_dirs(sim.CSRC)
    names = lambda src: {p.name for p in sim._headers(sim.CSRC / src, dirs)}
    step = names("jacobi_step.cu")
    # direct, through target.cuh (pivot_count.cuh), and the simulator's stand-in CUDA headers
    assert {"target.cuh", "sampling.cuh", "pivot_count.cuh", "row_smem.cuh", "common.cuh", "cuda_runtime.h",
            "sjd_sim.h", "cuda_bf16.h", "cuda_fp16.h"} <= step
    assert all(sim.CSRC.resolve() in p.parents for p in sim._headers(sim.CSRC / "jacobi_step.cu", dirs))
    assert "sampling.cuh" not in names("bindings.cpp") and "common.cuh" in names("bindings.cpp")
    assert "target.cuh" not in names("tree_kv_update.cu")


def test_build_cache_refuses_an_include_it_cannot_follow(tmp_path):
    from sjd_kernels.cuda import sim
    (tmp_path / "a.cu").write_text('#include "b.cuh"\n#define H "c.cuh"\n#include H\n')
    (tmp_path / "b.cuh").write_text("")
    with pytest.raises(sim.SimUnavailable, match="cannot follow"):
        sim._headers(tmp_path / "a.cu", [tmp_path])


def test_mutant_build_recompiles_only_what_the_mutation_reaches(tmp_path, monkeypatch):
    """A changed header rebuilds the objects of the sources that include it and reuses the others
    (the tests' mutants build in seconds); the module gets a file and an entry point of its own.
    It builds in a cache of its own, which starts with the objects of the unmutated build."""
    from sjd_kernels.cuda import sim
    sim_module()
    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    # objects only: another test process's build in progress (a .tmp file) may vanish mid-copy
    shutil.copytree(sim.cache_dir() / "obj", tmp_path / "cache" / "obj", copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns("*.tmp"))
    monkeypatch.setenv("SJD_SIM_CACHE", str(tmp_path / "cache"))
    unmutated = sim.load()
    compiled = []
    real = sim._run
    monkeypatch.setattr(sim, "_run", lambda cmd, verbose: (compiled.append(cmd), real(cmd, verbose)))
    mod = _mutant_module(tmp_path, "sampling.cuh", "  parity ^= 1;\n}", "  parity ^= 1;\n}  // changed")
    sources = sorted(os.path.basename(c[c.index("-c") + 3]) for c in compiled if "-c" in c)
    assert sources == ["jacobi_step.cu", "sjd2_prepare.cu", "tree_verify.cu", "verify_chain.cu"]
    assert mod is not unmutated and mod.__file__ != unmutated.__file__


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_simulator_catches_broken_synchronisation(cpu_cases, mutant, tmp_path):
    from sjd_kernels.cuda import sim
    mod = _mutant_module(tmp_path, *MUTANTS[mutant])
    cfg = dict(tcj.CONFIGS["sjd-bf16-cfg-topk-topp"])
    # the unmutated kernels pass this check (test_jacobi_step_matches_reference); the mutant is
    # built under its own module name, beside the unmutated one
    assert mod is not sim.load()
    for order in ("forward", "reverse"):
        with sim.simulate(order, module=mod):
            if mutant == "divergent-barrier":
                with pytest.raises(RuntimeError, match="divergent control flow|deadlock"):
                    tcj.check_config(reps=1, **cfg)
            else:
                # wrong reductions: outputs that differ from the reference, or threads that disagree
                # on a loop's exit and meet at different barriers
                with pytest.raises((AssertionError, RuntimeError), match="differ|status|divergent control flow"):
                    tcj.check_config(reps=1, **cfg)


@pytest.fixture(scope="module")
def hist_mutant(tmp_path_factory):
    """The simulator built with the hist_topk path halving the probabilities it scatters."""
    sim_module()
    return _mutant_module(tmp_path_factory.mktemp("hist_mutant"), "target.cuh", "S[hb.ids[t]] = hb.vals[t];",
                          "S[hb.ids[t]] = 0.5f * hb.vals[t];")


@pytest.mark.parametrize("name", ["sjd-bf16-cfg-topk-topp", "topk-band", "topk-low-outlier", "topk-ties",
                                  "topk-masked"])
def test_hist_topk_list_path_runs_on_its_rows(cpu_cases, name, hist_mutant):
    """The hist_topk path falls back to the default one on some rows, with the same results, so
    its parity tests alone cannot show that it ran. A mutant that halves the probabilities it
    scatters into the row must fail them on rows built for each of its branches: an exact rank
    among few candidates, a crowded bin refined by key histograms (topk-band), a bin split into
    sub-bins by one more pass (topk-low-outlier), tied candidates
    (topk-ties), fewer finite lanes than k (topk-masked). The unmutated path passes on the same rows
    (test_optional_kernel_paths_match_reference)."""
    from sjd_kernels.cuda import sim
    from sjd_kernels.cuda.jacobi_step import kernel_features
    cfg = dict(tcj.CONFIGS[name])
    cfg.pop("reps", None)
    with sim.simulate("reverse", module=hist_mutant), kernel_features("hist_topk"):
        with pytest.raises(AssertionError, match="differ|status"):
            tcj.check_config(reps=1, **cfg)


def test_simulator_catches_a_write_past_dynamic_shared_memory(tmp_path):
    """tree_kv_update's path copy in dynamic shared memory written one entry too far."""
    sim_module()
    from sjd_kernels.cuda import sim
    from sjd_kernels.cuda.tree_kv_update import tree_kv_update_cuda
    mod = _mutant_module(tmp_path, "tree_kv_update.cu", "    s_src[j] = (used", "    s_src[j + 1] = (used")
    kv = torch.randn(2, 2, 1, 2, 8, 8)
    path, cl = torch.tensor([[0, 2, 3]]), torch.tensor([1])
    status = torch.zeros(4, dtype=torch.int32)
    with sim.simulate(module=sim.load()):
        tree_kv_update_cuda(kv.clone(), path, cl, status.clone())        # the unmutated kernel runs
    with sim.simulate(module=mod), pytest.raises(RuntimeError, match="past the end of its 12 bytes"):
        tree_kv_update_cuda(kv.clone(), path, cl, status.clone())


# ---------------------------------------------------------------- the race checks

# A sample of every kernel and path; ``SJD_SIM_RACE=1 pytest tests/test_cuda_sim.py
# tests/test_tree_kv_kernels.py`` runs all of this file's cases with the checks.
RACE_CASES = [((), "sjd-bf16-cfg-topk-topp"), ((), "coupling+vp"), ((), "gumbel_jacobi"), ((), "topk-ties"),
              (("bracket_topk", "list_races"), "sjd-bf16-cfg-topk-topp"), (("bracket_topk",), "topk-outlier-cfg"),
              (("hist_topk", "list_races"), "coupling+vp"), (("hist_topk",), "topk-band"),
              (("hist_topk",), "topk-low-outlier")]


@pytest.mark.parametrize("features,name", RACE_CASES, ids=lambda x: "+".join(x) if isinstance(x, tuple) else x)
def test_no_race_in_jacobi_step(cpu_cases, features, name):
    """Every load and store of the rows and commit kernels checked (``sim.load(race=True)``): no
    two unordered accesses to the same shared or global bytes with a write among them, no read of
    shared memory the block did not write; and the outputs still match the reference."""
    from sjd_kernels.cuda import sim
    from sjd_kernels.cuda.jacobi_step import kernel_features
    mod = sim_module(race=True)
    cfg = dict(tcj.CONFIGS[name])
    cfg.pop("reps", None)
    with sim.simulate("shuffle", seed=3, module=mod), kernel_features(*features):
        tcj.check_config(reps=1, **cfg)
    if name in ("sjd-bf16-cfg-topk-topp", "coupling+vp"):
        # and with the rows in the global buffer (the kernels' other instantiation)
        with sim.simulate("reverse", module=mod), kernel_features(*features):
            tcj.check_config(reps=1, force_global=True, **cfg)


def test_no_race_with_zero_mass_rows_and_errors(cpu_cases):
    """The status counters bumped from many blocks (atomics) and the per-request error paths."""
    from sjd_kernels.cuda import sim
    mod = sim_module(race=True)
    with sim.simulate("shuffle", seed=1, module=mod):
        tcj.test_zero_mass_counters_are_exercised()
        tcj.test_errors_reported_per_request()


def test_no_race_in_tree_kernels(cpu_cases):
    import test_tree_verify_kernels as ttv
    from sjd_kernels.cuda import sim
    from sjd_kernels.cuda.jacobi_step import kernel_features
    from sjd_kernels.cuda.tree_kv_update import tree_kv_update_cuda, tree_kv_update_list_cuda
    from sjd_kernels.cuda.tree_verify import tree_verify_cuda
    mod = sim_module(race=True)
    for name in ("K3-depth2", "V2048-bf16-cfg-topk"):
        for features in ((), ("hist_topk",)):
            with sim.simulate("reverse", module=mod), kernel_features(*features):
                ttv.check_against_reference(tree_verify_cuda, name, "cpu", reps=1)
    # overlapping moves (request 0: slots 1, 3, 4 into 1, 2, 3), a request with padding, both layouts
    kv = torch.randn(2, 2, 2, 2, 8, 8)
    path, cl = torch.tensor([[0, 2, 3], [1, -1, -1]]), torch.tensor([1, 4])
    status = torch.zeros(4, dtype=torch.int32)
    with sim.simulate("shuffle", module=mod):
        tree_kv_update_cuda(kv, path, cl, status)
        keys = [torch.randn(2, 2, 8, 8) for _ in range(2)]
        values = [torch.randn(2, 2, 8, 8) for _ in range(2)]
        tree_kv_update_list_cuda(keys, values, path, cl, None, status)
    assert int(status[0]) == 0


RACE_MUTANTS = {
    # the histogram's increments as plain read-modify-writes: same outputs here (fibers never
    # interleave inside one), lost counts on a GPU
    "shared-plain-increment": (("hist_topk",), "sjd-bf16-cfg-topk-topp", "target.cuh",
                               "    if (y >= ymin) atomicAdd(hb.hist + bin_of(y), 1u);",
                               "    if (y >= ymin) hb.hist[bin_of(y)] += 1u;", "race on dynamic shared memory"),
    # block_allreduce without its barrier (MUTANTS["missing-barrier"])
    "missing-barrier": ((), "sjd-bf16-cfg-topk-topp", *MUTANTS["missing-barrier"], "race on __shared__ red_"),
    # the reduction reads the partial of one warp more than the block has: never written
    "absent-warp-partial": ((), "sjd-bf16-cfg-topk-topp", "sampling.cuh", "lane < nw ? b[lane * N + k]",
                            "lane <= nw ? b[lane * N + k]", "that no thread of the block wrote"),
    # the zero-residual counter bumped by a plain read-modify-write from many blocks
    "global-plain-increment": (None, "zero-mass", "jacobi_step.cu", "        atomicAdd(p.status + kStatusZeroResid, 1);",
                               "        p.status[kStatusZeroResid] += 1;",
                               "race on global memory.*threads of different blocks"),
    # tree_verify counting each node's children with a plain increment
    "tree-plain-increment": (None, "tree", "tree_verify.cu", "      atomicAdd(&s_nch[pc], 1);",
                             "      s_nch[pc] += 1;", "race on __shared__ s_nch"),
}


def _run_race_case(features, name):
    if name == "zero-mass":
        tcj.test_zero_mass_counters_are_exercised()
    elif name == "tree":
        import test_tree_verify_kernels as ttv
        from sjd_kernels.cuda.tree_verify import tree_verify_cuda
        ttv.check_against_reference(tree_verify_cuda, "K3-depth2", "cpu", reps=1)
    else:
        from sjd_kernels.cuda.jacobi_step import kernel_features
        cfg = dict(tcj.CONFIGS[name])
        cfg.pop("reps", None)
        with kernel_features(*features):
            tcj.check_config(reps=1, **cfg)


@pytest.mark.parametrize("mutant", list(RACE_MUTANTS))
def test_race_check_catches_mutants(cpu_cases, mutant, tmp_path):
    """Each mutant races (or reads unwritten shared memory) and the race-checking build says so
    under a shuffled thread order. The output checks alone pass the three plain increments (the
    simulator runs a read-modify-write without interruption; a GPU loses counts). The unmutated
    kernels pass the same runs with the checks (test_no_race_in_jacobi_step,
    test_no_race_with_zero_mass_rows_and_errors, test_no_race_in_tree_kernels)."""
    from sjd_kernels.cuda import sim
    features, name, fname, old, new, match = RACE_MUTANTS[mutant]
    sim_module(race=True)
    mod = _mutant_module(tmp_path, fname, old, new, race=True)
    with sim.simulate("shuffle", seed=1, module=mod), pytest.raises(RuntimeError, match=match):
        _run_race_case(features, name)
    if "plain-increment" in mutant:
        # the output checks alone pass: only the race check sees these
        plain = _mutant_module(tmp_path / "plain", fname, old, new)
        with sim.simulate("shuffle", seed=1, module=plain):
            _run_race_case(features, name)
