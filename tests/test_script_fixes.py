"""Audit fixes: real output paths, formats and flag combinations of ``python/generate.py``, the
demo's window and ``--per-class`` limits, the [0, 1] range of images in the quality measure and the
tokenizer, and the data sets' error type."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _util import load_file_module
from sjd_kernels import data, demo
from sjd_kernels.ops._common import SJDInputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    return load_file_module("generate_script_fixes", ROOT / "python" / "generate.py")


def _no_model_work(gen, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model work started before the arguments were checked")
    monkeypatch.setattr(gen.bundled, "load", boom)
    monkeypatch.setattr(gen, "generate", boom)


def _usage_error(main, args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: " in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- python/generate.py
def test_generate_prints_the_files_it_writes_and_runs_ar_once(gen, tmp_path, capsys):
    """No extension: matplotlib writes ``.png`` and np.save ``.npy``; the printed paths are those files.
    ``--method ar --with-ar`` runs AR once (no 'ar and ar drew the same tokens')."""
    out, tok = tmp_path / "o" / "noext", tmp_path / "t" / "toks"
    assert gen.main(["--method", "ar", "--with-ar", "--classes", "3", "--cfg", "1", "--backend", "torch",
                     "--out", str(out), "--tokens", str(tok)]) == 0
    text = capsys.readouterr().out
    png, npy = out.with_name("noext.png"), tok.with_name("toks.npy")
    assert png.read_bytes()[:4] == b"\x89PNG" and np.load(npy).shape == (1, 196)
    assert not out.exists() and not tok.exists()
    assert f"wrote {png}\n" in text and f"wrote {npy}\n" in text, text
    assert "drew the same tokens" not in text and text.count(" NFE ") == 1, text
    assert "is AR itself" in text, text


@pytest.mark.parametrize("args,flag,words", [
    (["--out", "s.xyz"], "--out", ".png"),                                    # a format matplotlib does not write
    (["--method", "pac", "--window", "2"], "--window", "tree of depth 3"),   # pac's tree needs window >= 3
    (["--method", "pac", "--window", "0"], "--window", "tree of depth 3"),
], ids=["out-xyz", "pac-window-2", "pac-window-0"])
def test_generate_bad_flags_are_usage_errors(gen, tmp_path, capsys, monkeypatch, args, flag, words):
    _no_model_work(gen, monkeypatch)
    args = [a if a != "s.xyz" else str(tmp_path / "o" / "s.xyz") for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o" / "x.png")]
    err = _usage_error(gen.main, args, capsys)
    assert flag in err and words in err, err
    assert not (tmp_path / "o").exists()


def test_generate_pac_with_its_tree_depth_passes_the_checks(gen, tmp_path, monkeypatch):
    _no_model_work(gen, monkeypatch)
    with pytest.raises(AssertionError, match="model work started"):
        gen.main(["--method", "pac", "--window", "3", "--out", str(tmp_path / "x.PNG")])


# ----------------------------------------------------------------------------- python -m sjd_kernels.demo
@pytest.fixture
def no_run(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(demo.torch, "set_num_threads", lambda n: None)
    return calls


@pytest.mark.parametrize("args,flag,words", [
    (["--methods", "pac", "--window", "1"], "--window", "needs a window >= 3, got 1"),
    (["--methods", "sjd,pac", "--window", "2"], "--window", "tree of depth 3"),
    (["--per-class", "451"], "--per-class", "at most 450"),
    (["--model", "photo", "--per-class", "201"], "--per-class", "at most 200"),
], ids=["pac-window-1", "sjd-pac-window-2", "mnist-per-class", "photo-per-class"])
def test_demo_bad_flags_are_usage_errors(no_run, tmp_path, capsys, args, flag, words):
    out = tmp_path / "out"
    err = _usage_error(demo.main, args + ["--out", str(out)], capsys)
    assert flag in err and words in err, err
    assert not no_run and not out.exists()


def test_demo_limits_pass_at_the_edge(no_run, tmp_path):
    demo.main(["--per-class", "450", "--methods", "pac", "--window", "3", "--out", str(tmp_path / "a")])
    demo.main(["--model", "photo", "--per-class", "200", "--out", str(tmp_path / "b")])
    assert [k["per_class"] for k in no_run] == [450, 200]


def test_demo_run_refuses_per_class_above_the_real_pool(tmp_path, monkeypatch):
    from sjd_kernels.models import bundled

    def boom(*a, **k):
        raise AssertionError("the demo loaded its model before checking per_class")
    monkeypatch.setattr(bundled, "load", boom)
    with pytest.raises(SJDInputError, match="per_class must be at most 200"):
        demo.run("photo", per_class=201, out=tmp_path / "o", log=lambda s: None)
    assert not (tmp_path / "o").exists()
    assert demo.real_per_class("mnist") == 450 and demo.real_per_class("photo") == 200


# ----------------------------------------------------------------------------- images in [0, 1]
@pytest.fixture(scope="module")
def mnist_few():
    X, y = data.mnist("test")
    return X[:20], y[:20]


def _out_of_range(X):
    return [(X * 255.0, r"got values in \[0, 255\] \(divide 8-bit images by 255\)"),
            (np.rint(X * 255.0).astype(np.uint8), r"got values in \[0, 255\] \(divide 8-bit images by 255\)"),
            (-X, r"got values in \[-1, 0\]"),
            (X + 0.01, r"got values in \[0.01, 1.01\]")]


def test_quality_refuses_images_outside_unit_range(mnist_few):
    from sjd_kernels.models import bundled
    q = bundled.load_quality("mnist")
    X, y = mnist_few
    for bad, msg in _out_of_range(X):
        for call in (lambda: q.accuracy(bad, y), lambda: q.fd(bad, X), lambda: q.fd(X, bad),
                     lambda: q.features(torch.as_tensor(bad)), lambda: q.evaluate(X, y, X, real=bad)):
            with pytest.raises(SJDInputError, match=r"images must hold values in \[0, 1\], " + msg):
                call()
    # float rounding within the tolerance still counts as [0, 1] (and gives the same numbers)
    from sjd_kernels.models.tokenizer import UNIT_RANGE_TOL
    slack = np.where(X > 0.5, X + UNIT_RANGE_TOL / 2, X - UNIT_RANGE_TOL / 2).astype(np.float32)
    assert q.accuracy(slack, y) == q.accuracy(X, y)


def test_tokenizer_refuses_images_outside_unit_range(mnist_few):
    from sjd_kernels.models import bundled
    vq = bundled.load("mnist").tokenizer
    X, _ = mnist_few
    for bad, msg in _out_of_range(X):
        for call in (vq.encode, vq.roundtrip, vq.to_patches):
            with pytest.raises(SJDInputError, match=r"images must hold values in \[0, 1\], " + msg):
                call(bad)
    from sjd_kernels.models.tokenizer import UNIT_RANGE_TOL
    slack = np.where(X > 0.5, X + UNIT_RANGE_TOL / 2, X - UNIT_RANGE_TOL / 2).astype(np.float32)
    assert torch.equal(vq.encode(slack), vq.encode(X))


# ----------------------------------------------------------------------------- data
def test_data_split_and_model_errors_are_sjd_input_errors():
    with pytest.raises(SJDInputError, match="split must be 'train' or 'test', got 'val'"):
        data.photo_crops(10, "val")
    with pytest.raises(SJDInputError, match="model must be 'mnist' or 'photo'"):
        data.real_images("cifar", "train")


def test_generate_folder_as_output_file_is_still_refused(gen, tmp_path, capsys, monkeypatch):
    """A folder given as ``--out``/``--tokens`` stays an error, not a sibling ``folder.png``/``folder.npy``."""
    _no_model_work(gen, monkeypatch)
    (tmp_path / "d").mkdir()
    for args, flag in ((["--out", str(tmp_path / "d")], "--out"),
                       (["--out", str(tmp_path / "x.png"), "--tokens", str(tmp_path / "d")], "--tokens")):
        err = _usage_error(gen.main, args, capsys)
        assert flag in err and "is a folder" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
