"""In-memory quantization with one verb, torchao style: quantize_(model, QuantConfig(...)).

Also rebuilds the quantized module tree of a checkpoint (which Linears are QuantLinear, with which optional
tensors), so the loader can assign the stored tensors as they are.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..parallel import SINGLE
from .calibrate import LayerPlan
from .config import QuantConfig
from .linear import QuantLinear


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_(model: nn.Module, config: QuantConfig, plans: Optional[dict[str, LayerPlan]] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Swap Linears for QuantLinears in place.

    Without plans, every Linear that config.targets (or filter_fn) selects is quantized with dynamic
    activations; plans (from calibration) carry per-layer decisions, smoothing and static scales.
    """
    if plans is None and (config.activations == "static" or config.smooth_alpha is not None):
        raise ConfigError("static activations and SmoothQuant need calibration plans (see qavatar.quant.Calibrator)")
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        if plans is not None:
            plan = plans.get(name)
            if plan is None or not plan.quantized:
                continue
            _set(model, name, QuantLinear.from_float(mod, config, plan.smooth, plan.input_scale))
        elif (filter_fn(mod, name) if filter_fn else config.targets(name)):
            _set(model, name, QuantLinear.from_float(mod, config))
    return model


def quantized_skeleton(model: nn.Module, config: QuantConfig, shapes: dict[str, tuple[int, ...]],
                       compute_dtype: torch.dtype) -> nn.Module:
    """On a meta model: turn each Linear whose `<name>.weight_scale` the checkpoint holds into a QuantLinear."""
    from ..model.linear import RowParallelLinear

    for name in linear_names(model):
        if f"{name}.weight_scale" not in shapes:
            continue
        lin = model.get_submodule(name)
        row = isinstance(lin, RowParallelLinear)
        scale = shapes.get(f"{name}.input_scale")
        q = QuantLinear(lin.in_features, lin.out_features, config, bias=lin.bias is not None, row_parallel=row,
                        tp=lin.tp if row else SINGLE, device="meta",
                        static_slots=scale[0] if scale else 0, smooth=f"{name}.smooth_scale" in shapes,
                        bias_dtype=compute_dtype)
        _set(model, name, q)
    return model
