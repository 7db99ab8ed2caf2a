"""The encoders of the real layout behind one interface (the calibration set and `infer` both use it).

    condition(image, latent_hw) -> (reference latent [1, C, 1, h, w], motion latents [1, C, 19, h, w])
    encode_audio(wave)          -> wav2vec2 hidden states [layers, T, C_a] at 50 Hz
    encode_text(prompt)         -> umT5 states [L, text_dim]

The image is resized and center-cropped to the latent grid x 8; the motion context is the image repeated
over the 73 motion frames, VAE-encoded, as the reference starts a stream. StandInEncoders (stand_in.py)
has the same interface for checkpoints without the encoder files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model import ModelConfig
from .sizing import fit_image


class PipelineEncoders:
    name = "pipeline"

    def __init__(self, root: "str | Path", cfg: ModelConfig, device: "str | torch.device" = "cpu",
                 dtype: torch.dtype = torch.float32, prompt_cache: bool = True,
                 t5_precision: str = "bf16"):
        from .audio_encoder import AudioEncoder
        from .text_encoder import TextEncoder
        from .vae import VAE_FILE, WanVAE

        self.cfg, self.root = cfg, Path(root)
        self.text = TextEncoder(self.root, text_len=cfg.text_len, use_cache=prompt_cache, precision=t5_precision)
        self.vae = WanVAE.load(self.root / VAE_FILE, device=device, dtype=dtype)
        self.audio = AudioEncoder(self.root)

    def condition(self, image: torch.Tensor, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = latent_hw
        pixels = fit_image(image, 8 * h, 8 * w)[None, :, None]  # [1, 3, 1, H, W]
        return encode_condition(self.vae, pixels, self.cfg.motion_frames)

    def encode_audio(self, wave: np.ndarray, sample_rate: int = 16000) -> torch.Tensor:
        return self.audio.hidden_states(self.audio.normalize(wave))

    def encode_text(self, prompt: str) -> torch.Tensor:
        return self.text.encode(prompt)


def encode_condition(vae, pixels: torch.Tensor, motion_frames: "tuple[int, int]") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference pixels [1, 3, 1, H, W] -> (reference latent, motion latents): the image alone, and the image
    repeated over motion_frames[0] frames (motion_frames[1] latent frames), each VAE-encoded."""
    ref = vae.encode(pixels)
    motion = vae.encode(pixels.expand(-1, -1, motion_frames[0], -1, -1))
    if motion.shape[2] != motion_frames[1]:
        raise ValueError(f"the VAE made {motion.shape[2]} motion latents from {motion_frames[0]} frames; the DiT "
                         f"expects {motion_frames[1]}")
    return ref, motion
