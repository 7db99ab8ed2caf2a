"""Toy checkpoints: complete, deterministic directories in the real download layout, with random weights.

    OUT/Wan2.2-S2V-14B/config.json, diffusion_pytorch_model-0000i-of-00004.safetensors (+ index), bf16
    OUT/Wan2.2-S2V-14B/Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/,
        wav2vec2-large-xlsr-53-english/      tiny encoders in the real files' formats (pipeline/toy_encoders.py)
    OUT/LiveAvatar/liveavatar.safetensors     PEFT LoRA on q,k,v,o,ffn.0,ffn.2 (blocks and audio injector)

Tensors are drawn and written one at a time, so `--config liveavatar-14b` writes the full 32.6 GB layout
(and a 1.35 GB rank-128 LoRA) with about one tensor in memory.
Every parameter is drawn so that no path is vacuous (upstream zero-inits the injector output, the cond
encoder and the head, which would hide bugs): matrices and convs N(0,1)/sqrt(fan_in), norm weights
1+0.1N, other vectors 0.1N, modulations N/sqrt(dim), the audio layer mix U(0.2, 1.2).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import ConfigError
from ..model import ModelConfig, build_model, resolve_config
from .load import DIT_DIRNAME, LORA_RELPATH
from .safetensors_format import SafetensorsWriter, TensorSpec
from .writer import ShardedWriter, atomic_directory, write_manifest

LORA_TARGET_SUFFIXES = (".q", ".k", ".v", ".o", ".ffn.0", ".ffn.2")  # PEFT target_modules of Live Avatar


def random_tensors(cfg: ModelConfig, seed: int, dtype: Optional[torch.dtype] = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in state_dict order, drawn one at a time (a full-size model is never in memory)."""
    with torch.device("meta"):
        model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        t = torch.randn(shape, generator=g)
        if name == "casual_audio_encoder.weights":
            t = 0.2 + torch.rand(shape, generator=g)
        elif name.endswith("padding_tokens") or name.startswith("trainable_cond_mask"):
            t.mul_(0.5)
        elif name.endswith("modulation"):
            t.div_(math.sqrt(cfg.dim))
        elif len(shape) >= 2:
            t.div_(math.sqrt(math.prod(shape[1:])))
        elif ".norm" in name and name.endswith(".weight"):
            t.mul_(0.1).add_(1)
        else:
            t.mul_(0.1)
        yield name, t if dtype is None else t.to(dtype)


def random_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    return dict(random_tensors(cfg, seed))


def model_specs(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: TensorSpec(k, dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


def lora_targets(shapes: "dict[str, torch.Tensor] | dict[str, tuple[int, ...]]") -> list[str]:
    return [k[: -len(".weight")] for k, v in shapes.items()
            if k.endswith(".weight") and k[: -len(".weight")].endswith(LORA_TARGET_SUFFIXES)
            and len(tuple(v.shape) if hasattr(v, "shape") else v) == 2]


def random_lora(shapes: dict[str, tuple[int, ...]], rank: int, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """PEFT A/B pairs (bf16) for every target, drawn one at a time."""
    g = torch.Generator().manual_seed(seed)
    for module in lora_targets(shapes):
        out_f, in_f = shapes[f"{module}.weight"]
        yield f"base_model.model.{module}.lora_A.weight", \
            torch.randn(rank, in_f, generator=g).div_(math.sqrt(in_f)).to(torch.bfloat16)
        yield f"base_model.model.{module}.lora_B.weight", \
            torch.randn(out_f, rank, generator=g).div_(math.sqrt(rank)).to(torch.bfloat16)


def make_toy_checkpoint(out: "str | Path", config: "str | ModelConfig" = "tiny", seed: int = 0,
                        lora_rank: int = 8, num_shards: int = 4, overwrite: bool = False,
                        encoders: bool = True) -> Path:
    """Write OUT (atomically) and return its path. encoders=False leaves out the VAE, umT5 and wav2vec2."""
    if lora_rank < 1:
        raise ConfigError(f"--lora-rank {lora_rank}: a LoRA has rank 1 or more (Live Avatar's is 128)")
    if num_shards < 1:
        raise ConfigError(f"num_shards {num_shards}: at least 1")
    cfg = resolve_config(config)
    specs = model_specs(cfg)
    shapes = {k: v.shape for k, v in specs.items()}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        dit = tmp / DIT_DIRNAME
        dit.mkdir()
        writer = ShardedWriter(dit, list(specs.values()), num_shards=num_shards)
        for k, v in random_tensors(cfg, seed, torch.bfloat16):  # one tensor in memory at a time
            writer.write(k, v)
        writer.finish()
        (dit / "config.json").write_text(json.dumps(cfg.to_wan_config(), indent=2))
        if encoders:
            from ..pipeline.toy_encoders import write_toy_encoders

            write_toy_encoders(dit, cfg, seed)
        (tmp / LORA_RELPATH).parent.mkdir(parents=True)
        lora_specs = [TensorSpec(f"base_model.model.{m}.lora_{ab}.weight", torch.bfloat16, shape)
                      for m in lora_targets(shapes)
                      for ab, shape in (("A", (lora_rank, shapes[f"{m}.weight"][1])),
                                        ("B", (shapes[f"{m}.weight"][0], lora_rank)))]
        lora = SafetensorsWriter(tmp / LORA_RELPATH, lora_specs,
                                 {"format": "pt", "lora_alpha": str(lora_rank / 2), "r": str(lora_rank)})
        for k, v in random_lora(shapes, lora_rank, seed + 1):
            lora.write(k, v)
        lora.close()
        write_manifest(dit, writer.hashes, kind="toy", config=cfg.name, seed=seed)
    return Path(out)
