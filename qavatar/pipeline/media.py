"""Reading the user's media: a portrait image and a speech track. Every failure names the file."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import QavatarError


class MediaError(QavatarError):
    pass


MIN_IMAGE_SIDE = 64  # one 64-px tile, the smallest output side: below it the portrait is mostly invented


def load_image(path: "str | Path") -> torch.Tensor:
    """RGB image as float [3, H, W] in [-1, 1], upright as its EXIF orientation says."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: image not found")
    try:
        with warnings.catch_warnings():  # between 1x and 2x Pillow's limit it only warns; we decode those
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(path, *im.size)
                rgb = _to_rgb8(path, ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise MediaError(f"{path}: {int(pixels.group(1)) if pixels else 'too many'} pixels is past Pillow's "
                         f"decompression-bomb limit ({2 * Image.MAX_IMAGE_PIXELS} pixels); scale it down (a portrait "
                         f"needs a few megapixels at most)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # SyntaxError: Pillow's broken-file
        raise MediaError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def _check_size(path: Path, width: int, height: int) -> None:
    if min(width, height) < MIN_IMAGE_SIDE:
        raise MediaError(f"{path}: {width}x{height} pixels is too small; the shorter side must be at least "
                         f"{MIN_IMAGE_SIDE} px (one {MIN_IMAGE_SIDE}-px tile of the output)")


def _to_rgb8(path: Path, im) -> np.ndarray:
    """Any Pillow mode -> [H, W, 3] uint8 with each mode's full range mapped onto 0..255.

    Pillow's convert("RGB") clips 16- and 32-bit values at 255 (a 16-bit grayscale PNG turns white), so those
    are scaled here: I;16* and I by 65535 (16-bit data, as PNG and TIFF store it; I holding only 0..255 as
    8-bit data), F from 0..1 (or 0..255 when it goes above 1). Transparent pixels (an alpha channel, or a
    palette or colour key with transparency) are composited onto white, not left as whatever colour the file
    keeps under them.
    """
    from PIL import Image

    if im.mode == "I" or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.int64)  # I;16B arrives big-endian: astype makes it native
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise MediaError(f"{path}: {im.mode} pixel values span {a.min()}..{a.max()}, outside 0..65535; save it "
                             f"as an 8- or 16-bit image")
        # mode I (32-bit) with no value above 255 is 8-bit data widened (Image.convert("I") of a photo): as
        # 16-bit it would load black. I;16 declares its depth, so it is always 16-bit.
        scale = 1.0 if im.mode == "I" and a.size and a.max() <= 255 else 255 / 65535
        return np.repeat(np.round(a * scale).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all() or (a.size and (a.min() < 0 or a.max() > 255)):
            raise MediaError(f"{path}: floating-point pixels must be finite and in 0..1 (or 0..255); save it as an "
                             f"8- or 16-bit image")
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return np.repeat(np.round(a * scale).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba)
                          .convert("RGB"))
    return np.asarray(im.convert("RGB"))


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
