"""The Live Avatar S2V DiT: Wan2.2-S2V-14B's module tree (and checkpoint keys) with the causal streaming mode.

Three ways to run it:
  forward_full    the upstream non-causal WanModel_S2V forward: [noisy | reference | motion] tokens, all
                  attending to each other (one denoising call over a whole segment).
  prefill_sink    condition prefill at t=0: caches K/V of [reference | motion] tokens in the SinkCache.
  forward_stream  one denoising call for one block of latent frames: attends to its own tokens, the rolling
                  KV cache of earlier frames, and the (re-roped) sink.
Latents are [B, C, F, H, W]. Tokens are flattened frame-major, then h, then w.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..parallel import SINGLE, TPGroup
from .audio import AudioInjector, CausalAudioEncoder
from .block import DiTBlock, Head, Segments, linear_fp32
from .config import ModelConfig
from .framepack import FramePackMotioner
from .kv_cache import LayerKV, RollingKVCache, SinkCache
from .rope import framepack_positions, rope_table, video_positions

NOISY, REF, MOTION = 0, 1, 2  # trainable_cond_mask ids

AudioTokens = tuple[torch.Tensor, torch.Tensor]  # (global [B, F, 1, dim], local [B, F, n+1, dim])


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos(t w_k), sin(t w_k)], w_k = 10000^(-k/(dim/2)), computed in float64 as the reference does."""
    half = dim // 2
    t = t.to(torch.float64)
    angle = torch.outer(t, torch.pow(10000, -torch.arange(half, dtype=torch.float64).div(half)))
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).float()


class LiveAvatarDiT(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, cfg.ffn_dim, cfg.num_heads, cfg.eps, tp)
                                    for _ in range(cfg.num_layers))
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        self.casual_audio_encoder = CausalAudioEncoder(cfg.audio_dim, dim, cfg.num_audio_token,
                                                       cfg.num_wav2vec_layers)
        self.audio_injector = AudioInjector(dim, cfg.num_heads, len(cfg.audio_inject_layers), cfg.eps, tp)
        self.frame_packer = FramePackMotioner(cfg.in_dim, dim, cfg.framepack_buckets)
        self.inject_index = cfg.inject_index

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ------------------------------------------------------------------ embeddings
    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, F] per-frame timesteps -> e [B, F, dim] (head), e0 [B, F, 6, 2, dim] (slot 1 = t=0), fp32."""
        b, f = t.shape
        tt = torch.cat([t.float(), t.new_zeros(1, f, dtype=torch.float32)])  # zero_timestep row for the condition
        e = self.time_embedding[1](linear_fp32(self.time_embedding[0], sinusoidal_embedding(self.cfg.freq_dim,
                                                                                         tt.flatten().to(self.device))))
        e = linear_fp32(self.time_embedding[2], e)
        e0 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim)).unflatten(0, (b + 1, f))
        e0 = torch.stack([e0[:-1], e0[-1:].expand(b, -1, -1, -1)], dim=3)
        return e.unflatten(0, (b + 1, f))[:-1], e0

    def embed_text(self, context: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """Text encoder states [B, L, text_dim] (or a list of [L_i, text_dim]) -> [B, text_len, dim].

        Zero-padded to text_len BEFORE the embedding; every one of the text_len rows is attended (no mask).
        """
        rows = list(context) if not torch.is_tensor(context) else list(context.unbind(0))
        text_len = self.cfg.text_len
        for u in rows:
            if u.shape[0] > text_len or u.shape[-1] != self.cfg.text_dim:
                raise ValueError(f"text context {tuple(u.shape)} must be [<= {text_len}, {self.cfg.text_dim}]")
        padded = torch.stack([torch.cat([u, u.new_zeros(text_len - u.shape[0], u.shape[1])]) for u in rows])
        return self.text_embedding(padded.to(device=self.device, dtype=self.dtype))

    def encode_audio(self, audio: torch.Tensor) -> AudioTokens:
        """Bucketed wav2vec2 states [B, layers, C_a, 4F] of one segment -> per-latent-frame audio tokens.

        As the reference does, the segment's first frame is repeated motion_frames[0] times in front (causal
        left context), and the first motion_frames[1] output frames are dropped.
        """
        pre, drop = self.cfg.motion_frames
        audio = audio.to(self.device)
        audio = torch.cat([audio[..., :1].expand(*audio.shape[:-1], pre), audio], dim=-1)
        glob, local = self.casual_audio_encoder(audio)
        # copies, not views: a view of the kept frames would hold all pre + 4F frames' storage for the block
        return glob[:, drop:].to(self.dtype, copy=True), local[:, drop:].to(self.dtype, copy=True)

    def embed_video(self, x: torch.Tensor, cond_states: Optional[torch.Tensor]) -> torch.Tensor:
        """Noisy latents [B, C, F, H, W] (+ pose/cond latents) -> tokens [B, F*h*w, dim].

        cond_states=None means zero cond latents (no pose video), which still adds cond_encoder's bias.
        """
        y = self.patch_embedding(x.to(device=self.device, dtype=self.dtype))
        if cond_states is None:
            y = y + self.cond_encoder.bias[None, :, None, None, None]
        else:
            y = y + self.cond_encoder(cond_states.to(device=self.device, dtype=self.dtype))
        return y.flatten(2).transpose(1, 2)

    def embed_condition(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[reference image | FramePack motion] tokens (with their cond-mask embeddings) and RoPE positions."""
        if ref_latents.shape[2] != 1:
            raise ValueError(f"ref_latents must hold one latent frame, got {tuple(ref_latents.shape)}")
        ref = self.patch_embedding(ref_latents.to(device=self.device, dtype=self.dtype)).flatten(2).transpose(1, 2)
        gh, gw = self._grid(ref_latents)
        ref_pos = video_positions(self.cfg.ref_rope_frame, 1, gh, gw)
        motion, motion_pos = self.frame_packer(motion_latents.to(device=self.device, dtype=self.dtype))
        ids = torch.cat([torch.full((ref.shape[1],), REF), torch.full((motion.shape[1],), MOTION)]).to(self.device)
        tokens = torch.cat([ref, motion], dim=1) + self.trainable_cond_mask(ids).to(self.dtype)
        return tokens, torch.cat([ref_pos, motion_pos]), ref.shape[1]

    def _grid(self, latents: torch.Tensor) -> tuple[int, int]:
        _, ph, pw = self.cfg.patch_size
        h, w = latents.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        return h // ph, w // pw

    def unpatchify(self, x: torch.Tensor, frames: int, gh: int, gw: int) -> torch.Tensor:
        """[B, F*h*w, pt*ph*pw*C] -> [B, C, F*pt, h*ph, w*pw] (token vectors ordered (pt, ph, pw, c))."""
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.reshape(x.shape[0], frames, gh, gw, pt, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], c, frames * pt, gh * ph, gw * pw)

    # ------------------------------------------------------------------ the block stack
    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, rope: torch.Tensor, context: torch.Tensor,
                   frames: Segments, audio: Optional[AudioTokens] = None,
                   kv: Optional[Callable[[int], LayerKV]] = None, layers: Optional[range] = None) -> torch.Tensor:
        """The blocks (all, or a pipeline stage's `layers`), with audio injection after the inject layers when
        audio tokens are given.

        frames: the per-latent-frame token layout of the noisy tokens (audio is injected frame by frame);
        e0's frame axis may be coarser (the non-causal forward uses one timestep for all frames).
        """
        mod = Segments(e0.shape[1], frames.num_noisy // e0.shape[1]) if frames.num_noisy else frames
        for i in layers if layers is not None else range(len(self.blocks)):
            x = self.blocks[i](x, e0, mod, rope, context, kv(i) if kv else None)
            if audio is not None and i in self.inject_index:
                x = self.audio_injector(self.inject_index[i], x, frames, *audio)
        return x

    def condition_positions(self, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """RoPE positions of the [reference | motion] tokens and the reference token count, from shapes alone
        (a pipeline stage without the embedding weights needs them for its share of the sink)."""
        _, ph, pw = self.cfg.patch_size
        gh, gw = latent_hw[0] // ph, latent_hw[1] // pw
        motion = framepack_positions(self.cfg.framepack_buckets, *latent_hw)
        return torch.cat([video_positions(self.cfg.ref_rope_frame, 1, gh, gw), *motion]), gh * gw

    # ------------------------------------------------------------------ the three ways to run
    def forward_full(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, ref_latents: torch.Tensor,
                     motion_latents: torch.Tensor, cond_states: Optional[torch.Tensor],
                     audio: AudioTokens) -> torch.Tensor:
        """Upstream WanModel_S2V.forward. x [B, C, F, H, W], t [B], context = embed_text(...) -> flow, fp32."""
        b, _, frames = x.shape[:3]
        gh, gw = self._grid(x)
        noisy = self.embed_video(x, cond_states) + self.trainable_cond_mask.weight[NOISY].to(self.dtype)
        cond, cond_pos, _ = self.embed_condition(ref_latents, motion_latents)
        tokens = torch.cat([noisy, cond], dim=1)
        rope = rope_table(torch.cat([video_positions(0, frames, gh, gw), cond_pos]), self.cfg.rope_split,
                          self.cfg.rope_theta)
        e, e0 = self.embed_time(t.reshape(b, 1))
        seg = Segments(frames, gh * gw)
        h = self.run_blocks(tokens, e0, rope, context, seg, audio)
        out = self.head(h[:, :seg.num_noisy], e)
        return self.unpatchify(out, frames, gh, gw)

    # ------------------------------------------------------------------ the sink prefill, in stage-sized pieces
    def sink_embed(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens [B, Lc, dim] and their (t=0) time modulation e0: the first stage's part."""
        tokens, _, _ = self.embed_condition(ref_latents, motion_latents)
        _, e0 = self.embed_time(torch.zeros(tokens.shape[0], self.cfg.num_frames_per_block, device=self.device))
        return tokens, e0

    def sink_layers(self, tokens: torch.Tensor, e0: torch.Tensor, latent_hw: tuple[int, int], context: torch.Tensor,
                    sink: SinkCache, layers: Optional[range] = None) -> torch.Tensor:
        """Run the condition tokens through the blocks at t=0, caching each layer's K (un-roped) and V."""
        positions, num_ref = self.condition_positions(latent_hw)
        rope = rope_table(positions, self.cfg.rope_split, self.cfg.rope_theta)
        sink.positions, sink.num_ref_tokens = positions, num_ref
        return self.run_blocks(tokens, e0, rope, context, Segments(0, 1), kv=lambda i: LayerKV("sink", i, sink),
                               layers=layers)

    def prefill_sink(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor, context: torch.Tensor,
                     sink: SinkCache) -> None:
        """Prefill every layer's sink with the [reference | motion] condition."""
        self.sink_layers(*self.sink_embed(ref_latents, motion_latents), tuple(ref_latents.shape[-2:]), context, sink)

    # ------------------------------------------------------------------ a streaming call, in stage-sized pieces
    def stream_embed(self, x: torch.Tensor, t: torch.Tensor, cond_states: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy latents -> (tokens [B, L, dim], e [B, F, dim] for the head, e0 for the blocks): the first stage's part."""
        e, e0 = self.embed_time(t)
        return self.embed_video(x, cond_states) + self.trainable_cond_mask.weight[NOISY].to(self.dtype), e, e0

    def stream_layers(self, h: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, audio: AudioTokens,
                      rolling: RollingKVCache, sink: SinkCache, start_frame: int, sink_shift: int,
                      grid: tuple[int, int, int], layers: Optional[range] = None) -> torch.Tensor:
        """The blocks of one streaming call; grid = (frames, gh, gw) of the block's tokens."""
        frames, gh, gw = grid
        split, theta = self.cfg.rope_split, self.cfg.rope_theta
        h = [h]  # handed to run_blocks without a name here, so the block input is freed after the first block
        rope = rope_table(video_positions(start_frame, frames, gh, gw), split, theta)
        sink_rope = rope_table(sink.shifted_positions(sink_shift), split, theta)
        start = start_frame * gh * gw
        return self.run_blocks(h.pop(), e0, rope, context, Segments(frames, gh * gw), audio,
                               kv=lambda i: LayerKV("stream", i, sink, rolling, start, sink_rope), layers=layers)

    def stream_head(self, h: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Final tokens -> the flow prediction [B, C, F, H, W] in fp32: the last stage's part."""
        return self.unpatchify(self.head(h, e), *grid)

    def forward_stream(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                       cond_states: Optional[torch.Tensor], audio: AudioTokens, rolling: RollingKVCache,
                       sink: SinkCache, start_frame: int, sink_shift: int) -> torch.Tensor:
        """One denoising call for a block of latent frames starting at absolute latent frame `start_frame`.

        t [B, F] per-frame timesteps; sink_shift moves the sink's reference tokens forward in time by that many
        latent frames for this call. Returns the flow prediction [B, C, F, H, W] in fp32.
        """
        if not sink.ready:
            raise RuntimeError("prefill_sink must run before forward_stream")
        grid = (x.shape[2], *self._grid(x))
        e, e0 = self.embed_time(t)
        # the embedded tokens go straight into the blocks, unnamed, so they are freed after the first block
        h = self.stream_layers(self.embed_video(x, cond_states) + self.trainable_cond_mask.weight[NOISY].to(self.dtype),
                               e0, context, audio, rolling, sink, start_frame, sink_shift, grid)
        return self.stream_head(h, e, grid)

def build_model(spec: "str | dict | ModelConfig" = "liveavatar-14b", tp: TPGroup = SINGLE,
                dtype: Optional[torch.dtype] = None) -> LiveAvatarDiT:
    """Build the DiT from a preset name, a config dict or a ModelConfig.

    Honours an enclosing `with torch.device("meta"):` (no memory is allocated then).
    """
    from .config import resolve_config

    model = LiveAvatarDiT(resolve_config(spec), tp)
    if dtype is not None:
        model.to(dtype)
    return model
