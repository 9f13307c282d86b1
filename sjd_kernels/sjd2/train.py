"""SJD2 fine-tuning pieces: noisy inputs, the next-clean-token loss, parameter groups.

Next-clean-token prediction (SPEC section 6): the image-token inputs are noised segment by
segment (``noise.sample_segment_levels``), the model still predicts the *clean* next token,
and the loss is plain cross-entropy. The level embedding is new and trains with its own,
larger learning rate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops._common import SJDInputError, check_tensor, host_checks
from .noise import SJD2Embedding, sample_segment_levels


def noisy_image_inputs(sjd2: SJD2Embedding, e: torch.Tensor, levels: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Model inputs ``[B, T, d]`` of image-token embeddings ``e [B, T, d]`` at ``levels [B, T]``.

    Level-0 positions are ``e`` itself; others ``unnormalize(a_k e_n + s_k eps) + L[k]``.
    Differentiable in ``e`` (so the embedding table fine-tunes) and in the level embedding.
    """
    eps = torch.randn(e.shape, generator=generator, dtype=torch.float32).to(e.device)
    x = sjd2.noise(e, levels, eps)
    return sjd2.inputs_embeds(e, x, levels)


def next_clean_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` (row t predicts the clean token t) against ``targets [B, T]``
    (integer ids in ``[0, V)``, checked on the host for CPU tensors only)."""
    check_tensor("logits", logits, dim=3, last_contiguous=False)
    B, T, V = logits.shape
    check_tensor("targets", targets, dtypes=(torch.int64,), dim=2, shape=(B, T), device=logits.device,
                 last_contiguous=False)
    if host_checks(targets) and targets.numel() and bool(((targets < 0) | (targets >= V)).any()):
        raise SJDInputError(f"targets must be token ids in [0, {V}), got values in [{int(targets.min())}, "
                            f"{int(targets.max())}]")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def sample_levels_like(tokens: torch.Tensor, levels: int, generator: torch.Generator | None = None,
                       max_segments: int = 8, p_rising: float = 0.5) -> torch.Tensor:
    """Segment levels ``[B, T]`` for a token batch (on the tokens' device)."""
    check_tensor("tokens", tokens, dim=2, last_contiguous=False)
    B, T = tokens.shape
    return sample_segment_levels(B, T, levels, generator=generator, max_segments=max_segments,
                                 p_rising=p_rising).to(tokens.device)


def param_groups(base: torch.nn.Module, sjd2: SJD2Embedding, lr: float, new_lr: float,
                 weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: the base model's weights at ``lr`` (decay on matrices only), the new SJD2
    parameters (level embedding) at ``new_lr`` without decay."""
    new = list(sjd2.parameters())
    new_ids = {id(p) for p in new}
    decay, no_decay = [], []
    for p in base.parameters():
        if not p.requires_grad or id(p) in new_ids:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "base"},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "base_no_decay"},
              {"params": new, "lr": new_lr, "weight_decay": 0.0, "name": "sjd2_new"}]
    return [g for g in groups if g["params"]]
