"""Command-line mistakes of the scripts under ``python/`` and ``benchmarks/``: each one is a usage error
that names its flag (exit 2, no traceback), raised before any work (data, models, training,
benchmarks: replaced here by a stand-in that fails the test when reached) and before any output
file or folder is made. The invocations that ``benchmarks/gpu_run.sh`` and the recorded results use
still pass the checks (they reach the stand-in)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _util import load_file_module

ROOT = Path(__file__).resolve().parents[1]
BIG = str(2 ** 64)
_MODULES: dict = {}


class Reached(BaseException):
    """The script got past its argument checks to the work (a BaseException: some loops catch Exception)."""


def reached(*a, **k):
    raise Reached


def script(rel: str):
    """The script at ``ROOT / rel`` as a module (its ``__main__`` block does not run)."""
    if rel not in _MODULES:
        _MODULES[rel] = load_file_module("script_" + Path(rel).stem, ROOT / rel)
    return _MODULES[rel]


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    """Scripts set torch's thread count: leave the test process's alone."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)


@pytest.fixture
def afile(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    return f


def usage_error(main, args, flag, capsys, *not_made):
    """``main(args)`` exits 2 with an argparse error naming ``flag``; none of ``not_made`` exists after."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    # the flag in the error line itself: the usage line above it names every flag
    errors = [ln for ln in err.splitlines() if "error: " in ln]
    assert errors and flag in errors[-1] and "Traceback" not in err, err
    for p in not_made:
        assert not Path(p).exists(), p
    return err


def ids(cases):
    return [" ".join(c[0]) or "''" for c in cases]


def fill(args, tmp_path, afile):
    """``TMP`` and ``AFILE`` in ``args``: the test's folder and a plain file in it."""
    return [a.replace("AFILE", str(afile)).replace("TMP", str(tmp_path)) for a in args]


# ----------------------------------------------------------------------------- python/train_toy.py
@pytest.fixture
def train_toy(monkeypatch, tmp_path):
    monkeypatch.setenv("SJD_TRAIN_CACHE", str(tmp_path / "train_cache"))   # no state of a real run here
    m = script("python/train_toy.py")
    for name in ("train_data", "stage_vq", "stage_clf", "stage_gpt"):
        monkeypatch.setattr(m, name, reached)
    monkeypatch.setattr(m.bundled, "save", reached)
    return m


TRAIN_BAD = [
    (["--threads", "0"], "--threads"),
    (["--steps", "0", "--budget-minutes", "0"], "--steps"),            # was a ZeroDivisionError after training
    (["--steps", "-1", "--budget-minutes", "0"], "--steps"),           # was a GPT stage that never ended
    (["--budget-minutes", "-1"], "--budget-minutes"),                  # never ended
    (["--budget-minutes", "nan"], "--budget-minutes"),                 # never ended
    (["--steps", "100"], "--steps"),                                   # ignored under the time budget
    (["--stages", "vq,clf", "--budget-minutes", "5"], "--budget-minutes"),   # no gpt stage to apply it to
    (["--seed", "-1"], "--seed"),                                      # k-means refused it after the data load
    (["--stages", "nope"], "--stages"),
    (["--stages", ","], "--stages"),                                   # nothing to run
    (["--stages", "gpt"], "--stages"),                                 # vq and clf are not in the fresh --out
    (["--stages", "vq"], "--stages"),                                  # the GPT in --out knows other codes
    (["--stages", "vq,clf"], "--stages"),
]


@pytest.mark.parametrize("args,flag", TRAIN_BAD, ids=ids(TRAIN_BAD))
def test_train_toy_bad_argument(train_toy, tmp_path, capsys, args, flag):
    out, log = tmp_path / "w", tmp_path / "l" / "train.log"
    usage_error(train_toy.main, args + ["--out", str(out), "--log", str(log)], flag, capsys, out, log.parent)


TRAIN_OUT = [(["--out", "AFILE/w"], "--out"),                      # was a failure after training
             (["--log", "TMP"], "--log"),
             (["--log", "AFILE/train.log"], "--log")]


@pytest.mark.parametrize("args,flag", TRAIN_OUT, ids=ids(TRAIN_OUT))
def test_train_toy_bad_output_location(train_toy, tmp_path, afile, capsys, args, flag):
    # --out and --log always name the test's folder (the defaults are the committed weights and logs)
    args = ["--out", "TMP/w", "--log", "TMP/l/train.log"] + args
    usage_error(train_toy.main, fill(args, tmp_path, afile), flag, capsys, tmp_path / "w", tmp_path / "l")


def test_train_toy_valid_commands_pass_the_checks(train_toy, tmp_path):
    """The recorded command, and a subset of stages that reuses the files in --out."""
    with pytest.raises(Reached):
        train_toy.main(["--model", "mnist", "--threads", "1", "--out", str(tmp_path / "w"),
                        "--log", str(tmp_path / "train.log")])
    w = tmp_path / "copy"
    w.mkdir()
    for f in ("mnist.json", "mnist_vq.safetensors", "mnist_quality.safetensors"):
        shutil.copy(ROOT / "sjd_kernels" / "models" / "weights" / f, w / f)
    with pytest.raises(Reached):
        train_toy.main(["--stages", "gpt", "--steps", "5", "--budget-minutes", "0", "--out", str(w),
                        "--log", str(tmp_path / "gpt.log")])


# ----------------------------------------------------------------------------- python/finetune_sjd2.py
@pytest.fixture
def finetune(monkeypatch, tmp_path):
    monkeypatch.setenv("SJD_TRAIN_CACHE", str(tmp_path / "train_cache"))   # no state of a real run here
    m = script("python/finetune_sjd2.py")
    monkeypatch.setattr(m.bundled, "load", reached)
    monkeypatch.setattr(m.checkpoint, "save", reached)
    monkeypatch.setattr(torch, "manual_seed", lambda s: None)         # the test process's seed stays
    return m


FINETUNE_BAD = [
    (["--levels", "-1"], "--levels"),
    (["--s-min", "0"], "--s-min"),
    (["--s-min", "0.5", "--s-max", "0.4"], "--s-min"),
    (["--s-max", "1.5"], "--s-max"),
    (["--rho", "0"], "--rho"),
    (["--rho", "nan"], "--rho"),
    (["--max-segments", "0"], "--max-segments"),
    (["--p-rising", "1.5"], "--p-rising"),
    (["--steps", "0"], "--steps"),                         # was a fine-tune of no step, saved as one step
    (["--batch", "0"], "--batch"),
    (["--batch", "4501"], "--batch"),                      # above mnist's 4500 training images: before the log
    (["--lr", "-1"], "--lr"),
    (["--new-lr", "nan"], "--new-lr"),
    (["--warmup", "-1"], "--warmup"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--cfg-drop", "2"], "--cfg-drop"),
    (["--seed", BIG], "--seed"),
    (["--max-minutes", "0"], "--max-minutes"),
    (["--max-minutes", "nan"], "--max-minutes"),
    (["--threads", "0"], "--threads"),
    (["--checkpoint-minutes", "-1"], "--checkpoint-minutes"),
    (["--resume"], "--resume"),                            # no saved state
    (["--checkpoint", "TMP"], "--checkpoint"),             # a folder
]


def _base_manifest_dir(tmp_path) -> Path:
    d = tmp_path / "fo"
    d.mkdir()
    shutil.copy(ROOT / "sjd_kernels" / "models" / "weights" / "mnist.json", d / "mnist.json")
    return d


@pytest.mark.parametrize("args,flag", FINETUNE_BAD, ids=ids(FINETUNE_BAD))
def test_finetune_bad_argument(finetune, tmp_path, capsys, args, flag):
    out, log = _base_manifest_dir(tmp_path), tmp_path / "l" / "ft.log"
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    usage_error(finetune.main, args + ["--out", str(out), "--log", str(log)], flag, capsys, log.parent,
                out / "mnist_sjd2.json")


FINETUNE_OUT = [(["--out", "TMP/new"], "--out"),                    # checkpoint.save reads the base manifest there
                (["--out", "AFILE"], "--out"),
                (["--log", "TMP"], "--log"),
                (["--log", "AFILE/ft.log"], "--log")]


@pytest.mark.parametrize("args,flag", FINETUNE_OUT, ids=ids(FINETUNE_OUT))
def test_finetune_bad_output_location(finetune, tmp_path, afile, capsys, args, flag):
    _base_manifest_dir(tmp_path)
    # --out and --log always name the test's folder (the defaults are the committed weights and logs)
    args = ["--out", "TMP/fo", "--log", "TMP/l/ft.log"] + args
    usage_error(finetune.main, fill(args, tmp_path, afile), flag, capsys, tmp_path / "new", tmp_path / "l")


def test_finetune_out_with_another_base_model(finetune, tmp_path, capsys):
    """The fine-tune records the base GPT's checksum from the manifest in --out: one naming another GPT
    than the bundled one the script loads is refused."""
    import json
    out = _base_manifest_dir(tmp_path)
    man = json.loads((out / "mnist.json").read_text())
    man["files"]["gpt"]["sha256"] = "0" * 64
    (out / "mnist.json").write_text(json.dumps(man))
    usage_error(finetune.main, ["--out", str(out), "--log", str(tmp_path / "l" / "ft.log")], "--out", capsys,
                tmp_path / "l", out / "mnist_sjd2.json")


def test_finetune_recorded_command_passes_the_checks(finetune, tmp_path):
    with pytest.raises(Reached):
        finetune.main(["--model", "mnist", "--steps", "450", "--max-minutes", "14", "--threads", "1",
                       "--out", str(_base_manifest_dir(tmp_path)), "--log", str(tmp_path / "ft.log")])


def test_finetune_resume_checks_the_saved_state_first(finetune, tmp_path, capsys, monkeypatch):
    """A saved state blocks a fresh start (it would be overwritten); --resume needs one of this run's
    settings; both are refused before the base model loads."""
    from sjd_kernels.models import resume
    out, state = _base_manifest_dir(tmp_path), tmp_path / "st.pt"
    args = ["--out", str(out), "--log", str(tmp_path / "ft.log"), "--checkpoint", str(state)]
    monkeypatch.setattr(finetune, "finetune_fingerprint", lambda a, m: {"x": 1, "training_data": None})
    resume.Checkpointer(state, {"x": 2, "training_data": "abc"}).save({})
    usage_error(finetune.main, args, "--resume", capsys)
    usage_error(finetune.main, args + ["--resume"], "--resume", capsys)
    resume.Checkpointer(state, {"x": 1, "training_data": "abc"}).save({})   # the data are checked later
    with pytest.raises(Reached):
        finetune.main(args + ["--resume"])


# ----------------------------------------------------------------------------- python/reproduce_tables.py
@pytest.fixture
def reproduce(monkeypatch):
    m = script("python/reproduce_tables.py")
    monkeypatch.setattr(m.subprocess, "run", reached)
    return m


REPRODUCE_BAD = [(["--rtol", "-1", "--out", "TMP/o"], "--rtol"),
                 (["--rtol", "nan", "--out", "TMP/o"], "--rtol"),
                 (["--out", "AFILE"], "--out"),
                 (["--out", "AFILE/sub"], "--out"),
                 (["--list", "--out", "TMP/o"], "--list"),          # used to ignore --out and --rtol
                 (["--list", "--rtol", "0.1"], "--list"),
                 (["--list", "--cpu-capability", "avx2"], "--list"),
                 (["--cpu-capability", "sse", "--out", "TMP/o"], "--cpu-capability")]


@pytest.mark.parametrize("args,flag", REPRODUCE_BAD, ids=ids(REPRODUCE_BAD))
def test_reproduce_tables_bad_argument(reproduce, tmp_path, afile, capsys, args, flag):
    usage_error(reproduce.main, fill(args, tmp_path, afile) + ["--only", "state_bytes"], flag, capsys,
                tmp_path / "o")


def test_reproduce_tables_valid_command_passes_the_checks(reproduce, tmp_path):
    with pytest.raises(Reached):
        reproduce.main(["--only", "state_bytes", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flag,want", [([], None), (["--cpu-capability", "native"], None),
                                       (["--cpu-capability", "avx2"], "avx2"),
                                       (["--cpu-capability", "default"], "default")])
def test_reproduce_tables_runs_get_the_asked_cpu_kernels(monkeypatch, tmp_path, flag, want):
    """Sampled values can follow torch's CPU kernels: --cpu-capability asks every run for a width through
    ATEN_CPU_CAPABILITY; native (the default) leaves torch's choice, also over an inherited variable."""
    m = script("python/reproduce_tables.py")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")   # the caller's: native must not pass it on
    runs, real = [], m.subprocess.run

    def run(cmd, env=None, **k):
        if cmd[0] != m.PY:                                  # git, for the summary's commit
            return real(cmd, env=env, **k)
        if cmd[1:2] == ["-c"]:                              # the kernels query: this CPU has AVX2
            return m.subprocess.CompletedProcess(cmd, 0, stdout="AVX2\n", stderr="")
        runs.append(env)
        raise Reached

    monkeypatch.setattr(m.subprocess, "run", run)
    with pytest.raises(Reached):
        m.main(["--only", "state_bytes", "--out", str(tmp_path / "o"), *flag])
    assert len(runs) == 1 and runs[0].get("ATEN_CPU_CAPABILITY") == want


def test_reproduce_tables_refuses_kernels_wider_than_the_cpu(monkeypatch, tmp_path, capsys):
    """torch takes ATEN_CPU_CAPABILITY=avx512 on a CPU without AVX-512 and every run would die of SIGILL."""
    m = script("python/reproduce_tables.py")
    real = m.subprocess.run

    def run(cmd, env=None, **k):
        if cmd[0] != m.PY:
            return real(cmd, env=env, **k)
        assert cmd[1:2] == ["-c"] and "ATEN_CPU_CAPABILITY" not in env, cmd   # the CPU's own width first
        return m.subprocess.CompletedProcess(cmd, 0, stdout="AVX2\n", stderr="")

    monkeypatch.setattr(m.subprocess, "run", run)
    usage_error(m.main, ["--only", "state_bytes", "--out", str(tmp_path / "o"), "--cpu-capability", "avx512"],
                "argument --cpu-capability: torch's own CPU kernels here are AVX2", capsys, tmp_path / "o")


def test_reproduce_tables_names_the_kernels_torch_used():
    """The query runs torch under the runs' environment: ATEN_CPU_CAPABILITY=default gives DEFAULT."""
    m = script("python/reproduce_tables.py")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    assert m._capability(env) == "DEFAULT"
    env.pop("ATEN_CPU_CAPABILITY")
    assert m._capability(env) == torch.backends.cpu.get_cpu_capability()


def test_reproduce_tables_repeated_target_runs_once(capsys):
    m = script("python/reproduce_tables.py")
    assert m.main(["--only", "state_bytes", "--only", "demo_mnist", "--only", "state_bytes", "--list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["state_bytes", "demo_mnist"]


# ----------------------------------------------------------------------------- benchmarks/bench_sjd2.py
@pytest.fixture
def bench_sjd2(monkeypatch):
    m = script("benchmarks/bench_sjd2.py")
    monkeypatch.setattr(m.bundled, "load", reached)
    monkeypatch.setattr(m.checkpoint, "load_finetuned", reached)
    return m


SJD2_BAD = [
    (["--images", "0"], "--images"),
    (["--batch", "0"], "--batch"),
    (["--threads", "0"], "--threads"),
    (["--window", "-1"], "--window"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--top-k", "9999"], "--top-k"),
    (["--temperature", "-1"], "--temperature"),
    (["--seeds", str(2 ** 62)], "--seeds"),
    (["--skip", "nope"], "--skip"),
    (["--configs", "8:16"], "--configs"),
    (["--configs", "x:16:keep"], "--configs"),
    (["--configs", "4:16:keep"], "--configs"),             # the fine-tune has 8 levels: was an exit after the runs
    (["--configs", "8:-1:keep"], "--configs"),
    (["--configs", "8:16:nope"], "--configs"),
]


@pytest.mark.parametrize("args,flag", SJD2_BAD, ids=ids(SJD2_BAD))
def test_bench_sjd2_bad_argument(bench_sjd2, tmp_path, capsys, args, flag):
    out = tmp_path / "bs"
    usage_error(bench_sjd2.main, args + ["--out", str(out)], flag, capsys, out)


@pytest.mark.skipif((ROOT / "sjd_kernels" / "models" / "weights" / "photo_sjd2.json").exists(),
                    reason="needs a model without an SJD2 fine-tune")
def test_bench_sjd2_model_without_fine_tune(bench_sjd2, tmp_path, capsys):
    usage_error(bench_sjd2.main, ["--model", "photo", "--out", str(tmp_path / "bs")], "--model", capsys,
                tmp_path / "bs")


def test_bench_sjd2_bad_out(bench_sjd2, afile, capsys):
    usage_error(bench_sjd2.main, ["--out", str(afile)], "--out", capsys)


def test_bench_sjd2_recorded_command_passes_the_checks(bench_sjd2, tmp_path):
    rt = script("python/reproduce_tables.py")
    cmd = rt.TARGETS["sjd2_mnist"]["cmd"](tmp_path / "bs")
    with pytest.raises(Reached):
        bench_sjd2.main(cmd[2:])
    assert not (tmp_path / "bs").exists()


def test_bench_sjd2_default_guidance_is_one_generate_sjd2_accepts(monkeypatch, tmp_path):
    """Without --cfg-scale the runs used to pass cfg_scale=None, which generate_sjd2 refuses (after loading)."""
    from sjd_kernels.decoding.loop import check_cfg_scale
    m = script("benchmarks/bench_sjd2.py")

    def first_run(*a, cfg_scale, **k):
        check_cfg_scale(cfg_scale)
        raise Reached
    monkeypatch.setattr(m, "generate_sjd2", first_run)
    with pytest.raises(Reached):
        m.main(["--images", "2", "--seeds", "0", "--out", str(tmp_path / "bs")])


def test_bench_sjd2_rerun_replaces_its_rows(monkeypatch, tmp_path):
    """A second run of the same command leaves one run's rows in the jsonl (it used to append a copy)."""
    m = script("benchmarks/bench_sjd2.py")
    keys = ("step_compression", "steps_mean", "accuracy", "fd", "fd_real", "n", "noisy_kv_tokens", "refed_tokens")
    monkeypatch.setattr(m, "run", lambda *a, **k: dict.fromkeys(keys, 1))
    args = ["--images", "2", "--seeds", "0", "1", "--skip", "base_ar", "ar", "--configs", "8:16:keep",
            "--out", str(tmp_path / "bs")]
    for _ in range(2):
        m.main(args)
    lines = (tmp_path / "bs" / "sjd2_mnist.jsonl").read_text().splitlines()
    assert len(lines) == 4, lines                          # (SJD, SJD2 K8) x seeds (0, 1)


# ----------------------------------------------------------------------------- benchmarks/two_sample_check.py
@pytest.fixture
def two_sample(monkeypatch):
    m = script("benchmarks/two_sample_check.py")
    monkeypatch.setattr(m.bundled, "load", reached)
    monkeypatch.setattr(m, "generate", reached)
    return m


TWO_SAMPLE_BAD = [
    (["--n", "0"], "--n"),
    (["--n", "-3"], "--n"),
    (["--threads", "0"], "--threads"),
    (["--seed", BIG], "--seed"),
    (["--ar-seed", BIG], "--ar-seed"),
    (["--method", "nope"], "--method"),                    # was an error after the AR sample
    (["--method", "sjd2"], "--method"),                    # the base model has no SJD2 parameters
    (["--model", "nope"], "--model"),
    (["--window", "-1"], "--window"),
    (["--cfg", "nan"], "--cfg"),
]


@pytest.mark.parametrize("args,flag", TWO_SAMPLE_BAD, ids=ids(TWO_SAMPLE_BAD))
def test_two_sample_check_bad_argument(two_sample, capsys, args, flag):
    usage_error(two_sample.main, ["--model", "mnist"] + args, flag, capsys)


def test_two_sample_check_recorded_command_passes_the_checks(two_sample):
    with pytest.raises(Reached):
        two_sample.main(["--model", "photo", "--method", "coupling", "--n", "200", "--ar-seed", "12345",
                         "--seed", "777"])


# ----------------------------------------------------------------------------- benchmarks/state_bytes.py
STATE_BYTES_BAD = [(["--out", "TMP"], "--out"),                      # a folder
                   (["--out", "AFILE/sb.md"], "--out"),
                   (["--floors", "--out", "TMP/f/sb.md"], "--out")]     # --floors ignored --out


@pytest.mark.parametrize("args,flag", STATE_BYTES_BAD, ids=ids(STATE_BYTES_BAD))
def test_state_bytes_bad_argument(monkeypatch, tmp_path, afile, capsys, args, flag):
    m = script("benchmarks/state_bytes.py")
    monkeypatch.setattr(m, "rows", reached)
    monkeypatch.setattr(m, "floor_table", reached)
    usage_error(m.main, fill(args, tmp_path, afile), flag, capsys, tmp_path / "f")


# ----------------------------------------------------------------------------- benchmarks/bench_tree_verify.py
@pytest.fixture
def tree_verify(monkeypatch):
    m = script("benchmarks/bench_tree_verify.py")
    monkeypatch.setattr(m, "machine_info", reached)
    return m


TREE_VERIFY_BAD = [(["--reps", "0"], "--reps"), (["--csv", "TMP"], "--csv"), (["--csv", "AFILE/tv.csv"], "--csv")]


@pytest.mark.parametrize("args,flag", TREE_VERIFY_BAD, ids=ids(TREE_VERIFY_BAD))
def test_bench_tree_verify_bad_argument(tree_verify, tmp_path, afile, capsys, args, flag):
    usage_error(tree_verify.main, fill(args, tmp_path, afile), flag, capsys)


def test_bench_tree_verify_gpu_run_command_passes_the_checks(tree_verify, tmp_path):
    with pytest.raises(Reached):
        tree_verify.main(["--quick", "--csv", str(tmp_path / "r" / "tree_verify.csv")])
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- benchmarks/bench_tree_kv_update.py
@pytest.fixture
def tree_kv(monkeypatch):
    m = script("benchmarks/bench_tree_kv_update.py")
    monkeypatch.setattr(m, "cpu_check", reached)
    return m


TREE_KV_BAD = [
    (["--dtypes", "nope"], "--dtypes"),                    # was a KeyError on the GPU, after the CPU check
    (["--batches", "x"], "--batches"),
    (["--batches", "0"], "--batches"),
    (["--path", "0"], "--path"),
    (["--S", "0"], "--S"),
    (["--S", "64"], "--S"),                                # a path of 8 entries reads node 35 > 64 // 2 - 1
    (["--reps", "0"], "--reps"),
    (["--backends", ","], "--backends"),                   # nothing to time
    (["--quick", "--reps", "10"], "--quick"),              # --quick set 50 reps, silently
    (["--quick", "--batches", "4"], "--quick"),
    (["--out", "AFILE"], "--out"),                         # was a failure after the GPU timings
    (["--out", "AFILE/kv"], "--out"),
]


@pytest.mark.parametrize("args,flag", TREE_KV_BAD, ids=ids(TREE_KV_BAD))
def test_bench_tree_kv_update_bad_argument(tree_kv, tmp_path, afile, capsys, args, flag):
    out = tmp_path / "kv"
    usage_error(tree_kv.main, ["--out", str(out)] + fill(args, tmp_path, afile), flag, capsys, out)


def test_bench_tree_kv_update_gpu_run_commands_pass_the_checks(tree_kv, tmp_path):
    for args in (["--quick"], "--batches 32 --S 256 --reps 50 --backends cuda,triton".split()):
        with pytest.raises(Reached):
            tree_kv.main(args + ["--out", str(tmp_path / "kv")])


# ----------------------------------------------------------------------------- benchmarks/profile_step.py
PROFILE_BAD = [
    (["--op", "nope", "--case", "B32"], "--op"),
    (["--case", "B32_W32_V16384_cfg_bf16_sjd_k1000", "--calls", "0"], "--calls"),
    (["--case", "B32_W32_V16384_cfg_bf16_sjd_k1000", "--backend", "nope"], "--backend"),
    (["--case", "nope"], "--case"),                        # no case
    (["--case", "B32"], "--case"),                         # several cases
    (["--case", "B32_W32_V16384_cfg_bf16_sjd_k1000", "--listing", "AFILE/listing.txt"], "--listing"),
]


@pytest.mark.parametrize("args,flag", PROFILE_BAD, ids=ids(PROFILE_BAD))
def test_profile_step_bad_argument(tmp_path, afile, capsys, args, flag):
    """Checked before the device: on a machine without a GPU too."""
    m = script("benchmarks/profile_step.py")
    usage_error(m.main, fill(args, tmp_path, afile), flag, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("backend", ["cuda", "cuda_hist", "triton"])
def test_profile_step_gpu_run_command_passes_the_checks(tmp_path, capsys, backend):
    m = script("benchmarks/profile_step.py")
    assert m.main(["--case", "B32_W32_V16384_cfg_bf16_sjd_k1000", "--backend", backend,
                   "--listing", str(tmp_path / "listing.txt")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------- benchmarks/cuda_sim_parity.py
@pytest.fixture
def sim_parity(monkeypatch):
    m = script("benchmarks/cuda_sim_parity.py")
    monkeypatch.setattr(m.sim, "simulate", reached)
    return m


SIM_PARITY_BAD = [(["--orders", "nope"], "--orders"), (["--orders", ""], "--orders"),
                  (["--orders", "forward,nope"], "--orders"),
                  (["--sparse", "nope"], "--sparse"),           # was a failure after every other run (hours)
                  (["--sparse", "default", "--sparse", "hist_topk+nope"], "--sparse")]


@pytest.mark.parametrize("args,flag", SIM_PARITY_BAD, ids=ids(SIM_PARITY_BAD))
def test_cuda_sim_parity_bad_argument(sim_parity, capsys, args, flag):
    usage_error(sim_parity.main, args, flag, capsys)


def test_cuda_sim_parity_recorded_commands_pass_the_checks(sim_parity):
    for args in ([], ["--orders", "reverse"], ["--sparse", "hist_topk+list_races"]):
        with pytest.raises(Reached):
            sim_parity.main(args)


# ----------------------------------------------------------------------------- benchmarks/fuzz_parity.py
@pytest.fixture
def fuzz(monkeypatch):
    m = script("benchmarks/fuzz_parity.py")
    for name in ("draw", "draw_tree", "draw_verify"):
        monkeypatch.setattr(m, name, reached)
    return m


FUZZ_BAD = [
    (["--cases", "0"], "--cases"),
    (["--cases", "-1"], "--cases"),                        # was 0 cases and exit 0
    (["--start", "-1"], "--start"),
    (["--budget-s", "-1"], "--budget-s"),                  # was 0 cases and exit 0
    (["--budget-s", "nan"], "--budget-s"),                 # was no limit
    (["--backends", "foo"], "--backends"),                 # ran the CUDA kernels under the name foo
    (["--backends", ""], "--backends"),
    (["--op", "tree_verify", "--backends", "cuda,foo"], "--backends"),
    (["--device", "foo"], "--device"),
    (["--seed", str(2 ** 60)], "--seed"),                  # every case failed on a seed outside int64
]


@pytest.mark.parametrize("args,flag", FUZZ_BAD, ids=ids(FUZZ_BAD))
def test_fuzz_parity_bad_argument(fuzz, capsys, args, flag):
    usage_error(fuzz.main, args, flag, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_fuzz_parity_cuda_without_a_device(fuzz, capsys):
    usage_error(fuzz.main, ["--device", "cuda", "--backends", "cuda"], "--device", capsys)


def test_fuzz_parity_gpu_run_commands_pass_the_checks(fuzz, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for op in ("jacobi_step", "tree_verify", "verify_chain"):
        with pytest.raises(Reached):
            fuzz.main(["--op", op, "--device", "cuda", "--backends", "cuda", "--seed", "5", "--cases", "100000",
                       "--budget-s", "40"])


# ----------------------------------------------------------------------------- benchmarks/pilot_sjd2_standin.py
PILOT_BAD = [(["foo"], "K"), (["0"], "K"), (["8", "0"], "s_min"), (["8", "nan"], "s_min"),
             (["8", "0.2", "extra"], "extra")]


@pytest.mark.parametrize("args,text", PILOT_BAD, ids=ids(PILOT_BAD))
def test_pilot_bad_argument(args, text):
    """The pilot's arguments are read before its imports and its ten minutes of training."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pilot_sjd2_standin.py"), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: " in r.stderr and text in r.stderr and "Traceback" not in r.stderr, r.stderr
