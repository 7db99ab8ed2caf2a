"""From a checkpoint directory to a ready model: find the parts, check them against the config, load.

The model is built on the meta device and each tensor is read (LoRA merged in, cast) and assigned in turn,
so no second copy of the weights ever exists.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import CheckpointError, LoraError
from ..model import LiveAvatarDiT, ModelConfig, build_model, from_wan_config
from ..parallel import SINGLE, TPGroup
from .lora import LoraAdapter, MergedWeights
from .reader import CheckpointReader

DIT_DIRNAME = "Wan2.2-S2V-14B"
LORA_RELPATH = Path("LiveAvatar") / "liveavatar.safetensors"

Weights = Union[CheckpointReader, MergedWeights]


def find_dit_dir(path: "str | Path") -> Path:
    """The DiT directory: PATH itself, or PATH/Wan2.2-S2V-14B (the `ckpt/` root users download into)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if path.is_dir() and not (path / "config.json").is_file() and (path / DIT_DIRNAME).is_dir():
        path = path / DIT_DIRNAME
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected the Wan2.2-S2V-14B directory)")
    return path


def find_lora(dit_dir: Path) -> Optional[Path]:
    """liveavatar.safetensors next to the DiT (ckpt/LiveAvatar/) or inside it; None if there is none."""
    for p in lora_places(dit_dir):
        if p.is_file():
            return p
    return None


def lora_places(dit_dir: Path) -> list[Path]:
    return [dit_dir.parent / LORA_RELPATH, dit_dir / LORA_RELPATH.name, dit_dir / LORA_RELPATH]


def missing_lora_error(dit_dir: Path) -> LoraError:
    where = ", ".join(str(p.parent) for p in lora_places(dit_dir)[:2])
    return LoraError(f"LoRA not found: expected {LORA_RELPATH.as_posix()} (the distilled Live Avatar LoRA, Hub "
                     f"Quark-Vision/Live-Avatar) in {where}; without it the 4-step sampler gives unusable video. "
                     f"Put it there (quantize also takes --lora FILE), or pass --no-lora to run the base model anyway")


def lora_merged(quantization_config: dict) -> bool:
    """Whether a quantized checkpoint has the LoRA merged in. Recorded by `qavatar quantize` as lora_merged
    (older checkpoints: the LoRA path, None when quantized without it); unknown writers count as merged."""
    info = quantization_config.get("qavatar") or {}
    if "lora_merged" in info:
        return bool(info["lora_merged"])
    return info.get("lora") is not None if "lora" in info else True


def require_lora(dit_dir: Path, no_lora: bool = False) -> Optional[Path]:
    """The LoRA a run of this DiT directory needs (None: none needed, or --no-lora); raises when it is missing.

    A quantized checkpoint carries its LoRA merged; one quantized without the LoRA needs --no-lora too."""
    qc = (CheckpointReader(dit_dir).config or {}).get("quantization_config")
    if qc is not None:
        if not no_lora and not lora_merged(qc):
            raise LoraError(f"{dit_dir} was quantized without the Live Avatar LoRA (the undistilled base model, "
                            f"unusable with the 4-step sampler); re-quantize with {LORA_RELPATH.as_posix()} next to "
                            f"the source, or pass --no-lora to run it anyway")
        return None
    if no_lora:
        return None
    path = find_lora(dit_dir)
    if path is None:
        raise missing_lora_error(dit_dir)
    return path


def model_shapes(cfg: ModelConfig, tp: TPGroup = SINGLE, quantization: Optional[dict] = None,
                 stored: Optional[dict[str, tuple[int, ...]]] = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model a config builds; with a quantization_config, of its quantized tree
    (which Linears are quantized, and their optional tensors, read from the stored key set)."""
    with torch.device("meta"):
        model = build_model(cfg, tp)
    if quantization is not None:
        from ..quant import QuantConfig, quantized_skeleton

        quantized_skeleton(model, QuantConfig.from_quantization_config(quantization), stored or {}, torch.bfloat16)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_keys(weights: Weights, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointError naming missing / unexpected keys and shape mismatches (with their files)."""
    have = set(weights.keys())
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected))
    base = weights.base if isinstance(weights, MergedWeights) else weights
    wrong = [f"{k}: {list(base.shape(k))} in {base.file_of(k).name}, config wants {list(expected[k])}"
             for k in sorted(have & set(expected)) if tuple(base.shape(k)) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:3])})")
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(problems))


def open_weights(path: "str | Path", lora: "str | Path | bool | None" = True,
                 lora_alpha: Optional[float] = None, config: Optional[ModelConfig] = None
                 ) -> tuple[Weights, ModelConfig, Optional[Path]]:
    """Open the DiT weights (with the LoRA merged on read when there is one) and their config.

    lora=True finds liveavatar.safetensors next to the checkpoint (none is fine), a path uses that file,
    False/None loads the base weights alone.
    """
    dit_dir = find_dit_dir(path)
    reader = CheckpointReader(dit_dir)
    if config is None:
        raw = reader.config
        if raw is None:
            raise CheckpointError(f"{dit_dir}: no config.json")
        config = from_wan_config(raw, name=dit_dir.name)
    lora_path: Optional[Path] = None
    if lora is True:
        lora_path = find_lora(dit_dir)
    elif lora:
        lora_path = Path(lora)
        if not lora_path.is_file():
            raise CheckpointError(f"{lora_path}: LoRA file not found")
    weights: Weights = reader
    if lora_path is not None:
        weights = MergedWeights(reader, LoraAdapter(lora_path, alpha=lora_alpha, default_alpha=config.lora_alpha))
        if weights.replaced and os.environ.get("RANK", "0") == "0":
            print(f"qavatar: {len(weights.replaced)} parameter(s) replaced by full tensors from {lora_path.name} "
                  f"(non-LoRA keys, loaded as the reference does)", file=sys.stderr)
    return weights, config, lora_path


def is_quantized(dit_dir: Path) -> bool:
    cfg = CheckpointReader(dit_dir).config or {}
    return "quantization_config" in cfg


def load_dit(path: "str | Path", dtype: torch.dtype = torch.float32, device: "str | torch.device" = "cpu",
             lora: "str | Path | bool | None" = True, lora_alpha: Optional[float] = None) -> LiveAvatarDiT:
    """Load the whole (unsharded) DiT: bf16 checkpoints with the LoRA merged, or a qavatar-quantized one.

    Quantized Linears keep their stored int8/fp8 weights and fp32 scales; everything else is cast to dtype.
    """
    dit_dir = find_dit_dir(path)
    raw = CheckpointReader(dit_dir).config or {}
    qc = raw.get("quantization_config")
    if qc is not None and lora not in (True, False, None):
        raise CheckpointError(f"{dit_dir} is quantized with the LoRA already merged; do not pass a LoRA")
    weights, cfg, _ = open_weights(dit_dir, False if qc is not None else lora, lora_alpha)
    with torch.device("meta"):
        model = build_model(cfg)
    if qc is not None:
        from ..quant import QuantConfig, quantized_skeleton

        quantized_skeleton(model, QuantConfig.from_quantization_config(qc),
                           {k: tuple(weights.shape(k)) for k in weights.keys()}, dtype)
    expected = model.state_dict()
    check_keys(weights, {k: tuple(v.shape) for k, v in expected.items()}, str(dit_dir))
    from .integrity import screen_weight

    keep = _stored_dtype_keys(model)
    state = {}
    for k in expected:
        t = weights.get(k)
        screen_weight(weights, k, t)  # NaN/Inf or a corrupt magnitude, named with its file
        state[k] = t.to(device=device, dtype=None if k in keep else dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def _stored_dtype_keys(model: torch.nn.Module) -> set[str]:
    """Keys whose tensors load in their stored dtype (quantized weights and their fp32 scales)."""
    from ..quant import QuantLinear

    keys = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            keys |= {f"{name}.{b}" for b in ("weight", "weight_scale", "input_scale", "smooth_scale")}
    return keys
