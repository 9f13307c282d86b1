"""VQ patch tokenizer: shapes, exact round trip of code images, de-duplicated fitting, errors."""
import numpy as np
import pytest
import torch

from sjd_kernels import data
from sjd_kernels.models.tokenizer import PatchVQ


@pytest.fixture(scope="module")
def mnist_small():
    X, y = data.mnist("train")
    idx = np.random.default_rng(0).permutation(len(X))[:600]
    return X[idx]


@pytest.fixture(scope="module")
def vq(mnist_small):
    return PatchVQ.fit(mnist_small, 256, patch=2, seed=0, n_init=1)


def test_shapes_and_raster_order():
    cb = torch.rand(7, 4)
    vq = PatchVQ(cb, patch=2, image_size=6)
    assert vq.tokens_per_image == 9 and vq.grid == 3
    tok = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1]])
    img = vq.decode(tok)
    assert img.shape == (1, 6, 6)
    # patch k of the raster sits at rows 2*(k//3).., cols 2*(k%3)..; within a patch the code is row-major
    for k in range(9):
        r, c = divmod(k, 3)
        assert torch.equal(img[0, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4), cb[tok[0, k]])
    assert torch.equal(vq.encode(img), tok)


def test_mnist_codebook_fit(vq, mnist_small):
    assert vq.num_codes == 256 and vq.tokens_per_image == 196
    rt = vq.roundtrip(mnist_small)
    assert rt["codes_used"] >= 240, rt
    assert rt["mse"] < 2e-3, rt
    # codes sorted by mean intensity, so id 0 is the blank background
    assert float(vq.codebook[0].max()) < 0.05
    # decoding a token map and encoding it again returns the same tokens (codes are distinct)
    tok = vq.encode(mnist_small[:50])
    assert torch.equal(vq.encode(vq.decode(tok)), tok)


def test_dedup_spreads_codes(mnist_small, vq):
    raw = PatchVQ.fit(mnist_small, 256, patch=2, seed=0, dedup=False, n_init=1)
    used_raw = raw.roundtrip(mnist_small)["codes_used"]
    used_dedup = vq.roundtrip(mnist_small)["codes_used"]
    assert used_raw < 150 < used_dedup, (used_raw, used_dedup)


def test_bad_inputs(vq):
    with pytest.raises(ValueError, match=r"tokens must be \[B, 196\]"):
        vq.decode(torch.zeros(2, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="token ids must lie in"):
        vq.decode(torch.full((1, 196), 256))
    with pytest.raises(ValueError, match=r"images must be \[B, 28, 28\]"):
        vq.encode(np.zeros((1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="multiple of patch"):
        PatchVQ(torch.zeros(4, 4), patch=2, image_size=7)
