"""Resumable training (``sjd_kernels.models.resume``, ``python/train_toy.py --resume``): a run stopped at
a step boundary and resumed ends with the same weights as one never stopped; a state of another run
is refused; a signal stops the loop instead of the process."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _util import load_file_module
from sjd_kernels import data
from sjd_kernels.models import bundled, resume

from test_script_args import ROOT, Reached, script, usage_error


class StopBefore:
    """A stop request that turns on at the boundary of step ``n`` (the loop reads it once per step)."""

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads > self.n


@pytest.fixture(scope="module")
def tiny():
    """A small GPT recipe on 64 MNIST images (the bundled tokenizer), step-based: 9 steps."""
    tt = load_file_module("train_toy_resume", ROOT / "python" / "train_toy.py")
    recipe = dict(tt.RECIPES["mnist"], gpt=dict(n_layer=1, n_head=2, n_kv_head=2, d_model=32), steps=9, batch=8,
                  warmup=2)
    vq = bundled.load_tokenizer("mnist")
    Xtr, ytr = data.real_images("mnist", "train", n=64, seed=0)
    Xte, yte = data.real_images("mnist", "test", n=16, seed=0)
    return tt, recipe, vq, Xtr, ytr, Xte, yte


def _train(tiny, log, ckpt=None, resume_run=False, seed=0):
    tt, recipe, vq, Xtr, ytr, Xte, yte = tiny
    return tt.stage_gpt("mnist", recipe, vq, Xtr, ytr, Xte, yte, seed, log, 0, ckpt=ckpt, resume_run=resume_run)


def test_a_resumed_run_ends_with_the_uninterrupted_run_weights(tiny, tmp_path):
    lines = []
    gpt_a, info_a = _train(tiny, lines.append)
    path = tmp_path / "state.pt"
    for stop_at in (1, 5):                                  # early (before the warm-up ends) and late
        ck = resume.Checkpointer(path, {}, every_s=0, stop=StopBefore(stop_at))
        with pytest.raises(resume.Interrupted) as e:
            _train(tiny, lines.append, ck)
        assert e.value.step == stop_at and path.is_file()
        gpt_b, info_b = _train(tiny, lines.append, resume.Checkpointer(path, {}, every_s=0), resume_run=True)
        assert f"resumed from {path}: step {stop_at}," in "\n".join(lines)
        a, b = gpt_a.state_dict(), gpt_b.state_dict()
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (stop_at, differ)
        assert info_b["steps_done"] == info_a["steps_done"] == 9
        assert [h[:3] for h in info_b["history"]] == [h[:3] for h in info_a["history"]]
        assert info_b["test_ce"] == info_a["test_ce"]
    # the check can fail: resuming the state of step 5 with the data order of a fresh run gives other weights
    ck = resume.Checkpointer(path, {}, every_s=0, stop=StopBefore(5))
    with pytest.raises(resume.Interrupted):
        _train(tiny, lines.append, ck)
    st = torch.load(path, weights_only=True)
    st["pi"] = 0
    torch.save(st, path)
    gpt_c, _ = _train(tiny, lines.append, resume.Checkpointer(path, {}, every_s=0), resume_run=True)
    assert any(not torch.equal(v, gpt_c.state_dict()[k]) for k, v in gpt_a.state_dict().items())


def test_saves_when_due_and_not_otherwise(tiny, tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    _train(tiny, lambda m: None, resume.Checkpointer(path, {}, every_s=0))
    assert not path.exists()                                # every_s 0 and no stop: nothing written
    saved, save = [], resume.Checkpointer.save

    def record(self, state):
        saved.append(state["step"])
        save(self, state)
    monkeypatch.setattr(resume.Checkpointer, "save", record)
    t = [1000.0]

    def clock():                                            # each read advances 10 s (a few reads a step)
        t[0] += 10.0
        return t[0]
    monkeypatch.setattr(resume.time, "time", clock)
    _train(tiny, lambda m: None, resume.Checkpointer(path, {}, every_s=100))
    assert 2 <= len(saved) < 9 and saved == sorted(set(saved)), saved
    assert torch.load(path, weights_only=True)["step"] == saved[-1]


def test_a_state_of_another_run_is_refused(tiny, tmp_path):
    path = tmp_path / "state.pt"
    with pytest.raises(resume.Interrupted):
        _train(tiny, lambda m: None, resume.Checkpointer(path, {}, every_s=0, stop=StopBefore(2)))
    with pytest.raises(resume.ResumeError, match=r"seed: saved 0, now 1"):
        _train(tiny, lambda m: None, resume.Checkpointer(path, {}, every_s=0), resume_run=True, seed=1)
    tt, recipe, vq, Xtr, ytr, Xte, yte = tiny
    with pytest.raises(resume.ResumeError, match=r"training_data: saved '[0-9a-f]{64}'"):
        tt.stage_gpt("mnist", recipe, vq, Xtr[:56], ytr[:56], Xte, yte, 0, lambda m: None, 0,
                     ckpt=resume.Checkpointer(path, {}, every_s=0), resume_run=True)
    other = dict(recipe, lr=1e-3)
    with pytest.raises(resume.ResumeError, match=r"recipe: saved"):
        tt.stage_gpt("mnist", other, vq, Xtr, ytr, Xte, yte, 0, lambda m: None, 0,
                     ckpt=resume.Checkpointer(path, {}, every_s=0), resume_run=True)


def test_missing_and_unreadable_states(tmp_path):
    path = tmp_path / "s.pt"
    with pytest.raises(resume.ResumeError, match="no training state"):
        resume.Checkpointer(path, {}).load()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(resume.ResumeError, match="not a readable training state"):
        resume.Checkpointer(path, {}).load()
    torch.save({"something": 1}, path)
    with pytest.raises(resume.ResumeError, match="not a training state of this version"):
        resume.Checkpointer(path, {}).load()
    ck = resume.Checkpointer(path, {"a": 1, "b": 2})
    ck.save({"x": torch.arange(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]   # the temporary file was renamed
    assert torch.equal(resume.Checkpointer(path, {"a": 1, "b": 2}).load()["x"], torch.arange(3))
    assert resume.Checkpointer(path, {"a": 1, "b": 3}).load(only=["a"])["x"].numel() == 3
    with pytest.raises(resume.ResumeError, match=r"b: saved 2, now 3"):
        resume.Checkpointer(path, {"a": 1, "b": 3}).load()


def test_digest_sees_every_byte():
    a = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    b = a.clone()
    b[2, 3] += 1
    assert resume.digest(a) == resume.digest(a.clone()) != resume.digest(b)
    assert resume.digest(a) != resume.digest(a.reshape(4, 3)) != resume.digest(a.to(torch.int32))


def test_a_signal_asks_the_loop_to_stop(capfd):
    before = signal.getsignal(signal.SIGINT)
    with resume.StopOnSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested                               # the process goes on
        with pytest.raises(KeyboardInterrupt):              # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert "SIGTERM: stopping at the next step boundary" in capfd.readouterr().err


def test_a_second_sigterm_ends_the_process_and_an_ignored_signal_stays_ignored():
    code = ("import os, signal, time\n"
            "from sjd_kernels.models import resume\n"
            "with resume.StopOnSignal() as s:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    assert s.requested\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGTERM and "not reached" not in r.stdout, (r.returncode, r.stdout, r.stderr)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with resume.StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_gpt_stage_takes_signals_only_during_its_loop(tiny, tmp_path):
    """A signal during the evaluation after the loop used to be noted and dropped (the run went on and
    exited 0): the stage's handlers cover the loop only."""
    seen = []

    def log(msg):
        seen.append((msg, signal.getsignal(signal.SIGINT)))
    before = signal.getsignal(signal.SIGINT)
    _train(tiny, log, resume.Checkpointer(tmp_path / "s.pt", {}, every_s=0))
    in_loop = [h for m, h in seen if " progress " in m]     # the loop's step lines
    after = [h for m, h in seen if m.startswith("gpt trained")]   # after the evaluations
    assert in_loop and all(getattr(h, "__self__", None).__class__ is resume.StopOnSignal for h in in_loop)
    assert after and all(h is before for h in after)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_failed_save_leaves_the_old_state_and_no_temporary_file(tmp_path):
    path = tmp_path / "s.pt"
    ck = resume.Checkpointer(path, {"a": 1})
    ck.save({"x": torch.arange(2)})
    with pytest.raises(Exception):
        ck.save({"x": torch.arange(3), "bad": lambda: 0})   # not picklable
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]
    assert torch.equal(ck.load()["x"], torch.arange(2))


def test_a_state_path_is_claimed_by_one_process(tmp_path):
    path = tmp_path / "s.pt"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        Path(str(path) + ".lock").write_text(str(other.pid))
        with pytest.raises(resume.ResumeError, match=f"another run \\(process {other.pid}\\) is using"):
            resume.Claim(path).acquire()
    finally:
        other.kill()
        other.wait()
    c = resume.Claim(path)                                  # its process ended: a stale lock is taken over
    c.acquire()
    assert Path(str(path) + ".lock").read_text().split()[0] == str(os.getpid())
    c.acquire()                                             # this process's own lock: taken again
    c.release()
    assert not Path(str(path) + ".lock").exists()


@pytest.mark.skipif(resume._start_time(os.getpid()) is None, reason="needs /proc/<pid>/stat (Linux)")
def test_a_lock_whose_pid_now_names_another_process_is_taken_over(tmp_path):
    """A lock records its process's start time with the pid: a live process with that pid but another
    start time got the pid after the owner ended, so the lock is stale."""
    path = tmp_path / "s.pt"
    lock = Path(str(path) + ".lock")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = resume._start_time(other.pid)
        assert started is not None and started == resume._start_time(other.pid)
        lock.write_text(f"{other.pid} {started}")           # the owner itself: refused
        with pytest.raises(resume.ResumeError, match=f"another run \\(process {other.pid}\\) is using"):
            resume.Claim(path).acquire()
        lock.write_text(f"{other.pid} {started + 1}")       # the pid reused by a later process: taken over
        c = resume.Claim(path)
        c.acquire()
        assert lock.read_text() == f"{os.getpid()} {resume._start_time(os.getpid())}"
        c.release()
    finally:
        other.kill()
        other.wait()


# ------------------------------------------------------------------------ the script's flags and exits
@pytest.fixture
def tt(monkeypatch, tmp_path):
    monkeypatch.setenv("SJD_TRAIN_CACHE", str(tmp_path / "cache"))
    m = script("python/train_toy.py")
    for name in ("train_data", "stage_vq", "stage_clf"):
        monkeypatch.setattr(m, name, lambda *a, **k: (None, {}))
    z = torch.zeros(1)
    monkeypatch.setattr(m, "train_data", lambda *a, **k: (z, z, z, z))
    return m


def _args(tmp_path, *extra):
    return ["--model", "mnist", "--threads", "1", "--out", str(tmp_path / "w"), "--log", str(tmp_path / "t.log"),
            *extra]


def test_interrupted_run_exits_130_and_resume_continues_it(tt, tmp_path, monkeypatch):
    path = resume.default_path("train_toy", "mnist")
    assert path == tmp_path / "cache" / "train_toy_mnist.pt"
    seen = []

    def interrupted(*a, ckpt, resume_run, **k):
        seen.append(resume_run)
        ckpt.fingerprint = {"x": 1}
        ckpt.save({"step": 3})
        raise resume.Interrupted(3, ckpt.path)
    monkeypatch.setattr(tt, "stage_gpt", interrupted)
    with pytest.raises(SystemExit) as e:
        tt.main(_args(tmp_path))
    assert e.value.code == 130 and path.is_file() and seen == [False]
    assert "continue with the same command and --resume" in (tmp_path / "t.log").read_text()
    with pytest.raises(SystemExit) as e:                    # a fresh start would overwrite it: refused
        tt.main(_args(tmp_path))
    assert e.value.code == 2
    w2 = tmp_path / "w2"                                    # a run without the gpt stage ignores the state
    w2.mkdir()
    for f in ("mnist.json", "mnist_vq.safetensors", "mnist_quality.safetensors"):
        shutil.copy(ROOT / "sjd_kernels" / "models" / "weights" / f, w2 / f)
    with monkeypatch.context() as mp:
        mp.setattr(tt, "stage_clf", lambda *a, **k: (_ for _ in ()).throw(Reached()))
        with pytest.raises(Reached):
            tt.main(["--model", "mnist", "--stages", "clf", "--out", str(w2), "--log", str(tmp_path / "c.log")])
    assert path.is_file()

    def finished(*a, ckpt, resume_run, **k):
        seen.append(resume_run)
        return "gpt", {}
    monkeypatch.setattr(tt, "stage_gpt", finished)
    monkeypatch.setattr(tt.bundled, "save", lambda *a, **k: {"files": {}})
    # the saved fingerprint ({"x": 1}) lacks this run's settings: refused before any stage
    with pytest.raises(SystemExit) as e:
        tt.main(_args(tmp_path, "--resume"))
    assert e.value.code == 2 and path.is_file()
    known = tt.gpt_fingerprint("mnist", dict(tt.RECIPES["mnist"]), 0, tt.RECIPES["mnist"]["budget_minutes"],
                               None, None)
    resume.Checkpointer(path, known).save({"step": 3})
    tt.main(_args(tmp_path, "--resume"))
    assert seen == [False, True] and not path.exists()     # removed once the weights are written
    log = (tmp_path / "t.log").read_text()
    assert "continue with the same command and --resume" in log and f"removed the training state {path}" in log


RESUME_BAD = [(["--resume"], "--resume"),                                 # nothing saved
              (["--checkpoint-minutes", "-1"], "--checkpoint-minutes"),
              (["--checkpoint-minutes", "inf"], "--checkpoint-minutes"),
              (["--stages", "vq,clf", "--resume"], "--resume/--checkpoint")]


@pytest.mark.parametrize("args", RESUME_BAD, ids=[" ".join(a) for a, _ in RESUME_BAD])
def test_bad_resume_flags(tt, tmp_path, capsys, args):
    args, flag = args
    usage_error(tt.main, _args(tmp_path, *args), flag, capsys, tmp_path / "w", tmp_path / "t.log")


def test_valid_resume_reaches_the_work(tt, tmp_path, monkeypatch):
    monkeypatch.setattr(tt, "stage_gpt", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    path = tmp_path / "mine.pt"
    known = tt.gpt_fingerprint("mnist", dict(tt.RECIPES["mnist"]), 0, tt.RECIPES["mnist"]["budget_minutes"],
                               None, None)
    resume.Checkpointer(path, known).save({"step": 3})
    with pytest.raises(Reached):
        tt.main(_args(tmp_path, "--resume", "--checkpoint", str(path)))


# ------------------------------------------------------------------------ python/finetune_sjd2.py
def _finetune_setup(tmp_seed=0):
    """The fine-tune's pieces as its main builds them, on 48 MNIST images, 4 levels, 6 steps."""
    import argparse
    from sjd_kernels.sjd2 import checkpoint
    from sjd_kernels.sjd2.noise import EmbedNorm, NoiseSchedule, SJD2Embedding
    from sjd_kernels.sjd2.train import param_groups
    torch.manual_seed(tmp_seed)
    base = bundled.load("mnist")
    gpt = base.gpt
    gpt.train()
    X, y = data.real_images("mnist", "train", n=48, seed=0)
    tok, lab = base.tokenizer.encode(X), torch.as_tensor(y)
    sjd2 = SJD2Embedding(NoiseSchedule(levels=4, s_min=0.2, s_max=1.0, rho=7.0),
                         EmbedNorm.from_embedding(checkpoint.image_embedding(gpt)))
    groups = param_groups(gpt, sjd2, 3e-4, 3e-3, 0.0)
    for grp in groups:
        grp["base_lr"] = grp["lr"]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    params = [p for grp in groups for p in grp["params"]]
    g = torch.Generator().manual_seed(tmp_seed)
    args = argparse.Namespace(steps=6, batch=8, warmup=2, cfg_drop=0.1, levels=4, max_segments=8, p_rising=0.5,
                              max_minutes=60.0)
    return args, gpt, sjd2, opt, params, g, tok, lab, base.num_classes


def _fresh(g, tok):
    return dict(perm=torch.randperm(len(tok), generator=g), pi=0, step=0, ema=None, loss=float("nan"), history=[],
                spent=0.0)


def test_a_resumed_finetune_ends_with_the_uninterrupted_weights(tmp_path):
    ft = load_file_module("finetune_resume", ROOT / "python" / "finetune_sjd2.py")
    path = tmp_path / "ft.pt"
    args, gpt_a, sjd2_a, opt, params, g, tok, lab, n_cls = _finetune_setup()
    done_a = ft.train_loop(args, gpt_a, sjd2_a, opt, params, g, tok, lab, n_cls, lambda m: None,
                           resume.Checkpointer(path, {}, every_s=0), _fresh(g, tok))
    assert done_a["step"] == 5 and not path.exists()
    args, gpt, sjd2, opt, params, g, tok, lab, n_cls = _finetune_setup()
    with pytest.raises(resume.Interrupted):
        ft.train_loop(args, gpt, sjd2, opt, params, g, tok, lab, n_cls, lambda m: None,
                      resume.Checkpointer(path, {}, every_s=0, stop=StopBefore(3)), _fresh(g, tok))
    args, gpt_b, sjd2_b, opt, params, g, tok, lab, n_cls = _finetune_setup(tmp_seed=1)   # restored over
    ck = resume.Checkpointer(path, {}, every_s=0)
    st = ft.restore(ck, gpt_b, sjd2_b, opt, g)
    assert st["step"] == 3
    done_b = ft.train_loop(args, gpt_b, sjd2_b, opt, params, g, tok, lab, n_cls, lambda m: None, ck, st)
    assert done_b["step"] == 5 and [h[:3] for h in done_b["history"]] == [h[:3] for h in done_a["history"]]
    for a, b in ((gpt_a, gpt_b), (sjd2_a, sjd2_b)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), \
            [k for k in sa if not torch.equal(sa[k], sb[k])]
    # without the restore (a fresh start from the seed-1 pieces) the weights differ: the check can fail
    args, gpt_c, sjd2_c, opt, params, g, tok, lab, n_cls = _finetune_setup(tmp_seed=1)
    ft.train_loop(args, gpt_c, sjd2_c, opt, params, g, tok, lab, n_cls, lambda m: None,
                  resume.Checkpointer(path, {}, every_s=0), _fresh(g, tok))
    assert any(not torch.equal(v, gpt_c.state_dict()[k]) for k, v in gpt_a.state_dict().items())


def test_finetune_fingerprint_names_a_changed_setting(tmp_path):
    import argparse
    ft = load_file_module("finetune_resume", ROOT / "python" / "finetune_sjd2.py")
    keys = ("model", "levels", "s_min", "s_max", "rho", "max_segments", "p_rising", "steps", "batch", "lr",
            "new_lr", "warmup", "weight_decay", "cfg_drop", "seed")
    a = argparse.Namespace(**{k: 1 for k in keys}, threads=1, max_minutes=5.0)
    man = {"files": {"gpt": {"sha256": "ab"}}}
    path = tmp_path / "s.pt"
    resume.Checkpointer(path, ft.finetune_fingerprint(a, man)).save({})
    b = argparse.Namespace(**vars(a))
    b.threads, b.max_minutes = 2, 9.0                       # not part of the outcome: accepted
    resume.Checkpointer(path, ft.finetune_fingerprint(b, man)).load()
    b.new_lr = 2
    with pytest.raises(resume.ResumeError, match="new_lr: saved 1, now 2"):
        resume.Checkpointer(path, ft.finetune_fingerprint(b, man)).load()
    with pytest.raises(resume.ResumeError, match="base_gpt_sha256: saved 'ab', now 'cd'"):
        resume.Checkpointer(path, ft.finetune_fingerprint(a, {"files": {"gpt": {"sha256": "cd"}}})).load()


def test_a_second_run_on_the_same_state_is_refused(tt, tmp_path, capsys):
    """Two runs of one script and model shared the default state file: each overwrote the other's state,
    and the first to end removed it. A live process's claim now refuses the second run."""
    path = resume.default_path("train_toy", "mnist")
    path.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        Path(str(path) + ".lock").write_text(str(other.pid))
        usage_error(tt.main, _args(tmp_path), f"argument --checkpoint: another run (process {other.pid})", capsys,
                    tmp_path / "w", tmp_path / "t.log")
    finally:
        other.kill()
        other.wait()


def test_the_manifest_records_the_budget_that_ran(tt, tmp_path, monkeypatch):
    """--budget-minutes overrides the recipe's, and the manifest's recipe says so (it said the
    default 20 beside a run of --budget-minutes 0 --steps 3)."""
    got = {}

    def gpt_stage(model, recipe, *a, ckpt, resume_run, **k):
        got["stage"] = (recipe["budget_minutes"], a[-1], recipe["steps"])
        return "gpt", {}
    monkeypatch.setattr(tt, "stage_gpt", gpt_stage)
    monkeypatch.setattr(tt.bundled, "save", lambda *a, training, **k: got.update(training=training) or {"files": {}})
    monkeypatch.setattr(tt.resume, "finish", lambda *a, **k: None)
    tt.main(_args(tmp_path, "--stages", "vq,clf,gpt", "--budget-minutes", "0", "--steps", "3"))
    assert got["stage"] == (0, 0, 3), got
    assert got["training"]["recipe"]["budget_minutes"] == 0 and got["training"]["recipe"]["steps"] == 3, got
