"""Attention layers of the S2V DiT: full-width q/k RMSNorm, self-attention with a streaming KV cache,
and cross-attention (text, and the per-frame audio injector).

Tensor parallelism (Megatron): q, k, v are column-parallel (each rank holds num_heads/tp heads), o is
row-parallel and all-reduces its partial sums. The q/k RMSNorm runs over the FULL width, so its sum of
squares is all-reduced across ranks: that is the only extra collective head-sharding costs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import SINGLE, TPGroup
from .linear import RowParallelLinear
from .rope import apply_rope

if TYPE_CHECKING:
    from .kv_cache import LayerKV


class RMSNorm(nn.Module):
    """RMSNorm over the full model width; this rank holds `dim / tp` of its channels."""

    def __init__(self, dim: int, eps: float, tp: TPGroup = SINGLE):
        super().__init__()
        self.full_dim, self.eps, self.tp = dim, eps, tp
        self.weight = nn.Parameter(torch.ones(tp.shard(dim, "dim")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.tp.size == 1:
            mean_sq = xf.pow(2).mean(dim=-1, keepdim=True)
        else:
            sum_sq = xf.pow(2).sum(dim=-1, keepdim=True)
            mean_sq = self.tp.all_reduce(sum_sq) / self.full_dim  # cross-rank sum of squares
        return (xf * torch.rsqrt(mean_sq + self.eps)).type_as(x) * self.weight


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention on [B, L, H, d] tensors, scale 1/sqrt(d); returns [B, Lq, H*d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """q, k, v, o projections with full-width q/k RMSNorm (Wan's WanSelfAttention key layout)."""

    def __init__(self, dim: int, num_heads: int, eps: float, tp: TPGroup = SINGLE):
        super().__init__()
        self.num_heads = tp.shard(num_heads, "num_heads")  # heads on this rank
        self.head_dim = dim // num_heads
        local = self.num_heads * self.head_dim
        self.q = nn.Linear(dim, local)
        self.k = nn.Linear(dim, local)
        self.v = nn.Linear(dim, local)
        self.o = RowParallelLinear(local, dim, tp)
        self.norm_q = RMSNorm(dim, eps, tp)
        self.norm_k = RMSNorm(dim, eps, tp)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))


class SelfAttention(Attention):
    """Self-attention over the block's tokens, optionally through the streaming KV cache.

    kv=None:             bidirectional attention over x itself (the non-causal Wan S2V forward).
    kv.mode == "sink":   condition prefill; caches un-roped K and V of the condition tokens, attends to itself.
    kv.mode == "stream": writes this block's roped K/V into the rolling cache, attends to the cache + sink.
    """

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv: Optional["LayerKV"] = None) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(x)))
        v = self._heads(self.v(x))
        q_roped = apply_rope(q, rope).type_as(v)
        k_roped = apply_rope(k, rope).type_as(v)
        if kv is not None:
            if kv.mode == "sink":
                kv.store_sink(k, v)
            else:
                k_roped, v = kv.append(k_roped, v)
        return self.o(sdpa(q_roped, k_roped, v))


class CrossAttention(Attention):
    """x attends to a context (embedded text; or one latent frame's audio tokens in the injector)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        v = self._heads(self.v(context))
        return self.o(sdpa(q, k, v))
