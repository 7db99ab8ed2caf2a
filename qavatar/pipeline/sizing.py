"""Output size: `--size` is an area; the aspect ratio follows the image; both sides are multiples of 64.

The rule is the reference's (get_size_less_than_area): scale the image down until its 64-padded size fits
the area, trying 100 scales from the largest; if none fits, fall back to the aspect-ratio box floored to 64.
The image is then resized so its shorter side matches and center-cropped (torchvision Resize + CenterCrop on the
8-bit PIL image; where the resized image is too small CenterCrop pads with black), then scaled to [-1, 1].
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
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


@dataclass(frozen=True)
class CropPlan:
    """How an image of (h, w) becomes (height, width), as torchvision's Resize(min) + CenterCrop do it."""
    resized_hw: tuple[int, int]  # after resizing the short side to min(height, width)
    pad_ltrb: tuple[int, int, int, int]  # black bars added by CenterCrop where the resized image is too small
    offset_tl: tuple[int, int]  # crop offset (top, left) in the padded image
    out_hw: tuple[int, int]

    def image_box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the resized image inside the output; the rest is padding."""
        (nh, nw), (l, t, _, _), (top, left) = self.resized_hw, self.pad_ltrb, self.offset_tl
        (height, width) = self.out_hw
        return max(0, t - top), max(0, l - left), min(height, t + nh - top), min(width, l + nw - left)

    @property
    def padded_pixels(self) -> int:
        top, left, bottom, right = self.image_box()
        return self.out_hw[0] * self.out_hw[1] - (bottom - top) * (right - left)


def crop_plan(h: int, w: int, height: int, width: int) -> CropPlan:
    """Resize so the SHORT side is min(height, width) (long side truncated), then center-crop to (height, width):
    an axis shorter than the crop is first padded (left/top diff // 2, right/bottom the rest), and the crop
    offsets are round((size - crop) / 2) with Python's round-half-even, exactly as torchvision does."""
    short = min(height, width)
    if w <= h:
        nh, nw = int(short * h / w), short
    else:
        nh, nw = short, int(short * w / h)
    pw, ph = max(0, width - nw), max(0, height - nh)
    pad = (pw // 2, ph // 2, (pw + 1) // 2, (ph + 1) // 2)
    top, left = int(round((nh + ph - height) / 2.0)), int(round((nw + pw - width) / 2.0))
    return CropPlan((nh, nw), pad, (top, left), (height, width))


def resize_and_crop(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [height, width, 3]: PIL bilinear resize (the reference resizes the PIL image,
    antialiased), black padding, center crop."""
    from PIL import Image

    plan = crop_plan(rgb.shape[0], rgb.shape[1], height, width)
    nh, nw = plan.resized_hw
    if (nh, nw) != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BILINEAR))
    l, t, r, b = plan.pad_ltrb
    if l or t or r or b:
        rgb = np.pad(rgb, ((t, b), (l, r), (0, 0)))  # uint8 0: black, -1.0 once scaled
    top, left = plan.offset_tl
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


def to_pixel_values(rgb: "np.ndarray | torch.Tensor") -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] with ToTensor's arithmetic: /255 then *2 - 1
    (not /127.5 - 1, which rounds differently)."""
    u8 = rgb if isinstance(rgb, torch.Tensor) else torch.from_numpy(np.array(rgb, dtype=np.uint8))  # a copy
    return u8.permute(2, 0, 1).float().div(255) * 2 - 1.0


def as_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, h, w] uint8, or float in [-1, 1] from 8-bit pixels (media.load_image) -> uint8 [h, w, 3].
    Float input is rounded back to its 8-bit levels: exact for v/127.5 - 1."""
    if image.dtype != torch.uint8:
        image = ((image.float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return image.permute(1, 2, 0).contiguous().numpy()


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The reference's reference-image preparation: [3, h, w] (uint8, or float in [-1, 1]) -> float32
    [3, height, width] in [-1, 1], resized on the short side, black-padded where too small, center-cropped."""
    return to_pixel_values(resize_and_crop(as_uint8(image), height, width))
