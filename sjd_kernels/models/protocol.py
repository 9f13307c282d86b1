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

import json

import torch

from ..ops._common import ANY_FLOAT_DTYPES, INT_DTYPES, SJDInputError, check_tensor


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
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise TypeError(f"{type(model).__name__}.{a} must be a positive int, got {v!r}")


def check_forward(model, d: int, inputs_embeds, positions, cache, mask, write_slots) -> None:
    """The arguments of ``model.forward`` (``d``: the model's embedding width), checked before anything
    runs or is written: shapes, dtypes and devices only (no host synchronisation); a
    ``StaticKVCache`` also checks its geometry against the model and, on the CPU, the slots' values.
    A cache needs ``write_slots`` and ``mask`` (without them attention would not see the cache's rows)."""
    check_tensor("inputs_embeds", inputs_embeds, dtypes=ANY_FLOAT_DTYPES, dim=3, shape=(None, None, d),
                 last_contiguous=False)
    R, T, _ = inputs_embeds.shape
    dev = inputs_embeds.device
    check_tensor("positions", positions, dtypes=INT_DTYPES, dim=2, shape=(R, T), device=dev, last_contiguous=False)
    S = T
    if cache is None:
        if write_slots is not None:
            raise SJDInputError("write_slots is given without a cache: pass cache= too, or neither")
    else:
        if write_slots is None or mask is None:
            raise SJDInputError("write_slots and mask are required with a cache (write_slots [R, T] where the new "
                                "K/V go, mask [R, T, S] over the cache's slots)")
        kv = getattr(cache, "kv", None)
        if isinstance(kv, torch.Tensor) and hasattr(cache, "check_slots"):       # a StaticKVCache
            want = (model.num_layers, 2, R, model.num_kv_heads, None, model.head_dim)
            if kv.dim() != 6 or any(w is not None and w != k for w, k in zip(want, kv.shape)):
                raise SJDInputError(f"cache has shape {list(kv.shape)} [layers, 2, rows, kv_heads, max_len, "
                                    f"head_dim]: the model and inputs need {[w if w else 'S' for w in want]}")
            cache.check_slots(write_slots, T, "write_slots")
            S = kv.shape[4]
        else:
            check_tensor("write_slots", write_slots, dtypes=INT_DTYPES, dim=2, shape=(R, T), device=dev,
                         last_contiguous=False)
            S = mask.shape[-1] if isinstance(mask, torch.Tensor) else S
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), dim=3, device=dev, last_contiguous=False)
        if mask.shape[0] not in (1, R) or tuple(mask.shape[1:]) != (T, S):
            raise SJDInputError(f"mask must have shape [R={R} (or 1), T={T}, S={S}] (S = the cache's slots, or T "
                                f"without a cache), got {list(mask.shape)}")


def read_json(path, error: type, required=()) -> dict:
    """The JSON object in ``path`` (a checkpoint's or manifest's metadata). A damaged file (not JSON,
    not an object, or without the ``required`` keys) raises ``error`` naming the file."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}): the file is damaged (restore it or write it again)") from None
    if not isinstance(d, dict):
        raise error(f"{path} holds a JSON {type(d).__name__}, not the object of a checkpoint's metadata")
    missing = [k for k in required if k not in d]
    if missing:
        raise error(f"{path} lacks the entries {missing}: the file is damaged or from another version")
    return d
