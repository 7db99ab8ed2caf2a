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
# The format of the group of unfolded SmoothQuant layers: no compressed-tensors reader knows it, on purpose.
SMOOTH_FORMAT = "qavatar-smoothquant-divide-input-by-smooth_scale"

# Every Linear of the blocks and of the audio injector; the rest stays bf16, as upstream keeps it.
DEFAULT_TARGETS = (
    r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)",
    r"blocks\.\d+\.ffn\.(0|2)",
    r"audio_injector\.injector\.\d+\.(q|k|v|o)",
    r"audio_injector\.injector_adain_layers\.\d+\.linear",
)
_DEFAULT_RE = re.compile("|".join(f"(?:{p})" for p in DEFAULT_TARGETS) + "$")
# The same, as compressed-tensors targets (re.match from the start, so anchored at the end): by name, not by the
# class "Linear", so that a reader without the model class (compressed-tensors' model-free converter, which takes
# every `*.weight` for a Linear's under "Linear") finds exactly the quantized layers.
CT_TARGETS = [f"re:{p}$" for p in DEFAULT_TARGETS]


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

    def check_ignore(self, linear_names: list[str]) -> None:
        """Every --ignore pattern names at least one Linear that would be quantized: a typo (a `.weight`
        suffix, a wrong block number) would otherwise quantize the layer meant to stay bf16, without a word."""
        targets = [n for n in linear_names if is_default_target(n)]
        for g in self.ignore:
            if not any(fnmatch.fnmatchcase(n, g) for n in targets):
                raise ConfigError(f"--ignore {g!r} matches none of the {len(targets)} Linears quantized (module "
                                  f"names such as {targets[0]!r}, no '.weight'); fix the pattern or drop it")

    # ------------------------------------------------------------------ compressed-tensors description
    @property
    def storage_format(self) -> str:
        """The compressed-tensors format of the stored weights: plain int8/e4m3 plus a per-channel scale.

        What compressed-tensors 0.20 would infer itself, except int8-wo: it infers `pack-quantized` (int8
        packed into int32 words, `weight_packed`), which is not how qavatar stores it.
        """
        if self.weight_only:
            return "naive-quantized"
        return "int-quantized" if self.weight_dtype == torch.int8 else "float-quantized"

    def quantization_config(self, ignore: list[str], qavatar: dict[str, Any],
                            smoothed: Optional[list[str]] = None) -> dict[str, Any]:
        """config.json's `quantization_config`. Every group declares its own `format`: compressed-tensors reads
        the format per group, and infers one when it is missing (wrongly for int8-wo).

        `smoothed` are the layers whose stored weight is W * smooth_scale (SmoothQuant not folded away). A
        reader must divide their input by smooth_scale; one that does not know to would compute W * s, so they
        form their own group with a format no compressed-tensors reader has (`SMOOTH_FORMAT`): such a reader
        refuses the whole config instead of computing a wrong layer (docs/quantization.md, Interoperability).
        """
        kind = "int" if self.weight_dtype == torch.int8 else "float"
        weights = {"num_bits": 8, "type": kind, "strategy": "channel", "symmetric": True, "dynamic": False}
        acts = None
        if not self.weight_only:
            acts = {"num_bits": 8, "type": kind, "symmetric": True,
                    "strategy": "token" if self.activations == "dynamic" else "tensor",
                    "dynamic": self.activations == "dynamic"}
        groups = {"group_0": {"targets": list(CT_TARGETS), "weights": weights, "input_activations": acts,
                              "format": self.storage_format}}
        if smoothed:  # exact names outrank regexes when a reader matches targets
            groups["group_1"] = {"targets": sorted(smoothed), "weights": dict(weights),
                                 "input_activations": dict(acts) if acts else None, "format": SMOOTH_FORMAT}
        return {
            "quant_method": "compressed-tensors",
            "format": self.storage_format if not smoothed else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
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


def static_scale_slots(weights) -> int:
    """How many static input scales each quantized Linear of a checkpoint holds: 0 (dynamic or weight-only),
    1 (per-tensor) or steps + 1 (per-timestep: one per sampler step, then the sink prefill). Reads shapes only."""
    key = next((k for k in weights.keys() if k.endswith(".input_scale")), None)
    return 0 if key is None else int(weights.shape(key)[0])


def check_sample_steps(slots: int, steps: int) -> None:
    """Per-timestep scales belong to the step count they were calibrated for: with more steps the sink slot is
    out of range, with fewer the sink prefill would run on a sampler step's scale (0.8 dB instead of 41 on the
    worst layer, issue 10). Refuse the mismatch rather than guess a scale."""
    if slots > 1 and slots != steps + 1:
        raise ConfigError(f"--sample-steps {steps}: this checkpoint's static input scales were calibrated per sampler "
                          f"step for {slots - 1} steps; run --sample-steps {slots - 1}, or quantize without "
                          f"--per-timestep (one per-tensor scale fits any step count)")
