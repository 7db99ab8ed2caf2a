"""FLOPs of one streaming DiT call (one sampler step of one block, batch 1), layer by layer.

A multiply-add counts as 2 FLOPs. Counted from the code path of forward_stream (model/dit.py, block.py,
attention.py, audio.py): every Linear, the attention products over [rolling window | sink], the cross-attention
over the text, the audio injector after its layers, and the patch embedding and head. The pipeline layout
balances its stages with these counts; the planner's speed model turns them into seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model import ModelConfig
from ..model.rope import framepack_positions


@dataclass(frozen=True)
class CallShape:
    """Token counts of one streaming call."""
    noisy: int  # tokens of the block being denoised (frames x tokens per frame)
    keys: int  # self-attention keys: rolling window (full) + sink
    text: int  # cross-attention keys (the padded text length)
    frames: int  # latent frames in the block
    sink: int  # condition tokens (reference frame + FramePack motion)


def call_shape(cfg: ModelConfig, latent_hw: tuple[int, int]) -> CallShape:
    h, w = latent_hw
    fs = cfg.tokens_per_frame(h, w)
    sink = fs + sum(len(g) for g in framepack_positions(cfg.framepack_buckets, h, w))
    f = cfg.num_frames_per_block
    return CallShape(f * fs, cfg.clip_latent_frames * fs + sink, cfg.text_len, f, sink)


def block_flops(cfg: ModelConfig, s: CallShape) -> int:
    """One DiT block: self-attention (q, k, v, o and the two attention products), cross-attention, FFN."""
    d, L = cfg.dim, s.noisy
    self_attn = 4 * 2 * L * d * d + 2 * 2 * L * s.keys * d
    cross = 2 * 2 * L * d * d + 2 * 2 * s.text * d * d + 2 * 2 * L * s.text * d
    ffn = 2 * 2 * L * d * cfg.ffn_dim
    return self_attn + cross + ffn


def injector_flops(cfg: ModelConfig, s: CallShape) -> int:
    """One audio injector: AdaLN per frame, cross-attention of each frame's tokens to its audio tokens."""
    d, L = cfg.dim, s.noisy
    a = s.frames * (cfg.num_audio_token + 1)  # audio tokens (local + padding token) over the block's frames
    adain = 2 * s.frames * d * 2 * d
    return adain + 2 * 2 * L * d * d + 2 * 2 * a * d * d + 2 * 2 * L * (cfg.num_audio_token + 1) * d


def layer_flops(cfg: ModelConfig, latent_hw: tuple[int, int]) -> list[int]:
    """FLOPs of each of the num_layers layers of one call (a block, plus its audio injector if it has one)."""
    s = call_shape(cfg, latent_hw)
    blk, inj = block_flops(cfg, s), injector_flops(cfg, s)
    return [blk + (inj if i in cfg.inject_index else 0) for i in range(cfg.num_layers)]


def embed_flops(cfg: ModelConfig, latent_hw: tuple[int, int]) -> int:
    """Patch embedding of the noisy block and the time embedding (the first stage's extra work)."""
    s = call_shape(cfg, latent_hw)
    patch = 2 * s.noisy * cfg.in_dim * 4 * cfg.dim  # a 1x2x2 Conv3d is a Linear over 4*in_dim inputs
    time = 2 * 2 * s.frames * (cfg.freq_dim * cfg.dim + cfg.dim * cfg.dim + cfg.dim * 6 * cfg.dim)
    return patch + time


def head_flops(cfg: ModelConfig, latent_hw: tuple[int, int]) -> int:
    s = call_shape(cfg, latent_hw)
    return 2 * s.noisy * cfg.dim * 4 * cfg.out_dim
