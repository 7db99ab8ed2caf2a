"""FramePack motioner: the last 19 motion latent frames as condition tokens, compressed by age.

Buckets (nearest to farthest) [1, 2, 16] latent frames are patchified by Conv3d kernels (1,2,2), (2,4,4) and
(4,8,8): the newest frame at full token resolution, older ones 2x and 4x coarser in time and space.
Fewer motion frames than the buckets cover are zero-padded at the old end ("padd" mode).
"""
from __future__ import annotations

import torch
from torch import nn

from .rope import framepack_positions


class FramePackMotioner(nn.Module):
    def __init__(self, in_dim: int, dim: int, buckets: tuple[int, int, int] = (1, 2, 16)):
        super().__init__()
        self.buckets = tuple(buckets)
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """motion [B, C, T, H, W] latents -> tokens [B, L_motion, dim] ordered [1x | 2x | 4x], positions [L, 3]."""
        b, c, t, h, w = motion.shape
        total = sum(self.buckets)
        padded = motion.new_zeros(b, c, total, h, w)
        keep = min(total, t)
        if keep:
            padded[:, :, -keep:] = motion[:, :, -keep:]
        far, mid, near = padded.split(list(self.buckets)[::-1], dim=2)
        tokens = [proj(x).flatten(2).transpose(1, 2)
                  for proj, x in ((self.proj, near), (self.proj_2x, mid), (self.proj_4x, far))]
        positions = torch.cat(framepack_positions(self.buckets, h, w), dim=0)
        return torch.cat(tokens, dim=1), positions
