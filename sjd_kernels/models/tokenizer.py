"""VQ patch tokenizer: an image is cut into non-overlapping ``p x p`` patches, each replaced by the
id of its nearest codebook vector (squared Euclidean distance), in raster order.

A 28x28 MNIST digit with 2x2 patches gives 14 x 14 = 196 tokens; a 32x32 crop gives 256.
Decoding pastes the code vectors back. The codebook is fitted by k-means (scikit-learn
``MiniBatchKMeans``) on the DE-DUPLICATED set of training patches, quantised to 8 bits before
de-duplication: MNIST patches are mostly blank, and k-means on raw patches spends its codes on
the few dense modes (a few dozen codes end up used); on unique patches the codes spread over the
shapes that occur. Codes are then sorted by mean intensity (id 0 = darkest), which makes token
maps readable and the fit independent of k-means' label order.
"""
from __future__ import annotations

import numpy as np
import torch

from ..ops._common import SJDInputError, check_int

# Images are gray values in [0, 1]; a float value at most this far outside still counts as inside
# (float32 rounding of a computed image, e.g. a resize or ``k / 255``) and is clamped where it is used.
UNIT_RANGE_TOL = 1e-5


def check_unit_range(t: torch.Tensor, name: str = "images") -> torch.Tensor:
    """SJDInputError unless the finite float tensor ``t`` lies in [0, 1] (up to ``UNIT_RANGE_TOL``)."""
    if t.numel():
        lo, hi = float(t.min()) + 0.0, float(t.max()) + 0.0     # + 0.0: no "-0" in the message
        if lo < -UNIT_RANGE_TOL or hi > 1.0 + UNIT_RANGE_TOL:
            hint = " (divide 8-bit images by 255)" if hi > 1.0 + UNIT_RANGE_TOL else ""
            raise SJDInputError(f"{name} must hold values in [0, 1], got values in [{lo:.6g}, {hi:.6g}]{hint}")
    return t


def _as_tensor(images, name: str = "images") -> torch.Tensor:
    """``images`` as a float32 tensor in [0, 1] (``check_unit_range``); values that are not finite
    numbers, or lie outside [0, 1], are an SJDInputError."""
    try:
        t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SJDInputError(f"{name} must be an array or tensor of numbers, got {type(images).__name__} "
                            f"({e})") from None
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise SJDInputError(f"{name} must hold finite values, got NaN or infinite ones")
    return check_unit_range(t, name)


class PatchVQ:
    """Codebook ``[K, p*p]`` float32 over gray patches; images ``[B, H, W]`` in [0, 1]; tokens ``[B, N]`` i64."""

    def __init__(self, codebook: torch.Tensor, patch: int, image_size: int):
        patch, image_size = check_int("patch", patch, 1), check_int("image_size", image_size, 1)
        codebook = _as_tensor(codebook, "codebook")
        if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] != patch * patch:
            raise SJDInputError(f"codebook must be [K >= 1, {patch * patch}] for patch {patch}, got "
                                f"{list(codebook.shape)}")
        if image_size % patch:
            raise SJDInputError(f"image_size {image_size} must be a multiple of patch {patch}")
        self.codebook = codebook.contiguous()
        self.patch = int(patch)
        self.image_size = int(image_size)

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    # -- patches <-> images ------------------------------------------------------------------
    def to_patches(self, images) -> torch.Tensor:
        """``[B, H, W]`` -> ``[B, N, p*p]`` in raster order of patches."""
        x = _as_tensor(images)
        if x.dim() != 3 or x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise SJDInputError(f"images must be [B, {self.image_size}, {self.image_size}], got {list(x.shape)}")
        B, p, g = x.shape[0], self.patch, self.grid
        return x.reshape(B, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(B, g * g, p * p)

    def from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        B, p, g = patches.shape[0], self.patch, self.grid
        return patches.reshape(B, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(B, g * p, g * p)

    # -- encode / decode ---------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images, chunk: int = 65536) -> torch.Tensor:
        """Images ``[B, H, W]`` in [0, 1] -> tokens ``[B, N]`` int64 (nearest code)."""
        chunk = check_int("chunk", chunk, 1)
        P = self.to_patches(images)
        B, N, D = P.shape
        flat = P.reshape(-1, D)
        out = torch.empty(flat.shape[0], dtype=torch.int64)
        c2 = (self.codebook ** 2).sum(1)
        for i in range(0, flat.shape[0], chunk):
            f = flat[i:i + chunk]
            d = c2[None, :] - 2.0 * f @ self.codebook.T
            out[i:i + chunk] = d.argmin(1)
        return out.reshape(B, N)

    @torch.no_grad()
    def decode(self, tokens) -> torch.Tensor:
        """Tokens ``[B, N]`` -> images ``[B, H, W]`` float32."""
        try:
            t = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError) as e:
            raise SJDInputError(f"tokens must be integer ids [B, {self.tokens_per_image}], got "
                                f"{type(tokens).__name__} ({e})") from None
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise SJDInputError(f"tokens must be integer ids [B, {self.tokens_per_image}], got {t.dtype}")
        t = t.to(torch.int64)
        if t.dim() != 2 or t.shape[1] != self.tokens_per_image:
            raise SJDInputError(f"tokens must be [B, {self.tokens_per_image}], got {list(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_codes):
            raise SJDInputError(f"tokens: token ids must lie in [0, {self.num_codes}), got [{int(t.min())}, "
                                f"{int(t.max())}]")
        return self.from_patches(self.codebook[t])

    @torch.no_grad()
    def roundtrip(self, images) -> dict:
        """Round-trip error on ``images``: MSE, PSNR (dB, peak 1), and how many codes the images use."""
        x = _as_tensor(images)
        tok = self.encode(x)
        mse = float(((self.decode(tok) - x) ** 2).mean())
        return {"mse": mse, "psnr_db": float(10 * np.log10(1.0 / max(mse, 1e-12))),
                "codes_used": int(torch.unique(tok).numel()), "num_codes": self.num_codes}

    # -- fitting and storage -----------------------------------------------------------------
    @classmethod
    def fit(cls, images, num_codes: int, patch: int = 2, seed: int = 0, dedup: bool = True,
            batch_size: int = 8192, n_init: int = 3) -> "PatchVQ":
        """k-means codebook on the (8-bit quantised, de-duplicated) patches of ``images [B, H, W]``."""
        from sklearn.cluster import MiniBatchKMeans
        x = _as_tensor(images)
        vq = cls(torch.zeros(1, patch * patch), patch, x.shape[1])
        P = vq.to_patches(x).reshape(-1, patch * patch).numpy()
        q = np.clip(np.rint(P * 255.0), 0, 255).astype(np.uint8)
        if dedup:
            q = np.unique(q, axis=0)
        if q.shape[0] < num_codes:
            raise ValueError(f"only {q.shape[0]} distinct patches for {num_codes} codes")
        km = MiniBatchKMeans(n_clusters=num_codes, random_state=seed, batch_size=batch_size, n_init=n_init,
                             max_iter=200, reassignment_ratio=0.01)
        km.fit(q.astype(np.float32) / 255.0)
        cb = torch.as_tensor(km.cluster_centers_, dtype=torch.float32)
        order = torch.argsort(cb.mean(1), stable=True)
        out = cls(cb[order].clamp(0.0, 1.0), patch, x.shape[1])
        out.fit_info = {"distinct_patches": int(q.shape[0]), "all_patches": int(P.shape[0])}
        return out

    def state_dict(self) -> dict:
        return {"codebook": self.codebook.clone()}

    def config(self) -> dict:
        return {"num_codes": self.num_codes, "patch": self.patch, "image_size": self.image_size,
                "tokens_per_image": self.tokens_per_image}

    @classmethod
    def from_state(cls, tensors: dict, config: dict) -> "PatchVQ":
        return cls(tensors["codebook"], config["patch"], config["image_size"])
