"""Bytes every rank sends per block, predicted exactly from the code path (checked against ByteCounter).

Convention (parallel/group.py ByteCounter): the payload of the calls a rank makes, not the wire bytes of the
collective's algorithm. One block is `steps` streaming calls; the sink prefill (once per clip) is not in it.

Tensor parallelism, per layer and call (model/attention.py, model/linear.py, model/block.py, model/audio.py,
quant/linear.py), with L = frames x tokens per frame noisy tokens and H/T heads per rank:
  all_gather  the full-width q/k RMSNorm's per-head sums of squares, q's and k's rows fused, fp32 [rows, H/T]:
              self-attention 2L rows, cross-attention L + text_len, the audio injector L + F (n+1)
  all_reduce  the row-parallel partial outputs [L, dim] of self-attention o, cross-attention o, ffn.2 and, after
              an inject layer, the injector's o: int32 accumulators for exact int8 W8A8, the compute dtype
              otherwise (bf16 out of the sm89 fp8 kernel, fp32 out of the emulated one); before each of them,
              with dynamic W8A8 activations, the max of the per-token absmax, fp32 [L, 1]
Pipeline (the runtime's protocol): per call each rank of stage k < S-1 sends its peer in stage k+1 the hidden
states [1, L, dim] (compute dtype), e0 [1, F, 6, 2, dim] and e [1, F, dim] (fp32), the audio tokens [1, F, 1, dim]
and [1, F, n+1, dim] (compute dtype); the last stage sends the flow [1, C, F, h, w] fp32 back to stage 0
after every call (steps per block: stage 0 owns the sampler state and the finished blocks), and, with the VAE on
its own rank, the finished latents once per block (from TP rank 0 of the last stage).
"""
from __future__ import annotations

from typing import Union

import torch

from ..errors import ConfigError
from ..model import ModelConfig
from .stages import stage_layers

KINDS = ("all_reduce", "all_gather", "p2p")
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
FP8_KERNELS = ("native", "emulate", "weight-only")


def _dtype_bytes(dtype: Union[str, torch.dtype]) -> int:
    if dtype not in _BYTES:
        raise ConfigError(f"compute dtype {dtype!r}: use bf16, fp16 or fp32")
    return _BYTES[dtype]


def reduce_bytes_per_element(precision: str, compute_dtype: Union[str, torch.dtype], exact_int8_reduce: bool,
                             fp8_kernel: str = "native") -> tuple[int, bool]:
    """(bytes per element of a row-parallel all-reduce, whether a per-token absmax max-reduce precedes it)."""
    c = _dtype_bytes(compute_dtype)
    if fp8_kernel not in FP8_KERNELS:
        raise ConfigError(f"fp8 kernel {fp8_kernel!r}: one of {', '.join(FP8_KERNELS)}")
    if precision in ("bf16", "int8-wo", "fp8-wo"):
        return c, False  # F.linear in the compute dtype (fp16/bf16 kept, anything else fp32)
    if precision == "int8":
        return (4, True) if exact_int8_reduce else (c, True)  # int32 accumulators, or dequantized partials
    if precision == "fp8":
        return {"native": (2, True), "emulate": (4, True), "weight-only": (c, False)}[fp8_kernel]
    raise ConfigError(f"unknown precision {precision!r}")


def tp_layer_bytes(cfg: ModelConfig, latent_hw: tuple[int, int], tp: int, layer: int, precision: str,
                   compute_dtype: Union[str, torch.dtype], exact_int8_reduce: bool, fp8_kernel: str = "native",
                   static_activations: bool = False) -> dict[str, int]:
    """Collective payload one rank sends for one layer of one streaming call (zero without TP)."""
    if tp == 1:
        return {"all_reduce": 0, "all_gather": 0}
    if cfg.num_heads % tp:
        raise ConfigError(f"num_heads={cfg.num_heads} is not divisible by the tensor-parallel degree {tp}")
    h, w = latent_hw
    F = cfg.num_frames_per_block
    L = F * cfg.tokens_per_frame(h, w)
    heads = cfg.num_heads // tp
    per_elem, absmax = reduce_bytes_per_element(precision, compute_dtype, exact_int8_reduce, fp8_kernel)
    absmax = absmax and not static_activations
    reduces = 3 + (layer in cfg.inject_index)  # self o, cross o, ffn.2 (+ injector o)
    gather_rows = 2 * L + (L + cfg.text_len) + ((L + F * (cfg.num_audio_token + 1)) if layer in cfg.inject_index else 0)
    return {"all_reduce": reduces * (L * cfg.dim * per_elem + (4 * L if absmax else 0)),
            "all_gather": gather_rows * heads * 4}


def handoff_bytes(cfg: ModelConfig, latent_hw: tuple[int, int], compute_dtype: Union[str, torch.dtype]) -> int:
    """What a stage sends the next one per call: hidden states, time embeddings e0 and e, audio tokens."""
    h, w = latent_hw
    c, F, d = _dtype_bytes(compute_dtype), cfg.num_frames_per_block, cfg.dim
    L = F * cfg.tokens_per_frame(h, w)
    return L * d * c + F * 6 * 2 * d * 4 + F * d * 4 + F * d * c + F * (cfg.num_audio_token + 1) * d * c


def latents_bytes(cfg: ModelConfig, latent_hw: tuple[int, int]) -> int:
    return cfg.in_dim * cfg.num_frames_per_block * latent_hw[0] * latent_hw[1] * 4


def comm_bytes_per_block(cfg: ModelConfig, size: tuple[int, int], tp: int = 1, pp: int = 1, precision: str = "bf16",
                         compute_dtype: Union[str, torch.dtype] = "bf16", exact_int8_reduce: bool = True,
                         steps: int = 4, *, fp8_kernel: str = "native", static_activations: bool = False,
                         vae_rank: bool = False) -> list[dict[str, int]]:
    """Bytes each DiT rank sends per block in the steady state, by kind (KINDS), for the pixel size H, W.

    Ranks are stage-major: rank = stage * tp + tp_rank. fp8_kernel says which fp8 path runs: "native" (sm89+
    GPUs: W8A8, bf16 out), "emulate" (the sm89 numerics in fp32, a test setting) or "weight-only" (other
    devices). static_activations: calibrated per-tensor scales, so no absmax reduce.
    """
    if size[0] % 8 or size[1] % 8:
        raise ConfigError(f"size {size[0]}x{size[1]}: sides must be multiples of 8")
    latent_hw = (size[0] // 8, size[1] // 8)
    ranges = stage_layers(cfg, pp, latent_hw)
    out = []
    for stage, (start, stop) in enumerate(ranges):
        per_call = {k: 0 for k in KINDS}
        for layer in range(start, stop):
            for k, v in tp_layer_bytes(cfg, latent_hw, tp, layer, precision, compute_dtype, exact_int8_reduce,
                                       fp8_kernel, static_activations).items():
                per_call[k] += v
        if stage < pp - 1:
            per_call["p2p"] += handoff_bytes(cfg, latent_hw, compute_dtype)
        block = {k: v * steps for k, v in per_call.items()}
        if pp > 1 and stage == pp - 1:
            block["p2p"] += steps * latents_bytes(cfg, latent_hw)
        for t in range(tp):
            rank = dict(block)
            if vae_rank and stage == pp - 1 and t == 0:
                rank["p2p"] += latents_bytes(cfg, latent_hw)
            out.append(rank)
    return out
