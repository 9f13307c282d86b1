"""SJD2 audit: argument and output checks of ``sjd2_loop`` / ``generate_sjd2``, SJD2 parameters that cannot
decode, checkpoints that would not load, and tiny end-to-end runs of ``python/finetune_sjd2.py`` and
``python/train_toy.py`` (stubbed data, seconds). Each check here failed before its fix: the comment says
what happened instead."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from _util import load_file_module
from test_script_args import Reached, keep_threads, reached  # noqa: F401 (keep_threads: an autouse fixture)
from test_sjd2 import _emb_rows, _sjd2_gpt, _tiny_forward

from sjd_kernels.models.bundled import BundledModelError
from sjd_kernels.ops._common import SJDInputError
from sjd_kernels.sjd2 import EmbedNorm, NoiseSchedule, SJD2Embedding, generate_sjd2, sjd2_loop

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "sjd_kernels" / "models" / "weights"


class Counting:
    """A ``forward`` for ``sjd2_loop`` that counts its calls (the arguments must be refused before any)."""

    def __init__(self, fw=None):
        self.fw, self.calls = fw, 0

    def __call__(self, *a):
        self.calls += 1
        return self.fw(*a)


# ---------------------------------------------------------------- sjd2_loop: arguments, before any forward

def test_loop_refuses_bad_arguments_before_any_forward():
    m = _sjd2_gpt()
    E, cls, T = _emb_rows(m), torch.tensor([0, 1]), 6
    bad = [
        ("window must be an int >= 0", dict(window=2.5)),            # ran W = 2 silently
        ("window must be an int >= 0", dict(window=-1)),             # ValueError, not the package's error
        ("num_tokens must be an int >= 0", dict(num_tokens=5.5)),    # gave 5 tokens silently
        ("num_tokens must be an int >= 0", dict(num_tokens=-1)),     # RuntimeError: negative dimension
        ("seed must be an int or integers", dict(seed=[1.7, 2.2])),  # truncated to seeds 1, 2
        ("kv must be one of keep, recompute", dict(kv="bogus")),
        ("kv must be one of keep, recompute", dict(kv=None)),
        ("max_steps must be an int >= 1", dict(max_steps=0)),        # 'did not finish in 0 steps'
        ("embed_weight must be 2-D", dict(embed_weight=E[0])),       # ValueError: not enough values to unpack
        ("sjd2 must be an SJD2Embedding", dict(sjd2="model")),
        ("sjd2: .*belongs to another model", dict(sjd2=SJD2Embedding(NoiseSchedule(levels=2), EmbedNorm(8)))),
        ("temperature must be", dict(temperature=-1.0)),             # these three: after a forward
        ("top_k must be an int in", dict(top_k=100)),
        ("top_p must be a number in", dict(top_p=0.0)),
        ("cfg_scale must be a finite real number", dict(cfg_scale=float("nan"))),   # was an SJDDeviceError
        ("cfg_scale must be a float or give one value per request", dict(cfg_scale=[1.0, 2.0, 3.0])),  # RuntimeError
    ]
    for msg, kw in bad:
        kw = dict(kw)
        fw = Counting(_tiny_forward(m, cls, T, 3))
        args = (fw, kw.pop("embed_weight", E), kw.pop("sjd2", m.sjd2), kw.pop("num_tokens", T), kw.pop("seed", [1, 2]))
        with pytest.raises(SJDInputError, match=msg), torch.no_grad():
            sjd2_loop(*args, **{"window": 3, **kw})
        assert fw.calls == 0, msg
    with pytest.raises(SJDInputError, match="forward must be a callable"):
        sjd2_loop(3, E, m.sjd2, T, [1, 2], window=3)


def test_loop_cfg_scale_needs_unconditional_rows():
    """``cfg_scale`` with a forward that returns no CFG rows used to be ignored silently (the same tokens as
    without guidance); CFG rows without a scale failed naming ``uncond_logits``, an argument of another op."""
    m = _sjd2_gpt()
    E, cls, T = _emb_rows(m), torch.tensor([0, 1]), 6
    with torch.no_grad():
        with pytest.raises(SJDInputError, match="cfg_scale is given but forward returned no unconditional rows"):
            sjd2_loop(_tiny_forward(m, cls, T, 3), E, m.sjd2, T, [1, 2], window=3, cfg_scale=3.0)
        with pytest.raises(SJDInputError, match="unconditional rows .* but no cfg_scale"):
            sjd2_loop(_tiny_forward(m, cls, T, 3, cfg=True), E, m.sjd2, T, [1, 2], window=3)
        a = sjd2_loop(_tiny_forward(m, cls, T, 3, cfg=True), E, m.sjd2, T, [1, 2], window=3, cfg_scale=1.0)
        b = sjd2_loop(_tiny_forward(m, cls, T, 3), E, m.sjd2, T, [1, 2], window=3)
    assert torch.equal(a.tokens, b.tokens)                         # scale 1 is the conditional law


@pytest.mark.parametrize("make,msg", [
    (lambda x: (torch.zeros(x.shape[0], x.shape[1], 7), None), r"logits of shape \[B, N, V\] = \[2, 4, 12\].*\[2, 4, 7\]"),
    (lambda x: (torch.zeros(x.shape[0], 1, 12), None), r"logits of shape .*got torch.float32 \[2, 1, 12\]"),
    (lambda x: torch.zeros(x.shape[0], x.shape[1], 12), "forward must return \\(logits, uncond\\), got Tensor"),
    (lambda x: (torch.zeros(x.shape[0], x.shape[1], 12, dtype=torch.int64), None),
     r"logits of shape .*got torch.int64 \[2, 4, 12\]"),
], ids=["wrong-V", "wrong-N", "bare-tensor", "int-logits"])
def test_loop_checks_what_forward_returns(make, msg):
    """A forward whose rows do not match the decode used to fail deep inside (an index error, or an error
    naming ``state.q_state``)."""
    m = _sjd2_gpt()
    with pytest.raises(SJDInputError, match=msg), torch.no_grad():
        sjd2_loop(lambda x, p, s: make(x), _emb_rows(m), m.sjd2, 6, [1, 2], window=3)


def test_loop_seed_count_must_match_the_forward_batch():
    m = _sjd2_gpt()
    with pytest.raises(SJDInputError, match="3 requests .* built for a batch of 2"), torch.no_grad():   # was IndexError
        sjd2_loop(_tiny_forward(m, torch.tensor([0, 1]), 6, 3), _emb_rows(m), m.sjd2, 6, [1, 2, 3], window=3)


def test_loop_window_beyond_the_sequence_and_w1():
    """A window longer than the sequence decodes as ``num_tokens - 1`` (positions past the end never enter);
    W = 1 and num_tokens = 1 run, and every token is a valid id."""
    m = _sjd2_gpt(seed=4)
    E, cls, T = _emb_rows(m), torch.tensor([2, 0]), 7
    with torch.no_grad():
        big = sjd2_loop(_tiny_forward(m, cls, T, 20), E, m.sjd2, T, [5, 6], window=20)
        cut = sjd2_loop(_tiny_forward(m, cls, T, T - 1), E, m.sjd2, T, [5, 6], window=T - 1)
        w1 = sjd2_loop(_tiny_forward(m, cls, T, 1), E, m.sjd2, T, [5, 6], window=1)
        one = sjd2_loop(_tiny_forward(m, cls, 1, 4), E, m.sjd2, 1, [5, 6], window=4)
    assert torch.equal(big.tokens, cut.tokens) and big.nfe == cut.nfe
    for r, n in ((w1, T), (one, 1)):
        assert r.tokens.shape == (2, n) and bool((r.tokens >= 0).all()) and bool((r.tokens < m.vocab_size).all())
    assert one.nfe == 1


# ---------------------------------------------------------------- generate_sjd2: SJD2 parameters, forward

@pytest.mark.parametrize("spoil,msg", [
    (lambda e: e.level_embed.weight.data.__setitem__((1, 3), float("nan")), "level_embed holds NaN"),
    (lambda e: e.norm.mean.__setitem__(0, float("inf")), "norm.mean holds NaN or infinite"),
    (lambda e: e.norm.std.__setitem__(5, 0.0), "norm.std must be > 0"),
    (lambda e: e.sigma.__setitem__(1, 0.0), "sigma must be > 0 at levels 1..K"),
], ids=["nan-level-embedding", "inf-mean", "zero-std", "zero-sigma"])
def test_generate_refuses_sjd2_parameters_that_cannot_decode(spoil, msg):
    """They used to run and end in an SJDDeviceError about non-finite logits after the first forward."""
    m = _sjd2_gpt()
    spoil(m.sjd2)
    with pytest.raises(SJDInputError, match="sjd2: " + msg):
        generate_sjd2(m, torch.tensor([0, 1]), 8, window=3)
    assert m.calls == 0


def test_generate_refuses_a_forward_that_is_not_callable_before_work():
    m = _sjd2_gpt()
    with pytest.raises(SJDInputError, match="forward must be None .* or a callable"):      # was a TypeError
        generate_sjd2(m, torch.tensor([0, 1]), 8, window=3, forward=3)
    assert m.calls == 0


def test_generate_w1_batch_and_seed_reproducible():
    """W = 1 under both KV policies: the same seed gives the same tokens, and a request's tokens do not
    depend on the rest of the batch (an int seed s gives request i the seed ``derive_seeds(s, B)[i]``)."""
    from sjd_kernels.decoding.loop import request_seeds
    m = _sjd2_gpt(seed=5)
    c = torch.tensor([0, 1, 2])
    for kv in ("keep", "recompute"):
        a = generate_sjd2(m, c, 9, window=1, seed=4, kv=kv)
        b = generate_sjd2(m, c, 9, window=1, seed=4, kv=kv)
        alone = generate_sjd2(m, c[2:], 9, window=1, seed=[int(request_seeds(4, 3, "cpu")[2])], kv=kv)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(alone.tokens[0], a.tokens[2]), kv


# ---------------------------------------------------------------- checkpoints

def _tiny_base(tmp_path):
    from sjd_kernels.models.gpt import GPT, GPTConfig
    from sjd_kernels.sjd2 import checkpoint
    cfg = dict(vocab_size=16, max_image_tokens=8, num_classes=2, n_layer=1, n_head=2, n_kv_head=2, d_model=8)
    (tmp_path / "mnist.json").write_text(json.dumps({"files": {"gpt": {"sha256": "0" * 64}}, "gpt": cfg}))
    gpt = GPT(GPTConfig(**cfg))
    emb = SJD2Embedding(NoiseSchedule(levels=3), EmbedNorm.from_embedding(checkpoint.image_embedding(gpt)))
    return cfg, gpt, emb


def test_save_refuses_what_would_not_load_and_writes_nothing(tmp_path):
    """A GPT of another config than the base manifest (recorded as the config) saved a fine-tune that
    ``load_finetuned`` refused; SJD2 parameters of another width saved one ``generate_sjd2`` refused; a
    missing base manifest failed after the weights file was written (replacing a previous fine-tune's)."""
    from sjd_kernels.models.gpt import GPT, GPTConfig
    from sjd_kernels.sjd2 import checkpoint
    cfg, gpt, emb = _tiny_base(tmp_path)
    checkpoint.save("mnist", gpt, emb, out=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SJDInputError, match="gpt: its config .* differs from the base model's"):
        checkpoint.save("mnist", GPT(GPTConfig(**{**cfg, "d_model": 16})), emb, out=tmp_path)
    with pytest.raises(SJDInputError, match="belongs to another model"):
        checkpoint.save("mnist", gpt, SJD2Embedding(NoiseSchedule(levels=3), EmbedNorm(4)), out=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    checkpoint.load_finetuned("mnist", tmp_path)                  # the previous fine-tune still loads
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundledModelError, match="mnist.json is missing"):
        checkpoint.save("mnist", gpt, emb, out=empty)
    assert list(empty.iterdir()) == []


def test_save_with_training_json_cannot_hold_keeps_the_previous_finetune(tmp_path):
    """The weights file was replaced before the manifest's json.dump failed on the training record,
    leaving a half-written manifest and no loadable fine-tune."""
    import numpy as np

    from sjd_kernels.sjd2 import checkpoint
    _, gpt, emb = _tiny_base(tmp_path)
    checkpoint.save("mnist", gpt, emb, out=tmp_path, training={"seed": 0})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        gpt.tok_emb.weight.add_(1.0)                              # other weights: the old file must stay
    with pytest.raises(SJDInputError, match="mnist_sjd2.json: the manifest cannot be written as JSON"):
        checkpoint.save("mnist", gpt, emb, out=tmp_path, training={"loss": np.float32(0.5)})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before       # no temporary file left
    checkpoint.load_finetuned("mnist", tmp_path)
    man = checkpoint.save("mnist", gpt, emb, out=tmp_path, training={"loss": 0.5})
    assert man["training"] == {"loss": 0.5} and checkpoint.manifest("mnist", tmp_path)["sha256"] == man["sha256"]


def test_load_refuses_a_manifest_config_it_cannot_build(tmp_path):
    from sjd_kernels.sjd2 import checkpoint
    _, gpt, emb = _tiny_base(tmp_path)
    checkpoint.save("mnist", gpt, emb, out=tmp_path)
    man = json.loads((tmp_path / "mnist_sjd2.json").read_text())
    man["gpt"]["n_layers"] = 2                                    # a typo'd key: was a bare TypeError
    (tmp_path / "mnist_sjd2.json").write_text(json.dumps(man))
    with pytest.raises(BundledModelError, match="mnist_sjd2.json: its gpt config or noise schedule cannot be built"):
        checkpoint.load_finetuned("mnist", tmp_path)



def test_nonfinite_finetune_refused_on_save_and_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from sjd_kernels.models import bundled
    from sjd_kernels.sjd2 import checkpoint
    _, gpt, emb = _tiny_base(tmp_path)
    checkpoint.save("mnist", gpt, emb, out=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        gpt.tok_emb.weight[0, 0] = float("inf")
    with pytest.raises(SJDInputError, match=r"gpt: tensors \['tok_emb.weight'\] hold NaN or infinite values; nothing"):
        checkpoint.save("mnist", gpt, emb, out=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    wpath = tmp_path / "mnist_sjd2.safetensors"
    sd = load_file(str(wpath))
    sd["tok_emb.weight"][0, 0] = float("nan")
    save_file(sd, str(wpath))
    man = json.loads((tmp_path / "mnist_sjd2.json").read_text())
    man["sha256"] = bundled.sha256_file(wpath)
    (tmp_path / "mnist_sjd2.json").write_text(json.dumps(man))
    with pytest.raises(BundledModelError, match=r"\['tok_emb.weight'\] hold NaN or infinite"):
        checkpoint.load_finetuned("mnist", tmp_path)


# ---------------------------------------------------------------- the scripts, end to end on stubbed data

@pytest.fixture
def small_mnist(monkeypatch):
    """``data.real_images`` / ``data.mnist`` on 16 training and 8 test images."""
    from sjd_kernels import data
    X, y = data.mnist("test")
    small = {"train": (X[:16], y[:16]), "test": (X[16:24], y[16:24])}
    monkeypatch.setattr(data, "real_images", lambda model, split, *a, **k: small[split])
    return small


def _finetune(tmp_path):
    m = load_file_module("audit_finetune_sjd2", ROOT / "python" / "finetune_sjd2.py")
    out = tmp_path / "w"
    out.mkdir()
    shutil.copy(WEIGHTS / "mnist.json", out / "mnist.json")
    return m, out


def test_finetune_tiny_run_end_to_end(tmp_path, small_mnist, monkeypatch):
    from sjd_kernels.sjd2 import checkpoint
    monkeypatch.setattr(torch, "manual_seed", lambda s: None)
    m, out = _finetune(tmp_path)
    m.main(["--steps", "2", "--batch", "4", "--levels", "2", "--out", str(out), "--log", str(tmp_path / "ft.log")])
    gpt, emb = checkpoint.load_finetuned("mnist", out)
    tr = checkpoint.manifest("mnist", out)["training"]
    assert tr["steps_done"] == 2 and emb.levels == 2 and tr["args"]["batch"] == 4
    assert set(tr["heldout_ce"]["after_per_level"]) == {"0", "1", "2"}
    log = (tmp_path / "ft.log").read_text()
    assert "(8 images)" in log and "(200 images)" not in log         # it said 200 whatever the test set
    assert re.search(r"step +0/2 loss .* s/step, about \d+ s left\)", log), log
    r = generate_sjd2(gpt, torch.tensor([3]), 6, window=3, seed=1)
    assert bool((r.tokens >= 0).all()) and bool((r.tokens < gpt.vocab_size).all())


def test_finetune_diverged_loss_saves_nothing(tmp_path, small_mnist, monkeypatch):
    """A non-finite loss used to be trained on and saved (NaN weights, decoded as a device error later)."""
    monkeypatch.setattr(torch, "manual_seed", lambda s: None)
    m, out = _finetune(tmp_path)
    monkeypatch.setattr(m, "evaluate", lambda *a, **k: 0.0)
    monkeypatch.setattr(m, "next_clean_token_loss", lambda logits, x: logits.float().sum() * float("nan"))
    with pytest.raises(SystemExit) as e:
        m.main(["--steps", "3", "--batch", "4", "--levels", "1", "--out", str(out), "--log", str(tmp_path / "ft.log")])
    assert e.value.code == 1
    assert not (out / "mnist_sjd2.safetensors").exists() and not (out / "mnist_sjd2.json").exists()
    assert "training diverged; nothing was saved" in (tmp_path / "ft.log").read_text()


def test_finetune_batch_larger_than_the_data_is_a_usage_error(tmp_path, small_mnist, monkeypatch, capsys):
    """It used to train silently on batches of 16 (all there was) while recording --batch 40."""
    m, out = _finetune(tmp_path)
    monkeypatch.setattr(m, "evaluate", lambda *a, **k: 0.0)
    with pytest.raises(SystemExit) as e:
        m.main(["--steps", "1", "--batch", "40", "--levels", "1", "--out", str(out), "--log", str(tmp_path / "ft.log")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --batch: 40 exceeds the 16 training sequences" in err, err
    assert not (out / "mnist_sjd2.json").exists()


def test_finetune_records_the_command_it_was_given(tmp_path, monkeypatch):
    """``main([])`` recorded the *process's* arguments (pytest's, here) as the fine-tune command."""
    m, out = _finetune(tmp_path)
    monkeypatch.setattr(m.bundled, "WEIGHTS_DIR", out)
    monkeypatch.setattr(m, "ROOT", tmp_path)                       # default log: ROOT/benchmarks/results/...
    monkeypatch.setattr(sys, "argv", ["finetune_sjd2.py", "--from-the-process"])
    monkeypatch.setattr(m.bundled, "load", reached)
    monkeypatch.setattr(torch, "manual_seed", lambda s: None)
    m2 = load_file_module("audit_finetune_sjd2_b", ROOT / "python" / "finetune_sjd2.py")   # defaults read now
    monkeypatch.setattr(m2, "ROOT", tmp_path)
    with pytest.raises(Reached):
        m2.main([])
    log = (tmp_path / "benchmarks" / "results" / "finetune_sjd2_mnist.log").read_text()
    assert "command: PYTHONPATH=. python python/finetune_sjd2.py \n" in log and "--from-the-process" not in log


def _train_toy(tmp_path, monkeypatch, small_mnist):
    m = load_file_module("audit_train_toy", ROOT / "python" / "train_toy.py")
    X, y = small_mnist["train"]
    Xt, yt = small_mnist["test"]
    monkeypatch.setattr(m, "train_data", lambda model, recipe, seed: (X, y, Xt, yt))
    recipe = dict(m.RECIPES["mnist"], gpt=dict(n_layer=1, n_head=2, n_kv_head=2, d_model=16), batch=4)
    monkeypatch.setitem(m.RECIPES, "mnist", recipe)
    out = tmp_path / "w"
    out.mkdir()
    for f in ("mnist.json", "mnist_vq.safetensors", "mnist_quality.safetensors", "mnist_gpt.safetensors"):
        shutil.copy(WEIGHTS / f, out / f)
    return m, out


def test_train_toy_tiny_budget_trains_one_step_and_saves(tmp_path, monkeypatch, small_mnist):
    """A budget spent before the first step (``--budget-minutes 1e-9``) ended in an UnboundLocalError after
    the data and earlier stages, with nothing saved."""
    m, out = _train_toy(tmp_path, monkeypatch, small_mnist)
    m.main(["--stages", "gpt", "--budget-minutes", "1e-9", "--out", str(out), "--log", str(tmp_path / "t.log")])
    man = json.loads((out / "mnist.json").read_text())
    assert man["info"]["gpt"]["steps_done"] == 1 and man["gpt"]["d_model"] == 16
    assert "--stages gpt --budget-minutes 1e-9 --out" in man["training"]["command"]


def test_train_toy_tiny_step_run_end_to_end(tmp_path, monkeypatch, small_mnist):
    from sjd_kernels.models import bundled
    m, out = _train_toy(tmp_path, monkeypatch, small_mnist)
    m.main(["--stages", "gpt", "--steps", "3", "--budget-minutes", "0", "--out", str(out),
            "--log", str(tmp_path / "t.log")])
    man = json.loads((out / "mnist.json").read_text())
    assert man["info"]["gpt"]["steps_done"] == 3
    assert bundled.load("mnist", out).gpt.config.d_model == 16        # the files written load, hash-checked


def test_train_toy_diverged_loss_saves_nothing(tmp_path, monkeypatch, small_mnist):
    """A non-finite loss trained on and reached ``bundled.save`` (which refuses NaN weights with a traceback)."""
    m, out = _train_toy(tmp_path, monkeypatch, small_mnist)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_ce = m.F.cross_entropy
    monkeypatch.setattr(m.F, "cross_entropy", lambda *a, **k: real_ce(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as e:
        m.main(["--stages", "gpt", "--steps", "3", "--budget-minutes", "0", "--out", str(out),
                "--log", str(tmp_path / "t.log")])
    assert e.value.code == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert "step 0: the loss is nan: training diverged; nothing was saved" in (tmp_path / "t.log").read_text()


def test_image_embedding_reads_the_rows_on_the_models_device():
    """``image_embedding`` (every ``generate_sjd2`` call) built its ids on the CPU: an index on another device
    than a CUDA model's embedding. A meta-device model stands in for the GPU here."""
    from sjd_kernels.models.gpt import GPT, GPTConfig
    from sjd_kernels.sjd2 import checkpoint
    g = GPT(GPTConfig(vocab_size=16, max_image_tokens=8, num_classes=2, n_layer=1, n_head=2, n_kv_head=2,
                      d_model=8)).to("meta")
    seen = []
    emb = g.embed_tokens
    g.embed_tokens = lambda ids: (seen.append(ids.device), emb(ids))[1]
    out = checkpoint.image_embedding(g)
    assert seen == [torch.device("meta")] and tuple(out.shape) == (16, 8)


def test_schedule_and_norm_errors_are_the_packages():
    """A bad schedule or normaliser raised a bare ValueError, unlike every other SJD2 argument check; a level
    embedding of width 0 was built."""
    from sjd_kernels.sjd2 import LevelEmbedding
    from sjd_kernels.sjd2.decode import SeqForward
    for make, msg in ((lambda: NoiseSchedule(levels=2, s_min=0.0), "need 0 < s_min"),
                      (lambda: NoiseSchedule(levels=2, rho=-1.0), "rho must be > 0"),
                      (lambda: EmbedNorm.from_embedding(torch.ones(1, 4)), "at least 2 image-token rows"),
                      (lambda: LevelEmbedding(3, 0), "dim must be an int >= 1"),
                      (lambda: SeqForward(lambda x: x, torch.zeros(3, 1, 4), 2, 8, 0, 5), "prompt_embeds must have")):
        with pytest.raises(SJDInputError, match=msg):
            make()


def test_schedule_takes_numpy_numbers_and_stores_json_ones():
    """``NoiseSchedule(levels=np.int64(3))`` was refused (the package takes NumPy ints elsewhere); the schedule
    is written to the fine-tune's JSON manifest, so it stores Python numbers."""
    import json

    import numpy as np
    s = NoiseSchedule(levels=np.int64(3), s_min=np.float32(0.25), rho=np.float64(5.0))
    assert type(s.levels) is int and type(s.s_min) is float and type(s.rho) is float
    assert json.loads(json.dumps(s.to_dict())) == {"levels": 3, "s_min": 0.25, "s_max": 1.0, "rho": 5.0}
    assert torch.equal(s.sigmas64(), NoiseSchedule(levels=3, s_min=0.25, rho=5.0).sigmas64())
    for bad in (2.5, True, -1, "3"):
        with pytest.raises(SJDInputError, match="levels"):
            NoiseSchedule(levels=bad)


@pytest.mark.parametrize("rel,needles", [
    ("python/finetune_sjd2.py", ["(default: 700)", "(default: 32)", "checked after each step", "<model>.json",
                                 "finetune_sjd2_<model>.log"]),
    ("python/train_toy.py", ["loaded from --out", "mnist 1600", "train_<model>.log"]),
])
def test_script_help_documents_defaults_and_out(rel, needles, capsys):
    """``--help`` listed --steps, --batch, --out, --log without a word (defaults and where the reused
    parts are read from were only in the code)."""
    m = load_file_module("audit_help_" + Path(rel).stem, ROOT / rel)
    with pytest.raises(SystemExit) as e:
        m.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for n in needles:
        assert n in out, (n, out)


def test_loop_and_generate_share_the_measured_kv_default():
    """docs/SJD2.md chose ``recompute`` by measurement (keeping the noisy KV lost class accuracy); the public
    ``sjd2_loop`` defaulted to ``keep`` while ``generate_sjd2`` used ``recompute``."""
    import inspect
    m = _sjd2_gpt(seed=6)
    E, cls, T = _emb_rows(m), torch.tensor([1, 2]), 12
    assert inspect.signature(sjd2_loop).parameters["kv"].default == "recompute"
    assert inspect.signature(generate_sjd2).parameters["kv"].default == "recompute"
    with torch.no_grad():
        d = sjd2_loop(_tiny_forward(m, cls, T, 4), E, m.sjd2, T, [3, 4], window=4)
        r = sjd2_loop(_tiny_forward(m, cls, T, 4), E, m.sjd2, T, [3, 4], window=4, kv="recompute")
    assert torch.equal(d.tokens, r.tokens) and int(d.noisy_kv.sum()) == 0 and int(d.refed.sum()) > 0


def test_forwards_refuse_a_capacity_too_small():
    """``KVForward`` with a too small capacity decoded *other* tokens silently (the cache clamps writes past
    its end into the last slot); ``SeqForward`` raised an IndexError from its buffer."""
    from sjd_kernels.sjd2.checkpoint import gpt_forward_parts
    from sjd_kernels.sjd2.decode import KVForward, SeqForward
    m = _sjd2_gpt()
    cls, T, W = torch.tensor([0, 1]), 12, 4
    E, prompt, fn, lo = gpt_forward_parts(m, cls, False)
    with torch.no_grad():
        for fw in (KVForward(m, prompt, 2, 5), SeqForward(fn, prompt, 2, 5, 0, 12)):
            with pytest.raises(SJDInputError, match="capacity: .*num_tokens \\+ 2 \\* window\\)"):
                sjd2_loop(fw, E, m.sjd2, T, [1, 2], window=W)
        # the bound is checked before any forward (on a GPU the forward does not check each call):
        # one position less is refused, the bound itself decodes what a roomy forward decodes
        for fw in (KVForward(m, prompt, 2, T + 2 * W - 1), SeqForward(fn, prompt, 2, T + 2 * W - 1, 0, 12)):
            with pytest.raises(SJDInputError, match="may feed 20 "):
                sjd2_loop(fw, E, m.sjd2, T, [1, 2], window=W)
        ok = sjd2_loop(KVForward(m, prompt, 2, T + 2 * W), E, m.sjd2, T, [1, 2], window=W)
        ref = sjd2_loop(SeqForward(fn, prompt, 2, T + 2 * W, 0, 12), E, m.sjd2, T, [1, 2], window=W)
        roomy = sjd2_loop(KVForward(m, prompt, 2, T + 2 * W + 9), E, m.sjd2, T, [1, 2], window=W)
    assert torch.equal(ok.tokens, ref.tokens) and torch.equal(ok.tokens, roomy.tokens)
    with pytest.raises(SJDInputError, match="prompt_embeds must be"):
        KVForward(m, torch.cat([prompt, prompt, prompt]), 2, 8)


def test_sjd2_parameters_in_another_float_dtype_decode():
    """An ``SJD2Embedding`` moved to float64 (``.double()``) failed with 'mean must have dtype float32' (an
    argument of the op, not of the call); the noise lives in float32, so float64 parameters that hold float32
    values decode the same tokens."""
    import copy
    m = _sjd2_gpt(seed=7)
    c = torch.tensor([0, 1])
    want = generate_sjd2(m, c, 10, window=3, seed=1)
    got = generate_sjd2(m, c, 10, window=3, seed=1, sjd2=copy.deepcopy(m.sjd2).double())
    assert torch.equal(want.tokens, got.tokens)
    half = generate_sjd2(m, c, 10, window=3, seed=1, sjd2=copy.deepcopy(m.sjd2).half())
    assert bool((half.tokens >= 0).all()) and bool((half.tokens < m.vocab_size).all())


def test_finetune_out_with_another_gpt_config_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """A base manifest in --out with the bundled GPT's checksum but another config passed the checks; the
    fine-tune then trained and (now) ``checkpoint.save`` refuses it: a traceback after the whole run."""
    m, out = _finetune(tmp_path)
    man = json.loads((out / "mnist.json").read_text())
    man["gpt"]["n_layer"] += 1
    (out / "mnist.json").write_text(json.dumps(man))

    def reached(*a, **k):
        raise AssertionError("the fine-tune started")
    monkeypatch.setattr(m.bundled, "load", reached)
    with pytest.raises(SystemExit) as e:
        m.main(["--out", str(out), "--log", str(tmp_path / "l" / "ft.log")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --out: its mnist.json gives another GPT config" in err, err
    assert not (tmp_path / "l").exists()


@pytest.mark.parametrize("progress", ["no", 0, 1.0])
def test_progress_must_be_a_bool(progress):
    """``progress="no"`` turned the bar on (any truthy value did), in generate, generate_sjd2 and sjd2_loop."""
    from sjd_kernels import generate
    m = _sjd2_gpt()
    cls = torch.tensor([0, 1])
    with torch.no_grad():
        for call in (lambda: sjd2_loop(_tiny_forward(m, cls, 6, 2), _emb_rows(m), m.sjd2, 6, [1, 2], window=2,
                                       progress=progress),
                     lambda: generate_sjd2(m, cls, 6, window=2, progress=progress),
                     lambda: generate(m, cls, 6, method="sjd", window=2, progress=progress)):
            with pytest.raises(SJDInputError, match="progress must be"):
                call()
