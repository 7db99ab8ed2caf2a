"""The clip loop of the reference's multi-GPU pipeline, its bookkeeping, and the decoded-frame stream.

    plan_clips()   audio length -> wav2vec2 frames, clips, frames (the reference's count, and what qavatar keeps)
    clip_inputs()  per-clip noise and audio cut into the per-block inputs that model/streaming.stream_sequential
                   (and the pipeline stages) run clip after clip, with the rolling sink after clip 0
    FrameStream    the VAE side: warm the causal cache on the first motion latents, decode each block as it
                   comes, drop the stream's first frames

`infer` runs these on the real encoders' outputs; `check-parity` runs the same functions (and stream_sequential)
on the golden fixture's inputs, so the parity check covers the code that makes the video.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..model.streaming import BlockInputs, rolled_condition

DROP_FRAMES = 3  # the reference drops the stream's first 3 decoded frames
VAE_WARMUP_LATENTS = 7  # motion latents decoded (and discarded) to warm the VAE's causal cache
VIDEO_RATE = 30  # Hz of the resampled wav2vec2 features


def wav2vec_frames(num_samples: int, kernels: "tuple[int, ...]", strides: "tuple[int, ...]") -> int:
    """Frames out of wav2vec2's conv stack (no padding) for num_samples input samples."""
    n = num_samples
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return max(n, 0)


def clip_count(t50: int, fps: int = 25, clip_frames: int = 48, video_rate: int = VIDEO_RATE) -> int:
    """The reference's number of clips for t50 wav2vec2 frames: always one more than fits in full."""
    af = int(t50 / 50 * video_rate)
    return int(af / (clip_frames * video_rate / fps)) + 1


@dataclass(frozen=True)
class ClipPlan:
    t50: int  # wav2vec2 frames (50 Hz)
    audio_frames: int  # after the 50 -> 30 Hz resampling
    audio_clips: int  # clips the reference makes for this audio (nr)
    clips: int  # clips to run (the reference's min(num_clip, nr))
    clip_frames: int
    drop: int
    blocks: int  # blocks qavatar generates (trimmed to the audio)
    frames: int  # frames qavatar writes

    @property
    def reference_frames_generated(self) -> int:
        return self.clips * self.clip_frames

    @property
    def reference_frames_kept(self) -> int:
        """What the reference writes before muxing (it generates every block, then ffmpeg -shortest cuts)."""
        return self.reference_frames_generated - self.drop


def plan_clips(num_samples: int, kernels: "tuple[int, ...]", strides: "tuple[int, ...]", fps: int = 25,
               clip_frames: int = 48, block_frames: int = 12, num_clip: Optional[int] = None,
               sample_rate: int = 16000, drop: int = DROP_FRAMES) -> ClipPlan:
    """Clips as the reference counts them; qavatar then generates only the blocks the audio covers."""
    t50 = wav2vec_frames(num_samples, kernels, strides)
    audio_clips = clip_count(t50, fps, clip_frames)
    clips = audio_clips if num_clip is None else min(num_clip, audio_clips)
    needed = min(clips * clip_frames, int(num_samples / sample_rate * fps))
    blocks = -(-needed // block_frames)
    return ClipPlan(t50, int(t50 / 50 * VIDEO_RATE), audio_clips, clips, clip_frames, drop, blocks,
                    max(needed - drop, 0))


def clip_inputs(cfg, noise: Callable[[int], torch.Tensor], audio: Callable[[int], torch.Tensor],
                ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> BlockInputs:
    """Per-block inputs (model/streaming.BlockInputs) from per-clip draws, as the reference makes them.

    noise(r) -> [B, C, clip_latent_frames, h, w]; audio(r) -> [B, layers, C_a, 4 * clip_latent_frames]. Each is
    called once per clip, when the clip's first block asks, on every rank and in order (they may hold
    collectives); the previous clip's tensor is dropped then. The sink rolls after clip 0: latent frame 0 of
    the first block becomes the reference, the motion latents stay.
    """
    per_clip, fpb = cfg.clip_latent_frames // cfg.num_frames_per_block, cfg.num_frames_per_block
    return BlockInputs(_per_block(noise, per_clip, lambda x, i: x[:, :, i * fpb:(i + 1) * fpb]),
                       _per_block(audio, per_clip, lambda x, i: x[..., 4 * i * fpb:4 * (i + 1) * fpb]),
                       rolled_condition(ref_latents, motion_latents))


def _per_block(draw: Callable[[int], torch.Tensor], per_clip: int,
               piece: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    held: dict[int, torch.Tensor] = {}

    def block(b: int) -> torch.Tensor:
        r, i = divmod(b, per_clip)
        if r not in held:
            held.clear()  # the previous clip's tensor is no longer needed
            held[r] = draw(r)
        return piece(held[r], i)
    return block


class FrameStream:
    """The VAE side of the stream: block latents in, the frames the video keeps out ([3, n, H, W], [-1, 1])."""

    def __init__(self, vae, motion_latents: torch.Tensor, warmup: int = VAE_WARMUP_LATENTS, drop: int = DROP_FRAMES,
                 keep_decoded: bool = False):
        """keep_decoded: keep the warm-up output and each block's whole decode (for parity checks)."""
        self.decoder = vae.stream()
        warm = self.decoder.decode(motion_latents[:, :, :warmup].cpu())  # warms the causal cache; not shown
        self.keep = keep_decoded
        self.warmup_frames = warm if keep_decoded else None
        self.decoded: Optional[torch.Tensor] = None
        self.drop, self.first = drop, True

    def block(self, latents: torch.Tensor) -> torch.Tensor:
        frames = self.decoder.decode(latents.cpu())[0]  # [3, 4 * frames_per_block, H, W]
        if self.keep:
            self.decoded = frames
        if self.first:
            frames, self.first = frames[:, self.drop:], False
        return frames
