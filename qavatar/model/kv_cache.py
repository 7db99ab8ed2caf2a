"""Streaming caches: the shared condition sink and one rolling self-attention cache per denoising step.

Sink:    K (un-roped) and V of the condition tokens [reference image | FramePack motion], prefilled once at
         t=0. Every streaming call re-ropes the sink keys, with the reference tokens moved forward in time
         (the sink offset), so the reference stays a fixed distance behind the frames being generated.
Rolling: roped K and V of generated tokens at their absolute positions, a window of one clip
         (clip_latent_frames * tokens_per_frame), written modulo the window once it is full.
The reference keeps one rolling cache per denoising step (step i always reads and writes cache i).
Caches hold this rank's heads only, so they shard with tensor parallelism, and only the layers of this rank's
pipeline stage (layers first_layer.. of the DiT), so they shard with the pipeline layout too.
8-bit caches (fp8, int8; model/kv_quant.py) store one fp32 scale per (token, head) beside K and V: the
rolling K is quantized after RoPE, the sink K before its per-call re-RoPE; both are dequantized at read.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .kv_quant import dequantize, is_quantized, quantize
from .rope import apply_rope
from .segment_attention import attend_two, sdpa


@dataclass
class SinkCache:
    num_layers: int
    k: list[Optional[torch.Tensor]] = field(default_factory=list)  # per layer [B, Lc, H, d], un-roped
    v: list[Optional[torch.Tensor]] = field(default_factory=list)
    positions: Optional[torch.Tensor] = None  # [Lc, 3] RoPE positions at prefill time
    num_ref_tokens: int = 0  # the first tokens are the reference image; only they move with the offset
    first_layer: int = 0  # DiT index of the first layer held (a pipeline stage holds a contiguous range)
    dtype: Optional[torch.dtype] = None  # fp8 / int8: quantized with scales; None: the compute dtype
    k_scale: list[Optional[torch.Tensor]] = field(default_factory=list)  # per layer [B, Lc, H] fp32 (8-bit only)
    v_scale: list[Optional[torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.k = [None] * self.num_layers
        self.v = [None] * self.num_layers
        self.k_scale = [None] * self.num_layers
        self.v_scale = [None] * self.num_layers

    @property
    def ready(self) -> bool:
        return self.positions is not None and all(t is not None for t in self.k)

    def shifted_positions(self, frames: int) -> torch.Tensor:
        """Sink positions with the reference tokens moved `frames` latent frames forward (motion stays)."""
        pos = self.positions.clone()
        pos[: self.num_ref_tokens, 0] += frames
        return pos

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.k_scale + self.v_scale
                   if t is not None)


class RollingKVCache:
    """Self-attention K/V for one denoising step: [layers, B, window, heads, head_dim] for K and for V."""

    def __init__(self, num_layers: int, batch: int, window: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: "torch.device | str" = "cpu", first_layer: int = 0):
        shape = (num_layers, batch, window, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.window, self.first_layer = window, first_layer
        # 8-bit storage: the per-(token, head) fp32 scales live in a cache of their own (head_dim 1), written
        # and windowed exactly like the 8-bit rows
        self.scales = RollingKVCache(num_layers, batch, window, heads, 1, torch.float32, device, first_layer) \
            if is_quantized(dtype) else None

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v of tokens [start, start+L) (absolute) and return the K/V rows attention sees."""
        n, layer = k.shape[1], layer - self.first_layer
        slot, active = self.slots(start, n)
        self.k[layer, :, slot:slot + n] = k
        self.v[layer, :, slot:slot + n] = v
        return self.k[layer, :, :active], self.v[layer, :, :active]

    def slots(self, start: int, n: int) -> tuple[int, int]:
        """(first row written, rows attended) for n tokens at absolute position start."""
        if start >= self.window:  # window full: overwrite the oldest rows, attend to all of them
            slot, active = start % self.window, self.window
        else:
            slot, active = start, start + n
        if slot + n > self.window:
            raise ValueError(f"block of {n} tokens at {slot} overflows the {self.window}-token KV window")
        return slot, active

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size() + (self.scales.nbytes() if self.scales is not None else 0)


def _one_layer(cache: RollingKVCache, layer: int) -> RollingKVCache:
    """A view of one layer of a rolling cache (shared storage), numbered 0."""
    j = layer - cache.first_layer
    view = copy.copy(cache)
    view.k, view.v, view.first_layer = cache.k[j:j + 1], cache.v[j:j + 1], 0
    view.scales = None if cache.scales is None else _one_layer(cache.scales, layer)
    return view


class LayerKV:
    """What one block's self-attention sees of the caches during one forward call."""

    def __init__(self, mode: str, layer: int, sink: SinkCache, rolling: Optional[RollingKVCache] = None,
                 start: int = 0, sink_rope: Optional[torch.Tensor] = None):
        self.mode, self.layer, self.sink, self.rolling = mode, layer, sink, rolling
        self.start, self.sink_rope = start, sink_rope

    def one_layer(self) -> tuple["LayerKV", Callable[[], None]]:
        """The same view over one-layer caches numbered 0, and a function that puts back what the sink prefill
        stored. A compiled block (model/compile.py) then sees no layer number, so one graph serves every layer."""
        i, sink = self.layer - self.sink.first_layer, self.sink
        local = SinkCache(1, positions=sink.positions, num_ref_tokens=sink.num_ref_tokens, dtype=sink.dtype)
        local.k, local.v, local.k_scale, local.v_scale = [sink.k[i]], [sink.v[i]], [sink.k_scale[i]], [sink.v_scale[i]]
        rolling = None if self.rolling is None else _one_layer(self.rolling, self.layer)

        def put_back() -> None:
            sink.k[i], sink.v[i], sink.k_scale[i], sink.v_scale[i] = local.k[0], local.v[0], local.k_scale[0], local.v_scale[0]
        return LayerKV(self.mode, 0, local, rolling, self.start, self.sink_rope), put_back

    def store_sink(self, k: torch.Tensor, v: torch.Tensor) -> None:
        i, sink = self.layer - self.sink.first_layer, self.sink
        if is_quantized(sink.dtype):  # un-roped K: the re-RoPE of every call acts on the dequantized rows
            sink.k[i], sink.k_scale[i] = quantize(k.detach(), sink.dtype)
            sink.v[i], sink.v_scale[i] = quantize(v.detach(), sink.dtype)
            return
        sink.k[i] = k.detach().clone()
        sink.v[i] = v.detach().clone()

    def attend(self, q: torch.Tensor, k_roped: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this block's roped K and V in the rolling cache, then attend q [B, Lq, H, d] to the rolling window
        and the re-roped sink; returns [B, Lq, H*d].

        Compute-dtype caches: the window is read in place (a view of the cache) and the sink where it is stored;
        the two segments are attended separately and merged by their log-sum-exp (model/segment_attention.py),
        so no [window | sink] K and V are built. The sink keys are re-roped every call: the reference draws a
        new sink offset per call, so the only per-call copy left is the sink's roped keys.
        8-bit caches: dequantizing is a copy anyway, so window and sink are dequantized into one [window | sink]
        buffer and attended with one SDPA."""
        if self.rolling.scales is not None:
            return sdpa(q, *self._dequantized(k_roped, v))
        keys, values = self.rolling.write(self.layer, self.start, k_roped.to(self.rolling.k.dtype),
                                          v.to(self.rolling.v.dtype))
        i = self.layer - self.sink.first_layer
        sink_k = apply_rope(self.sink.k[i], self.sink_rope).type_as(v)
        return attend_two(q, keys.type_as(v), values.type_as(v), sink_k, self.sink.v[i].type_as(v))

    def _dequantized(self, k_roped: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """8-bit rolling cache: store this block's roped K and V quantized, then dequantize the window and the
        re-roped sink straight into the [rolling window | sink] K and V that attention reads (no fp32 copy of the
        window, no concatenation)."""
        r, dtype = self.rolling, self.rolling.k.dtype
        kq, ks = quantize(k_roped, dtype)
        vq, vs = quantize(v, dtype)
        keys, values = r.write(self.layer, self.start, kq, vq)
        k_scale, v_scale = r.scales.write(self.layer, self.start, ks.unsqueeze(-1), vs.unsqueeze(-1))
        del kq, ks, vq, vs
        i, sink, n = self.layer - self.sink.first_layer, self.sink, keys.shape[1]
        shape = (v.shape[0], n + sink.k[i].shape[1], *v.shape[2:])
        k_out = torch.empty(shape, dtype=v.dtype, device=v.device)
        v_out = torch.empty(shape, dtype=v.dtype, device=v.device)
        dequantize(keys, k_scale.squeeze(-1), v.dtype, out=k_out[:, :n])
        dequantize(values, v_scale.squeeze(-1), v.dtype, out=v_out[:, :n])
        dequantize(sink.v[i], sink.v_scale[i], v.dtype, out=v_out[:, n:])
        sink_k = dequantize(sink.k[i], sink.k_scale[i], v.dtype, out=k_out[:, n:])
        sink_k.copy_(apply_rope(sink_k, self.sink_rope))  # re-RoPE of the dequantized un-roped sink keys
        return k_out, v_out
