"""Is a weight intact? Non-finite values, implausible magnitudes, and files that differ from their manifest.

Three checks, each paid for by a read that happens anyway:
- `screen(key, t)`: one aminmax per tensor (or slice) as it is read. NaN/Inf are always refused; a float
  weight beyond PLAUSIBLE_RATIO times its tensor's robust scale (median |w| of a strided subsample) and beyond
  PLAUSIBLE_FLOOR in absolute value is refused as corrupt (a flipped exponent byte: 0.05 -> -51).
- `StreamHash`: the sha256 of a file computed from the bytes the reader hands out, in file order, so a
  complete read of a file verifies it against `qavatar-manifest.json` without a second pass.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError

# Refuse |w| > PLAUSIBLE_RATIO * median|w| when also |w| > PLAUSIBLE_FLOOR (docs/checkpoint.md: how they were chosen)
PLAUSIBLE_RATIO = 512.0
PLAUSIBLE_FLOOR = 16.0
_SAMPLE = 1 << 16  # elements of the strided subsample the median is taken on
_QUANT_AUX = (".weight_scale", ".input_scale", ".smooth_scale")


def _fp8_nan(t: torch.Tensor) -> bool:
    """float8_e4m3fn has no Inf; NaN is exponent and mantissa all ones (0x7f / 0xff)."""
    return bool(((t.reshape(-1).view(torch.uint8) & 0x7F) == 0x7F).any())


def nonfinite(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return False
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if t.dtype == torch.float8_e4m3fn:
            return _fp8_nan(t)
        return not bool(torch.isfinite(t.float()).all())
    lo, hi = torch.aminmax(t)  # NaN propagates into both, Inf into one
    return not bool(torch.isfinite(lo) & torch.isfinite(hi))


def robust_scale(t: torch.Tensor) -> float:
    """median |w| over a strided subsample of at most 65536 elements (mean |w| when the median is 0)."""
    flat = t.reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLE)].float().abs()
    m = float(sample.median())
    return m if m > 0 else float(sample.mean())


def implausible(t: torch.Tensor) -> Optional[tuple[int, float, float]]:
    """(flat index, value, robust scale) of the largest |w| when it is implausible, else None."""
    if t.dtype not in (torch.bfloat16, torch.float16, torch.float32) or t.numel() < 2:
        return None
    lo, hi = torch.aminmax(t)
    peak = max(-float(lo), float(hi))
    if peak <= PLAUSIBLE_FLOOR:
        return None
    scale = robust_scale(t)
    if scale <= 0 or peak <= PLAUSIBLE_RATIO * scale:
        return None
    idx = int(t.reshape(-1).float().abs().argmax())
    return idx, float(t.reshape(-1)[idx]), scale


def screen(key: str, t: torch.Tensor, where: "str | Path", merged: Optional["str | Path"] = None,
           plausibility: bool = True) -> None:
    """Raise CheckpointError naming the tensor and its file when `t` is non-finite or implausible.
    merged: the LoRA file merged into t (named too, since either file may be the damaged one)."""
    via = f", after merging the LoRA {merged}" if merged else ""
    if nonfinite(t):
        raise CheckpointError(f"{key} holds NaN or Inf ({where}{via}); the checkpoint is damaged: re-download or "
                              f"re-create it")
    if plausibility and not key.endswith(_QUANT_AUX) and os.environ.get("QAVATAR_NO_PLAUSIBILITY") != "1":
        bad = implausible(t)
        if bad is not None:
            idx, value, scale = bad
            raise CheckpointError(
                f"{key} holds {value:g} at flat index {idx}, {abs(value) / scale:.0f}x its typical magnitude "
                f"{scale:.3g} ({where}{via}): the file is corrupt (a damaged byte?); re-download or re-create it "
                f"(QAVATAR_NO_PLAUSIBILITY=1 skips this check)")


def screen_weight(weights, key: str, t: torch.Tensor) -> None:
    """screen() for a tensor read from a CheckpointReader or MergedWeights, naming its file (and the LoRA)."""
    base = getattr(weights, "base", weights)
    lora = getattr(weights, "lora", None)
    merged = lora.path if lora is not None and key in getattr(weights, "_targets", {}) else None
    screen(key, t, base.file_of(key), merged)


# ----------------------------------------------------------------- manifest hashing while reading
def manifest_hashes(directory: Path) -> Optional[dict[str, dict]]:
    """{relative name: {bytes, sha256}} of qavatar-manifest.json, None when there is none."""
    from .writer import MANIFEST

    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        return {k: {"bytes": int(v["bytes"]), "sha256": str(v["sha256"])} for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: unreadable manifest; re-download the checkpoint or delete the manifest "
                              f"to skip the hash check") from None


class StreamHash:
    """sha256 of one file fed by the reader's own reads. Bytes must come in file order: a read behind the
    cursor is ignored (already hashed), one ahead of it first hashes the gap (an extra read, counted)."""

    def __init__(self, path: Path, expected: str, size: int):
        self.path, self.expected, self.size = path, expected, size
        self.h = hashlib.sha256()
        self.pos = 0
        self.extra_bytes = 0
        self.done = False

    def feed(self, fh, at: int, data) -> None:
        if self.done or at + len(data) <= self.pos:
            return
        if at > self.pos:  # out of order: hash the skipped bytes now
            here = fh.tell()
            fh.seek(self.pos)
            while self.pos < at:
                chunk = fh.read(min(16 << 20, at - self.pos))
                if not chunk:
                    raise CheckpointError(f"{self.path}: truncated while reading (file changed on disk?)")
                self.h.update(chunk)
                self.pos += len(chunk)
                self.extra_bytes += len(chunk)
            fh.seek(here)
        self.h.update(memoryview(data)[self.pos - at:])
        self.pos = at + len(data)
        if self.pos >= self.size:
            self.finish()

    def finish(self) -> None:
        self.done = True
        if self.h.hexdigest() != self.expected:
            raise CheckpointError(f"{self.path}: sha256 differs from its qavatar-manifest.json: the file is corrupt "
                                  f"(tensors read from it cannot be trusted); re-download or re-create it")
