"""Image quality of generated samples, with nothing to download.

Each bundled model ships a small CNN classifier (``TinyCNN``: three 3x3 conv layers of 16, 32 and
64 channels with ReLU, 2x2 max-pooling after the first two, average pooling to a 4x4 grid, a 32-unit ReLU feature
layer, a linear class head; about 56k parameters) trained on the model's real
training images (MNIST digits, or grayscale crops labelled by source photograph; see
``sjd_kernels.data``) together with their VQ round-trips, so that decoded token maps are not
out of distribution for it. It is trained by the model's training script
(``python/train_toy.py``) and committed beside the generator's weights. Two numbers come from it:

- **class accuracy**: the fraction of generated images whose predicted class is the class they
  were conditioned on (for real held-out images this is the classifier's test accuracy, reported
  at training time: the ceiling for a generator).
- **Frechet distance (FD)**: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between
  Gaussians fitted to the 32-d feature vectors of two image sets (generated vs. real), the FID
  recipe with this classifier in place of Inception. FD is biased upwards for small sets and
  depends on the set sizes, so compare it only at equal sizes; ``evaluate`` reports, next to
  the generated images' FD, the FD of an equally large set of real images against the same
  reference (``fd_real``), the floor a perfect generator would reach.

These are proxies for the class- and image-level statistics the generator must reproduce; they
are meant to show that a lossy decoding method changed the output distribution (or did not), not
to rank image generators in general.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.tokenizer import check_unit_range
from .ops._common import SJDInputError, check_int

FEATURE_DIM = 32


class TinyCNN(nn.Module):
    """Gray images ``[B, H, W]`` (any H, W >= 8) -> class logits ``[B, C]``; ``features`` -> ``[B, 32]``."""

    def __init__(self, num_classes: int, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.num_classes = num_classes = check_int("num_classes", num_classes, 1)
        feature_dim = check_int("feature_dim", feature_dim, 1)
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).unsqueeze(1) * 2.0 - 1.0
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.c3(x)), 4).flatten(1)
        return F.relu(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def frechet_distance(fa: np.ndarray, fb: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``fa [Na, D]`` and ``fb [Nb, D]``."""
    fa = np.asarray(fa, dtype=np.float64)
    fb = np.asarray(fb, dtype=np.float64)
    for name, f in (("fa", fa), ("fb", fb)):
        if f.ndim != 2 or f.shape[1] != fa.shape[-1]:
            raise SJDInputError(f"{name} must be features [N, D] with the same D in both sets, got shapes "
                                f"{list(fa.shape)} and {list(fb.shape)}")
        if not np.isfinite(f).all():
            raise SJDInputError(f"{name} holds NaN or infinite features")
    if fa.shape[0] < 2 or fb.shape[0] < 2:
        raise ValueError(f"need at least 2 images per set, got {fa.shape[0]} and {fb.shape[0]}")
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    # tr((Sa Sb)^(1/2)) = tr((Sa^(1/2) Sb Sa^(1/2))^(1/2)): a symmetric PSD matrix, so its
    # eigenvalues give the trace stably even when a covariance is singular (few or blank images).
    ea, va = np.linalg.eigh(sa)
    ra = (va * np.sqrt(np.clip(ea, 0.0, None))) @ va.T
    m = ra @ sb @ ra
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2.0 * tr_covmean)


class QualityModel:
    """A trained ``TinyCNN`` with the two measures of the module docstring."""

    def __init__(self, net: TinyCNN):
        self.net = net.eval()

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @torch.no_grad()
    def _run(self, images, fn, batch: int = 512) -> torch.Tensor:
        batch = check_int("batch", batch, 1)
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.dim() != 3 or x.shape[0] < 1 or min(x.shape[1:]) < 8:
            raise SJDInputError(f"images must be gray images [B >= 1, H >= 8, W >= 8], got {list(x.shape)}")
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise SJDInputError("images must hold finite values, got NaN or infinite ones")
        # the tokenizer's range check (the same tolerance); the clamp only removes that rounding slack
        x = check_unit_range(x).clamp(0.0, 1.0)
        return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])

    def predict(self, images) -> np.ndarray:
        """Predicted class ``[B]`` of images ``[B, H, W]`` in [0, 1]."""
        return self._run(images, self.net).argmax(1).numpy()

    def features(self, images) -> np.ndarray:
        """Feature vectors ``[B, 32]`` of images ``[B, H, W]`` in [0, 1]."""
        return self._run(images, self.net.features).numpy()

    def accuracy(self, images, labels) -> float:
        pred = self.predict(images)
        labels = np.asarray(labels)
        if labels.shape != pred.shape or not np.issubdtype(labels.dtype, np.number):
            raise SJDInputError(f"labels must be class ids [B={pred.shape[0]}] (one per image), got "
                                f"{labels.dtype} {list(labels.shape)}")
        return float((pred == labels).mean())

    def fd(self, images_a, images_b) -> float:
        return frechet_distance(self.features(images_a), self.features(images_b))

    def evaluate(self, images, labels, reference, real=None) -> dict:
        """``accuracy`` of ``images`` w.r.t. their conditioning ``labels``, ``fd`` against ``reference``
        images, and (with ``real``, a real set as large as ``images``) ``fd_real``: the same FD for
        real images, the floor at this set size."""
        out = {"accuracy": self.accuracy(images, labels), "fd": self.fd(images, reference), "n": int(len(images))}
        if real is not None:
            out["fd_real"] = self.fd(real, reference)
        return out

    def state_dict(self) -> dict:
        return {k: v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "feature_dim": self.net.fc.out_features}

    @classmethod
    def from_state(cls, tensors: dict, config: dict) -> "QualityModel":
        net = TinyCNN(config["num_classes"], config.get("feature_dim", FEATURE_DIM))
        net.load_state_dict(tensors)
        return cls(net)


def train_classifier(images, labels, num_classes: int, *, epochs: int = 8, batch: int = 128, lr: float = 3e-3,
                     seed: int = 0, log=print) -> QualityModel:
    """Train a ``TinyCNN`` on ``images [N, H, W]`` in [0, 1] with ``labels [N]`` (AdamW, cosine lr)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    net = TinyCNN(num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        tot, correct, n = 0.0, 0, 0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            logits = net(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            n += len(idx)
        log(f"classifier epoch {ep + 1}/{epochs}: loss {tot / n:.4f} train acc {correct / n:.4f}")
    return QualityModel(net.eval())
