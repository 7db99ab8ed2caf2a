"""Each clip's starting noise, drawn so that a seed means the same video as in the reference.

The reference (causal_s2v_pipeline_tpp.py) makes, for clip r, a fresh generator on the GPU seeded with
seed + r and draws `torch.randn(16, 12, h, w, dtype=bfloat16, device=cuda, generator=g)`: one draw per clip,
nothing else taken from that generator (its Euler steps draw no noise). `reference` repeats exactly that call.

`cpu` draws fp32 on a CPU generator seeded with seed + r: the same numbers on every machine and at any thread
count, which is what the CPU runs and the tests use. CPU and CUDA generators are different algorithms, so
for one seed the two kinds give different noise, hence different videos. `reference` needs CUDA: the CPU
cannot reproduce the CUDA generator's numbers, so asking for it on the CPU is an error, not a silent switch.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError

NOISE_KINDS = ("reference", "cpu")


def resolve_noise(kind: Optional[str], device: str) -> str:
    """--noise for a run on `device` (cpu | cuda): default `reference` on GPUs, `cpu` on the CPU."""
    if kind is None:
        return "reference" if device == "cuda" else "cpu"
    if kind not in NOISE_KINDS:
        raise ConfigError(f"--noise {kind}: choose reference or cpu")
    if kind == "reference" and device != "cuda":
        raise ConfigError("--noise reference draws on the CUDA generator as the reference does, and the CPU cannot "
                          "reproduce its numbers; run on a GPU, or use --noise cpu (the CPU default)")
    return kind


def clip_noise(kind: str, seed: int, clip: int, channels: int, frames: int, h: int, w: int,
               device: "str | torch.device" = "cpu") -> torch.Tensor:
    """Clip `clip`'s noise [1, channels, frames, h, w]: bf16 on `device` for `reference`, fp32 on the CPU for `cpu`."""
    if kind == "reference":
        g = torch.Generator(device=device)
        g.manual_seed(seed + clip)
        return torch.randn(channels, frames, h, w, dtype=torch.bfloat16, device=device, generator=g)[None]
    if kind != "cpu":
        raise ConfigError(f"noise kind {kind!r}: choose reference or cpu")
    return torch.randn(1, channels, frames, h, w, generator=torch.Generator().manual_seed(seed + clip))
