"""Attention over two key segments (the rolling window and the sink) without concatenating them.

softmax over [A | B] keys = a weighted mix of the two segments' own attention outputs, each weighted by its
share of the total softmax mass: out = out_A * w + out_B * (1 - w) with w = sigmoid(lse_A - lse_B), where
lse_X is the log-sum-exp of segment X's scaled scores per (query, head). Each segment is read where it is
stored (a view of the rolling cache, the sink), so no [window | sink] copy of K and V is made.

The public scaled_dot_product_attention does not return the log-sum-exp; the fused kernels behind it do,
so we call them by their aten names (the ones torch's own context-parallel attention merges with):
CPU flash (what SDPA runs on CPU, same output bits), CUDA flash for fp16/bf16, CUDA memory-efficient
attention otherwise, and an explicit math form for any other device, or wherever the fused kernels are
switched off (`sdpa_kernel(SDPBackend.MATH)`, as the FLOP-count test does). All take [B, H, L, d].
"""
from __future__ import annotations

import torch

import torch.nn.functional as F

_CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention on [B, L, H, d] tensors, scale 1/sqrt(d); returns [B, Lq, H*d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


@torch.compiler.assume_constant_result  # a setting, not data: read once when traced, no graph break
def _fused_kernels_enabled() -> bool:
    return torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()


def sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention with scale 1/sqrt(d) on [B, H, L, d]: (out [B, H, Lq, d], lse [B, H, Lq] fp32)."""
    lq = q.shape[2]
    if not _fused_kernels_enabled():
        return sdpa_lse_math(q, k, v)  # the fused kernels are switched off (sdpa_kernel(SDPBackend.MATH))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse
    if q.device.type == "cuda":
        if q.dtype in _CUDA_FLASH_DTYPES and q.shape[-1] <= 256:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
        else:
            res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
        return res[0], res[1][..., :lq]  # memory-efficient attention pads lse's query axis
    return sdpa_lse_math(q, k, v)


def sdpa_lse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain fp32 ops (any device; the score matrix is materialised)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def attend_two(q: torch.Tensor, k_a: torch.Tensor, v_a: torch.Tensor, k_b: torch.Tensor, v_b: torch.Tensor
               ) -> torch.Tensor:
    """Attention of q [B, Lq, H, d] over the keys of A and of B together ([B, L*, H, d] each, any strides with
    a contiguous last axis); returns [B, Lq, H*d] in q's dtype. The mix is formed in fp32."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731  [B, L, H, d] -> [B, H, L, d], a view
    qt = t(q)
    out_a, lse_a = sdpa_lse(qt, t(k_a), t(v_a))
    out_b, lse_b = sdpa_lse(qt, t(k_b), t(v_b))
    del qt
    weight = torch.sigmoid(lse_a.sub_(lse_b)).unsqueeze(-1)  # A's share of the softmax mass, [B, H, Lq, 1]
    del lse_a, lse_b
    out = out_b.float()  # out_b itself at fp32 compute: a temporary of ours, mixed in place
    del out_b
    out = out.lerp_(out_a.float(), weight)  # out_b + weight * (out_a - out_b)
    del out_a, weight
    return out.to(q.dtype).transpose(1, 2).flatten(2)
