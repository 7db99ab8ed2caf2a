"""Calibration statistics of Linear inputs, per slot (each sampler step, and the sink prefill).

Per module: `absmax` [slots, in] per-channel max |x|; `percentiles` [slots, 3] per-tensor (p99.9, p99.99, max)
of |x| (the max over calls); `tokens` [slots]. Saved as safetensors (`<module>.absmax`, ...) with the slot
names in the metadata, so the format is independent of which encoders produced the inputs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..checkpoint.writer import save_file_atomic
from ..errors import CalibrationError

PERCENTILES = (99.9, 99.99, 100.0)
FORMAT = "qavatar-calibration-stats/1"


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    if signal <= 0:
        return float("-inf")
    return 10 * math.log10(signal / noise)


def _tail_percentiles(absx: torch.Tensor) -> torch.Tensor:
    """(p99.9, p99.99, max) of a flat non-negative tensor, via top-k (torch.quantile caps its input size)."""
    n = absx.numel()
    out = []
    for p in PERCENTILES:
        k = max(1, math.ceil(n * (100.0 - p) / 100.0))
        out.append(torch.topk(absx, min(k, n)).values[-1] if p < 100 else absx.max())
    return torch.stack(out).float()


@dataclass
class ActivationStats:
    slots: list[str]
    absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    percentiles: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)

    def observe(self, name: str, slot: int, x: torch.Tensor, pair: str) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise CalibrationError(f"{pair}: NaN or Inf in the input of {name} at {self.slots[slot]}; check this "
                                   f"pair's media, or the checkpoint's weights")
        absx = x.abs()
        if name not in self.absmax:
            s = len(self.slots)
            self.absmax[name] = torch.zeros(s, x.shape[1])
            self.percentiles[name] = torch.zeros(s, len(PERCENTILES))
            self.tokens[name] = torch.zeros(s, dtype=torch.long)
        self.absmax[name][slot] = torch.maximum(self.absmax[name][slot], absx.amax(dim=0).cpu())
        self.percentiles[name][slot] = torch.maximum(self.percentiles[name][slot], _tail_percentiles(absx.flatten()).cpu())
        self.tokens[name][slot] += x.shape[0]

    def channel_absmax(self, name: str, slot: Optional[int] = None) -> torch.Tensor:
        a = self.absmax[name]
        return a.max(dim=0).values if slot is None else a[slot]

    def save(self, path: "str | Path", **meta: str) -> None:
        tensors = {}
        for name in sorted(self.absmax):
            tensors[f"{name}.absmax"] = self.absmax[name]
            tensors[f"{name}.percentiles"] = self.percentiles[name]
            tensors[f"{name}.tokens"] = self.tokens[name]
        save_file_atomic(path, tensors, {"format": FORMAT, "slots": json.dumps(self.slots),
                                         "percentiles": json.dumps(PERCENTILES), **meta})

    @classmethod
    def load(cls, path: "str | Path") -> "ActivationStats":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CalibrationError(f"{path}: not a qavatar calibration statistics file")
            stats = cls(json.loads(meta["slots"]))
            for key in f.keys():
                name, kind = key.rsplit(".", 1)
                getattr(stats, kind)[name] = f.get_tensor(key)
        return stats


class SqnrMeter:
    """Accumulates signal and error energy per (module, candidate, slot)."""

    def __init__(self) -> None:
        self.energy: dict[tuple[str, str, int], list[float]] = {}

    def add(self, name: str, candidate: str, slot: int, ref: torch.Tensor, approx: torch.Tensor) -> None:
        e = self.energy.setdefault((name, candidate, slot), [0.0, 0.0])
        ref = ref.float()
        e[0] += ref.pow(2).sum().item()
        e[1] += (ref - approx.float()).pow(2).sum().item()

    def db(self, name: str, candidate: str, slot: Optional[int] = None) -> float:
        items = [(k, v) for k, v in self.energy.items() if k[0] == name and k[1] == candidate
                 and (slot is None or k[2] == slot)]
        if not items:
            return float("nan")
        return sqnr_db(sum(v[0] for _, v in items), sum(v[1] for _, v in items))

    def candidates(self, name: str) -> list[str]:
        return sorted({k[1] for k in self.energy if k[0] == name})
