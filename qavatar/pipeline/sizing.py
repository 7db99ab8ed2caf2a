"""Output size: `--size` is an area; the aspect ratio follows the image; both sides are multiples of 64.

The rule is the reference's (get_size_less_than_area): scale the image down until its 64-padded size fits
the area, trying 100 scales from the largest; if none fits, fall back to the aspect-ratio box floored to 64.
The image is then resized so its shorter side matches and center-cropped (torchvision Resize + CenterCrop).
"""
from __future__ import annotations

import math
import re

import torch

from ..errors import ConfigError

DIVISOR = 64


def parse_area(size: str) -> int:
    """'704*384' (or 704x384) -> 270336 pixels; a bare number is an area."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[*xX]\s*(\d+))?\s*", str(size))
    if not m:
        raise ConfigError(f"--size {size!r}: expected an area as H*W, e.g. 704*384")
    area = int(m.group(1)) * int(m.group(2) or 1)
    if area < DIVISOR * DIVISOR:
        raise ConfigError(f"--size {size}: the area {area} is below one {DIVISOR}x{DIVISOR} tile; sides are "
                          f"multiples of {DIVISOR}")
    return area


def _padded(v: int) -> int:
    return v + (DIVISOR - v % DIVISOR) % DIVISOR


def size_for_area(height: int, width: int, area: int) -> tuple[int, int]:
    """(H, W), multiples of 64, at the image's aspect ratio and at most `area` pixels."""
    if height <= 0 or width <= 0:
        raise ConfigError(f"image of size {height}x{width} has no pixels")
    if height * width <= area:
        lo, hi = 0.1, 1.0
    else:
        d = DIVISOR - 1
        a, b, c = height * width, d * (height + width), d * d - area
        lo, hi = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a), math.sqrt(area / (height * width))
    for i in range(100):
        scale = hi - (hi - lo) * i / 100
        h, w = _padded(int(height * scale)), _padded(int(width * scale))
        if h * w <= area and h > 0 and w > 0:
            return h, w
    aspect = width / height
    w = int((area * aspect) ** 0.5 // DIVISOR * DIVISOR)
    h = int((area / aspect) ** 0.5 // DIVISOR * DIVISOR)
    if w >= width or h >= height:
        w, h = width // DIVISOR * DIVISOR, height // DIVISOR * DIVISOR
    if h <= 0 or w <= 0:
        raise ConfigError(f"no {DIVISOR}-multiple size fits an area of {area} pixels at this image's aspect "
                          f"ratio ({width}x{height}); ask for a larger --size")
    return h, w


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, h, w] -> [3, height, width]: shorter side resized to min(height, width) (bilinear, antialiased),
    then center-cropped; any side left short is zero-padded, as torchvision's CenterCrop does."""
    import torch.nn.functional as F

    _, h, w = image.shape
    short = min(height, width)
    nh, nw = (short, max(1, int(short * w / h))) if h <= w else (max(1, int(short * h / w)), short)
    x = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = int(round((nh - height) / 2.0)), int(round((nw - width) / 2.0))
    if nh < height or nw < width:
        ph, pw = max(0, height - nh), max(0, width - nw)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        nh, nw = x.shape[-2:]
        top, left = int(round((nh - height) / 2.0)), int(round((nw - width) / 2.0))
    return x[:, top:top + height, left:left + width].clamp(-1, 1)
