"""QuantLinear: plain tensors named like the checkpoint keys, and a short forward.

    weight        int8 or float8_e4m3fn [out, in]
    weight_scale  fp32 [out, 1]            per output channel
    bias          compute dtype [out]
    input_scale   fp32 [1] or [slots]      static activations only (per-tensor, or one per sampler step)
    smooth_scale  fp32 [in]                SmoothQuant divisor applied to the input, when not folded away

A row-parallel layer (o, ffn.2) all-reduces its partial output before adding the bias, and with dynamic
per-token activations it first all-reduces the per-token absmax (max), so every rank quantizes a token with
the scale the unsharded layer would use.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model.step_context import current_slot
from ..parallel import SINGLE, TPGroup
from .config import QuantConfig
from .kernels import (FP8, dequantize_weight, fp8_matmul, fp8_matmul_supported, fp8_rowwise_failed,
                      int8_accumulate, notice_once, pick_int8_kernel, quantize_activation, token_absmax)

class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias: bool = True,
                 row_parallel: bool = False, tp: TPGroup = SINGLE, static_slots: int = 0, smooth: bool = False,
                 bias_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        self.row_parallel, self.tp = row_parallel, tp
        kw = {"device": device}
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=config.weight_dtype, **kw))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, **kw))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, **kw) if bias else None)
        self.register_buffer("input_scale", torch.empty(static_slots, dtype=torch.float32, **kw)
                             if static_slots else None)
        self.register_buffer("smooth_scale", torch.empty(in_features, dtype=torch.float32, **kw) if smooth else None)
        self.kernel_override: Optional[str] = None  # tests pin a kernel ("dequant", "bnb", "int_mm", "emulate")

    def extra_repr(self) -> str:
        extra = []
        if self.input_scale is not None:
            extra.append(f"static[{self.input_scale.numel()}]")
        if self.smooth_scale is not None:
            extra.append("smoothed")
        if self.row_parallel:
            extra.append(f"row-parallel tp={self.tp.size}")
        return f"{self.in_features}, {self.out_features}, {self.config.precision}" + "".join(f", {e}" for e in extra)

    def _activation_absmax(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:  # static: a calibrated per-tensor scale
            slot = current_slot()  # the sampler step (or sink prefill) running now
            if slot is not None and slot >= self.input_scale.numel() > 1:
                raise ConfigError(f"per-timestep input scales for {self.input_scale.numel() - 1} sampler steps, but "
                                  f"this is sampler slot {slot}: run the step count the checkpoint was calibrated for")
            s = self.input_scale.max() if slot is None or self.input_scale.numel() == 1 else self.input_scale[slot]
            return (s * self.config.qmax).reshape(1, 1)
        absmax = token_absmax(x)
        if self.row_parallel and self.tp.size > 1:
            absmax = self.tp.all_reduce(absmax, op="max")  # the scale the unsharded layer would use
        return absmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.smooth_scale is not None:
            x2 = x2 / self.smooth_scale.to(x2.dtype)
        y = self._matmul(x2)  # row-parallel: already summed over the ranks
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        cfg, wq, sw = self.config, self.weight, self.weight_scale
        compute = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
        if cfg.weight_only:
            return self._reduce(F.linear(x.to(compute), dequantize_weight(wq, sw, compute)))
        if cfg.weight_dtype == torch.int8:
            kernel = pick_int8_kernel(x.device, x.shape[0], self.in_features, self.out_features, self.kernel_override)
            xq, sx = quantize_activation(x, torch.int8, self._activation_absmax(x))
            acc = int8_accumulate(xq, wq, "dequant" if kernel == "emulate" else kernel)
            if self.row_parallel and self.tp.size > 1 and not self.tp.exact_int8_reduce:
                return self._reduce((acc.float() * sx * sw.t()).to(compute if compute != torch.float32 else x.dtype))
            # integer partial sums reduce exactly: a row-parallel int8 layer equals the unsharded one bit for bit
            return self._reduce(acc).float() * sx * sw.t()
        return self._reduce(self._fp8(x, compute))

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        """Row-parallel: sum the partial outputs over the ranks (before the bias)."""
        return self.tp.all_reduce(y) if self.row_parallel and self.tp.size > 1 else y

    def _fp8(self, x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        """fp8 W8A8 on sm89+ GPUs; weight-only elsewhere (said once)."""
        wq, sw = self.weight, self.weight_scale
        if self.kernel_override == "emulate":  # the sm89 numerics, computed in fp32 (tests on CPU)
            xq, sx = quantize_activation(x, FP8, self._activation_absmax(x))
            return F.linear(xq.float() * sx, dequantize_weight(wq, sw))
        if fp8_matmul_supported(x.device):
            xq, sx = quantize_activation(x, FP8, self._activation_absmax(x))
            sx = sx.expand(x.shape[0], 1).contiguous()
            try:
                return fp8_matmul(xq, sx, wq, sw, torch.bfloat16)
            except RuntimeError as e:  # e.g. a torch build without rowwise fp8 kernels for this GPU
                fp8_rowwise_failed(x.device, e)
        if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) < (8, 9):
            notice_once(f"fp8 activations need an sm89+ GPU; on {x.device.type} the fp8 checkpoint runs weight-only "
                        f"(weights dequantized to {str(compute).removeprefix('torch.')})")
        return F.linear(x.to(compute), dequantize_weight(wq, sw, compute))

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig, smooth: Optional[torch.Tensor] = None,
                   input_scale: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantize a float Linear: W * smooth (per input column) quantized per output channel; bias kept.

        A RowParallelLinear stays row-parallel (same TP group).
        """
        from ..model.linear import RowParallelLinear
        from .kernels import quantize_weight

        row = isinstance(linear, RowParallelLinear)
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth.to(w.device)[None, :]
        q = cls(linear.in_features, linear.out_features, config, bias=linear.bias is not None, row_parallel=row,
                tp=linear.tp if row else SINGLE, static_slots=0 if input_scale is None else input_scale.numel(),
                smooth=smooth is not None, bias_dtype=linear.weight.dtype, device=linear.weight.device)
        wq, sw = quantize_weight(w, config.weight_dtype)
        with torch.no_grad():
            q.weight.copy_(wq)
            q.weight_scale.copy_(sw)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
            if smooth is not None:
                q.smooth_scale.copy_(smooth)
            if input_scale is not None:
                q.input_scale.copy_(input_scale.reshape(-1))
        return q
