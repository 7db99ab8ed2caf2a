"""Streaming generation with the causal DiT: sink prefill, then block after block of latent frames.

Per block of `num_frames_per_block` latent frames, every sampler step i runs one forward_stream call that
reads and writes rolling KV cache i (the reference keeps one cache per denoising step; with its
timestep-forcing pipeline each step lives on its own GPU). Each call draws a sink offset rd in
sink_offset_range (python random.randint in the reference), and the sink's reference tokens are re-roped
max(0, frame - (ref_rope_frame - rd)) frames forward. After the first clip the sink can be rolled: the
first generated latent frame replaces the reference image (`roll_sink`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .dit import LiveAvatarDiT
from .finite import watch_layers
from .kv_cache import RollingKVCache, SinkCache
from .kv_quant import is_quantized
from .step_context import sampler_slot


def flow_match_schedule(steps: int = 4, shift: float = 3.0, train_steps: int = 1000
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps [steps] and sigmas [steps+1] of diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps.

    diffusers shifts the training sigmas to find sigma_min, spaces the timesteps linearly between the shifted
    extremes, then shifts again; we reproduce that arithmetic (float32, as diffusers does).
    """
    def shifted(s: np.ndarray) -> np.ndarray:
        return shift * s / (1 + (shift - 1) * s)

    train = shifted(np.linspace(1, train_steps, train_steps, dtype=np.float32)[::-1].copy() / train_steps)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    ts = np.linspace(sigma_max * train_steps, sigma_min * train_steps, steps)
    sigmas_t = torch.from_numpy(shifted(ts / train_steps)).float()
    return sigmas_t * train_steps, torch.cat([sigmas_t, torch.zeros(1)])


@dataclass
class BlockInputs:
    """What a run draws or receives per block, as callables so nothing is held longer than its block.

    noise(block) -> [B, C, F, h, w]; audio(block) -> wav2vec2 features [B, layers, C_a, 4F];
    condition(clip, first_block) -> (ref_latents, motion_latents) for the sink of that clip: clip 0 the
    reference image; clip 1 the rolled sink, made from first_block (the finished latents of block 0).
    """
    noise: Callable[[int], torch.Tensor]
    audio: Callable[[int], torch.Tensor]
    condition: Callable[[int, Optional[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def rolled_condition(ref_latents: torch.Tensor, motion_latents: torch.Tensor
                     ) -> Callable[[int, Optional[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """The reference multi-GPU pipeline's sink: the image first; from clip 1 on, the first generated latent frame
    as the reference, with the motion latents unchanged."""
    def condition(clip: int, first_block: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (ref_latents, motion_latents) if clip == 0 else (first_block[:, :, :1], motion_latents)
    return condition


@dataclass
class CallInfo:
    """What one forward_stream call did (for progress displays, tests and parity checks)."""
    block: int
    step: int
    start_frame: int
    sink_offset: int
    sink_shift: int
    flow: torch.Tensor
    latents_in: Optional[torch.Tensor] = None  # the call's input latents
    timestep: Optional[torch.Tensor] = None  # [B, frames]


class StreamingSession:
    """Generates latents block by block for one (reference image, motion, prompt) condition."""

    def __init__(self, model: LiveAvatarDiT, context: torch.Tensor, ref_latents: torch.Tensor,
                 motion_latents: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                 sink_offset: Optional[Callable[[], int]] = None, seed: Optional[int] = None,
                 kv_dtype: Optional[torch.dtype] = None):
        """context: text encoder states [B, L, text_dim] (or a list of [L_i, text_dim]).

        sink_offset: a callable returning the next sink re-RoPE distance; by default random.Random(seed) draws
        in cfg.sink_offset_range, which with the same seed repeats the reference's python `random` draws.
        kv_dtype: None (the compute dtype), or torch.float8_e4m3fn / torch.int8 for 8-bit caches with
        per-(token, head) scales (model/kv_quant.py).
        """
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.timesteps, self.sigmas = timesteps.float().cpu(), sigmas.float().cpu()
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError("sigmas must have one more entry than timesteps")
        if sink_offset is None:
            rng = random.Random(seed)
            lo, hi = cfg.sink_offset_range
            sink_offset = lambda: rng.randint(lo, hi)  # noqa: E731
        self.sink_offset = sink_offset
        self.batch = ref_latents.shape[0]
        self.latent_hw = tuple(ref_latents.shape[-2:])
        self.frame_len = cfg.tokens_per_frame(*self.latent_hw)
        with torch.no_grad():
            self.context = model.embed_text(context)
        self.sink = SinkCache(cfg.num_layers, dtype=kv_dtype if is_quantized(kv_dtype) else None)
        attn = model.blocks[0].self_attn
        window = cfg.clip_latent_frames * self.frame_len
        self.caches = [RollingKVCache(cfg.num_layers, self.batch, window, attn.num_heads, attn.head_dim,
                                      kv_dtype or model.dtype, model.device) for _ in range(len(self.timesteps))]
        self.next_frame = 0  # absolute latent frame index of the next block
        self.block_index = 0
        self.roll_sink(ref_latents, motion_latents)

    @torch.no_grad()
    def roll_sink(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> None:
        """(Re-)prefill the sink with a reference frame and motion context (the rolling sink after clip 0)."""
        with sampler_slot(len(self.timesteps)):
            self.model.prefill_sink(ref_latents, motion_latents, self.context, self.sink)

    @torch.no_grad()
    def denoise_block(self, noise: torch.Tensor, audio: torch.Tensor, cond_states: Optional[torch.Tensor] = None,
                      on_call: Optional[Callable[[CallInfo], None]] = None) -> torch.Tensor:
        """Run all sampler steps on one block. noise [B, C, F, H, W]; audio [B, layers, C_a, 4F] -> latents (fp32)."""
        frames = noise.shape[2]
        if tuple(noise.shape[-2:]) != self.latent_hw:
            raise ValueError(f"block latents {tuple(noise.shape[-2:])} differ from the condition's {self.latent_hw}")
        audio_tokens = self.model.encode_audio(audio)
        if audio_tokens[0].shape[1] != frames:
            raise ValueError(f"audio covers {audio_tokens[0].shape[1]} latent frames, the block has {frames}")
        x = noise.float().to(self.model.device)
        for i, t in enumerate(self.timesteps):
            offset = int(self.sink_offset())
            shift = max(0, self.next_frame - (self.cfg.ref_rope_frame - offset))
            t_in, x_in = t.expand(self.batch, frames).to(self.model.device), x
            with sampler_slot(i), watch_layers(self.model) as watch:
                flow = self.model.forward_stream(x, t_in, self.context, cond_states, audio_tokens, self.caches[i],
                                                 self.sink, self.next_frame, shift)
            watch.check(flow, self.block_index, i)  # NaN/Inf latents stop the run, naming block, step and layer
            x = x + (self.sigmas[i + 1] - self.sigmas[i]).item() * flow
            if on_call is not None:
                on_call(CallInfo(self.block_index, i, self.next_frame, offset, shift, flow, x_in, t_in))
            del x_in
            del flow  # not alive during the next call
        self.next_frame += frames
        self.block_index += 1
        return x

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches) + self.sink.nbytes()


def stream_sequential(session: StreamingSession, blocks: int, inputs: BlockInputs,
                      on_block: Callable[[int, torch.Tensor], None],
                      on_call: Optional[Callable[[CallInfo], None]] = None) -> None:
    """Every block in order on one rank group (TP or a single GPU); the sink rolls when clip 1 starts."""
    per_clip = session.cfg.clip_latent_frames // session.cfg.num_frames_per_block
    first = None
    for b in range(blocks):
        if b == per_clip:
            session.roll_sink(*inputs.condition(1, first))
        latents = session.denoise_block(inputs.noise(b), inputs.audio(b), on_call=on_call)
        if b == 0:
            first = latents
        on_block(b, latents)
