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


def call_flops(cfg: ModelConfig, latent_hw: tuple[int, int]) -> int:
    """The whole DiT call: every layer, the embeddings and the head."""
    return sum(layer_flops(cfg, latent_hw)) + embed_flops(cfg, latent_hw) + head_flops(cfg, latent_hw)


def layer_attention_flops(cfg: ModelConfig, latent_hw: tuple[int, int]) -> list[int]:
    """The attention products (QK^T and PV) in each layer's layer_flops: self-attention over window + sink, the
    text, the audio tokens after an inject layer. They run in the compute dtype even when the Linears are 8-bit."""
    s = call_shape(cfg, latent_hw)
    d, L = cfg.dim, s.noisy
    base = 2 * 2 * L * s.keys * d + 2 * 2 * L * s.text * d
    audio = 2 * 2 * L * (cfg.num_audio_token + 1) * d
    return [base + (audio if i in cfg.inject_index else 0) for i in range(cfg.num_layers)]


def _conv1d_out(length: int, kernel: int, stride: int) -> int:
    return (length + kernel - 1 - kernel) // stride + 1  # causal: kernel-1 frames of left padding


def audio_encoder_flops(cfg: ModelConfig) -> int:
    """The causal audio encoder over one block's audio (once per block, on the first stage): the conv stacks
    over 4F video frames plus the motion_frames[0] repeated frames in front, and the global token's Linear."""
    t = cfg.motion_frames[0] + 4 * cfg.num_frames_per_block
    d, n, ca = cfg.dim, cfg.num_audio_token, cfg.audio_dim
    t2 = _conv1d_out(t, 3, 2)
    t3 = _conv1d_out(t2, 3, 2)
    conv1 = 2 * t * (d // 4 * n) * ca * 3 + 2 * t * (d // 4) * ca * 3  # local (n token groups) and global
    trunk = 2 * t2 * (d // 2) * (d // 4) * 3 + 2 * t3 * d * (d // 2) * 3  # per token group and for the global
    return conv1 + (n + 1) * trunk + 2 * t3 * d * d


# The Wan 2.1 VAE decoder (diffusers AutoencoderKLWan defaults; Wan2.1_VAE.pth has these shapes).
WAN21_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": (1, 2, 4, 4), "num_res_blocks": 2,
             "temporal_upsample": (True, True, False), "out_channels": 3}


def vae_decode_flops(latent_hw: tuple[int, int], latent_frames: int, vae: dict = WAN21_VAE) -> int:
    """Decoding `latent_frames` latent frames of a running stream (each one -> 4 video frames; the stream's very
    first frame decodes to 1 and costs less): post_quant_conv, then per frame conv_in, the middle block (two
    residual blocks and a single-head attention over the frame's pixels), the up blocks (residual blocks,
    causal time convolution, 2x nearest upsampling and a 3x3 conv), conv_out. Convs count 2 x output elements
    x input channels x kernel volume, as torch's flop counter does."""
    h, w = latent_hw
    z, base = vae["z_dim"], vae["base_dim"]
    mult = vae["dim_mult"]
    dims = [base * m for m in (mult[-1],) + tuple(mult[::-1])]
    t = 1
    total = 0

    def conv(cin: int, cout: int, kernel: int) -> int:
        return 2 * cout * t * h * w * cin * kernel

    def res(cin: int, cout: int) -> int:
        return conv(cin, cout, 27) + conv(cout, cout, 27) + (conv(cin, cout, 1) if cin != cout else 0)

    total += conv(z, z, 1) + conv(z, dims[0], 27)  # post_quant_conv, conv_in
    d = dims[0]
    total += 2 * res(d, d) + conv(d, 3 * d, 1) + conv(d, d, 1) + 2 * 2 * t * (h * w) ** 2 * d  # mid block
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if i > 0 else cin  # Wan 2.1: the upsampler halved the channels
        total += res(cin, cout) + vae["num_res_blocks"] * res(cout, cout)
        if i != len(mult) - 1:
            if vae["temporal_upsample"][i]:
                total += conv(cout, 2 * cout, 3)  # causal time conv, then twice the frames
                t *= 2
            h, w = 2 * h, 2 * w
            total += conv(cout, cout // 2, 9)
    total += conv(dims[-1], vae["out_channels"], 27)
    return latent_frames * total
