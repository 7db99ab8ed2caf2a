"""Stand-in encoders: deterministic, content-dependent substitutes for the Wan VAE, umT5 and wav2vec2.

They produce tensors with the real shapes from the real media, so the calibration and the demo exercise the
same code paths as with the real encoders (which load from the checkpoint directory when present). They
are NOT the real models: latents are a pooled, fixed random projection of the pixels; audio states are
fixed random projections of 50 Hz log spectra; text states are per-word seeded embeddings.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from ..model import ModelConfig


def _seeded(seed: str, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "little"))
    return torch.randn(*shape, generator=g)


class StandInEncoders:
    name = "stand-in"

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._rgb = _seeded("vae", cfg.in_dim, 3) / 3 ** 0.5
        self._audio = _seeded("wav2vec2", cfg.num_wav2vec_layers, 201, cfg.audio_dim) / 201 ** 0.5

    def encode_image(self, image: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """[3, H, W] in [-1, 1] -> latent [1, C, 1, h, w] (area-resized to the latent grid)."""
        pooled = F.interpolate(image[None].float(), size=latent_hw, mode="area")[0]  # [3, h, w]
        lat = torch.einsum("cr,rhw->chw", self._rgb, pooled) * 2.0
        return lat[None, :, None]

    def condition(self, image: torch.Tensor, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference latent, motion latents = the reference repeated over the motion frames)."""
        ref = self.encode_image(image, latent_hw)
        return ref, ref.expand(-1, -1, self.cfg.motion_frames[1], -1, -1)

    def encode_audio(self, wave: np.ndarray, sample_rate: int = 16000) -> torch.Tensor:
        """Mono waveform -> hidden states [layers, T, C_a] at 50 Hz (wav2vec2's rate: one state per 320 samples)."""
        hop, win = sample_rate // 50, 400
        x = torch.from_numpy(np.pad(wave, (0, max(0, win - len(wave))))).float()
        frames = x.unfold(0, win, hop)  # [T, win]
        spec = torch.log1p(torch.fft.rfft(frames * torch.hann_window(win), dim=-1).abs())  # [T, 201]
        spec = (spec - spec.mean()) / (spec.std() + 1e-6)
        return torch.tanh(torch.einsum("tf,lfc->ltc", spec, self._audio))

    def encode_text(self, prompt: str) -> torch.Tensor:
        """Prompt -> states [L, text_dim], one seeded vector per word (at most text_len words)."""
        words = prompt.split()[: self.cfg.text_len] or [""]
        return torch.stack([_seeded("t5:" + w.lower(), self.cfg.text_dim) for w in words])
