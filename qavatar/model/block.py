"""The DiT block and the output head, with Wan2.2-S2V's two-slot fp32 modulation.

A block sees two kinds of tokens: noisy tokens (frame f modulated by the embedding of its timestep, slot 0)
followed by condition tokens (reference image and motion, modulated by the embedding of t=0, slot 1).
`Segments` says where the noisy tokens end, so no per-token modulation tensor is ever materialised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import SINGLE, TPGroup
from .attention import CrossAttention, SelfAttention
from .kv_cache import LayerKV
from .linear import RowParallelLinear


@dataclass(frozen=True)
class Segments:
    """Token layout of a block input: num_frames * frame_len noisy tokens, then condition tokens."""
    num_frames: int
    frame_len: int

    @property
    def num_noisy(self) -> int:
        return self.num_frames * self.frame_len

    def apply(self, fn: Callable[..., torch.Tensor], x: torch.Tensor, *chunks: torch.Tensor) -> torch.Tensor:
        """fn(x_part, *chunk_parts) per segment; each chunk is [B, F, 2, dim] (frame, slot)."""
        n, out = self.num_noisy, []
        if n:
            xs = x[:, :n].unflatten(1, (self.num_frames, self.frame_len))
            out.append(fn(xs, *(c[:, :, 0, None] for c in chunks)).flatten(1, 2))
        if x.shape[1] > n:
            out.append(fn(x[:, n:], *(c[:, 0:1, 1] for c in chunks)))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x * gate


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's affine-free LayerNorm (norm1, norm2, head norm)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, tp: TPGroup = SINGLE):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, num_heads, eps, tp)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps, tp)
        start, stop = tp.span(ffn_dim)  # the FFN width may split unevenly (13824 over 5 ranks)
        self.ffn = nn.Sequential(
            nn.Linear(dim, stop - start),
            nn.GELU(approximate="tanh"),
            RowParallelLinear(stop - start, dim, tp),
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, seg: Segments, rope: torch.Tensor,
                context: torch.Tensor, kv: Optional[LayerKV] = None) -> torch.Tensor:
        """x [B, L, dim]; e0 [B, F, 6, 2, dim] fp32 time modulation; rope [L, d/2, 2]; context [B, Lt, dim]."""
        dtype = x.dtype
        e = (self.modulation.float()[:, None, :, None] + e0).unbind(dim=2)  # 6 x [B, F, 2, dim], fp32

        # temporaries are passed, not named, so each is freed as soon as its consumer is done with it
        y = self.self_attn(self._modulated(x, seg, e[0], e[1], dtype), rope, kv)
        x = x + seg.apply(_gate, y.float(), e[2])
        del y
        x = x + self.cross_attn(self.norm3(x.to(dtype)).to(dtype), context)
        y = self.ffn(self._modulated(x, seg, e[3], e[4], dtype))
        x = x + seg.apply(_gate, y.float(), e[5])
        return x.to(dtype)

    def _modulated(self, x: torch.Tensor, seg: Segments, shift: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
        """LayerNorm(x) * (1 + scale) + shift in fp32, cast to the compute dtype for the next Linear."""
        return seg.apply(_modulate, layer_norm(x, self.eps).float(), shift, scale).to(dtype)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The reference runs the time path and the head under fp32 autocast, whatever the weights' dtype."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


class Head(nn.Module):
    """Final modulated LayerNorm and projection to patch pixels, per latent frame's own timestep."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, F*FS, dim] noisy tokens; e [B, F, dim] time embedding of each frame; returns fp32."""
        num_frames = e.shape[1]
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None].float()).unbind(dim=2)  # [B, F, dim]
        xn = layer_norm(x.float(), self.eps).unflatten(1, (num_frames, -1))
        xn = xn * (1 + scale[:, :, None]) + shift[:, :, None]
        return linear_fp32(self.head, xn.flatten(1, 2))
