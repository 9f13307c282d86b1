"""What the decoding loop needs of a model, and what a model needs of the KV cache.

The loop (``sjd_kernels.decoding``) drives any object with these members; the in-package
``GPT`` implements them directly, the Hugging Face adapters (``sjd_kernels.models.hf``) wrap a
``transformers`` model. Models know nothing of the kernels: they return image logits and the
loop hands those to the ops.

Model (``ImageModel``):
- ``vocab_size``: V, the number of image codes; ``forward`` returns logits ``[R, T, V]`` over
  exactly these (an image-only LM head; structural tokens are forced by the op, not sampled).
- ``num_layers``, ``num_kv_heads``, ``head_dim``: the KV cache geometry.
- ``max_image_tokens``: the longest image the model supports (None = no limit).
- ``prefix(cond, cfg, uncond=None) -> Prefix``: the prompt of every model row, right-padded.
  Rows ``0..B-1`` are the requests' conditional rows; with ``cfg`` rows ``B..2B-1`` are their
  unconditional twins (their prefixes may have another length).
- ``embed_tokens(ids [R, T]) -> [R, T, d]``: embeddings of image codes ``0..V-1`` (adapters
  may accept ids ``>= V`` for structural tokens they define).
- ``forward(inputs_embeds [R, T, d], positions [R, T], cache=None, mask=None,
  write_slots=None) -> logits [R, T, V]``: with a cache, the new K/V go to ``write_slots
  [R, T]`` and attention reads the whole cache under ``mask [R, T, S]`` (True = may attend);
  without, attention is causal over the inputs. ``mask`` may be any boolean mask and
  ``positions`` need not be consecutive or distinct: method ``pac`` feeds a draft tree (node i
  at slot ``cache_len + i``, position id ``cache_len + depth``, attending to the prefix and its
  ancestors). A model that cannot honour such masks sets ``tree_attention = False`` (optional
  attribute, default True) and ``pac`` refuses it.

KV cache (``KVCacheLike``; ``sjd_kernels.decoding.cache.StaticKVCache``):
- ``write(layer, k, v, slots)``: store ``k, v [R, H_kv, T, D]`` at per-row ``slots [R, T]``.
- ``layer(layer) -> (k, v)``: the layer's full cache ``[R, H_kv, S, D]`` each.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch


class Prefix(NamedTuple):
    """The prompt of every model row: ``embeds [R, L, d]`` right-padded, ``lengths [R]`` i64 (>= 1)."""
    embeds: torch.Tensor
    lengths: torch.Tensor


@runtime_checkable
class KVCacheLike(Protocol):
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None: ...

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class ImageModel(Protocol):
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_image_tokens: Optional[int]

    def prefix(self, cond, cfg: bool, uncond=None) -> Prefix: ...

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache=None, mask=None,
                write_slots=None) -> torch.Tensor: ...


REQUIRED = ("vocab_size", "num_layers", "num_kv_heads", "head_dim", "prefix", "embed_tokens", "forward")


def check_model(model) -> None:
    """Raise TypeError naming the members a model lacks for the decoding loop."""
    missing = [a for a in REQUIRED if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a decoding model: it lacks {', '.join(missing)} "
                        f"(see sjd_kernels.models.protocol)")
    for a in ("vocab_size", "num_layers", "num_kv_heads", "head_dim"):
        v = getattr(model, a)
        if not isinstance(v, int) or v < 1:
            raise TypeError(f"{type(model).__name__}.{a} must be a positive int, got {v!r}")
