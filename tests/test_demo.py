"""The demo end to end on the bundled MNIST model, tiny: files written and JSON keys present."""
import json

import numpy as np
import pytest

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
