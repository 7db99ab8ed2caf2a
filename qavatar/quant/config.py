"""Quantization schemes as one small validated config (torchao style), and their on-disk description.

    int8      W8A8: int8 weights per output channel, per-token dynamic int8 activations, int32 accumulation
    fp8       W8A8: float8_e4m3fn weights per output channel, per-token dynamic e4m3 activations (sm89+ GPUs;
              weight-only elsewhere)
    int8-wo   int8 weights, activations stay in the compute dtype
    fp8-wo    e4m3 weights, activations stay in the compute dtype
activations="static" replaces per-token scales by one calibrated per-tensor scale (per sampler step with
per_timestep=True). The checkpoint describes itself with a compressed-tensors `quantization_config`.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from ..errors import ConfigError

PRECISIONS = ("int8", "fp8", "int8-wo", "fp8-wo")
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}

# Every Linear of the blocks and of the audio injector; the rest stays bf16, as upstream keeps it.
DEFAULT_TARGETS = (
    r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)",
    r"blocks\.\d+\.ffn\.(0|2)",
    r"audio_injector\.injector\.\d+\.(q|k|v|o)",
    r"audio_injector\.injector_adain_layers\.\d+\.linear",
)
_DEFAULT_RE = re.compile("|".join(f"(?:{p})" for p in DEFAULT_TARGETS) + "$")


def is_default_target(name: str) -> bool:
    return _DEFAULT_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Example: QuantConfig("int8", smooth_alpha=0.5, ignore=("blocks.0.*",))
    """
    precision: str = "int8"
    activations: str = "dynamic"  # "dynamic" (per-token) or "static" (per-tensor, calibrated)
    per_timestep: bool = False  # static only: one scale per sampler step (and one for the sink prefill)
    smooth_alpha: Optional[float] = None  # SmoothQuant migration strength, int8 W8A8 only
    ignore: tuple[str, ...] = ()  # fnmatch globs of module names kept in bf16
    auto_skip_db: Optional[float] = None  # keep a layer bf16 if its calibration SQNR is below this
    version: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.activations not in ("dynamic", "static"):
            raise ConfigError(f"activations must be 'dynamic' or 'static', not {self.activations!r}")
        if self.weight_only and self.activations == "static":
            raise ConfigError(f"{self.precision} keeps activations unquantized; static scales need int8 or fp8")
        if self.per_timestep and self.activations != "static":
            raise ConfigError("--per-timestep needs --activations static")
        if self.smooth_alpha is not None:
            if self.precision != "int8":
                raise ConfigError("SmoothQuant (--smooth) applies to int8 W8A8 only")
            if not 0.0 < self.smooth_alpha < 1.0:
                raise ConfigError(f"--smooth alpha must lie in (0, 1), got {self.smooth_alpha}")
        object.__setattr__(self, "ignore", tuple(self.ignore))

    @property
    def weight_only(self) -> bool:
        return self.precision.endswith("-wo")

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.int8 if self.precision.startswith("int8") else torch.float8_e4m3fn

    @property
    def qmax(self) -> float:
        return QMAX[self.weight_dtype]

    def targets(self, name: str) -> bool:
        """True when module `name` is quantized by default and not ignored."""
        return is_default_target(name) and not any(fnmatch.fnmatchcase(name, g) for g in self.ignore)

    # ------------------------------------------------------------------ compressed-tensors description
    def quantization_config(self, ignore: list[str], qavatar: dict[str, Any]) -> dict[str, Any]:
        kind = "int" if self.weight_dtype == torch.int8 else "float"
        weights = {"num_bits": 8, "type": kind, "strategy": "channel", "symmetric": True, "dynamic": False}
        acts = None
        if not self.weight_only:
            acts = {"num_bits": 8, "type": kind, "symmetric": True,
                    "strategy": "token" if self.activations == "dynamic" else "tensor",
                    "dynamic": self.activations == "dynamic"}
        fmt = {"int8": "int-quantized", "fp8": "float-quantized", "int8-wo": "naive-quantized",
               "fp8-wo": "float-quantized"}[self.precision]
        return {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": sorted(ignore),
            "qavatar": {"scheme": asdict(self), **qavatar},
        }

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any]) -> "QuantConfig":
        try:
            scheme = dict(qc["qavatar"]["scheme"])
        except (KeyError, TypeError):
            raise ConfigError("quantization_config has no qavatar scheme; only qavatar checkpoints are supported") from None
        scheme["ignore"] = tuple(scheme.get("ignore", ()))
        return cls(**scheme)
