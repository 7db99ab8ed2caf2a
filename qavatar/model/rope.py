"""3D rotary position embedding (time, height, width) as Wan2.2-S2V uses it.

head_dim/2 complex pairs are split between the axes (config.rope_split). Every token carries a signed
(t, h, w) position; negative t (the FramePack motion tokens, which lie in the past) use the conjugate.
The reference stores its tables as complex32, so cos/sin are rounded to fp16; we reproduce that rounding
exactly (it moves streaming outputs by ~1e-4 if skipped), then rotate in fp32.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch


def _axis_inv_freq(pairs: int, theta: float) -> torch.Tensor:
    dim = 2 * pairs
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64).div(dim))


def rope_table(positions: torch.Tensor, split: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """cos/sin table [L, sum(split), 2] (float32 holding fp16-rounded values) for positions [L, 3]."""
    parts = []
    for axis, pairs in enumerate(split):
        p = positions[:, axis]
        angle = p.abs().to(torch.float64)[:, None] * _axis_inv_freq(pairs, theta)[None, :]
        rot = torch.polar(torch.ones_like(angle), angle)
        rot = torch.where((p < 0)[:, None], rot.conj(), rot)
        parts.append(rot)
    with warnings.catch_warnings():  # "ComplexHalf support is experimental": we only round through it
        warnings.simplefilter("ignore", UserWarning)
        table = torch.cat(parts, dim=1).to(torch.complex32)  # the reference's fp16 rounding
        return torch.view_as_real(table).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, d] by table [L, d/2, 2] in fp32; returns fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    cos = table[None, :, None, :, 0].to(x.device)
    sin = table[None, :, None, :, 1].to(x.device)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


def grid_positions(t: Sequence[int], h: Sequence[int], w: Sequence[int]) -> torch.Tensor:
    """Positions [len(t)*len(h)*len(w), 3] of a token grid, flattened frame-major, then h, then w."""
    tt, hh, ww = torch.meshgrid(torch.as_tensor(list(t), dtype=torch.long),
                                torch.as_tensor(list(h), dtype=torch.long),
                                torch.as_tensor(list(w), dtype=torch.long), indexing="ij")
    return torch.stack((tt, hh, ww), dim=-1).reshape(-1, 3)


def video_positions(first_frame: int, num_frames: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Noisy (or reference) tokens: t = absolute latent frame index, h/w = patch-grid coordinates."""
    return grid_positions(range(first_frame, first_frame + num_frames), range(grid_h), range(grid_w))


def _linspace_int(start: float, stop: float, num: int) -> list[int]:
    return np.linspace(start, stop, num).astype(int).tolist()  # reference rounding (truncation)


def framepack_positions(buckets: Sequence[int], latent_h: int, latent_w: int) -> list[torch.Tensor]:
    """Positions of the FramePack groups [post (1x), 2x, 4x], each compressed 1/2/4x in time and space.

    Group j covers `buckets[j]` past latent frames ending sum(buckets[:j]) frames ago; its tokens sit at the
    negative times np.linspace(start, start-frames+1, tokens) and at h/w positions spread over the full patch grid.
    """
    grid_h, grid_w = latent_h // 2, latent_w // 2
    groups = []
    end = 0
    for j, frames in enumerate(buckets):
        factor = 2 ** j
        start = end + frames  # frames ago of the group's oldest frame
        end = start
        n_t, n_h, n_w = frames // factor, latent_h // (2 * factor), latent_w // (2 * factor)
        t = [-v for v in _linspace_int(start, start - frames + 1, n_t)]
        h = _linspace_int(0, grid_h - 1, n_h)
        w = _linspace_int(0, grid_w - 1, n_w)
        groups.append(grid_positions(t, h, w))
    return groups
