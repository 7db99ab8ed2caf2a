"""The clip loop of the reference's multi-GPU pipeline, its bookkeeping, and the decoded-frame stream.

    plan_clips()   audio length -> wav2vec2 frames, clips, frames (the reference's count, and what qavatar keeps)
    ClipRunner     clip after clip, block after block, through one StreamingSession: clip r's noise and audio,
                   the rolling sink after clip 0 (its first generated latent frame becomes the reference)
    FrameStream    the VAE side: warm the causal cache on the first motion latents, decode each block as it
                   comes, drop the stream's first frames

`infer` runs these on the real encoders' outputs; `check-parity` runs the same objects on the golden fixture's
inputs, so the parity check covers the code that makes the video.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ..model.streaming import CallInfo, StreamingSession

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


@dataclass
class BlockOut:
    clip: int
    block: int  # within the clip
    latents: torch.Tensor  # [B, C, frames_per_block, h, w], fp32
    audio_frames: tuple[int, int]  # video frames of the audio this block used (global)
    dit_seconds: float  # DiT time of this block, and of the sink re-prefill that followed it
    clip_done: bool  # the last block of its clip


class ClipRunner:
    """Runs `clips` clips of `session` (at most `blocks` blocks in all), yielding each denoised block.

    noise(r) -> [B, C, clip_latent_frames, h, w]; audio(r) -> [B, layers, C_a, 4 * clip_latent_frames]. Both are
    called once per clip on every rank, in order (they may hold collectives). After clip 0 (when a clip 1
    follows), the sink is re-prefilled with latent frame 0 of clip 0's block 0 and the unchanged motion latents;
    later clips keep that sink. The rolling KV caches and the frame counter run on across clips.
    """

    def __init__(self, session: StreamingSession, motion_latents: torch.Tensor, clips: int, blocks: int,
                 noise: Callable[[int], torch.Tensor], audio: Callable[[int], torch.Tensor],
                 on_call: Optional[Callable[[int, int, CallInfo], None]] = None):
        cfg = session.cfg
        self.session, self.motion, self.clips, self.blocks = session, motion_latents, clips, blocks
        self.noise, self.audio, self.on_call = noise, audio, on_call
        self.fpb, self.per_clip = cfg.num_frames_per_block, cfg.clip_latent_frames // cfg.num_frames_per_block
        self.new_ref: Optional[torch.Tensor] = None

    def __iter__(self) -> Iterator[BlockOut]:
        fpb, done = self.fpb, 0
        clip_audio_frames = 4 * self.per_clip * fpb
        for r in range(self.clips):
            audio, noise = self.audio(r), self.noise(r)
            last = min(self.per_clip, self.blocks - done) - 1
            for b in range(last + 1):
                t = time.perf_counter()
                a0, a1 = 4 * b * fpb, 4 * (b + 1) * fpb
                lat = self.session.denoise_block(
                    noise[:, :, b * fpb:(b + 1) * fpb], audio[..., a0:a1],
                    on_call=None if self.on_call is None else (lambda info, r=r, b=b: self.on_call(r, b, info)))
                if r == 0 and b == 0:
                    self.new_ref = lat[:, :, :1]
                if r == 0 and b == last and r + 1 < self.clips and done + 1 < self.blocks:
                    self.session.roll_sink(self.new_ref, self.motion)  # the rolling sink
                done += 1
                yield BlockOut(r, b, lat, (r * clip_audio_frames + a0, r * clip_audio_frames + a1),
                               time.perf_counter() - t, b == last)
            if done >= self.blocks:
                return


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
