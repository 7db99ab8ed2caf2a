"""Attention layers of the S2V DiT: full-width q/k RMSNorm, self-attention with a streaming KV cache,
and cross-attention (text, and the per-frame audio injector).

Tensor parallelism (Megatron): q, k, v are column-parallel (each rank holds num_heads/tp heads), o is
row-parallel and all-reduces its partial sums. The q/k RMSNorm runs over the FULL width, so its sum of
squares needs the other ranks' heads: each rank sums squares per head and one all-gather per attention
(q's and k's sums fused) gives every rank all heads' sums, added in head order. That order is the same at
every TP degree, so the norm is bit-identical across degrees (an all-reduce would not be).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..parallel import SINGLE, TPGroup
from .linear import RowParallelLinear
from .rope import apply_rope
from .segment_attention import sdpa

if TYPE_CHECKING:
    from .kv_cache import LayerKV


class RMSNorm(nn.Module):
    """RMSNorm over the full model width; this rank holds `dim / tp` of its channels (num_heads / tp heads)."""

    def __init__(self, dim: int, eps: float, num_heads: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.full_dim, self.eps, self.tp = dim, eps, tp
        self.heads = tp.shard(num_heads, "num_heads")
        self.weight = nn.Parameter(torch.ones(tp.shard(dim, "dim")))

    def head_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of squares per local head, fp32 [..., heads]."""
        return x.float().pow(2).unflatten(-1, (self.heads, -1)).sum(dim=-1)

    def finish(self, x: torch.Tensor, all_head_sums: torch.Tensor) -> torch.Tensor:
        mean_sq = all_head_sums.sum(dim=-1, keepdim=True) / self.full_dim
        return (x.float() * torch.rsqrt(mean_sq + self.eps)).type_as(x) * self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.tp.all_gather(self.head_sums(x), dim=-1))


def qk_norm(norm_q: RMSNorm, q: torch.Tensor, norm_k: RMSNorm, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both full-width norms with a single collective (q and k head sums gathered together)."""
    sq, sk = norm_q.head_sums(q), norm_k.head_sums(k)
    if norm_q.tp.size > 1:
        both = torch.cat([sq.flatten(0, -2), sk.flatten(0, -2)])  # [Lq + Lk, heads]
        both = norm_q.tp.all_gather(both, dim=-1)  # the one extra collective of head-sharded attention
        sq, sk = both[: sq[..., 0].numel()].reshape(*sq.shape[:-1], -1), both[sq[..., 0].numel():].reshape(
            *sk.shape[:-1], -1)
    return norm_q.finish(q, sq), norm_k.finish(k, sk)


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
        self.norm_q = RMSNorm(dim, eps, num_heads, tp)
        self.norm_k = RMSNorm(dim, eps, num_heads, tp)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))


class SelfAttention(Attention):
    """Self-attention over the block's tokens, optionally through the streaming KV cache.

    kv=None:             bidirectional attention over x itself (the non-causal Wan S2V forward).
    kv.mode == "sink":   condition prefill; caches un-roped K and V of the condition tokens, attends to itself.
    kv.mode == "stream": writes this block's roped K/V into the rolling cache, attends to the cache + sink
                         (LayerKV.attend: the two segments merged by log-sum-exp, no concatenated copy).
    """

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv: Optional["LayerKV"] = None) -> torch.Tensor:
        q, k = qk_norm(self.norm_q, self.q(x), self.norm_k, self.k(x))
        q, k, v = self._heads(q), self._heads(k), self._heads(self.v(x))
        del x  # the modulated input is not needed any more
        q_roped = apply_rope(q, rope).type_as(v)
        k_roped = apply_rope(k, rope).type_as(v)
        if kv is not None and kv.mode == "sink":
            kv.store_sink(k, v)
        del q, k  # the un-roped q and k are not needed any more
        if kv is not None and kv.mode == "stream":  # the rolling window and the sink, read where they are stored
            out = kv.attend(q_roped, k_roped, v)
        else:
            out = sdpa(q_roped, k_roped, v)
        del q_roped, k_roped, v  # before the output projection
        return self.o(out)


class CrossAttention(Attention):
    """x attends to a context (embedded text; or one latent frame's audio tokens in the injector)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k = qk_norm(self.norm_q, self.q(x), self.norm_k, self.k(context))
        del x
        out = sdpa(self._heads(q), self._heads(k), self._heads(self.v(context)))
        del q, k
        return self.o(out)
