"""The Wan 2.1 causal video VAE, run by diffusers' AutoencoderKLWan and loaded from Wan's own `Wan2.1_VAE.pth`.

The config (base_dim, dim_mult, num_res_blocks, temporal downsampling) is read off the tensor shapes, and the
keys are renamed with keymaps.vae_diffusers_to_wan, so the real VAE and the toy one load through one path.
Latents are normalised as the reference's streaming WanVAE does: (mu - mean) * (1 / std) per channel, and back
with z / (1 / std) + mean, the 16 means and stds being diffusers' latents_mean / latents_std. Like the reference,
the constants and this arithmetic are in the VAE's dtype: bf16 on a GPU (the bf16 mean and reciprocal move
latents by up to 3.5e-3 against fp32 ones), fp32 on the CPU.

Decoding streams: `StreamingDecoder` keeps the causal conv cache between calls, so a block of 3 latent frames
decodes to 12 video frames the moment it is generated, and the result equals decoding the whole sequence at
once (tested). The first latent frame of a stream decodes to 1 frame, every later one to 4.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError
from .keymaps import vae_wan_to_diffusers

VAE_FILE = "Wan2.1_VAE.pth"


def vae_config(state: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKLWan kwargs read off a Wan 2.1 VAE state dict."""
    try:
        base_dim = state["encoder.conv1.weight"].shape[0]
        z_dim = state["conv1.weight"].shape[0] // 2
    except KeyError as e:
        raise CheckpointError(f"not a Wan 2.1 VAE state dict (no {e.args[0]})") from None
    kinds: dict[int, str] = {}
    out_ch: dict[int, int] = {}
    for k, v in state.items():
        m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(residual\.2\.weight|resample\.1\.weight|time_conv\.weight)", k)
        if not m:
            continue
        i = int(m.group(1))
        if m.group(2) == "residual.2.weight":
            kinds[i], out_ch[i] = "res", v.shape[0]
        elif m.group(2) == "time_conv.weight":
            kinds[i] = "down3d"
        else:
            kinds.setdefault(i, "down2d")
    seq = [kinds[i] for i in sorted(kinds)]
    if any(k.startswith("encoder.downsamples.") and ".attn" in k for k in state):
        raise CheckpointError("VAE with attention in the down blocks (attn_scales) is not a Wan 2.1 VAE")
    num_res = next((i for i, k in enumerate(seq) if k != "res"), len(seq))
    res_idx = [i for i in sorted(kinds) if kinds[i] == "res"]
    levels = len(res_idx) // max(num_res, 1)
    dim_mult = [out_ch[res_idx[lv * num_res]] // base_dim for lv in range(levels)]
    temporal = [k == "down3d" for k in seq if k != "res"]
    return {"base_dim": base_dim, "z_dim": z_dim, "dim_mult": dim_mult, "num_res_blocks": num_res,
            "attn_scales": [], "temperal_downsample": temporal, "dropout": 0.0}


def load_wan_vae(path: "str | Path", device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32):
    """diffusers AutoencoderKLWan with the weights of Wan's `Wan2.1_VAE.pth` (or a .safetensors of its state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: VAE not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable VAE checkpoint ({e.__class__.__name__})") from None
    return vae_from_state_dict(state, device, dtype, name=str(path))


def vae_from_state_dict(state: dict[str, torch.Tensor], device: "str | torch.device" = "cpu",
                        dtype: torch.dtype = torch.float32, name: str = "VAE"):
    from ..quiet import quiet_bitsandbytes

    with quiet_bitsandbytes():  # diffusers imports bitsandbytes, which logs on import
        from diffusers import AutoencoderKLWan

    cfg = vae_config(state)
    with torch.device("meta"):
        model = AutoencoderKLWan(**cfg)
    names = vae_wan_to_diffusers(list(model.state_dict()), cfg["num_res_blocks"])
    missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or extra:
        raise CheckpointError(f"{name}: VAE keys do not match a Wan 2.1 VAE: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    model.load_state_dict({names[k]: v for k, v in state.items()}, assign=True, strict=True)
    model = model.to(device)
    if dtype != next(model.parameters()).dtype:
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # its "keep in float32" notice lists no modules for this VAE
        model = model.to(dtype)
        dlog.set_verbosity(level)
    return model.eval()


def _causal_conv_count(module: torch.nn.Module) -> int:
    return sum(type(m).__name__ == "WanCausalConv3d" for m in module.modules())


class WanVAE:
    """Encode pixels to normalised latents; decode them back, streamed."""

    def __init__(self, model, constants_dtype: Optional[torch.dtype] = None):
        """constants_dtype: dtype of the latent mean and 1/std and of the normalisation arithmetic; by default
        the VAE's own dtype, as the reference builds them (`torch.tensor(mean, dtype=param_dtype)`)."""
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        c = model.config
        self.z_dim = c.z_dim
        cd = constants_dtype or self.dtype
        self.mean = torch.tensor(c.latents_mean, dtype=cd, device=self.device).view(1, -1, 1, 1, 1)
        self.inv_std = (1.0 / torch.tensor(c.latents_std, dtype=cd, device=self.device)).view(1, -1, 1, 1, 1)

    @classmethod
    def load(cls, path: "str | Path", device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32):
        return cls(load_wan_vae(path, device, dtype))

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw encoder means -> latents: (mu - mean) * (1/std), in the constants' dtype."""
        return (mu.to(self.mean) - self.mean) * self.inv_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> decoder input: z / (1/std) + mean (the reference divides by the reciprocal)."""
        return z.to(self.mean) / self.inv_std + self.mean

    @torch.no_grad()
    def encode_mu(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> raw encoder means [B, z, 1 + (T-1)//4, H/8, W/8] (VAE dtype and device).
        Time is chunked 1, 4, 4, ... frames with the causal cache cleared before and after, as the reference's."""
        return self.model.encode(video.to(self.device, self.dtype)).latent_dist.mode()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> normalised latents [B, z, 1 + (T-1)//4, H/8, W/8] (fp32, on CPU)."""
        return self.normalize(self.encode_mu(video)).float().cpu()

    def stream(self) -> "StreamingDecoder":
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes latent frames as they arrive, carrying the causal cache between calls."""

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self._cache: list = [None] * _causal_conv_count(vae.model.decoder)
        self._first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, t, h, w] -> frames [B, 3, T, H, W] in [-1, 1] (fp32, on CPU)."""
        m, v = self.vae.model, self.vae
        x = m.post_quant_conv(v.denormalize(latents.to(v.device)).to(v.dtype))
        out = []
        for i in range(x.shape[2]):
            idx = [0]
            out.append(m.decoder(x[:, :, i:i + 1], feat_cache=self._cache, feat_idx=idx,
                                 first_chunk=self._first).float().clamp_(-1, 1).cpu())
            self._first = False
        return torch.cat(out, dim=2)


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8, as the reference's save_video: clamp, (x + 1) / 2, * 255,
    then TRUNCATED (the cast), not rounded, so frames equal the reference's bit for bit."""
    x = (frames.float().clamp(-1, 1) + 1) / 2
    return (x * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def vae_file(root: "str | Path") -> Optional[Path]:
    p = Path(root) / VAE_FILE
    return p if p.is_file() else None
