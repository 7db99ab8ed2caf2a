"""Calibration sets: a manifest of (image, audio, optional prompt) pairs, and the DiT inputs built from them.

manifest.json:
    {"format": "qavatar-calibration/1", "name": ..., "license": ...,
     "pairs": [{"name": "p00", "image": "images/p00.png", "audio": "audio/p00.wav", "prompt": "...",
                "sha256": {"image": "...", "audio": "..."}}]}
Paths are relative to the manifest. Each pair becomes the inputs of the first streaming block, exactly as
inference builds them: reference latent, motion latents (the image repeated over the motion frames, as the
pipeline starts), text states, and the block's bucketed audio.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import CalibrationError
from ..model import ModelConfig
from ..pipeline.audio_features import bucket_features, interpolate_features
from ..pipeline.media import MediaError, load_audio, load_image

DEFAULT_PROMPT = "A person is talking to the camera with natural expressions."
BUNDLED = Path(__file__).resolve().parents[2] / "calibration" / "bundled" / "manifest.json"


@dataclass
class Pair:
    name: str
    image: Path
    audio: Path
    prompt: str


@dataclass
class CalibrationInputs:
    """The DiT inputs of one pair: everything the first block of a stream needs."""
    name: str
    context: torch.Tensor  # [L, text_dim]
    ref_latents: torch.Tensor  # [1, C, 1, h, w]
    motion_latents: torch.Tensor  # [1, C, 19, h, w]
    audio: torch.Tensor  # [1, layers, C_a, 4 * frames_per_block]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CalibrationSet:
    def __init__(self, manifest: "str | Path"):
        path = Path(manifest)
        if path.is_dir():
            path = path / "manifest.json"
        if not path.is_file():
            raise CalibrationError(f"{path}: calibration manifest not found")
        try:
            raw = json.loads(path.read_text())
            entries = raw["pairs"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CalibrationError(f"{path}: not a calibration manifest (needs a 'pairs' list)") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise CalibrationError(f"{path}: 'pairs' must be a list of objects like {{\"image\": ..., \"audio\": ...}}")
        if not entries:
            raise CalibrationError(f"{path}: the calibration set is empty")
        self.path, self.name = path, raw.get("name", path.parent.name)
        self.pairs: list[Pair] = []
        for i, e in enumerate(entries):
            name = e.get("name") or f"pair {i}"
            if not (isinstance(e.get("image"), str) and isinstance(e.get("audio"), str)):
                raise CalibrationError(f"{path}: {name} needs both 'image' and 'audio' (file names)")
            pair = Pair(name, path.parent / e["image"], path.parent / e["audio"], e.get("prompt") or DEFAULT_PROMPT)
            for kind in ("image", "audio"):
                want = (e.get("sha256") or {}).get(kind)
                f = getattr(pair, kind)
                if not f.is_file():
                    raise CalibrationError(f"{name}: {kind} {f} not found")
                if want and _sha256(f) != want:
                    raise CalibrationError(f"{name}: {kind} {f} does not match its sha256 in {path.name}")
            self.pairs.append(pair)
        names = [p.name for p in self.pairs]
        if len(set(names)) != len(names):
            raise CalibrationError(f"{path}: pair names must be unique")

    def sha256(self) -> str:
        """Hash of the manifest and every media file (recorded in the quantized checkpoint)."""
        h = hashlib.sha256(self.path.read_bytes())
        for p in self.pairs:
            h.update(_sha256(p.image).encode() + _sha256(p.audio).encode() + p.prompt.encode())
        return h.hexdigest()

    def inputs(self, encoders, cfg: ModelConfig, latent_hw: tuple[int, int],
               limit: Optional[int] = None) -> list[CalibrationInputs]:
        """Encode every pair (errors name the pair)."""
        out = []
        fpb = cfg.num_frames_per_block
        for pair in self.pairs[:limit]:
            try:
                image = load_image(pair.image)
                wave = load_audio(pair.audio)
            except MediaError as e:
                raise CalibrationError(f"{pair.name}: {e}") from None
            try:
                ref, motion = encoders.condition(image, latent_hw)
            except ValueError as e:
                raise CalibrationError(f"{pair.name}: {e}") from None
            hidden = encoders.encode_audio(wave)
            feats, _ = bucket_features(interpolate_features(hidden, 50, 30), fps=cfg.sample_fps,
                                       clip_frames=4 * cfg.clip_latent_frames)
            audio = feats[..., : 4 * fpb]
            context = encoders.encode_text(pair.prompt)
            for what, t in (("image latent", ref), ("audio features", audio), ("text states", context)):
                if not torch.isfinite(t).all():
                    raise CalibrationError(f"{pair.name}: {what} contain NaN or Inf")
            out.append(CalibrationInputs(pair.name, context, ref, motion, audio))
        return out
