"""8-bit KV cache storage: symmetric absmax quantization with one fp32 scale per (token, head).

A row is one token's head_dim values of one head. scale = absmax(row) / QMAX (448 for fp8 e4m3, the largest
finite e4m3 value; 127 for int8), so every row uses the full 8-bit range and nothing saturates; an all-zero
row gets scale 1 (it quantizes to zeros, and no division by zero). Rounding happens exactly once, when the
row is stored: fp8 by the e4m3 cast (round to nearest even), int8 by torch.round (nearest, ties to even).
Dequantizing (q * scale, in fp32, then one cast to the compute dtype) happens at read, inside attention.
Scales are fp32: 4 bytes per (token, head), so an 8-bit row of head_dim=128 costs 132 bytes, not 128.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError

KV_CHOICES = ("bf16", "fp8", "int8")  # bf16: the compute dtype, no scales
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
SCALE_DTYPE = torch.float32
NAMED = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def kv_storage_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """--kv-dtype -> the dtype a session stores its caches in (None: the compute dtype, unquantized)."""
    if name is None or name == "bf16":
        return None
    if name not in NAMED:
        raise ConfigError(f"--kv-dtype must be one of {', '.join(KV_CHOICES)}, not {name!r}")
    return NAMED[name]


def is_quantized(dtype: Optional[torch.dtype]) -> bool:
    return dtype in QMAX


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (q [..., head_dim] in dtype, scale [...] fp32)."""
    qmax = QMAX[dtype]
    x32 = x.to(torch.float32, copy=True)  # divided in place below: never the caller's tensor
    amax = x32.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))  # zero rows: any scale, keep it finite
    x32.div_(scale.unsqueeze(-1))
    if dtype == torch.int8:
        x32.round_().clamp_(-qmax, qmax)
    return x32.to(dtype), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(q, scale) -> q * scale in `dtype`, written into `out` when given (no temporary at all).

    The 8-bit values are exact in any float dtype, and the in-place product of a compute-dtype tensor with the
    fp32 scale is formed in fp32 and rounded once, so every path gives round(q * scale) bit for bit."""
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    out.copy_(q)
    return out.mul_(scale.unsqueeze(-1))


def bytes_per_row(head_dim: int, dtype: torch.dtype) -> int:
    """Stored bytes of one (token, head) row of K or of V, its scale included."""
    elem = torch.empty((), dtype=dtype).element_size()
    return head_dim * elem + (SCALE_DTYPE.itemsize if is_quantized(dtype) else 0)
