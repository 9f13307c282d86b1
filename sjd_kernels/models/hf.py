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

Model-specific constructors (all take a loaded ``transformers`` model; nothing is downloaded here):

- ``from_chameleon`` (``ChameleonForConditionalGeneration``: Chameleon, Anole, Lumina-mGPT): image
  ids from the model's vocabulary map; structural tokens (row end, end of image) passed as
  ``extra_token_ids`` and forced with ``grid_forced``.
- ``from_emu3`` (``Emu3ForConditionalGeneration``, Emu3-Gen): the ``<|visual token......|>`` ids
  of the vocabulary map, codes ``V, V+1, V+2`` = EOL ``<|extra_200|>``, EOF ``<|extra_201|>``,
  ``<|image end|>``; ``emu3_forced(B, H, W, V)`` is Emu3's layout (H rows of W codes + EOL, then
  EOF and image end). CFG uses a negative prompt (``uncond=``).
- ``from_janus`` / ``JanusImageLM`` (``JanusForConditionalGeneration``, Janus and Janus-Pro): a
  separate image vocabulary (16384 VQ codes) with its own input embedding
  (``generation_embeddings`` + ``generation_aligner``) and head (``generation_head``); 576 codes
  per 384 x 384 image, no row ends; CFG rows default to Janus's masked prompt (all but BOS / BOI
  replaced by PAD).

Usage with weights (bf16 on a GPU; prompts from the models' own processors)::

    import torch, transformers
    from sjd_kernels import generate
    from sjd_kernels.models.hf import from_emu3, emu3_forced, from_janus

    # Emu3-Gen
    m = transformers.Emu3ForConditionalGeneration.from_pretrained("BAAI/Emu3-Gen-hf", dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa").cuda().eval()
    proc = transformers.Emu3Processor.from_pretrained("BAAI/Emu3-Gen-hf")
    x = proc(text=["a red fox in snow"], return_for_image_generation=True, return_tensors="pt")
    neg = proc(text=["lowres, blurry"], return_for_image_generation=True, return_tensors="pt")
    H, W = map(int, x["image_sizes"][0])                # the token grid
    a = from_emu3(m)
    out = generate(a, x.input_ids, H * (W + 1) + 2, "coupling", window=16, cfg_scale=3.0,
                   uncond=neg.input_ids, forced=emu3_forced(1, H, W, a.vocab_size, device="cuda"))
    codes = out.tokens[:, :H * (W + 1)].view(1, H, W + 1)[..., :W]     # VQ codes; drop the EOL column
    image = m.model.vqmodel.decode(codes)

    # Janus-Pro
    m = transformers.JanusForConditionalGeneration.from_pretrained("deepseek-community/Janus-Pro-1B",
                                                                   dtype=torch.bfloat16).cuda().eval()
    proc = transformers.JanusProcessor.from_pretrained("deepseek-community/Janus-Pro-1B")
    x = proc(text=["a red fox in snow"], generation_mode="image", return_tensors="pt")
    out = generate(from_janus(m), x.input_ids, 576, "coupling", window=16, cfg_scale=5.0)
    image = m.decode_image_tokens(out.tokens)

Written against transformers 5.x (``cache=`` keyword) and 4.x (``past_key_values=``); tested
offline with tiny random Llama and Chameleon configs (tests/test_hf_adapters.py) and Emu3 and
Janus configs (tests/test_hf_emu3_janus.py, against the models' own ``generate``); the Emu3 and
Janus tests are skipped, with the reason, on a ``transformers`` without those classes.
"""
from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._common import INT_DTYPES, SJDInputError, as_int, check_int, check_tensor, host_checks
from .protocol import Prefix, check_forward


class _CacheBridge:
    """A ``StaticKVCache`` seen by ``transformers`` attention layers during one forward.

    ``is_sliding``: per layer, as ``transformers`` caches give it (its mask builders look for the first
    sliding layer); the masks themselves are the adapter's 4-D per-row masks."""

    is_compileable = False

    def __init__(self, cache, slots: torch.Tensor, is_sliding: list):
        self.cache = cache
        self.slots = slots
        self.is_sliding = is_sliding

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.cache.write(layer_idx, key_states, value_states, self.slots)
        k, v = self.cache.layer(layer_idx)
        return k.to(key_states.dtype), v.to(value_states.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:     # only read when position ids are missing
        return 0


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _id_seq(x, name: str, full: int, empty_ok: bool = False) -> torch.Tensor:
    """``x`` (a sequence or 1-D tensor of integer ids) as a 1-D int64 tensor, every id in ``[0, full)``;
    floats, bools, nested or flat scalars, and (unless ``empty_ok``) empty sequences are SJDInputErrors."""
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or isinstance(x, (str, bytes)) or t.dim() != 1:
        raise SJDInputError(f"{name} must be a sequence of token ids (a list or 1-D tensor), got {x!r:.80}")
    if t.numel() == 0:
        if empty_ok:
            return t.to(torch.int64)
        raise SJDInputError(f"{name} is empty: every prompt needs at least one token")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise SJDInputError(f"{name} must hold integer token ids, got {t.dtype}")
    if int(t.min()) < 0 or int(t.max()) >= full:
        raise SJDInputError(f"{name} has ids outside [0, {full}): got [{int(t.min())}, {int(t.max())}]")
    return t.to(torch.int64)


def _sliding_layers(cfg, num_layers: int) -> tuple[list, int | None]:
    """``(per layer whether it attends within cfg.sliding_window, that window or None when no layer does)``:
    ``layer_types`` when the config lists them, else every layer when a window is set, as in Mistral.
    Other attention kinds (chunked, linear) are refused: the adapter's masks are plain causal masks over
    the cache."""
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types is None:
        return [window is not None] * num_layers, None if window is None else int(window)
    other = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise SJDInputError(f"layer types {other} are not supported: the adapter passes causal per-row masks "
                            f"over its cache (full or sliding-window attention only)")
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and window is None:
        raise SJDInputError("the config lists sliding_attention layers but no sliding_window")
    return sliding, int(window) if any(sliding) else None


def _position_limit(cfg, decoder) -> int | None:
    """Positions the model can take, when it adds a learned position table (GPT-2's ``wpe``, OPT's
    ``embed_positions``; None for rotary and other computed positions). ALiBi models are refused: they
    build their bias from a 2-D padding mask, where the adapter passes per-row 4-D masks."""
    mt = getattr(cfg, "model_type", "")
    if mt in ("bloom", "mpt") or getattr(cfg, "alibi", False):
        raise SJDInputError(f"{mt or type(cfg).__name__}: ALiBi attention is not supported (its bias is built from a "
                            f"2-D padding mask; the adapter passes per-row 4-D cache masks)")
    for name in ("wpe", "embed_positions", "position_embeddings"):
        table = getattr(decoder, name, None)
        if isinstance(table, nn.Embedding):
            return int(table.num_embeddings) - int(getattr(table, "offset", 0) or 0)
    return None


def _max_tokens(v):
    return None if v is None else check_int("max_image_tokens", v, 1)


def _logit_multiplier(cfg) -> float | None:
    """The factor some families apply to the LM head's output before any soft-capping (None: none):
    Cohere's ``logit_scale`` (times), Granite's ``logits_scaling`` (divided by), ``output_multiplier``
    (times). Left out, the target law would be the model's at another temperature."""
    mult = 1.0
    for name, invert in (("logit_scale", False), ("logits_scaling", True), ("output_multiplier", False)):
        v = getattr(cfg, name, None)
        if v is None:
            continue
        v = float(v)
        if not (math.isfinite(v) and v > 0):
            raise SJDInputError(f"the model's config.{name} = {v} is not a finite positive logit scale")
        mult = mult / v if invert else mult * v
    return None if mult == 1.0 else mult


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
        ids = _id_seq(image_token_ids, "image_token_ids", 2 ** 62)              # integers; the range below
        if int(ids.min()) < 0 or int(ids.max()) >= full_vocab or ids.unique().numel() != ids.numel():
            raise SJDInputError(f"image_token_ids must be {ids.numel()} distinct ids in [0, {full_vocab})")
        extra = _id_seq(extra_token_ids, "extra_token_ids", 2 ** 62, empty_ok=True)
        if extra.numel() and (int(extra.min()) < 0 or int(extra.max()) >= full_vocab):
            raise SJDInputError(f"extra_token_ids must lie in [0, {full_vocab}), got {extra.tolist()}")
        lo = int(ids[0])
        self._offset = lo if torch.equal(ids, torch.arange(lo, lo + ids.numel(), device=ids.device)) else None
        dev = self.lm_head.weight.device
        self.register_buffer("image_ids", ids.to(dev), persistent=False)
        self.register_buffer("extra_ids", extra.to(dev), persistent=False)
        self.vocab_size = int(ids.numel())
        self.num_extra_tokens = int(extra.numel())
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.hidden_size = int(cfg.hidden_size)
        # layers that attend within a window: the per-row masks cover the whole cache, so a cache (or an
        # uncached input) longer than the window would let them see past it (checked in forward)
        self._sliding, self.sliding_window = _sliding_layers(cfg, self.num_layers)
        self._pos_limit = _position_limit(cfg, self.decoder)
        self.max_image_tokens = _max_tokens(max_image_tokens)
        self.uncond_prompt = (None if uncond_prompt is None
                              else _id_seq(uncond_prompt, "uncond_prompt", full_vocab).tolist())
        self._softcap = getattr(cfg, "final_logit_softcapping", None)
        self._logit_mult = _logit_multiplier(cfg)
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
    def _check_ids(self, ids) -> None:
        """``ids`` integer, in ``[0, V + extra)`` (values checked on the host for CPU tensors only; on a
        GPU out-of-range ids are clamped)."""
        check_tensor("ids", ids, dtypes=INT_DTYPES, last_contiguous=False)
        hi = self.vocab_size + self.num_extra_tokens
        if host_checks(ids) and ids.numel() and bool(((ids < 0) | (ids >= hi)).any()):
            raise SJDInputError(f"ids must be codes in [0, {hi}) ({self.vocab_size} image codes + "
                                f"{self.num_extra_tokens} structural), got values in "
                                f"[{int(ids.min())}, {int(ids.max())}]")

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Image codes ``[0, V)`` and structural codes ``[V, V + extra)`` -> input embeddings."""
        self._check_ids(ids)
        V = self.vocab_size
        model_ids = self.image_ids[ids.clamp(0, V - 1)]
        if self.num_extra_tokens:
            model_ids = torch.where(ids >= V, self.extra_ids[(ids - V).clamp(0, self.num_extra_tokens - 1)], model_ids)
        return self.hf.get_input_embeddings()(model_ids)

    def _ids_list(self, x, name: str) -> list[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            if x.dim() == 1:
                x = x.unsqueeze(0)
            if x.dim() != 2 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise SJDInputError(f"{name} must be token ids [B, L] or a list of id sequences, got {x.dtype} "
                                    f"{list(x.shape)}")
        elif isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
            raise SJDInputError(f"{name} must be token ids [B, L] or a list of id sequences, got "
                                f"{type(x).__name__}")
        full = self.lm_head.weight.shape[0]
        rows = [_id_seq(r, f"{name}[{i}]", full) for i, r in enumerate(x)]
        if not rows:
            raise SJDInputError(f"{name} must hold at least one prompt, got none")
        return rows

    def prefix(self, cond, cfg: bool, uncond=None) -> Prefix:
        rows = self._ids_list(cond, "cond")
        B = len(rows)
        if cfg:
            if uncond is None:
                if self.uncond_prompt is None:
                    raise SJDInputError("CFG needs unconditional prompts: pass uncond= or set the adapter's uncond_prompt")
                u = [torch.tensor(self.uncond_prompt, dtype=torch.int64)] * B
            else:
                u = self._ids_list(uncond, "uncond")
                if len(u) != B:
                    raise SJDInputError(f"uncond must have one prompt per request ({B}), got {len(u)}")
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
        check_forward(self, self.hidden_size, inputs_embeds, positions, cache, mask, write_slots)
        if self.sliding_window is not None:
            span = mask.shape[-1] if mask is not None else inputs_embeds.shape[1]
            if span > self.sliding_window:
                n = sum(self._sliding)
                raise SJDInputError(
                    f"{n} of the model's {self.num_layers} layers attend within a sliding window of "
                    f"{self.sliding_window} tokens, and this forward spans {span} cache slots or inputs: the "
                    f"adapter's masks do not apply the window, so those layers would see past it. Keep prompt + "
                    f"image tokens + window (the cache) within {self.sliding_window} tokens")
        if self._pos_limit is not None:
            self._check_positions(positions, mask, inputs_embeds.shape[1])
        kw = dict(inputs_embeds=inputs_embeds, position_ids=positions, use_cache=cache is not None)
        if cache is not None:
            kw[self._cache_kw] = _CacheBridge(cache, write_slots, self._sliding)
        if mask is not None:
            kw["attention_mask"] = self._mask4d(mask, inputs_embeds.dtype)
        return self.image_logits(self.decoder(**kw).last_hidden_state)

    def _check_positions(self, positions: torch.Tensor, mask, inputs: int) -> None:
        """Positions past a learned table would index out of it (an IndexError inside the model, a device
        assert on a GPU). On the CPU the positions fed are checked; on a GPU (no host sync) the span of
        the cache or the inputs bounds them, so a cache longer than the table is refused there."""
        lim = self._pos_limit
        if host_checks(positions):
            top = int(positions.max()) if positions.numel() else -1
            if top >= lim:
                raise SJDInputError(
                    f"the model has a learned table of {lim} positions, and this forward feeds position {top}: "
                    f"it would index out of the table. Keep prompt + image tokens + window within {lim} tokens")
            return
        span = mask.shape[-1] if mask is not None else inputs
        if span > lim:
            raise SJDInputError(
                f"the model has a learned table of {lim} positions, and this forward spans {span} cache slots or "
                f"inputs (on a GPU the positions are not read, to keep the step free of host syncs, and the span "
                f"bounds them): keep the cache (prompt + image tokens + window, or cache_len) within {lim} tokens")

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The image-only head: decoder hidden states ``[..., d]`` -> image logits ``[..., V]``."""
        w, b = self.image_head()
        logits = F.linear(hidden, w, b)
        if self._logit_mult is not None:
            logits = logits * self._logit_mult
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
    batch, height, width, vocab_size = (check_int(n, v, 1) for n, v in (
        ("batch", batch), ("height", height), ("width", width), ("vocab_size", vocab_size)))
    tail = [check_int("tail", t, 0) for t in tail]
    row = [-1] * width + ([vocab_size] if row_end else [])
    f = torch.tensor(row * height + list(tail), dtype=torch.int64, device=device)
    return f.expand(batch, -1).contiguous()


# ---- Emu3 (``Emu3ForConditionalGeneration``): visual tokens of the text vocabulary, EOL row ends
EMU3_EOL, EMU3_EOF, EMU3_EOI = "<|extra_200|>", "<|extra_201|>", "<|image end|>"


def _emu3_mapping(model):
    vm = getattr(model, "vocabulary_mapping", None)
    if vm is None:
        base = getattr(model, "model", None)
        vm = getattr(base, "vocabulary_mapping", None)
    if vm is None or not hasattr(vm, "vocab_map"):
        raise TypeError(f"{type(model).__name__} has no Emu3 vocabulary_mapping: pass image_token_ids to HFImageLM")
    return vm


def emu3_image_ids(model) -> list[int]:
    """Model ids of Emu3's visual tokens (``<|visual token000000|>`` ..) in VQ code order."""
    img2bpe = _emu3_mapping(model).img2bpe
    if not img2bpe:
        raise ValueError("the model's vocabulary map has no '<|visual token......|>' entries")
    codes = sorted(img2bpe)
    if codes != list(range(len(codes))):
        raise ValueError("visual token codes in the vocabulary map are not 0..K-1")
    return [int(img2bpe[c]) for c in codes]


def from_emu3(model, *, extra_token_ids: Sequence[int] | None = None, uncond_prompt=None,
              max_image_tokens: int | None = None) -> HFImageLM:
    """``HFImageLM`` of an ``Emu3ForConditionalGeneration`` (Emu3-Gen).

    Codes ``0..V-1`` are the VQ codes (visual tokens); by default codes ``V, V+1, V+2`` are the
    row end ``<|extra_200|>`` (EOL), ``<|extra_201|>`` (EOF) and ``<|image end|>``, looked up in
    the model's vocabulary map; force them with ``emu3_forced``. Emu3's own forward does not mask
    logits; the adapter still applies only the visual rows of the LM head.
    """
    ids = emu3_image_ids(model)
    if extra_token_ids is None:
        vm = _emu3_mapping(model).vocab_map
        missing = [t for t in (EMU3_EOL, EMU3_EOF, EMU3_EOI) if t not in vm]
        if missing:
            raise ValueError(f"the vocabulary map lacks {missing}: pass extra_token_ids (row end first)")
        extra_token_ids = [int(vm[t]) for t in (EMU3_EOL, EMU3_EOF, EMU3_EOI)]
    return HFImageLM(model, ids, extra_token_ids=extra_token_ids, uncond_prompt=uncond_prompt,
                     max_image_tokens=max_image_tokens)


def emu3_forced(batch: int, height: int, width: int, vocab_size: int, *, tail: bool = True,
                device="cpu") -> torch.Tensor:
    """Emu3's image layout after the prompt's ``<|image token|>``: ``height`` rows of ``width`` codes
    each followed by EOL (code V), then (``tail``) EOF and ``<|image end|>`` (codes V+1, V+2), as in
    Emu3's ``prefix_allowed_tokens_fn``. ``num_tokens = height * (width + 1) + 2 * tail``."""
    vocab_size = check_int("vocab_size", vocab_size, 1)
    return grid_forced(batch, height, width, vocab_size, row_end=True,
                       tail=(vocab_size + 1, vocab_size + 2) if tail else (), device=device)


# ---- Janus / Janus-Pro (``JanusForConditionalGeneration``): a separate image vocabulary
class JanusImageLM(HFImageLM):
    """Janus image generation: the text decoder with Janus's generation embeddings and head.

    Janus writes images in their own vocabulary of ``vq_config.num_embeddings`` VQ codes (16384):
    a code enters as ``generation_aligner(generation_embeddings(code))`` and the next code's
    logits are ``generation_head(hidden)`` (an MLP, not the text LM head, so nothing is masked and
    no slice is needed). No row ends: an image is ``vision_config.num_image_tokens`` codes (576,
    24 x 24 for 384 x 384 pixels), the default ``max_image_tokens``. The prompt (text ids, ending
    with ``<begin_of_image>``) goes through the text embeddings.

    CFG: without ``uncond`` / ``uncond_prompt`` the unconditional row of a request is its own
    prompt with every id except BOS and BOI replaced by PAD, as Janus's ``generate`` does (ids from
    ``uncond_keep_ids`` / ``uncond_pad_token_id``, default: the model's generation config).
    """

    def __init__(self, model: nn.Module, *, uncond_prompt: Sequence[int] | None = None,
                 uncond_pad_token_id: int | None = None, uncond_keep_ids: Sequence[int] | None = None,
                 max_image_tokens: int | None = None):
        nn.Module.__init__(self)
        base = getattr(model, "model", None)
        parts = {n: getattr(base, n, None) for n in ("generation_embeddings", "generation_aligner", "generation_head")}
        if any(p is None for p in parts.values()):
            raise TypeError(f"{type(model).__name__} is not a Janus model: it lacks model."
                            f"{'/'.join(n for n, p in parts.items() if p is None)}")
        self.hf = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()        # text head: prompt vocabulary, device, dtype
        if self.lm_head is None or not hasattr(self.lm_head, "weight"):
            raise TypeError(f"{type(model).__name__} has no text LM head (needed for the prompt vocabulary)")
        self.gen_embed, self.gen_aligner, self.gen_head = parts.values()
        cfg = _text_config(model.config)
        V = int(self.gen_head.vision_head.out_features)
        if self.gen_embed.num_embeddings != V:
            raise ValueError(f"vocabulary mismatch: generation_embeddings has {self.gen_embed.num_embeddings} codes, "
                             f"generation_head predicts {V}")
        d = int(cfg.hidden_size)
        d_in = int(self.gen_head.proj_out.in_features)
        with torch.no_grad():
            d_emb = int(self.gen_aligner(self.gen_embed.weight[:1]).shape[-1])
        if d_in != d or d_emb != d:
            raise ValueError(f"hidden size mismatch: decoder {d}, generation_head input {d_in}, "
                             f"generation_aligner output {d_emb}")
        self.vocab_size = V
        self.num_extra_tokens = 0
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        if max_image_tokens is None:
            vis = getattr(model.config, "vision_config", None)
            max_image_tokens = getattr(vis, "num_image_tokens", None)
        self.hidden_size = d
        self._sliding, self.sliding_window = _sliding_layers(cfg, self.num_layers)
        self._pos_limit = _position_limit(cfg, self.decoder)
        self.max_image_tokens = _max_tokens(max_image_tokens)
        full = self.lm_head.weight.shape[0]
        self.uncond_prompt = None if uncond_prompt is None else _id_seq(uncond_prompt, "uncond_prompt", full).tolist()
        gc = getattr(model, "generation_config", None)
        if uncond_pad_token_id is None:
            uncond_pad_token_id = getattr(gc, "pad_token_id", None)
        if uncond_keep_ids is None:
            boi = (getattr(gc, "generation_kwargs", None) or {}).get("boi_token_id")
            uncond_keep_ids = [t for t in (getattr(gc, "bos_token_id", None), boi) if t is not None]
        keep = [as_int(t) for t in uncond_keep_ids]
        pad = None if uncond_pad_token_id is None else as_int(uncond_pad_token_id)
        if uncond_pad_token_id is not None and (pad is None or not 0 <= pad < full) \
                or any(t is None or not 0 <= t < full for t in keep):
            raise SJDInputError(f"uncond_pad_token_id and uncond_keep_ids must lie in [0, {full}) (integer ids), "
                                f"got {uncond_pad_token_id!r} and {list(uncond_keep_ids)!r}")
        self.uncond_pad_token_id = pad
        self.uncond_keep_ids = keep
        self._softcap = None
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Image codes ``[0, V)`` -> ``generation_aligner(generation_embeddings(code))``."""
        self._check_ids(ids)
        return self.gen_aligner(self.gen_embed(ids.clamp(0, self.vocab_size - 1)))

    def image_head(self):
        raise NotImplementedError("Janus's generation_head is an MLP, not rows of a linear head: use image_logits")

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gen_head(hidden)

    def uncond_of(self, cond) -> list[torch.Tensor]:
        """Janus's unconditional prompts: ``cond`` with every id except BOS / BOI replaced by PAD."""
        if self.uncond_pad_token_id is None:
            raise SJDInputError("CFG needs unconditional prompts: pass uncond=, set uncond_prompt, or give the "
                                "adapter uncond_pad_token_id (no pad_token_id in the model's generation config)")
        rows = self._ids_list(cond, "cond")
        keep = torch.tensor(self.uncond_keep_ids, dtype=torch.int64, device=rows[0].device)
        return [torch.where(torch.isin(r, keep), r, torch.full_like(r, self.uncond_pad_token_id)) for r in rows]

    def prefix(self, cond, cfg: bool, uncond=None) -> Prefix:
        if cfg and uncond is None and self.uncond_prompt is None:
            uncond = self.uncond_of(cond)
        return super().prefix(cond, cfg, uncond)


def from_janus(model, **kw) -> JanusImageLM:
    """``JanusImageLM`` of a ``JanusForConditionalGeneration`` (Janus, Janus-Pro); see its arguments."""
    return JanusImageLM(model, **kw)
