"""Quality measure: the Frechet distance formula, and the bundled classifiers separate real from noise."""
import numpy as np
import pytest

from sjd_kernels import data
from sjd_kernels.quality import frechet_distance


def test_frechet_distance_closed_form():
    # features with exactly known sample mean and covariance: FD of two diagonal Gaussians is
    # |mu_a - mu_b|^2 + sum_i (sigma_a,i - sigma_b,i)^2
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4000, 3))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T   # exactly white
    mu_a, sd_a = np.array([1.0, 0.0, -2.0]), np.array([1.0, 2.0, 0.5])
    mu_b, sd_b = np.array([0.0, 0.5, -2.0]), np.array([3.0, 2.0, 0.1])
    fa, fb = z * sd_a + mu_a, z[::-1] * sd_b + mu_b
    want = ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()
    assert frechet_distance(fa, fb) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-9)
    # a singular covariance (constant features) must not produce NaN
    assert np.isfinite(frechet_distance(np.zeros((10, 3)), fb))


def _bundled_quality(name):
    from sjd_kernels.models import bundled
    return bundled.load_quality(name)


@pytest.mark.parametrize("name", ["mnist", "photo"])
def test_real_scores_high_noise_scores_low(name):
    q = _bundled_quality(name)
    rng = np.random.default_rng(1)
    if name == "mnist":
        real, labels = data.mnist("test")                          # never seen by the classifier
        ref, _ = data.mnist("train")
        acc_floor = 0.9
    else:
        # crops from the region the generator and the classifier were trained on, at positions
        # drawn with another seed: what a perfect generator would produce
        real, labels = data.photo_crops(500, "train", seed=123)
        ref, _ = data.photo_crops(500, "train", seed=456)
        acc_floor = 0.9
    ref = ref[rng.permutation(len(ref))[:500]]
    real, labels = real[:500], labels[:500]
    acc_real = q.accuracy(real, labels)
    fd_real = q.fd(real, ref)
    noise = rng.random(real.shape).astype(np.float32)
    acc_noise = q.accuracy(noise, labels)
    fd_noise = q.fd(noise, ref)
    # label-shuffled real images: same FD, chance accuracy
    acc_shuffled = q.accuracy(real, rng.permutation(labels))
    assert acc_real >= acc_floor, acc_real
    assert acc_noise <= 0.3 and acc_shuffled <= 0.3, (acc_noise, acc_shuffled)
    assert fd_noise > 20 * fd_real, (fd_noise, fd_real)
