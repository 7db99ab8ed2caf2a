"""Toy checkpoints: complete, deterministic directories in the real download layout, with random weights.

    OUT/Wan2.2-S2V-14B/config.json, diffusion_pytorch_model-0000i-of-00004.safetensors (+ index), bf16
    OUT/Wan2.2-S2V-14B/Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/,
        wav2vec2-large-xlsr-53-english/      tiny encoders in the real files' formats (pipeline/toy_encoders.py)
    OUT/LiveAvatar/liveavatar.safetensors     PEFT LoRA on q,k,v,o,ffn.0,ffn.2 (blocks and audio injector)

Every parameter is drawn so that no path is vacuous (upstream zero-inits the injector output, the cond
encoder and the head, which would hide bugs): matrices and convs N(0,1)/sqrt(fan_in), norm weights
1+0.1N, other vectors 0.1N, modulations N/sqrt(dim), the audio layer mix U(0.2, 1.2).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..model import ModelConfig, build_model, resolve_config
from .load import DIT_DIRNAME, LORA_RELPATH
from .safetensors_format import TensorSpec
from .writer import ShardedWriter, atomic_directory, save_file_atomic, write_manifest

LORA_TARGET_SUFFIXES = (".q", ".k", ".v", ".o", ".ffn.0", ".ffn.2")  # PEFT target_modules of Live Avatar


def random_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        n = torch.randn(shape, generator=g)
        if name == "casual_audio_encoder.weights":
            t = 0.2 + torch.rand(shape, generator=g)
        elif name.endswith("padding_tokens") or name.startswith("trainable_cond_mask"):
            t = 0.5 * n
        elif name.endswith("modulation"):
            t = n / math.sqrt(cfg.dim)
        elif len(shape) >= 2:
            t = n / math.sqrt(math.prod(shape[1:]))
        elif ".norm" in name and name.endswith(".weight"):
            t = 1 + 0.1 * n
        else:
            t = 0.1 * n
        state[name] = t
    return state


def lora_targets(state: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".weight")] for k in state
            if k.endswith(".weight") and k[: -len(".weight")].endswith(LORA_TARGET_SUFFIXES) and state[k].ndim == 2]


def make_toy_checkpoint(out: "str | Path", config: "str | ModelConfig" = "tiny", seed: int = 0,
                        lora_rank: int = 8, num_shards: int = 4, overwrite: bool = False,
                        encoders: bool = True) -> Path:
    """Write OUT (atomically) and return its path. encoders=False leaves out the VAE, umT5 and wav2vec2."""
    cfg = resolve_config(config)
    state = {k: v.to(torch.bfloat16) for k, v in random_state_dict(cfg, seed).items()}
    g = torch.Generator().manual_seed(seed + 1)
    lora: dict[str, torch.Tensor] = {}
    for module in lora_targets(state):
        out_f, in_f = state[f"{module}.weight"].shape
        lora[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(lora_rank, in_f, generator=g)
                                                            / math.sqrt(in_f)).to(torch.bfloat16)
        lora[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_f, lora_rank, generator=g)
                                                            / math.sqrt(lora_rank)).to(torch.bfloat16)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        dit = tmp / DIT_DIRNAME
        dit.mkdir()
        writer = ShardedWriter(dit, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state.items()],
                               num_shards=num_shards)
        for k, v in state.items():
            writer.write(k, v)
        writer.finish()
        (dit / "config.json").write_text(json.dumps(cfg.to_wan_config(), indent=2))
        if encoders:
            from ..pipeline.toy_encoders import write_toy_encoders

            write_toy_encoders(dit, cfg, seed)
        (tmp / LORA_RELPATH).parent.mkdir(parents=True)
        save_file_atomic(tmp / LORA_RELPATH, lora,
                         {"format": "pt", "lora_alpha": str(lora_rank / 2), "r": str(lora_rank)})
        write_manifest(dit, writer.hashes, kind="toy", config=cfg.name, seed=seed)
    return Path(out)
