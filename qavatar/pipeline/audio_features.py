"""From wav2vec2 hidden states to the per-video-frame audio buckets the DiT consumes.

wav2vec2 runs at 50 Hz. The reference resamples its hidden states linearly to `video_rate` (30) Hz, then
samples one bucket per output video frame at `fps` (25): the frame's nearest feature (m=0), or 2m+1 features
around it. Frames past the end of the audio get zeros. Output layout: [1, layers, C_a * (2m+1), frames],
padded to a whole number of clips of `clip_frames` frames.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def interpolate_features(hidden: torch.Tensor, input_fps: float = 50, output_fps: float = 30) -> torch.Tensor:
    """[layers, T, C] at input_fps -> [layers, int(T / input_fps * output_fps), C] (linear, align_corners)."""
    out_len = int(hidden.shape[1] / float(input_fps) * output_fps)
    x = F.interpolate(hidden.transpose(1, 2).float(), size=out_len, mode="linear", align_corners=True)
    return x.transpose(1, 2)


def _frame_indices(video_rate: int, total: int, fps: int, count: int) -> np.ndarray:
    duration = count / fps
    if duration > total / video_rate:
        raise ValueError("audio bucket request is longer than the padded audio")
    times = np.linspace(0.0, duration, count, endpoint=False)
    return np.clip(np.round(times * video_rate).astype(int), 0, total - 1)


def bucket_features(feats: torch.Tensor, fps: int = 25, clip_frames: int = 48, video_rate: int = 30,
                    m: int = 0) -> tuple[torch.Tensor, int]:
    """[layers, T, C] at video_rate -> ([1, layers, C*(2m+1), clips*clip_frames], clips)."""
    layers, t, c = feats.shape
    clips = int(t / (clip_frames * video_rate / fps)) + 1
    frames = clips * clip_frames
    pad = math.ceil(frames / fps * video_rate) - t
    stride = int(video_rate / fps)
    rows = []
    for bi in _frame_indices(video_rate, t + pad, fps, frames).tolist():
        if bi < t:
            idx = [min(max(j, 0), t - 1) for j in range(bi - m * stride, bi + (m + 1) * stride, stride)]
            rows.append(feats[:, idx].flatten(-2))
        else:
            rows.append(feats.new_zeros(layers, c * (2 * m + 1)))
    return torch.stack(rows).unsqueeze(0).permute(0, 2, 3, 1), clips
