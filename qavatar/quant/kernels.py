"""Quantizers and the 8-bit matmul paths, chosen per device. The checkpoint format never depends on them.

Measured on the 2-core AVX2 CPU of CI (256x5120 @ 5120x5120, docs/quantization.md): fp32 F.linear 190 ms;
per-token int8 with int32 accumulation: torch._int_mm 4.1 s, bitsandbytes int8_linear_matmul 240-340 ms,
dequantize-then-fp32 390 ms. So on CPU int8 W8A8 uses bitsandbytes when installed, else the exact
dequantize path. On CUDA it uses torch._int_mm (int8 tensor cores), fp8 uses torch._scaled_mm with rowwise
scales on sm89+, and fp8 elsewhere falls back to weight-only, saying so once.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import QMAX

FP8 = torch.float8_e4m3fn
_EPS = 1e-12
_noticed: set[str] = set()


def notice_once(msg: str) -> None:
    """One line on stderr, once per run (quiet fallbacks are bugs); under tensor parallelism rank 0 says it."""
    if msg not in _noticed:
        _noticed.add(msg)
        if os.environ.get("RANK", "0") == "0":
            print(f"qavatar: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------- quantizers
def quantize_weight(w: torch.Tensor, dtype: torch.dtype,
                    transform: Optional[Callable[[torch.Tensor, int, int], torch.Tensor]] = None,
                    absmax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization: (q [out, in] in dtype, scale [out, 1] fp32).

    Works a block of rows at a time in fp32 (transform(rows, r0, r1) may edit them first: LoRA merge,
    SmoothQuant), so the temporaries stay a few MB whatever the weight's size. absmax [out, 1], when given,
    sets the scales (a column slice of a row-parallel weight quantized with the whole row's range).
    """
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32, device=w.device)
    q = torch.empty(w.shape, dtype=dtype, device=w.device)
    step = max(1, (1 << 20) // max(1, w.shape[1]))  # ~4 MB of fp32 rows at a time
    for r in range(0, w.shape[0], step):
        wf = w[r:r + step].to(torch.float32, copy=True)
        if transform is not None:
            wf = transform(wf, r, min(r + step, w.shape[0]))
        amax = wf.abs().amax(dim=1, keepdim=True) if absmax is None else absmax[r:r + step].float()
        s = (amax / QMAX[dtype]).clamp(min=_EPS)
        scale[r:r + step] = s
        q[r:r + step] = _to_q(wf.div_(s), dtype)
    return q, scale


def _to_q(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    qmax = QMAX[dtype]
    if dtype == torch.int8:
        return x.round_().clamp_(-qmax, qmax).to(torch.int8)
    return x.clamp(-qmax, qmax).to(dtype)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in fp32, cast to dtype. Scaled in place: one fp32 weight-sized temporary, not two (at 14B TP=4 an
    audio-injector AdaLN weight is 10240x5120, so a second copy is 210 MB)."""
    w = q.to(torch.float32)
    return w.mul_(scale.float()).to(dtype)


def token_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-row absmax [M, 1] in fp32 (tensor-parallel callers all-reduce it with max across ranks)."""
    return x.float().abs().amax(dim=1, keepdim=True)


def quantize_activation(x: torch.Tensor, dtype: torch.dtype, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of x [M, K] with per-row (or a broadcast per-tensor) absmax -> (q, scale fp32)."""
    scale = (absmax.float() / QMAX[dtype]).clamp(min=_EPS)
    return _to_q(x.float() / scale, dtype), scale


# ---------------------------------------------------------------------------- device abilities
_rowwise_failed: set[str] = set()


def fp8_matmul_supported(device: torch.device) -> bool:
    """sm89+ GPU whose torch build has rowwise-scaled _scaled_mm (a first failure marks it unavailable)."""
    if device.type != "cuda" or str(device) in _rowwise_failed:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_rowwise_failed(device: torch.device, err: Exception) -> None:
    _rowwise_failed.add(str(device))
    notice_once(f"torch._scaled_mm with rowwise scales failed on {device} ({str(err).splitlines()[0][:120]}); "
                f"fp8 runs weight-only from here on")


_BNB: list = []  # [bitsandbytes.functional or None], looked up once (torch.compile then reads it, no import)


def _bnb():
    if not _BNB:
        _BNB.append(_import_bnb())
    return _BNB[0]


def _import_bnb():
    from ..quiet import quiet_bitsandbytes

    try:
        with quiet_bitsandbytes():  # its import logs a 4-bit kernel warning that does not concern us
            import bitsandbytes.functional as bnbf  # noqa: F401

        return bnbf
    except Exception:  # not installed, or no native library for this platform
        return None


# ---------------------------------------------------------------------------- matmuls (no bias)
def int8_accumulate(xq: torch.Tensor, wq: torch.Tensor, kernel: str) -> torch.Tensor:
    """xq @ wq^T for int8 operands: int32 [M, N] (exact), or fp32 holding integers for "dequant"."""
    if kernel == "int_mm":
        return torch._int_mm(xq, wq.t())
    if kernel == "bnb":
        return _bnb().int8_linear_matmul(xq, wq)
    return F.linear(xq.float(), wq.float())  # exact while |sum| < 2^24


def int8_matmul(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, kernel: str) -> torch.Tensor:
    """(xq * sx) @ (wq * sw)^T with int8 inputs and integer accumulation; returns fp32 [M, N]."""
    return int8_accumulate(xq, wq, kernel).float() * sx * sw.t()


def fp8_matmul(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm with rowwise scales (sm89+): e4m3 x e4m3 -> out_dtype [M, N]."""
    return torch._scaled_mm(xq, wq.t(), scale_a=sx.float(), scale_b=sw.float().t(), out_dtype=out_dtype)


def pick_int8_kernel(device: torch.device, m: int, k: int, n: int, override: Optional[str] = None) -> str:
    if override:
        return override
    if device.type == "cuda":
        # cuBLAS int8 GEMM wants M > 16 and K, N multiples of 8
        return "int_mm" if m > 16 and k % 8 == 0 and n % 8 == 0 else "dequant"
    return "bnb" if _bnb() is not None else "dequant"
