"""Model configuration: one dataclass, named presets, and the mapping to Wan's config.json.

The presets are data (gpt-fast style): `liveavatar-14b` holds the exact reference values, `tiny` the
same module tree at a size that runs in milliseconds on a CPU (it matches ../shared/fixtures).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    # --- DiT shape (Wan config.json names) ---
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    cond_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # --- audio path ---
    audio_dim: int = 1024
    num_audio_token: int = 4
    num_wav2vec_layers: int = 25
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    # --- FramePack motioner: latent frames per bucket, nearest to farthest ---
    framepack_buckets: tuple[int, int, int] = (1, 2, 16)
    # --- streaming conventions of the reference pipeline (not in config.json) ---
    motion_frames: tuple[int, int] = (73, 19)  # pixel frames, latent frames of motion context
    num_frames_per_block: int = 3  # latent frames generated per block
    clip_latent_frames: int = 12  # latent frames per clip (48 video frames); also the rolling KV window
    sample_fps: int = 25
    ref_rope_frame: int = 30  # RoPE time index of the reference-image tokens
    sink_offset_range: tuple[int, int] = (4, 30)  # python random.randint bounds of the sink re-RoPE distance
    default_size: tuple[int, int] = (704, 384)  # pixel H, W used when a command is given no --size
    # --- Live Avatar LoRA defaults (used when the LoRA file does not say) ---
    lora_alpha: float = 64.0
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.dim % 4:
            raise ConfigError(f"dim {self.dim} must be divisible by 4 (audio encoder widths dim/4, dim/2)")
        bad = [i for i in self.audio_inject_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"audio_inject_layers {bad} outside 0..{self.num_layers - 1}")
        if len(set(self.audio_inject_layers)) != len(self.audio_inject_layers):
            raise ConfigError(f"audio_inject_layers has duplicates: {self.audio_inject_layers}")
        if self.clip_latent_frames % self.num_frames_per_block:
            raise ConfigError("clip_latent_frames must be a multiple of num_frames_per_block")
        if sum(self.framepack_buckets) != self.motion_frames[1]:
            raise ConfigError(
                f"framepack buckets {self.framepack_buckets} must cover the {self.motion_frames[1]} motion latent frames")

    # --- derived sizes ---
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs of head_dim given to (t, h, w): d/2 - 2*(d/2//3), d/2//3, d/2//3."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)

    @property
    def inject_index(self) -> dict[int, int]:
        """Block index -> audio injector index, in block order (reference: AudioInjector_WAN)."""
        return {layer: i for i, layer in enumerate(sorted(self.audio_inject_layers))}

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.patch_size[1]) * (latent_w // self.patch_size[2])

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # --- serialisation ---
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def to_wan_config(self) -> dict[str, Any]:
        """config.json in the layout Wan2.2-S2V-14B ships (diffusers register_to_config of WanModel_S2V)."""
        return {
            "_class_name": "WanModel_S2V",
            "_diffusers_version": "0.35.0",
            "model_type": "s2v",
            "patch_size": list(self.patch_size),
            "text_len": self.text_len,
            "in_dim": self.in_dim,
            "dim": self.dim,
            "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim,
            "text_dim": self.text_dim,
            "out_dim": self.out_dim,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "window_size": [-1, -1],
            "qk_norm": True,
            "cross_attn_norm": True,
            "eps": self.eps,
            "cond_dim": self.cond_dim,
            "audio_dim": self.audio_dim,
            "num_audio_token": self.num_audio_token,
            "enable_adain": True,
            "adain_mode": "attn_norm",
            "audio_inject_layers": list(self.audio_inject_layers),
            "zero_init": True,
            "zero_timestep": True,
            "enable_motioner": False,
            "add_last_motion": True,
            "enable_tsm": False,
            "trainable_token_pos_emb": False,
            "motion_token_num": 1024,
            "enable_framepack": True,
            "framepack_drop_mode": "padd",
            # qavatar's own section: streaming conventions the reference keeps in code, not in config.json
            "qavatar": {k: v for k, v in self.to_dict().items() if k not in _WAN_KEYS},
        }


# Wan config.json keys we read, and the values of the switches we support (the ones Live Avatar uses).
_WAN_KEYS = {"dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "cond_dim", "patch_size", "text_dim",
             "text_len", "freq_dim", "eps", "audio_dim", "num_audio_token", "audio_inject_layers"}
_WAN_REQUIRED_SWITCHES = {
    "model_type": "s2v", "qk_norm": True, "cross_attn_norm": True, "enable_adain": True, "adain_mode": "attn_norm",
    "zero_timestep": True, "enable_framepack": True, "enable_motioner": False, "framepack_drop_mode": "padd",
    "enable_tsm": False, "trainable_token_pos_emb": False, "window_size": [-1, -1], "add_last_motion": True,
}
# Training-only or inert keys of the reference constructors.
_WAN_IGNORED = {"_class_name", "_diffusers_version", "zero_init", "motion_token_num", "cross_attn_type",
                "slide_motion_frames", "local_attn_size", "_name_or_path", "qavatar", "quantization_config"}

PRESETS: dict[str, ModelConfig] = {
    "liveavatar-14b": ModelConfig(name="liveavatar-14b"),
    # Same module tree as the 14B model (every key, every kind of layer) at fixture size.
    "tiny": ModelConfig(
        name="tiny", dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32, audio_dim=32,
        audio_inject_layers=(0, 2, 3), lora_alpha=4.0, default_size=(128, 64),
    ),
}


def from_wan_config(raw: Mapping[str, Any], name: str = "custom") -> ModelConfig:
    """Build a ModelConfig from a Wan config.json dict (or a fixture's constructor_kwargs)."""
    raw = dict(raw)
    if "constructor_kwargs" in raw:  # fixture layout: {"constructor_kwargs": {...}, "call_conventions": {...}}
        calls = raw.get("call_conventions", {})
        raw = dict(raw["constructor_kwargs"])
        extra = {}
        if "motion_frames" in calls:
            extra["motion_frames"] = tuple(calls["motion_frames"])
        for k_src, k_dst in (("num_frames_per_block", "num_frames_per_block"),
                             ("clip_latent_frames", "clip_latent_frames"),
                             ("num_wav2vec_layers", "num_wav2vec_layers")):
            if k_src in calls:
                extra[k_dst] = calls[k_src]
        raw["qavatar"] = {**extra, **raw.get("qavatar", {})}
    for key, want in _WAN_REQUIRED_SWITCHES.items():
        if key in raw and _norm(raw[key]) != _norm(want):
            raise ConfigError(f"config.json: {key}={raw[key]!r} is not supported (Live Avatar uses {want!r})")
    unknown = set(raw) - _WAN_KEYS - set(_WAN_REQUIRED_SWITCHES) - _WAN_IGNORED
    if unknown:
        raise ConfigError(f"config.json: unknown keys {sorted(unknown)}")
    kw: dict[str, Any] = {k: raw[k] for k in _WAN_KEYS if k in raw}
    for k in ("patch_size", "audio_inject_layers"):
        if k in kw:
            kw[k] = tuple(kw[k])
    own = dict(raw.get("qavatar", {}))
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    for k, v in own.items():
        if k not in valid:
            raise ConfigError(f"config.json: unknown qavatar key {k!r}")
        kw.setdefault(k, tuple(v) if isinstance(v, list) else v)
    kw.setdefault("name", name)
    return ModelConfig(**kw)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def resolve_config(spec: "str | Mapping[str, Any] | ModelConfig | Path") -> ModelConfig:
    """A preset name, a config dict, a ModelConfig, or a path to a config.json / checkpoint directory."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, Mapping):
        return from_wan_config(spec)
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return from_wan_config(json.loads(path.read_text()), name=path.parent.name)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    raise ConfigError(f"unknown config {str(spec)!r}: use one of {sorted(PRESETS)} or a path to config.json")
