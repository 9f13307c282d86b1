"""``python/generate.py``: images, token ids and the same-tokens line of gumbel_jacobi against AR."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _util import load_file_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    return load_file_module("generate_script", ROOT / "python" / "generate.py")


def test_gumbel_jacobi_with_ar_row(gen, tmp_path, capsys):
    png, tok = tmp_path / "s.png", tmp_path / "new" / "t.npy"       # --tokens makes its folder
    assert gen.main(["--method", "gumbel_jacobi", "--classes", "1", "4", "--window", "8", "--with-ar", "--cfg", "1",
                     "--backend", "torch", "--out", str(png), "--tokens", str(tok)]) == 0
    out = capsys.readouterr().out
    assert "gumbel_jacobi and ar_gumbel drew the same tokens" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    t = np.load(tok)
    assert t.shape == (2, 196) and t.min() >= 0 and t.max() < 256
    nfe = int(out.split("gumbel_jacobi")[1].split("NFE")[1].split()[0])
    assert 0 < nfe < 196                                          # fewer forwards than AR's 196


def test_bad_arguments_exit_with_a_message(gen, tmp_path, capsys):
    for args, msg in ((["--method", "nope"], "--method 'nope'"), (["--classes", "10"], "--classes must lie in")):
        with pytest.raises(SystemExit) as e:
            gen.main(args + ["--out", str(tmp_path / "x.png")])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------- command-line mistakes
def _no_model_work(gen, monkeypatch):
    """Loading or generating after a bad argument is a bug: both fail the test loudly."""
    def boom(*a, **k):
        raise AssertionError("model work started before the arguments were checked")
    monkeypatch.setattr(gen.bundled, "load", boom)
    monkeypatch.setattr(gen, "generate", boom)


def _file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a folder")
    return f


def _cuda_backend_runs_here():
    from sjd_kernels import _ext
    return _ext._SIM is not None


BAD = [
    (["--window", "-1"], "--window"),
    (["--method", "pac", "--window", "2"], "--window"),   # below pac's default tree depth
    (["--top-k", "999"], "--top-k"),                   # above the mnist model's 256 codes
    (["--top-k", "-1"], "--top-k"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--cfg", "nan"], "--cfg"),
    (["--cfg", "inf"], "--cfg"),
    (["--method", "sjd", "--beta", "0.5"], "--beta"),  # beta: sjd_vp and coupling only
    (["--method", "coupling", "--beta", "nan"], "--beta"),
    (["--device", "foo"], "--device"),
    (["--seed", str(2 ** 63)], "--seed"),              # generate's seeds are int64
    (["--method", "sjd2", "--model", "photo"], "--method"),   # no SJD2 fine-tune of photo is bundled
]


@pytest.mark.parametrize("args,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_a_usage_error_before_any_model_work(gen, tmp_path, capsys, monkeypatch, args, flag):
    _no_model_work(gen, monkeypatch)
    png, tok = tmp_path / "o" / "x.png", tmp_path / "t" / "t.npy"
    with pytest.raises(SystemExit) as e:
        gen.main(args + ["--out", str(png), "--tokens", str(tok)])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "error: " in err and flag in err and "Traceback" not in err, err
    assert not png.parent.exists() and not tok.parent.exists()      # nothing written, no folder made


def test_image_formats_that_cannot_be_written_here_are_usage_errors(gen, tmp_path, capsys, monkeypatch):
    """An extension matplotlib does not know, and .pgf without its TeX program (matplotlib would
    fail only after the decoding), exit 2 naming --out before any model work."""
    import matplotlib
    _no_model_work(gen, monkeypatch)
    monkeypatch.setattr(gen.shutil, "which", lambda *a, **k: None)            # no TeX program
    for ext, text in (("xyz", "matplotlib cannot write"), ("pgf", matplotlib.rcParams["pgf.texsystem"])):
        with pytest.raises(SystemExit) as e:
            gen.main(["--out", str(tmp_path / f"x.{ext}")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--out" in err and text in err and "Traceback" not in err, err
        assert ".pgf" not in err.split("one of")[1] and ".png" in err, err


def test_unavailable_device_or_backend_is_a_usage_error(gen, tmp_path, capsys, monkeypatch):
    _no_model_work(gen, monkeypatch)
    cases = []
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device"))
    cases.append((["--device", f"cuda:{torch.cuda.device_count()}"], "--device"))      # one past the last GPU
    if not _cuda_backend_runs_here():
        cases.append((["--backend", "cuda"], "--backend"))                              # on the CPU (default device)
    for args, flag in cases:
        with pytest.raises(SystemExit) as e:
            gen.main(args + ["--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "x.png").exists()


def test_unwritable_output_locations_are_usage_errors(gen, tmp_path, capsys, monkeypatch):
    """--out and --tokens are checked (and their folders made) before the model loads."""
    _no_model_work(gen, monkeypatch)
    f = _file(tmp_path)
    for args, flag in ((["--out", str(f / "x.png")], "--out"),
                       (["--out", str(tmp_path / "new" / "x.png"), "--tokens", str(f / "t.npy")], "--tokens"),
                       (["--out", str(f / "sub" / "x.png")], "--out"),
                       (["--out", str(tmp_path)], "--out")):                      # a folder, not a file
        with pytest.raises(SystemExit) as e:
            gen.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "new").exists()   # --out's folder: not made either
    assert f.read_text() == "not a folder"


def test_sjd2_with_ar_row_runs_ar_of_the_fine_tune(gen, tmp_path, capsys, monkeypatch):
    """SJD2 keeps the AR law of its fine-tune, so --with-ar's row is AR of that model, not of the base."""
    pytest.importorskip("sjd_kernels.sjd2")
    used = []
    real = gen.generate

    def spy(model, *a, **k):
        used.append((k["method"], model))
        return real(model, *a, **k)
    monkeypatch.setattr(gen, "generate", spy)
    assert gen.main(["--method", "sjd2", "--classes", "3", "--with-ar", "--backend", "torch",
                     "--out", str(tmp_path / "s.png")]) == 0
    (m1, sjd2_model), (m2, ar_model) = used
    assert (m1, m2) == ("sjd2", "ar") and ar_model is sjd2_model
    assert "ar " in capsys.readouterr().out
