"""The Live Avatar LoRA (liveavatar.safetensors): parsing, validation and merging into the base weights.

Keys follow PEFT: `[base_model.model.]<module>.lora_A[.<adapter>].weight` ([rank, in]) and `lora_B` ([out, rank]);
kohya's lora_down/lora_up/alpha names are read too. W' = W + (alpha / rank) * B @ A, accumulated in fp32 and
cast back to W's dtype. The merge works on slices as well, so a tensor-parallel rank merges only its rows
(column-parallel: B[rows] @ A) or columns (row-parallel: B @ A[:, cols]) and never builds a full weight.

Other tensors in the file that name a model parameter (after the PEFT prefix, and PEFT's `base_layer.` of a
wrapped Linear) replace that parameter before the merge: the reference loads the whole file into the PEFT
model with strict=False (load_lora_weight_only=False). They must have the parameter's shape; an unknown name
or a wrong shape is an error, where the reference would skip the name silently.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import LoraError
from .reader import CheckpointReader

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[\w\-]+))?\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_PREFIXES = ("base_model.model.", "diffusion_model.", "model.")
_KIND = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _param_name(key: str) -> str:
    """A non-LoRA key -> the model parameter it names (PEFT wraps a targeted Linear as `<m>.base_layer`)."""
    return _strip(key).replace(".base_layer.", ".")


@dataclass
class LoraTarget:
    module: str
    a_key: str
    b_key: str
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _alpha(value, path: Path, what: str) -> float:
    """A finite LoRA alpha (file metadata is a string; a NaN alpha would pass as a 'damaged checkpoint')."""
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise LoraError(f"{path}: {what} {value!r} is not a number; pass --lora-alpha") from None
    if not math.isfinite(a):
        raise LoraError(f"{path}: {what} {value!r} is not finite; pass a finite --lora-alpha")
    return a


class LoraAdapter:
    def __init__(self, path: "str | Path", alpha: Optional[float] = None, default_alpha: Optional[float] = None):
        """alpha: explicit override; else a per-module `alpha` tensor, the file's `lora_alpha` metadata, or
        default_alpha (the model preset's value: 64 for Live Avatar's rank-128 LoRA)."""
        self.path = Path(path)
        self.reader = CheckpointReader(self.path)
        meta = next(iter(self.reader.metadata.values()), {})
        file_alpha = meta.get("lora_alpha") or meta.get("alpha")
        pairs: dict[str, dict[str, str]] = {}
        alphas: dict[str, float] = {}
        self.replacements: dict[str, str] = {}  # model parameter -> file key of a full tensor that replaces it
        for key in self.reader.keys():
            m = _KEY.match(key)
            if m:
                slot = pairs.setdefault(_strip(m["module"]), {})
                kind = _KIND[m["kind"]]
                if kind in slot:
                    raise LoraError(f"{self.path}: two {m['kind']} tensors for {m['module']} ({slot[kind]}, {key}); "
                                    f"several adapters in one file are not supported")
                slot[kind] = key
            elif (a := _ALPHA.match(key)) is not None:
                alphas[_strip(a["module"])] = float(self.reader.get(key).float().item())
            else:
                name = _param_name(key)
                if name in self.replacements:
                    raise LoraError(f"{self.path}: {self.replacements[name]!r} and {key!r} both name {name}")
                self.replacements[name] = key
        if not pairs and not self.replacements:
            raise LoraError(f"{self.path}: no LoRA tensors (expected PEFT keys like '<module>.lora_A.weight')")
        self.targets: dict[str, LoraTarget] = {}
        for module, slot in sorted(pairs.items()):
            if set(slot) != {"A", "B"}:
                raise LoraError(f"{self.path}: {module} has only lora_{'A' if 'A' in slot else 'B'}")
            a_shape, b_shape = self.reader.shape(slot["A"]), self.reader.shape(slot["B"])
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise LoraError(f"{self.path}: {module} lora_A {list(a_shape)} and lora_B {list(b_shape)} "
                                f"do not share a rank")
            if a_shape[0] < 1:
                raise LoraError(f"{self.path}: {module} has LoRA rank 0 (lora_A {list(a_shape)}); the file holds no "
                                f"adapter: re-export it")
            chosen = alpha if alpha is not None else alphas.get(module, file_alpha or default_alpha)
            if chosen is None:
                raise LoraError(f"{self.path}: LoRA alpha unknown (no metadata); pass --lora-alpha")
            self.targets[module] = LoraTarget(module, slot["A"], slot["B"], a_shape[0],
                                              _alpha(chosen, self.path, "--lora-alpha" if alpha is not None else
                                                     "its alpha"))

    @property
    def weight_keys(self) -> set[str]:
        return {f"{m}.weight" for m in self.targets}

    @property
    def rank(self) -> int:
        return max((t.rank for t in self.targets.values()), default=0)

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def validate(self, base_shapes: dict[str, tuple[int, ...]]) -> None:
        """Every target must be a 2-D weight of the base model with matching in/out sizes, and every
        replacement a parameter of the model with its shape."""
        bad = []
        for name, key in sorted(self.replacements.items()):
            if name not in base_shapes:
                bad.append(f"{key} (no such model parameter)")
            elif tuple(self.reader.shape(key)) != tuple(base_shapes[name]):
                bad.append(f"{key} {list(self.reader.shape(key))} (the model's {name} is {list(base_shapes[name])})")
        if bad:
            raise LoraError(f"{self.path}: {len(bad)} tensor(s) are neither LoRA factors nor a model parameter of the "
                            f"same shape: {'; '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""))
        for t in self.targets.values():
            key = f"{t.module}.weight"
            if key not in base_shapes:
                raise LoraError(f"{self.path}: LoRA targets {t.module!r} ({t.a_key}), which the model does not have")
            out_f, in_f = self.reader.shape(t.b_key)[0], self.reader.shape(t.a_key)[1]
            if tuple(base_shapes[key]) != (out_f, in_f):
                raise LoraError(f"{self.path}: LoRA for {t.module} is [{out_f}, {in_f}] but {key} is "
                                f"{list(base_shapes[key])}")

    def delta(self, module: str, dim: Optional[int] = None, start: int = 0, stop: int = 0,
              a: Optional[torch.Tensor] = None) -> torch.Tensor:
        """scale * B @ A in fp32, optionally only output rows (dim 0) or input columns (dim 1) [start, stop).

        `a` may pass lora_A already read (row-block loops read it once)."""
        t = self.targets[module]
        b = self.reader.get_slice(t.b_key, 0, start, stop) if dim == 0 else self.reader.get(t.b_key)
        if a is None:
            a = self.reader.get_slice(t.a_key, 1, start, stop) if dim == 1 else self.reader.get(t.a_key)
        return (b.float() @ a.float()) * t.scale

    def lora_a(self, module: str) -> torch.Tensor:
        return self.reader.get(self.targets[module].a_key)


class MergedWeights:
    """A CheckpointReader-like view of base weights with a LoRA merged in on read (whole tensors or slices)."""

    def __init__(self, base: CheckpointReader, lora: LoraAdapter):
        lora.validate({k: base.shape(k) for k in base.keys()})
        self.base, self.lora = base, lora
        self._targets = {f"{m}.weight": m for m in lora.targets}
        self._replaced = lora.replacements  # parameter -> key in the LoRA file

    @property
    def replaced(self) -> list[str]:
        """Model parameters taken whole from the LoRA file instead of the base checkpoint."""
        return sorted(self._replaced)

    def raw(self, key: str) -> torch.Tensor:
        """The tensor before the merge: the base's, or its replacement from the LoRA file (in the base dtype,
        as load_state_dict copies it into the parameter)."""
        if key in self._replaced:
            return self.lora.reader.get(self._replaced[key]).to(self.base.dtype(key))
        return self.base.get(key)

    def raw_slice(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if key in self._replaced:
            return self.lora.reader.get_slice(self._replaced[key], dim, start, stop).to(self.base.dtype(key))
        return self.base.get_slice(key, dim, start, stop)

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.base

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    @property
    def config(self):
        return self.base.config

    @property
    def bytes_read(self) -> int:
        return self.base.bytes_read + self.lora.bytes_read

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The merged tensor, cast back to the base dtype (or to `dtype`: fp32 keeps the merge unrounded)."""
        w = self.raw(key)
        if key not in self._targets:
            return w if dtype is None else w.to(dtype)
        return (w.float() + self.lora.delta(self._targets[key])).to(dtype or w.dtype)

    def get_slice(self, key: str, dim: int, start: int, stop: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        w = self.raw_slice(key, dim, start, stop)
        if key not in self._targets:
            return w if dtype is None else w.to(dtype)
        return (w.float() + self.lora.delta(self._targets[key], dim, start, stop)).to(dtype or w.dtype)
