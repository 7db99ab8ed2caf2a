"""The audio path: a causal encoder of wav2vec2 hidden states, and the per-frame audio injector.

Encoder ("casual_audio_encoder", upstream's spelling): a learned softmax-like mix of the 25 wav2vec2 hidden
states, then causal Conv1d stacks (stride 2 twice: 4 video frames -> 1 latent frame) giving, per latent frame,
`num_audio_token` local tokens plus a learned padding token, and one global token (through final_linear).
Injector: after each inject block, the noisy tokens of latent frame f are AdaLayerNorm-ed by frame f's global
token and cross-attend to frame f's local tokens; the result is added to the hidden states.
The reference runs the encoder in fp32 (autocast), so we do too, whatever the weights' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import SINGLE, TPGroup
from .attention import CrossAttention
from .block import Segments, linear_fp32


class CausalConv1d(nn.Module):
    """Conv1d with replicate left padding (kernel-1 frames), so frame t only sees frames <= t."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.float(), (self.pad, 0), mode="replicate")
        bias = None if self.conv.bias is None else self.conv.bias.float()
        return F.conv1d(x, self.conv.weight.float(), bias, stride=self.conv.stride)


def _norm_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(F.layer_norm(x, (x.shape[-1],), eps=1e-6))


class MotionEncoderTC(nn.Module):
    """Upstream MotionEncoder_tc: local tokens per head group, and a global token."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(in_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, T] after conv1 -> [N, T', dim]: norm, SiLU, then the two strided convs."""
        x = _norm_silu(x.transpose(1, 2))
        x = _norm_silu(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return _norm_silu(self.conv3(x.transpose(1, 2)).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C_a] -> global [B, T', 1, dim], local [B, T', num_tokens + 1, dim] (fp32)."""
        b = x.shape[0]
        x = x.transpose(1, 2).float()
        local = self.conv1_local(x)  # [B, n*c, T], channels ordered (n c)
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [(B n), c, T]
        local = self._trunk(local)  # [(B n), T', dim]
        local = local.unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # [B, T', n, dim]
        pad = self.padding_tokens.float().expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad], dim=2)

        glob = self._trunk(self.conv1_global(x))  # [B, T', dim]
        glob = linear_fp32(self.final_linear, glob)
        return glob[:, :, None], local


class CausalAudioEncoder(nn.Module):
    def __init__(self, audio_dim: int, dim: int, num_tokens: int, num_layers: int = 25):
        super().__init__()
        self.encoder = MotionEncoderTC(audio_dim, dim, num_tokens)
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, num_wav2vec_layers, C_a, T] -> (global, local) tokens per (downsampled) frame."""
        w = F.silu(self.weights.float())
        mixed = ((features.float() * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C_a, T]
        return self.encoder(mixed.transpose(1, 2))


class AdaLayerNorm(nn.Module):
    """diffusers AdaLayerNorm(chunk_dim=1): LayerNorm(eps 1e-5, no affine), shift/scale from SiLU(temb)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)  # shift first: diffusers' chunk_dim=1 order
        return F.layer_norm(x, (x.shape[-1],), eps=1e-5) * (1 + scale[:, None]) + shift[:, None]


class AudioInjector(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_injectors: int, eps: float, tp: TPGroup = SINGLE):
        super().__init__()
        self.injector = nn.ModuleList(CrossAttention(dim, num_heads, eps, tp) for _ in range(num_injectors))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim) for _ in range(num_injectors))

    def forward(self, index: int, x: torch.Tensor, seg: Segments, audio_global: torch.Tensor,
                audio_local: torch.Tensor) -> torch.Tensor:
        """Add injector `index`'s output to the noisy tokens of x [B, L, dim].

        audio_global [B, F, 1, dim], audio_local [B, F, n+1, dim]: one entry per noisy latent frame.
        """
        return inject(self.injector_adain_layers[index], self.injector[index], x, seg, audio_global, audio_local)


def inject(adain: AdaLayerNorm, attn: CrossAttention, x: torch.Tensor, seg: Segments, audio_global: torch.Tensor,
           audio_local: torch.Tensor) -> torch.Tensor:
    """One injector's layers as arguments (no index), so a compiled injector is one graph for all of them."""
    n = seg.num_noisy
    frames = x[:, :n].unflatten(1, (seg.num_frames, seg.frame_len)).flatten(0, 1)  # [(B F), FS, dim]
    normed = adain(frames, audio_global.flatten(0, 1)[:, 0].to(x.dtype))
    residual = attn(normed, audio_local.flatten(0, 1).to(x.dtype))
    residual = residual.unflatten(0, (x.shape[0], seg.num_frames)).flatten(1, 2)
    if n == x.shape[1]:
        return x + residual
    return torch.cat([x[:, :n] + residual, x[:, n:]], dim=1)
