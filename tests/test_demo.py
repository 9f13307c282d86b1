"""The demo end to end on the bundled MNIST model, tiny: files written and JSON keys present."""
import json

import numpy as np
import pytest
import torch

from sjd_kernels import demo


def test_demo_tiny(tmp_path):
    js = tmp_path / "demo.json"
    res = demo.run("mnist", per_class=1, seeds=2, window=8, methods=["ar_gumbel", "sjd", "coupling", "gumbel_jacobi"],
                   permutations=50, out=tmp_path / "out", json_path=js, log=lambda s: None)
    png = tmp_path / "out" / "demo_mnist.png"
    assert png.exists() and png.stat().st_size > 1000
    assert (tmp_path / "out" / "demo_mnist.txt").exists()
    data = json.loads(js.read_text())
    assert set(data["methods"]) == {"ar", "ar_gumbel", "sjd", "coupling", "gumbel_jacobi"}
    for name, r in data["methods"].items():
        for key in ("nfe", "step_compression", "wall_s", "quality", "entropy"):
            assert key in r, (name, key)
        assert 0 < r["two_sample_vs_ar"]["p_value"] <= 1
        assert 0 <= r["quality"]["accuracy"] <= 1 and r["entropy"] > 0
    m = data["methods"]
    assert m["ar"]["nfe"] == 196 and m["ar"]["step_compression"] == pytest.approx(1.0)
    assert m["sjd"]["nfe"] < 196 and m["coupling"]["step_compression"] > 1.0
    # gumbel_jacobi is token-identical to ar_gumbel under the same seeds: same numbers
    assert m["gumbel_jacobi"]["quality"] == m["ar_gumbel"]["quality"]
    assert m["gumbel_jacobi"]["entropy"] == pytest.approx(m["ar_gumbel"]["entropy"], rel=1e-6)
    assert res["real"]["accuracy"] > 0.8
    assert data["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and data["cpu"]


def test_two_sample_test_detects_shift_and_accepts_equal_laws():
    rng = np.random.default_rng(0)
    V, N, n = 8, 20, 60
    p = rng.dirichlet(np.ones(V), size=N)
    q = p.copy()
    q[:, 0] += 0.3
    q /= q.sum(1, keepdims=True)

    def draw(law):
        return np.stack([rng.choice(V, size=n, p=law[i]) for i in range(N)], 1)

    strata = np.arange(n) % 5
    _, p_same = demo.two_sample_test(draw(p), draw(p), strata, V, permutations=200)
    _, p_diff = demo.two_sample_test(draw(p), draw(q), strata, V, permutations=200)
    assert p_diff <= 0.01 < p_same


# ----------------------------------------------------------------------------- command-line mistakes
@pytest.fixture
def no_run(monkeypatch):
    """``demo.main`` with the demo itself replaced: a bad argument must stop it before ``run`` (minutes)."""
    calls = []

    def fake_run(*a, **k):
        calls.append((a, k))
        raise AssertionError("the demo started before its arguments were checked")
    monkeypatch.setattr(demo, "run", fake_run)
    monkeypatch.setattr(demo.torch, "set_num_threads", lambda n: None)     # leave the test process's threads
    return calls


BAD = [
    (["--methods", "nope"], "--methods"),
    (["--methods", "sjd,nope"], "--methods"),
    (["--methods", "sjd2", "--model", "photo"], "--methods"),       # no SJD2 fine-tune of photo is bundled
    (["--window", "-1", "--methods", "sjd"], "--window"),
    (["--per-class", "0"], "--per-class"),
    (["--seeds", "0"], "--seeds"),
    (["--top-k", "9999"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--cfg", "nan"], "--cfg"),
    (["--backend", "nope"], "--backend"),
    (["--threads", "0"], "--threads"),
    (["--permutations", "-5"], "--permutations"),
]


@pytest.mark.parametrize("args,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_a_usage_error_before_any_work(no_run, tmp_path, capsys, args, flag):
    out, js = tmp_path / "out", tmp_path / "j" / "demo.json"
    with pytest.raises(SystemExit) as e:
        demo.main(args + ["--out", str(out), "--json", str(js)])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "error: " in err and flag in err and "Traceback" not in err, err
    assert not no_run and not out.exists() and not js.parent.exists()


def test_stale_sjd2_finetune_is_a_usage_error(no_run, tmp_path, capsys, monkeypatch):
    """An SJD2 fine-tune made from another base GPT than the bundled one is refused before any work."""
    import json
    import shutil
    from sjd_kernels.models import bundled
    w = tmp_path / "w"
    w.mkdir()
    for f in bundled.WEIGHTS_DIR.glob("mnist*"):                   # the model's files only
        shutil.copy(f, w)
    man = json.loads((w / "mnist_sjd2.json").read_text())
    man["base_gpt_sha256"] = "f" * 64
    (w / "mnist_sjd2.json").write_text(json.dumps(man))
    monkeypatch.setattr(bundled, "WEIGHTS_DIR", w)
    with pytest.raises(SystemExit) as e:
        demo.main(["--methods", "sjd2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--methods" in err and "stale" in err and "Traceback" not in err, err
    assert not no_run and not (tmp_path / "o").exists()


def test_unusable_backend_and_output_locations_are_usage_errors(no_run, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    cases = [(["--out", str(f)], "--out"), (["--out", str(f / "sub")], "--out"),
             (["--out", str(tmp_path / "o"), "--json", str(f / "demo.json")], "--json"),
             (["--out", str(tmp_path / "o"), "--json", str(tmp_path)], "--json")]         # a folder, not a file
    from sjd_kernels import _ext
    if _ext._SIM is None:
        cases.append((["--backend", "cuda", "--out", str(tmp_path / "o")], "--backend"))     # the demo runs on CPU
    for args, flag in cases:
        with pytest.raises(SystemExit) as e:
            demo.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and "Traceback" not in err, (args, err)
    assert not no_run and not (tmp_path / "o").exists() and f.read_text() == "x"


def test_main_passes_checked_arguments_to_run(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(demo, "run", lambda model, **k: seen.update(k, model=model))
    monkeypatch.setattr(demo.torch, "set_num_threads", lambda n: seen.update(threads=n))
    demo.main(["--methods", "sjd, coupling", "--window", "0", "--seeds", "1", "--per-class", "1", "--threads", "1",
               "--out", str(tmp_path / "o" / "p"), "--json", str(tmp_path / "j" / "d.json")])
    assert seen["methods"] == ["sjd", "coupling"] and seen["window"] == 0 and seen["threads"] == 1
    assert (tmp_path / "o" / "p").is_dir() and (tmp_path / "j").is_dir()


@pytest.mark.parametrize("k", [1, 2, 10])
def test_grid_title_fits_the_picture(tmp_path, k):
    """A grid of one or two images is narrower than a line of settings: the title wraps instead of
    running off both edges (the picture's outer columns stay background)."""
    import matplotlib.image as mpimg
    imgs = np.full((k, 28, 28), 0.5)
    png = tmp_path / "g.png"
    demo.save_grid(png, {"sjd": imgs, "ar": imgs},
                   f"mnist: classes {list(range(k))}, seed 0, window 16, cfg 3.0, temperature 1.0")
    rgb = mpimg.imread(png)[..., :3]
    edges = np.concatenate([rgb[:, :3], rgb[:, -3:]], axis=1)
    assert (edges > 0.99).all(), "the title reaches the picture's edge"
    assert (rgb[: rgb.shape[0] // 4] < 0.5).any()                # but it is drawn, at the top
