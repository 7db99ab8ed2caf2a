"""The embedded demo: everything runs on a toy checkpoint with random weights, on the CPU, with no downloads.

Steps: write the toy checkpoint (real layout, LoRA alongside), inspect it, load the DiT with the LoRA merged,
and stream one clip of latents through the causal DiT (sink prefill, 4 blocks x 4 Euler steps, rolling KV
caches). The weights are random, so the latents are noise with the right structure.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import MANIFEST, load_dit
from .checkpoint.inspect import format_report, inspect_checkpoint
from .checkpoint.toy import make_toy_checkpoint
from .checkpoint.writer import save_file_atomic
from .model.streaming import StreamingSession, flow_match_schedule

LATENT_HW = (32, 16)  # a 256x128-pixel video: small enough for a 2-core CPU


def run_demo(out: "str | Path", seed: int = 0, print_fn: Callable[[str], None] = print) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = out / "toy-checkpoint"
    if not (ckpt / "Wan2.2-S2V-14B" / MANIFEST).is_file():
        make_toy_checkpoint(ckpt, config="tiny", seed=seed, overwrite=ckpt.exists())
        print_fn(f"[1/3] wrote toy checkpoint {ckpt}")
    else:
        print_fn(f"[1/3] reusing toy checkpoint {ckpt}")
    print_fn(format_report(inspect_checkpoint(ckpt)))

    model = load_dit(ckpt, dtype=torch.float32)
    cfg = model.cfg
    print_fn(f"[2/3] loaded the DiT ({sum(p.numel() for p in model.parameters()):,} parameters, LoRA merged)")

    g = torch.Generator().manual_seed(seed)
    h, w = LATENT_HW
    ref = torch.randn(1, cfg.in_dim, 1, h, w, generator=g)
    motion = ref.expand(-1, -1, cfg.motion_frames[1], -1, -1)  # the reference pipeline starts from the ref image
    context = torch.randn(1, 12, cfg.text_dim, generator=g)
    frames = cfg.clip_latent_frames
    audio = torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 4 * frames, generator=g)
    noise = torch.randn(1, cfg.in_dim, frames, h, w, generator=g)
    timesteps, sigmas = flow_match_schedule(4, 3.0)
    session = StreamingSession(model, context, ref, motion, timesteps, sigmas, seed=seed)
    fpb = cfg.num_frames_per_block
    blocks = []
    for b in range(frames // fpb):
        tb = time.perf_counter()
        blocks.append(session.denoise_block(noise[:, :, b * fpb:(b + 1) * fpb], audio[..., 4 * b * fpb:4 * (b + 1) * fpb]))
        print_fn(f"      block {b}: {len(timesteps)} steps in {time.perf_counter() - tb:.2f} s")
    latents = torch.cat(blocks, dim=2)
    path = out / "latents.safetensors"
    save_file_atomic(path, {"latents": latents.contiguous()})
    print_fn(f"[3/3] streamed one clip: latents {list(latents.shape)} -> {path} "
             f"(KV caches {session.cache_bytes() / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    print_fn("The toy weights are random, so these latents are noise with the right structure.")
    print_fn("Real weights: point `qavatar inspect` at the Wan2.2-S2V-14B directory (with LiveAvatar/ beside it).")
    return path
