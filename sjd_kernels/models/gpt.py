"""A LlamaGen-style GPT for image tokens, written in the package.

Class-conditional (a table of ``num_classes + 1`` condition embeddings, the last row being the
null condition used for classifier-free guidance) or conditioned on a given embedding
(``cond_dim``: a linear projection of a text/image embedding; the null condition is a learned
vector). RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, and an untied LM head
over the image codes only. The condition sits at model position 0 and image token ``i`` at
position ``i + 1``.

Two entry points:
- ``forward_train(cond, tokens)``: teacher forcing, logits ``[B, N, V]`` for tokens 0..N-1.
- ``forward(inputs_embeds, positions, cache, ...)``: the decoding path on a static KV cache
  (``sjd_kernels.decoding.cache.StaticKVCache``) with per-row write slots and visible lengths.
  ``embed_tokens`` / ``embed_cond`` are separate so callers can feed their own embeddings
  (SJD2 feeds noised embeddings plus a level embedding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int                 # image codes V (the LM head's width)
    max_image_tokens: int           # tokens per image N
    num_classes: int = 10           # classes; row num_classes is the null condition
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    d_model: int = 192
    cond_dim: int | None = None     # set to condition on a given embedding instead of a class id
    mlp_ratio: float = 8.0 / 3.0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding of ``x [R, H, T, D]`` at integer ``positions [R, T]`` (half-split layout)."""
    D = x.shape[-1]
    half = D // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
    ang = positions.to(torch.float64).unsqueeze(-1) * inv                     # [R, T, half]
    cos = ang.cos().to(x.dtype).unsqueeze(1)
    sin = ang.sin().to(x.dtype).unsqueeze(1)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    return torch.cat([out, x[..., 2 * half:]], -1) if D % 2 else out


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.wkv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)

    def forward(self, x, positions, mask, cache=None, layer: int = 0, write_slots=None):
        """x [R, T, d]; positions [R, T]; mask [R, T, S] bool (True = may attend) or None for causal."""
        cfg = self.cfg
        R, T, _ = x.shape
        hd = cfg.head_dim
        q = self.wq(x).view(R, T, cfg.n_head, hd).transpose(1, 2)
        k, v = self.wkv(x).view(R, T, 2, cfg.n_kv_head, hd).permute(2, 0, 3, 1, 4)
        q = rope(q, positions, cfg.rope_base)
        k = rope(k, positions, cfg.rope_base)
        if cache is not None:
            cache.write(layer, k, v, write_slots)
            k, v = cache.layer(layer)                                         # [R, Hkv, S, D]
        rep = cfg.n_head // cfg.n_kv_head
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
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

    def forward(self, x, positions, mask, cache=None, layer=0, write_slots=None):
        x = x + self.attn(self.n1(x), positions, mask, cache, layer, write_slots)
        return x + self.mlp(self.n2(x))


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

    # -- the model protocol used by the decoding loop
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

    def null_condition(self, batch: int, device=None):
        """The condition value meaning 'no condition' (for CFG), ``[batch]`` ids or ``[batch, cond_dim]``."""
        device = device or self.tok_emb.weight.device
        if self.config.cond_dim is None:
            return torch.full((batch,), self.config.num_classes, dtype=torch.int64, device=device)
        return torch.full((batch, self.config.cond_dim), float("nan"), device=device)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(ids)

    def embed_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """``[B] -> [B, 1, d]``; with ``cond_dim``, NaN rows mean the null condition."""
        if self.config.cond_dim is None:
            if cond.dtype != torch.int64 or cond.dim() != 1:
                raise ValueError(f"cond must be int64 class ids [B], got {cond.dtype} {list(cond.shape)}")
            if ((cond < 0) | (cond > self.config.num_classes)).any():
                raise ValueError(f"class ids must be in [0, {self.config.num_classes}] "
                                 f"({self.config.num_classes} = null), got {cond.tolist()}")
            return self.cls_emb(cond).unsqueeze(1)
        null = torch.isnan(cond).any(-1, keepdim=True)
        e = self.cond_proj(torch.nan_to_num(cond).to(self.null_cond.dtype))
        return torch.where(null, self.null_cond.expand_as(e), e).unsqueeze(1)

    def forward(self, inputs_embeds, positions, cache=None, mask=None, write_slots=None):
        """Hidden states -> logits ``[R, T, V]`` for embeddings ``[R, T, d]`` at model ``positions [R, T]``.

        With ``cache``, the new K/V go to ``write_slots [R, T]`` and attention reads the whole
        cache under ``mask [R, T, S]``; without, attention is causal over the given inputs.
        """
        x = inputs_embeds
        for i, blk in enumerate(self.blocks):
            x = blk(x, positions, mask, cache, i, write_slots)
        return self.head(self.norm(x))

    def forward_train(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, N = tokens.shape
        x = torch.cat([self.embed_cond(cond), self.embed_tokens(tokens[:, :-1])], 1)
        pos = torch.arange(N, device=tokens.device).expand(B, N)
        return self.forward(x, pos)


def drop_condition(cond: torch.Tensor, p: float, num_classes: int, generator=None) -> torch.Tensor:
    """Replace each class id by the null id ``num_classes`` with probability p (CFG training)."""
    drop = torch.rand(cond.shape[0], generator=generator) < p
    return torch.where(drop.to(cond.device), torch.full_like(cond, num_classes), cond)
