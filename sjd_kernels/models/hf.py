"""Hugging Face ``transformers`` causal LMs as decoding models (``sjd_kernels.models.protocol``).

``HFImageLM`` wraps a causal LM whose vocabulary holds the image codes (Llama-style models,
Chameleon and its descendants Anole / Lumina-mGPT, where codes 0..8191 are ids 4..8195 of
65536). It

- embeds image codes ``0..V-1`` as their model ids, and codes ``V + k`` as the structural
  token ``extra_token_ids[k]`` (row ends, end of image), which the op forces (``forced``);
- computes logits for the image slice only, applying the LM head rows of the image ids
  itself to the decoder's hidden states (Chameleon's own forward sets image logits to the
  dtype's minimum, so its logits cannot be used; an image-only head also skips most of the
  head's weight reads on large vocabularies, SPEC section 2);
- runs the decoder on the loop's static per-row KV cache: a small bridge presents
  ``StaticKVCache`` to the attention layers as a ``transformers`` cache (``update`` writes the
  new K/V at each row's own slots and returns the whole layer), and the per-row mask is passed
  as a ready 4-D mask, which ``transformers`` uses as given.

Prompts are token ids of the full vocabulary: ``cond`` a LongTensor ``[B, L]`` or a list of B
id sequences (lengths may differ); ``uncond`` the same for the CFG rows (default: the
adapter's ``uncond_prompt`` for every request).

Written against transformers 5.x (``cache=`` keyword) and 4.x (``past_key_values=``); tested
offline with tiny random Llama and Chameleon configs (tests/test_hf_adapters.py).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .protocol import Prefix


class _CacheBridge:
    """A ``StaticKVCache`` seen by ``transformers`` attention layers during one forward."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache, slots: torch.Tensor):
        self.cache = cache
        self.slots = slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.cache.write(layer_idx, key_states, value_states, self.slots)
        k, v = self.cache.layer(layer_idx)
        return k.to(key_states.dtype), v.to(value_states.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:     # only read when position ids are missing
        return 0


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class HFImageLM(nn.Module):
    """A ``transformers`` causal LM restricted to its image tokens, for ``sjd_kernels.generate``.

    ``image_token_ids``: model id of each image code (``[V]``, code order; a contiguous range
    makes the image head a view of the LM head). ``extra_token_ids``: model ids reachable as codes
    ``V, V+1, ..`` (structural tokens to force). ``uncond_prompt``: default CFG prompt (ids).
    ``max_image_tokens``: optional limit checked by ``generate``.
    """

    def __init__(self, model: nn.Module, image_token_ids, *, extra_token_ids: Sequence[int] = (),
                 uncond_prompt: Sequence[int] | None = None, max_image_tokens: int | None = None):
        super().__init__()
        self.hf = model
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None or not hasattr(self.lm_head, "weight"):
            raise TypeError(f"{type(model).__name__} has no output embedding (LM head) to take image rows from")
        cfg = _text_config(model.config)
        full_vocab = self.lm_head.weight.shape[0]
        ids = torch.as_tensor(image_token_ids, dtype=torch.int64).reshape(-1)
        if ids.numel() < 1 or int(ids.min()) < 0 or int(ids.max()) >= full_vocab or ids.unique().numel() != ids.numel():
            raise ValueError(f"image_token_ids must be {ids.numel()} distinct ids in [0, {full_vocab})")
        extra = torch.as_tensor(list(extra_token_ids), dtype=torch.int64).reshape(-1)
        if extra.numel() and (int(extra.min()) < 0 or int(extra.max()) >= full_vocab):
            raise ValueError(f"extra_token_ids must lie in [0, {full_vocab}), got {extra.tolist()}")
        lo = int(ids[0])
        self._offset = lo if torch.equal(ids, torch.arange(lo, lo + ids.numel())) else None
        dev = self.lm_head.weight.device
        self.register_buffer("image_ids", ids.to(dev), persistent=False)
        self.register_buffer("extra_ids", extra.to(dev), persistent=False)
        self.vocab_size = int(ids.numel())
        self.num_extra_tokens = int(extra.numel())
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.max_image_tokens = max_image_tokens
        self.uncond_prompt = None if uncond_prompt is None else [int(t) for t in uncond_prompt]
        self._softcap = getattr(cfg, "final_logit_softcapping", None)
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def _attn_impl(self) -> str:
        return getattr(_text_config(self.hf.config), "_attn_implementation", None) or "eager"

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # -- embeddings
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Image codes ``[0, V)`` and structural codes ``[V, V + extra)`` -> input embeddings."""
        V = self.vocab_size
        model_ids = self.image_ids[ids.clamp(0, V - 1)]
        if self.num_extra_tokens:
            model_ids = torch.where(ids >= V, self.extra_ids[(ids - V).clamp(0, self.num_extra_tokens - 1)], model_ids)
        return self.hf.get_input_embeddings()(model_ids)

    def _ids_list(self, x, name: str) -> list[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            if x.dim() == 1:
                x = x.unsqueeze(0)
            if x.dim() != 2 or x.is_floating_point():
                raise ValueError(f"{name} must be token ids [B, L] or a list of id sequences, got {x.dtype} "
                                 f"{list(x.shape)}")
            rows = list(x.to(torch.int64))
        else:
            rows = [torch.as_tensor(r, dtype=torch.int64).reshape(-1) for r in x]
        full = self.lm_head.weight.shape[0]
        for i, r in enumerate(rows):
            if r.numel() < 1:
                raise ValueError(f"{name}[{i}] is empty: every prompt needs at least one token")
            if int(r.min()) < 0 or int(r.max()) >= full:
                raise ValueError(f"{name}[{i}] has ids outside [0, {full})")
        return rows

    def prefix(self, cond, cfg: bool, uncond=None) -> Prefix:
        rows = self._ids_list(cond, "cond")
        B = len(rows)
        if cfg:
            if uncond is None:
                if self.uncond_prompt is None:
                    raise ValueError("CFG needs unconditional prompts: pass uncond= or set the adapter's uncond_prompt")
                u = [torch.tensor(self.uncond_prompt, dtype=torch.int64)] * B
            else:
                u = self._ids_list(uncond, "uncond")
                if len(u) != B:
                    raise ValueError(f"uncond must have one prompt per request ({B}), got {len(u)}")
            rows = rows + u
        lengths = torch.tensor([r.numel() for r in rows], dtype=torch.int64)
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, :r.numel()] = r
        emb = self.hf.get_input_embeddings()(ids.to(self.device))
        return Prefix(emb, lengths.to(self.device))

    # -- forward
    def image_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LM head rows (and bias) of the image ids, ``[V, d]``: a view when the ids are contiguous."""
        w, b = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        if self._offset is not None:
            sl = slice(self._offset, self._offset + self.vocab_size)
            return w[sl], (None if b is None else b[sl])
        return w.index_select(0, self.image_ids), (None if b is None else b.index_select(0, self.image_ids))

    def _mask4d(self, mask: torch.Tensor, dtype) -> torch.Tensor:
        m = mask.unsqueeze(1)                                            # [R, 1, T, S]
        if self._attn_impl == "sdpa":
            return m
        if self._attn_impl != "eager":
            raise NotImplementedError(f"attention implementation {self._attn_impl!r}: use 'sdpa' or 'eager' "
                                      "(per-row cache masks are passed as 4-D masks)")
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache=None, mask=None,
                write_slots=None) -> torch.Tensor:
        """Image logits ``[R, T, V]`` (see ``sjd_kernels.models.protocol``)."""
        kw = dict(inputs_embeds=inputs_embeds, position_ids=positions, use_cache=cache is not None)
        if cache is not None:
            kw[self._cache_kw] = _CacheBridge(cache, write_slots)
        if mask is not None:
            kw["attention_mask"] = self._mask4d(mask, inputs_embeds.dtype)
        h = self.decoder(**kw).last_hidden_state
        w, b = self.image_head()
        logits = F.linear(h, w, b)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits


def chameleon_image_ids(model) -> list[int]:
    """Model ids of Chameleon's image codes in code order (from the model's vocabulary map)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    vm = getattr(base, "vocabulary_mapping", None)
    if vm is None:
        raise TypeError(f"{type(model).__name__} has no vocabulary_mapping: pass image_token_ids explicitly")
    img2bpe = vm.img2bpe
    if not img2bpe:
        raise ValueError("the model's vocabulary map has no IMGIMG image tokens")
    codes = sorted(img2bpe)
    if codes != list(range(len(codes))):
        raise ValueError("image codes in the vocabulary map are not 0..K-1")
    return [int(img2bpe[c]) for c in codes]


def from_chameleon(model, *, extra_token_ids: Sequence[int] = (), uncond_prompt=None,
                   max_image_tokens: int | None = None) -> HFImageLM:
    """``HFImageLM`` of a ``ChameleonForConditionalGeneration`` (Chameleon, Anole, Lumina-mGPT)."""
    return HFImageLM(model, chameleon_image_ids(model), extra_token_ids=extra_token_ids,
                     uncond_prompt=uncond_prompt, max_image_tokens=max_image_tokens)


def grid_forced(batch: int, height: int, width: int, vocab_size: int, *, row_end: bool = True,
                tail: Sequence[int] = (), device="cpu") -> torch.Tensor:
    """Forced-token layout ``[B, L]`` for images written row by row with a row-end token (Lumina-mGPT).

    Each row holds ``width`` image codes, then (with ``row_end``) code ``vocab_size`` (the
    adapter's ``extra_token_ids[0]``); ``tail`` appends further forced codes (e.g. ``vocab_size + 1``
    for end-of-image). ``L = height * (width + row_end) + len(tail)``; pass ``num_tokens = L``.
    """
    row = [-1] * width + ([vocab_size] if row_end else [])
    f = torch.tensor(row * height + list(tail), dtype=torch.int64, device=device)
    return f.expand(batch, -1).contiguous()
