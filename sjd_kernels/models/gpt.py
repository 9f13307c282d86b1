"""A LlamaGen-style GPT for image tokens, written in the package.

Class-conditional (a table of ``num_classes + 1`` condition embeddings, the last row being the
null condition used for classifier-free guidance) or conditioned on a given embedding
(``cond_dim``: a linear projection of a text/image embedding; a NaN row, or ``null_condition``,
selects a learned null vector). RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP,
and an untied LM head over the image codes only. The condition sits at model position 0 and
image token ``i`` at position ``i + 1``.

Entry points:
- ``forward_train(cond, tokens)``: teacher forcing, logits ``[B, N, V]`` predicting tokens
  0..N-1 from ``[cond, tok_0 .. tok_{N-2}]``.
- ``forward(inputs_embeds, positions, cache=None, mask=None, write_slots=None)``: logits for
  given input embeddings. ``embed_tokens(ids)`` / ``embed_cond(cond)`` are separate so callers
  can feed their own embeddings: SJD2 adds its noise and per-position level embedding to
  ``embed_tokens`` output before calling ``forward`` (the level table lives with the SJD2
  fine-tune, ``sjd_kernels.sjd2``, so a base checkpoint has no SJD2 tensors).
- the decoding protocol of ``sjd_kernels.models.protocol`` (``prefix``, ``vocab_size``, ...),
  used by ``sjd_kernels.decoding.generate`` with a static per-row KV cache.

``save_gpt`` / ``load_gpt`` store ``<stem>.safetensors`` plus ``<stem>.json`` (config, SHA-256
and size of the weights file); loading checks the hash and every tensor's name and shape.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._common import INT_DTYPES, SJDInputError, check_finite, check_int, check_tensor, host_checks
from .protocol import Prefix, check_forward, read_json

CHECKPOINT_FORMAT = 1


@dataclass
class GPTConfig:
    vocab_size: int                 # image codes V (the LM head's width)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None    # None = n_head (no grouping)
    d_model: int = 192
    max_image_tokens: int = 4096    # longest image (tokens) the model is built for
    num_classes: int = 10           # classes; class id num_classes is the null condition
    cond_dim: int | None = None     # condition on a given embedding [B, cond_dim] instead of a class id
    dropout: float = 0.0            # attention and residual dropout (training only)
    rope_base: float = 10000.0
    grid_width: int | None = None   # image tokens per row (for spatial priors and row-aware tools)
    mlp_ratio: float = 8.0 / 3.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "max_image_tokens", "num_classes",
                     "cond_dim", "grid_width"):
            v = getattr(self, name)
            if v is not None or name not in ("cond_dim", "grid_width"):
                setattr(self, name, check_int(f"GPTConfig.{name}", v, 0 if name == "num_classes" else 1))
        for name, lo in (("dropout", 0.0), ("rope_base", None), ("mlp_ratio", None), ("norm_eps", 0.0)):
            v = check_finite(f"GPTConfig.{name}", getattr(self, name))
            if v < 0.0 or (lo is None and v == 0.0):
                raise SJDInputError(f"GPTConfig.{name} must be {'>= 0' if lo is not None else '> 0'}, got {v!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_head = {self.head_dim} must be even for rotary positions")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.grid_width is not None and (self.grid_width < 1 or self.max_image_tokens % self.grid_width):
            raise ValueError(f"grid_width {self.grid_width} must divide max_image_tokens {self.max_image_tokens}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [R, 1, T, head_dim/2]`` for integer ``positions [R, T]`` (angles in float64)."""
    half = head_dim // 2
    inv = base ** (-torch.arange(half, device=positions.device, dtype=torch.float64) / half)
    ang = positions.to(torch.float64).unsqueeze(-1) * inv
    return ang.cos().to(dtype).unsqueeze(1), ang.sin().to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [R, H, T, D]`` (half-split layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.wkv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)

    def forward(self, x, rope, mask, cache=None, layer: int = 0, write_slots=None):
        """x [R, T, d]; rope (cos, sin); mask [R, T, S] bool (True = may attend) or None for causal."""
        cfg = self.cfg
        R, T, _ = x.shape
        hd = cfg.head_dim
        q = self.wq(x).view(R, T, cfg.n_head, hd).transpose(1, 2)
        k, v = self.wkv(x).view(R, T, 2, cfg.n_kv_head, hd).permute(2, 0, 3, 1, 4)
        q = apply_rope(q, *rope)
        k = apply_rope(k, *rope)
        if cache is not None:
            cache.write(layer, k, v, write_slots)
            k, v = cache.layer(layer)                                         # [R, Hkv, S, D]
        if cfg.n_head != cfg.n_kv_head:
            rep = cfg.n_head // cfg.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        p = cfg.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.unsqueeze(1),
                                               dropout_p=p)
        return self.wo(y.transpose(1, 2).reshape(R, T, cfg.n_head * hd))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        hidden = 8 * ((hidden + 7) // 8)
        self.w13 = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.n2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache=None, layer=0, write_slots=None):
        x = x + self.drop(self.attn(self.n1(x), rope, mask, cache, layer, write_slots))
        return x + self.drop(self.mlp(self.n2(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        if c.cond_dim is None:
            self.cls_emb = nn.Embedding(c.num_classes + 1, c.d_model)
        else:
            self.cond_proj = nn.Linear(c.cond_dim, c.d_model)
            self.null_cond = nn.Parameter(torch.zeros(c.d_model))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # -- the decoding protocol (sjd_kernels.models.protocol)
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.config.n_layer

    @property
    def num_kv_heads(self) -> int:
        return self.config.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def max_image_tokens(self) -> int:
        return self.config.max_image_tokens

    def null_condition(self, batch: int, device=None) -> torch.Tensor:
        """The condition meaning 'no condition' (CFG): class id ``num_classes`` ``[batch]``, or NaN rows."""
        batch = check_int("batch", batch, 0)
        device = device or self.tok_emb.weight.device
        if self.config.cond_dim is None:
            return torch.full((batch,), self.config.num_classes, dtype=torch.int64, device=device)
        return torch.full((batch, self.config.cond_dim), float("nan"), device=device)

    def check_cond(self, cond, name: str = "cond") -> torch.Tensor:
        """``cond`` as a tensor on the model's device, validated (class ids ``[B]`` or ``[B, cond_dim]``;
        an embedding row may be NaN (null) but not infinite). ``name`` is the argument named in errors."""
        dev = self.tok_emb.weight.device
        c = self.config
        try:
            cond = torch.as_tensor(cond, device=dev)
        except (TypeError, ValueError, RuntimeError) as e:
            raise SJDInputError(f"{name} must be a tensor (or list) of conditions, got {type(cond).__name__} "
                                f"({e})") from None
        if c.cond_dim is None:
            if cond.dtype not in INT_DTYPES or cond.dim() != 1:
                raise SJDInputError(f"{name} must be integer class ids [B], got {cond.dtype} {list(cond.shape)}")
            if cond.numel() and ((cond < 0) | (cond > c.num_classes)).any():
                raise SJDInputError(f"{name}: class ids must be in [0, {c.num_classes}] ({c.num_classes} = null), "
                                    f"got {cond.tolist()}")
            return cond.to(torch.int64)
        if not cond.is_floating_point() or cond.dim() != 2 or cond.shape[1] != c.cond_dim:
            raise SJDInputError(f"{name} must be float embeddings [B, {c.cond_dim}], got {cond.dtype} "
                                f"{list(cond.shape)}")
        if host_checks(cond) and bool(cond.isinf().any()):
            rows = cond.isinf().any(-1).nonzero().flatten().tolist()
            raise SJDInputError(f"{name} holds infinite values (rows {rows}); a NaN row is the null condition")
        if host_checks(cond):
            nan = cond.isnan()
            part = nan.any(-1) & ~nan.all(-1)
            if bool(part.any()):
                raise SJDInputError(f"{name} rows {part.nonzero().flatten().tolist()} hold NaN in some entries only; "
                                    f"a row of NaN only is the null condition")
        return cond

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Image-code embeddings: ``ids [..]`` in ``[0, V)`` -> ``[.., d]`` (ids checked on the host for CPU
        tensors only)."""
        check_tensor("ids", ids, dtypes=INT_DTYPES, last_contiguous=False)
        V = self.config.vocab_size
        if host_checks(ids) and ids.numel() and bool(((ids < 0) | (ids >= V)).any()):
            raise SJDInputError(f"ids must be image codes in [0, {V}), got values in [{int(ids.min())}, "
                                f"{int(ids.max())}]")
        return self.tok_emb(ids)

    def embed_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """``[B]`` class ids (or ``[B, cond_dim]``, rows of NaN only = null) -> ``[B, 1, d]``."""
        cond = self.check_cond(cond)
        if self.config.cond_dim is None:
            return self.cls_emb(cond).unsqueeze(1)
        # a row of NaN only is the null condition; a row with some NaN (refused on the host) keeps them,
        # so on a GPU its logits are NaN and the decoding reports the request instead of conditioning on 0s
        null = torch.isnan(cond).all(-1, keepdim=True)
        e = self.cond_proj(torch.where(null, torch.zeros_like(cond), cond).to(self.null_cond.dtype))
        return torch.where(null, self.null_cond.expand_as(e), e).unsqueeze(1)

    def prefix(self, cond, cfg: bool, uncond=None) -> Prefix:
        """Rows ``[cond_0..cond_{B-1}]`` (then, with ``cfg``, ``uncond`` or the null condition): 1 position each."""
        cond = self.check_cond(cond)
        B = cond.shape[0]
        e = self.embed_cond(cond)
        if cfg:
            u = self.null_condition(B) if uncond is None else self.check_cond(uncond, "uncond")
            if u.shape[0] != B:
                raise SJDInputError(f"uncond must have one row per request ({B}), got {u.shape[0]}")
            e = torch.cat([e, self.embed_cond(u)], 0)
        return Prefix(e, torch.ones(e.shape[0], dtype=torch.int64, device=e.device))

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, cache=None, mask=None,
                write_slots=None) -> torch.Tensor:
        """Logits ``[R, T, V]`` for embeddings ``[R, T, d]`` at model ``positions [R, T]``.

        With ``cache``, the new K/V go to ``write_slots [R, T]`` and attention reads the whole
        cache under ``mask [R, T, S]``; without, attention is causal over the given inputs
        (``mask [R, T, T]`` may replace the causal mask).
        """
        check_forward(self, self.config.d_model, inputs_embeds, positions, cache, mask, write_slots)
        w = self.tok_emb.weight
        if inputs_embeds.dtype != w.dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
            raise SJDInputError(f"inputs_embeds must have the model's dtype {w.dtype}, got {inputs_embeds.dtype}")
        x = self.drop(inputs_embeds)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_base, x.dtype)
        for i, blk in enumerate(self.blocks):
            x = blk(x, rope, mask, cache, i, write_slots)
        return self.head(self.norm(x))

    def forward_train(self, cond: torch.Tensor, tokens: torch.Tensor, *,
                      image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits ``[B, N, V]`` for ``tokens [B, N]`` given ``cond``.

        ``image_embeds [B, N-1, d]`` replaces ``embed_tokens(tokens[:, :-1])`` (e.g. noised inputs).
        """
        check_tensor("tokens", tokens, dtypes=INT_DTYPES, dim=2, last_contiguous=False)
        B, N = tokens.shape
        if N < 1:
            raise SJDInputError(f"tokens must hold at least one token per row, got {list(tokens.shape)}")
        if N > self.config.max_image_tokens:
            raise SJDInputError(f"tokens: {N} tokens exceed max_image_tokens {self.config.max_image_tokens}")
        if image_embeds is None:
            img = self.embed_tokens(tokens[:, :-1])
        else:
            img = check_tensor("image_embeds", image_embeds, dim=3, shape=(B, N - 1, self.config.d_model),
                               device=tokens.device, last_contiguous=False)
        c = self.embed_cond(cond)
        if c.shape[0] != B:
            raise SJDInputError(f"cond must have one row per row of tokens ({B}), got {c.shape[0]}")
        x = torch.cat([c.to(img.dtype), img], 1)
        pos = torch.arange(N, device=tokens.device).expand(B, N)
        return self.forward(x, pos)

    # -- checkpoints
    def save_pretrained(self, path) -> dict:
        return save_gpt(self, path)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32) -> "GPT":
        return load_gpt(path, device=device, dtype=dtype)


def drop_condition(cond: torch.Tensor, p: float, num_classes: int, generator=None) -> torch.Tensor:
    """CFG training: replace each request's condition by the null one with probability ``p``.

    Class ids ``[B]`` become ``num_classes``; embedding conditions ``[B, cond_dim]`` become NaN rows
    (the GPT's null vector).
    """
    check_tensor("cond", cond, last_contiguous=False)
    p = check_finite("p", p)
    if not 0.0 <= p <= 1.0:
        raise SJDInputError(f"p must be a probability in [0, 1], got {p!r}")
    if not cond.is_floating_point():
        num_classes = check_int("num_classes", num_classes, 0)
    drop = (torch.rand(cond.shape[0], generator=generator) < p).to(cond.device)
    if cond.is_floating_point():
        return torch.where(drop.view(-1, *([1] * (cond.dim() - 1))), torch.full_like(cond, float("nan")), cond)
    return torch.where(drop, torch.full_like(cond, num_classes), cond)


# ------------------------------------------------------------------------------------------ checkpoints
class GPTCheckpointError(RuntimeError):
    """A GPT checkpoint is missing, altered, or does not match its config."""


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _paths(path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_gpt(model: GPT, path, extra: dict | None = None) -> dict:
    """Write ``<stem>.safetensors`` (weights, fp32 as stored) and ``<stem>.json``; returns the JSON dict.

    ``path`` may be the stem or either file's name. ``extra`` is stored under ``"info"``. Both files
    are replaced only once both are written: an ``extra`` value JSON cannot hold is an ``SJDInputError``
    and leaves a previous checkpoint at ``path`` loadable.
    """
    from .bundled import write_together
    wpath, jpath = _paths(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    def meta(stats):
        sha, size = stats[wpath]
        return {"format": CHECKPOINT_FORMAT, "kind": "sjd_kernels.GPT", "config": model.config.to_dict(),
                "file": wpath.name, "sha256": sha, "bytes": size, "info": extra or {}}
    return write_together({wpath: sd}, jpath, meta)


def load_gpt(path, device="cpu", dtype=torch.float32) -> GPT:
    """Load a checkpoint written by ``save_gpt``, after the SHA-256 and name/shape checks; eval mode."""
    from safetensors.torch import load_file
    wpath, jpath = _paths(path)
    if not jpath.exists():
        raise GPTCheckpointError(f"{jpath} is missing (a GPT checkpoint is a .safetensors file and its .json)")
    if not wpath.exists():
        raise GPTCheckpointError(f"{wpath} is missing (named by {jpath.name})")
    meta = read_json(jpath, GPTCheckpointError, ("format", "sha256", "config"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise GPTCheckpointError(f"{jpath}: format {meta.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
    digest = sha256_file(wpath)
    if digest != meta["sha256"]:
        raise GPTCheckpointError(f"{wpath} has SHA-256 {digest}, but {jpath.name} expects {meta['sha256']}: "
                                 f"the file was altered or belongs to another checkpoint")
    try:
        cfg = GPTConfig(**meta["config"])
    except (TypeError, ValueError) as e:
        raise GPTCheckpointError(f"{jpath}: its config does not make a GPTConfig ({e})") from None
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    tensors = load_file(str(wpath))
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise GPTCheckpointError(f"{wpath}: tensor names differ from the GPT built from {jpath.name}: "
                                 f"missing {missing[:5]}, unexpected {extra[:5]}")
    for k, s in shapes.items():
        if tuple(tensors[k].shape) != s:
            raise GPTCheckpointError(f"{wpath}: tensor {k!r} has shape {list(tensors[k].shape)}, the config "
                                     f"implies {list(s)}")
    model = GPT(cfg)
    model.load_state_dict(tensors)
    return model.to(device=device, dtype=dtype).eval()
