"""Reading the user's media: a portrait image and a speech track. Every failure names the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import QavatarError


class MediaError(QavatarError):
    pass


def load_image(path: "str | Path") -> torch.Tensor:
    """RGB image as float [3, H, W] in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1.0


def load_audio(path: "str | Path", sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 waveform at sample_rate (any format FFmpeg decodes), via PyAV."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: audio not found")
    chunks = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except Exception as e:  # PyAV raises many error types (InvalidDataError, ...)
        raise MediaError(f"{path}: not a readable audio file ({e.__class__.__name__})") from None
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if wave.size == 0:
        raise MediaError(f"{path}: audio is empty")
    if not np.isfinite(wave).all():
        raise MediaError(f"{path}: audio has NaN or Inf samples")
    return wave
