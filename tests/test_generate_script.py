"""``python/generate.py``: images, token ids and the same-tokens line of gumbel_jacobi against AR."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _util import load_file_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    return load_file_module("generate_script", ROOT / "python" / "generate.py")


def test_gumbel_jacobi_with_ar_row(gen, tmp_path, capsys):
    png, tok = tmp_path / "s.png", tmp_path / "t.npy"
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
