"""`qavatar plan`: per-rank peak memory of a streaming run, before anything is downloaded.

Everything is computed, not typed in: weights from the model built on the meta device (with the quantized
tree of the chosen scheme) and the sharding rules; KV caches and activations from explicit formulas over the
config and the token counts of the chosen size. The activation formula follows the code path of one
forward_stream call (the largest of: embedding, attention over the rolling window and the sink, FFN, audio
injection, head) and is checked against allocations measured on CPU (tests/test_plan.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Optional

import torch

from ..errors import ConfigError
from ..model import ModelConfig, build_model
from ..model.kv_quant import bytes_per_row, is_quantized
from ..model.rope import framepack_positions
from .group import TPGroup
from .shard import shard_dim, shard_range

GiB = 2 ** 30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn,
          "int8": torch.int8}
PRECISIONS = ("bf16", "int8-wo", "int8", "fp8-wo", "fp8")  # best quality first (docs/quantization.md)
# KV cache dtypes, best quality first: int8 beats fp8 by ~13 dB at the same bytes (docs/kv_cache.md)
KV_DTYPES = ("bf16", "int8", "fp8")
# CUDA context (~0.5 GiB), cuBLAS/NCCL workspaces and allocator fragmentation, per rank. Stated, not measured.
RESERVE_BYTES = int(1.5 * GiB)

# Parameter counts of the other models of the pipeline, checked against transformers/diffusers built on the
# meta device in tests/test_plan.py: umT5-XXL encoder, Wan 2.1 VAE (encoder, decoder), wav2vec2-large.
ENCODERS = {"t5": 5_680_910_336, "vae_encoder": 53_595_872, "vae_decoder": 73_295_331, "wav2vec2": 315_438_720}
VAE_BASE_DIM = 96


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class PlanRequest:
    config: ModelConfig
    gpus: int = 1
    vram: int = 24 * GiB
    precision: str = "bf16"
    size: tuple[int, int] = (704, 384)  # pixel H, W
    kv_dtype: str = "bf16"
    compute_dtype: str = "bf16"
    steps: int = 4
    t5: str = "cpu"  # where the umT5 encoder runs: cpu | gpu (rank 0)
    vae: str = "gpu"  # gpu: the host rank decodes (the last TP rank of the first stage) | cpu
    wav2vec2: str = "cpu"
    attention: str = "flash"  # flash (GPU kernels, no score matrix) | math (scores materialised)
    replicated_dit: bool = False  # the reference layout (TPP): a whole DiT per GPU, one sampler step each
    pipeline: int = 1  # sampler-step pipeline stages, each a TP group of gpus/pipeline ranks (sizing only)
    pp: int = 1  # layer stages of the pipeline layout (stages.py), each a TP group of (gpus - vae_rank) / pp ranks
    vae_rank: bool = False  # the VAE decodes on a rank of its own (the reference's 5th GPU), not the host rank
    exact_int8_reduce: bool = True  # int8 W8A8 row-parallel layers all-reduce int32 (False: --bf16-reduce)
    stored: Optional[dict[str, tuple[int, ...]]] = None  # checkpoint key shapes, for the exact quantized tree

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.kv_dtype not in ("bf16", "fp8", "int8", "fp32", "fp16"):
            raise ConfigError(f"--kv-dtype must be bf16, fp8 or int8, not {self.kv_dtype!r}")
        if self.gpus < 1:
            raise ConfigError("--gpus must be at least 1")


@dataclass
class RankPlan:
    rank: int
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.breakdown.values())


@dataclass
class Plan:
    request: PlanRequest
    tp: int
    params: int
    tokens_per_frame: int
    sink_tokens: int
    ranks: list[RankPlan]
    activation_detail: dict[str, int]
    host_rank: int = 0  # runs the encoders on GPU (--t5/--wav2vec2 gpu)
    vae_at: int = 0  # decodes (the host rank, or a rank beyond the DiT's)

    @property
    def worst(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def peak_bytes_per_rank(self) -> int:
        return self.worst.peak

    @property
    def fits(self) -> bool:
        return self.peak_bytes_per_rank <= self.request.vram

    @property
    def headroom(self) -> int:
        return self.request.vram - self.peak_bytes_per_rank

    def to_json(self) -> dict:
        req = asdict(self.request)
        req.pop("stored")
        req["config"] = self.request.config.name
        return {"fits": self.fits, "peak_bytes_per_rank": self.peak_bytes_per_rank, "params": self.params,
                "breakdown": self.worst.breakdown, "worst_rank": self.worst.rank, "vram": self.request.vram,
                "headroom_bytes": self.headroom, "tp": self.tp, "tokens_per_frame": self.tokens_per_frame,
                "sink_tokens": self.sink_tokens, "request": req,
                "ranks": [{"rank": r.rank, "peak_bytes": r.peak, "breakdown": r.breakdown} for r in self.ranks],
                "activation_detail": self.activation_detail}


# ------------------------------------------------------------------------------------------ weights
@lru_cache(maxsize=16)
def _full_tree(cfg: ModelConfig, precision: str, stored_key: Optional[tuple]) -> tuple[tuple[str, tuple, str], ...]:
    """(key, full shape, dtype tag) of the model's state dict; quantized layers per the scheme."""
    with torch.device("meta"):
        model = build_model(cfg)
    quant = set()
    if precision != "bf16":
        from ..quant import QuantConfig, QuantLinear, quantized_skeleton

        qc = QuantConfig(precision)
        stored = dict(stored_key) if stored_key else {f"{n}.weight_scale": (0,) for n, m in model.named_modules()
                                                      if isinstance(m, torch.nn.Linear) and qc.targets(n)}
        quantized_skeleton(model, qc, stored, torch.bfloat16)
        quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = []
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in quant and leaf == "weight":
            tag = "weight8"
        elif module in quant and leaf in ("weight_scale", "input_scale", "smooth_scale"):
            tag = "scale"
        else:
            tag = "param"
        out.append((key, tuple(t.shape), tag))
    return tuple(out)


def stored_layers(cfg: ModelConfig, raw_config: dict, dit_dir=None) -> Optional[dict[str, tuple[int, ...]]]:
    """PlanRequest.stored for a quantized checkpoint: its header shapes when its weights are here (exact: the
    static and smoothing scales too), else the Linears its quantization_config does not `ignore` (a Hub config.json
    alone). None for a bf16 checkpoint. The default tree would miss layers kept bf16 by --ignore/--auto-skip."""
    qc = raw_config.get("quantization_config")
    if not qc:
        return None
    if dit_dir is not None:
        from ..checkpoint.reader import CheckpointReader

        reader = CheckpointReader(dit_dir)
        return reader.shapes()
    ignore = set(qc.get("ignore") or ())
    with torch.device("meta"):
        model = build_model(cfg)
    return {f"{n}.weight_scale": (m.out_features, 1) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n not in ignore}


def key_stage(cfg: ModelConfig, key: str, ranges: list[tuple[int, int]]) -> int:
    """The layer stage holding a parameter: its DiT layer's (an audio injector goes with the layer it follows),
    the head on the last stage, every embedding and encoder (patch, cond, text, time, audio, FramePack) on the
    first."""
    parts = key.split(".")
    layer = None
    if parts[0] == "blocks":
        layer = int(parts[1])
    elif parts[0] == "audio_injector":
        layer = sorted(cfg.audio_inject_layers)[int(parts[2])]
    elif parts[0] == "head":
        return len(ranges) - 1
    if layer is None:
        return 0
    return next(i for i, (a, b) in enumerate(ranges) if a <= layer < b)


def weight_bytes(req: PlanRequest, rank: int, tp: int, stage: int = 0,
                 ranges: Optional[list[tuple[int, int]]] = None) -> dict[str, int]:
    """Bytes this rank holds, by kind: sharded 8-bit weights, replicated 8-bit weights, fp32 scales,
    sharded and replicated parameters in the compute dtype. With layer stages (ranges), only the parameters
    of this rank's stage count (key_stage)."""
    stored_key = tuple(sorted(req.stored.items())) if req.stored else None
    staged = tuple(ranges) if ranges is not None and len(ranges) > 1 else None
    return dict(_weight_bytes(req.config, req.precision, req.compute_dtype, stored_key, rank, tp, stage, staged))


@lru_cache(maxsize=1024)
def _weight_bytes(cfg: ModelConfig, precision: str, compute_dtype: str, stored_key: Optional[tuple], rank: int,
                  tp: int, stage: int, ranges: Optional[tuple]) -> tuple[tuple[str, int], ...]:
    group = TPGroup(rank, tp)
    compute = _bytes(DTYPES[compute_dtype])
    out = {"weights_8bit_sharded": 0, "weights_8bit_replicated": 0, "scales_fp32": 0,
           f"params_{compute_dtype}_sharded": 0, f"params_{compute_dtype}_replicated": 0}
    for key, shape, tag in _full_tree(cfg, precision, stored_key):
        if ranges is not None and key_stage(cfg, key, list(ranges)) != stage:
            continue
        numel = math.prod(shape)
        dim = shard_dim(key)
        if dim is not None and tp > 1:
            start, stop = shard_range(key, shape[dim], group)
            numel = numel // shape[dim] * (stop - start)
        where = "replicated" if dim is None or tp == 1 else "sharded"
        if tag == "weight8":
            out[f"weights_8bit_{where}"] += numel
        elif tag == "scale":
            out["scales_fp32"] += numel * 4
        else:
            out[f"params_{compute_dtype}_{where}"] += numel * compute
    return tuple(out.items())


# ------------------------------------------------------------------------------------------ activations
def parse_hw(size: str) -> tuple[int, int]:
    """`plan --size`: '704*384' (or 704x384) -> (704, 384) pixels."""
    m = re.fullmatch(r"\s*(\d+)\s*[*xX]\s*(\d+)\s*", str(size))
    if not m:
        raise ConfigError(f"--size {size!r}: expected H*W in pixels, e.g. --size 704*384")
    return int(m.group(1)), int(m.group(2))


def token_counts(cfg: ModelConfig, size: tuple[int, int]) -> tuple[int, int, int]:
    """(tokens per latent frame, sink tokens, latent H, W) for a pixel size."""
    h, w = size
    if h % 16 or w % 16:
        raise ConfigError(f"--size {h}*{w}: sides must be multiples of 16 (the VAE's 8 and the patch's 2)")
    lat_h, lat_w = h // 8, w // 8
    fs = cfg.tokens_per_frame(lat_h, lat_w)
    sink = fs + sum(len(g) for g in framepack_positions(cfg.framepack_buckets, lat_h, lat_w))
    return fs, sink, lat_h * lat_w


def _cache_attention_stages(held: int, ldl: int, L: int, heads: int, dl: int, K: int, lc: int, c: int, kvb: int,
                            cast_kv: bool, up: int, math: int) -> dict[str, int]:
    """A compute-dtype cache's self-attention (model/segment_attention.py attend_two): the window is read in
    place and the sink where it is stored, attended separately and merged by log-sum-exp, so nothing of size
    K (window + sink) is allocated. What is: the sink keys re-roped (apply_rope's fp32 copy when the compute
    dtype is not fp32, two half products, the stacked result; then the compute-dtype keys), each segment's
    output and fp32 log-sum-exp, and the fp32 mix. A cache stored in another dtype than the compute dtype
    (a plain cast) also casts the block's K and V in, and the window's K and V out, per call."""
    f4, W = 4, K - lc
    cast = 2 * ldl * kvb + 2 * W * dl * c if cast_kv else 0
    sink_k = lc * dl * c
    lse = L * heads * f4
    # both outputs; then, at bf16, out_a beside the fp32 mix and out_a's fp32 copy; at fp32 no copies
    mix = max(2 * ldl * c, (c + 2 * f4) * ldl if up else 0) + 3 * lse
    return {"sink_rope": held + cast + lc * dl * f4 * (2 + up),
            "attention": held + cast + sink_k + mix + math * max(W, lc)}


def activation_bytes(cfg: ModelConfig, tp: TPGroup, size: tuple[int, int], compute: torch.dtype,
                     kv_dtype: torch.dtype, precision: str, attention: str) -> dict[str, int]:
    """Peak bytes alive during one block of the stream (B=1): the max over the stages of a forward_stream
    call, plus what the call holds throughout, or the audio encoder's peak, whichever is larger.

    Each stage lists the tensors the code holds at that point (model/block.py, model/attention.py):
    modulation, norms and RoPE in fp32 (a compute-dtype copy only when the dtypes differ), the residual
    stream in fp32 after the first gated add, an 8-bit W8A8 Linear's fp32 and int8 input copies and its
    integer and scaled accumulators, the self-attention's re-roped sink keys and per-segment outputs
    (compute-dtype caches) or dequantized [rolling window | re-roped sink] K and V (8-bit caches).
    """
    fs, lc, _ = token_counts(cfg, size)
    c, f4, kvb = _bytes(compute), 4, _bytes(kv_dtype)
    up = int(compute != torch.float32)  # 1 when casting between fp32 and the compute dtype copies
    F = cfg.num_frames_per_block
    L = F * fs
    D, hd, T = cfg.dim, cfg.head_dim, cfg.text_len
    heads = tp.shard(cfg.num_heads, "num_heads")
    dl = heads * hd
    start, stop = tp.span(cfg.ffn_dim)
    fl = stop - start
    K = cfg.clip_latent_frames * fs + lc  # keys of a full rolling window plus the sink
    w8a8, wo = precision in ("int8", "fp8"), precision.endswith("-wo")

    def lx(rows: int, n_in: int, n_out: int) -> int:
        """A Linear's temporaries beyond its output (and its bias-added copy)."""
        if w8a8:  # quantizing the input: fp32 copy, input / scale, int8; then int8 input + integer accumulator
            return max(rows * n_in * (up * f4 + f4 + 1), rows * n_in + rows * n_out * f4)
        # weight-only: the weight dequantized in fp32 (quant/kernels.py dequantize_weight) and its compute-dtype copy
        return n_in * n_out * (f4 + up * c) if wo else 0

    ld, ldl, tdl = L * D, L * dl, T * dl
    # the block input (the caller holds it for the whole block) and, from the first gated add on, the fp32
    # residual stream beside it
    x_in = ld * c
    x32 = x_in + ld * f4
    m = ld * c  # a modulated / normed branch input: the caller holds it until the branch returns
    modulate = 3 * ld * f4 + up * ld * c  # LayerNorm in fp32, x * (1 + scale), + shift; the cast copy
    gate = ld * c + up * ld * f4 + 2 * ld * f4  # branch output, its fp32 copy, x * gate, x + ...
    norm_tmp = (1 + up) * f4 + up * c  # per element of a q/k RMSNorm: fp32 input, product, cast copy
    rope = 5 * ldl * f4 // 2  # apply_rope's fp32 half-rotations and the stacked result
    math = 2 * heads * L * f4 if attention == "math" else 0  # score and softmax matrices, per key
    stages = {
        "modulate": x_in + modulate,
        "qk_projection": x_in + m + 2 * ldl * c + lx(L, D, dl),
        "qk_norm": x_in + m + 3 * ldl * c + ldl * norm_tmp,
        "v_projection": x_in + m + 3 * ldl * c + lx(L, D, dl),
        "rope": x_in + m + 4 * ldl * c + rope,
        # self-attention through the caches (model/kv_cache.py LayerKV.attend); the caller holds the roped q, k
        # and v throughout (the un-roped q and k are freed first)
        **(_cache_attention_stages(x_in + m + 3 * ldl * c, ldl, L, heads, dl, K, lc, c, kvb, kv_dtype != compute,
                                   up, math)
           if not is_quantized(kv_dtype) else
           # 8-bit caches (LayerKV._dequantized): the block's K and V quantized (fp32 copy, its abs, the 8-bit
           # result), then K and V of [window | sink] dequantized in place, the sink keys re-roped (apply_rope's
           # fp32 copy when the compute dtype is not fp32, its two half products, the stacked result), one SDPA
           {"kv_quantize": x_in + m + 3 * ldl * c + ldl * (2 * f4 + 1 + 1) + 2 * L * heads * f4,
            "kv_dequant": x_in + m + 3 * ldl * c + 2 * K * dl * c + lc * dl * f4 * (2 + up),
            "attention": x_in + m + 4 * ldl * c + 2 * K * dl * c + math * K}),
        "o_projection": x_in + m + ldl * c + 2 * ld * c + lx(L, dl, D),
        "gate_attention": x_in + gate,
        # q and k projected (a Linear's temporaries beside them), then normed one after the other (model/
        # attention.py qk_norm: the fp32 product and the weighted result, 8 bytes an element at any compute
        # dtype), each beside both projections, k's beside the normed q; plus the gathered head sums
        "cross_qk": x32 + m + (L + T) * cfg.num_heads * f4 + max(
            ldl * c + lx(L, D, dl), (ldl + tdl) * c + lx(T, D, dl),
            ldl * (c + 8) + tdl * c, 2 * ldl * c + tdl * (c + 8)),
        # v of the context tokens projected beside the normed q and k (at 14B width, 512 text tokens: the
        # peak). A W8A8 Linear's two phases apart: quantizing the input, then the int8 input, the accumulator,
        # its output and the bias-added copy (the output does not exist while the input is quantized)
        "cross_v": x32 + m + (ldl + tdl) * c + (
            max(T * D * (up * f4 + f4 + 1), T * D + tdl * f4 + 2 * tdl * c) if w8a8 else 2 * tdl * c + lx(T, D, dl)),
        "cross_attention": x32 + m + (ldl + 2 * tdl) * c + ldl * c + math * T,
        "cross_output": x32 + m + ldl * c + 2 * ld * c + lx(L, dl, D),
        "cross_add": x32 + ld * f4 + ld * c,
        "modulate_ffn": x32 + modulate,
        "ffn_in": x32 + m + L * fl * c + lx(L, D, fl),
        "ffn_gelu": x32 + m + 2 * L * fl * c,
        "ffn_out": x32 + m + L * fl * c + 2 * ld * c + lx(L, fl, D),
        "gate_ffn": x32 + gate,
        # the AdaLN's shift/scale Linear (a replicated D -> 2D on F rows: its temporaries, e.g. a weight-only
        # layer's dequantized weight), then the norm
        "audio_adain": x_in + max(2 * ld * c, lx(F, D, 2 * D) + 2 * F * 2 * D * c),
        "audio_attention": x_in + m + 2 * ldl * c + ldl * norm_tmp + lx(L, D, dl),
        "audio_output": x_in + m + ldl * c + 2 * ld * c + lx(L, dl, D),
        "audio_add": 3 * ld * c,
        "head": ld * c + (3 + up) * ld * f4 + 2 * L * cfg.out_dim * 4 * f4,
    }
    latents = cfg.num_frames_per_block * cfg.in_dim * (size[0] // 8) * (size[1] // 8) * f4
    # the sampler's latents, the two RoPE tables, the time embeddings and this block's modulation, audio tokens
    call = latents + (L + lc) * hd * f4 + F * D * f4 * 25 + F * (cfg.num_audio_token + 2) * D * c
    audio_frames = cfg.motion_frames[0] + 4 * cfg.num_frames_per_block
    audio = 3 * cfg.num_wav2vec_layers * cfg.audio_dim * audio_frames * f4  # the layer mix's input copies
    worst = max(stages, key=stages.get)
    return {"peak": max(call + stages[worst], audio), "call_tensors": call, "worst_stage": stages[worst],
            "audio_encoder": audio, **{f"stage_{k}": v for k, v in stages.items()}}


def kv_bytes(cfg: ModelConfig, tp: TPGroup, size: tuple[int, int], kv_dtype: torch.dtype,
             steps: int, layers: Optional[int] = None, compute: Optional[torch.dtype] = None) -> tuple[int, int]:
    """(rolling caches, sink) bytes on one rank: one rolling window per sampler step, one shared sink, for
    `layers` layers (all of them by default; a layer stage holds its own layers' rows of every cache).

    A row is one (token, head) of K or of V; 8-bit rows carry their fp32 scale (model/kv_quant.py). The sink is
    stored like the rolling caches when they are 8-bit, else in the compute dtype (a plain-cast KV dtype such
    as fp16 applies to the rolling caches only)."""
    fs, lc, _ = token_counts(cfg, size)
    layers = cfg.num_layers if layers is None else layers
    rows = 2 * tp.shard(cfg.num_heads, "num_heads") * layers  # K and V rows per token
    sink_dtype = kv_dtype if is_quantized(kv_dtype) or compute is None else compute
    rolling = steps * cfg.clip_latent_frames * fs * rows * bytes_per_row(cfg.head_dim, kv_dtype)
    return rolling, lc * rows * bytes_per_row(cfg.head_dim, sink_dtype)


def session_bytes(cfg: ModelConfig, compute: torch.dtype) -> int:
    """Held for the whole stream: the embedded text context, and one block's audio tokens."""
    c = _bytes(compute)
    return cfg.text_len * cfg.dim * c + cfg.num_frames_per_block * (cfg.num_audio_token + 2) * cfg.dim * c


def vae_decode_bytes(size: tuple[int, int], compute: torch.dtype) -> int:
    """Estimate (not yet measured): decoding one latent frame into 4 pixel frames holds about 6 tensors
    of 4 x H x W x base_dim at full resolution (conv input/output, residual, norm, causal cache)."""
    return 6 * 4 * size[0] * size[1] * VAE_BASE_DIM * _bytes(compute)


def layout(req: PlanRequest) -> tuple[int, int]:
    """(pipeline stages, TP degree per stage). The reference layout is one replica per sampler step."""
    if req.replicated_dit:
        return min(req.gpus, req.steps), 1
    if req.pp > 1 or req.vae_rank:
        if req.pipeline != 1:
            raise ConfigError("--pp (layer stages) and --pipeline (sampler-step stages) are different layouts; "
                              "give one of them")
        dit = req.gpus - int(req.vae_rank)
        if req.pp < 1 or dit < req.pp or dit % req.pp:
            raise ConfigError(f"--pp {req.pp} must divide the {dit} DiT GPUs (--gpus {req.gpus}"
                              f"{' less the VAE rank' if req.vae_rank else ''})")
        return 1, dit // req.pp
    if req.pipeline < 1 or req.gpus % req.pipeline:
        raise ConfigError(f"--pipeline {req.pipeline} must divide --gpus {req.gpus}")
    if req.pipeline > req.steps:
        raise ConfigError(f"--pipeline {req.pipeline}: at most one stage per sampler step ({req.steps})")
    return req.pipeline, req.gpus // req.pipeline


def make_plan(req: PlanRequest) -> Plan:
    cfg = req.config
    stages, tp = layout(req)
    compute, kv = DTYPES[req.compute_dtype], DTYPES[req.kv_dtype]
    if cfg.num_heads % tp:  # a degree that splits a head: name the flags that fix it
        valid = [str(d) for d in valid_degrees(cfg, 8)]
        fix = (f"use --pp {req.gpus} (layer stages, any number up to {cfg.num_layers}), or " if req.pp == 1 and
               not req.replicated_dit and req.gpus <= cfg.num_layers else "use ")
        raise ConfigError(f"--gpus {req.gpus}{f' --pp {req.pp}' if req.pp > 1 else ''}: a tensor-parallel degree "
                          f"of {tp} splits the {cfg.num_heads} attention heads; {fix}a TP degree of "
                          f"{', '.join(valid)} per stage")
    fs, lc, _ = token_counts(cfg, req.size)
    params = sum(math.prod(s) for k, s, tag in _full_tree(cfg, "bf16", None))
    c = _bytes(compute)
    ranks = []
    act_detail: dict[str, int] = {}
    dit_ranks = stages * tp  # GPUs beyond the DiT's only decode (the 5th GPU of the reference's layout)
    if req.pp > 1 or req.vae_rank:
        dit_ranks = req.pp * tp
        from .stages import stage_layers

        ranges = stage_layers(cfg, req.pp, (req.size[0] // 8, req.size[1] // 8))
    else:
        ranges = [(0, cfg.num_layers)]
    # The host rank runs the encoders and the VAE besides its DiT slice, as the runtime does
    # (pipeline/infer.py): the last TP rank of the first stage.
    host_rank = tp - 1 if req.pp > 1 else dit_ranks - 1
    for rank in range(req.gpus):
        group = TPGroup(rank % tp, tp)
        stage = min(rank // tp, len(ranges) - 1)
        host = rank == host_rank
        if rank >= dit_ranks:
            b = {k: 0 for k in ranks[0].breakdown}
            b["vae"] = ENCODERS["vae_decoder"] * c + vae_decode_bytes(req.size, compute) if req.vae == "gpu" else 0
            b["reserve"] = RESERVE_BYTES
            ranks.append(RankPlan(rank, b))
            continue
        b = weight_bytes(req, group.rank, tp, stage, ranges)
        layers = ranges[stage][1] - ranges[stage][0]
        # its steps' caches (sampler-step stages), its layers' rows of every step's cache (layer stages)
        rolling, sink = kv_bytes(cfg, group, req.size, kv, math.ceil(req.steps / stages), layers,
                                 compute)
        b["kv_rolling"] = rolling
        b["kv_sink"] = sink
        act = activation_bytes(cfg, group, req.size, compute, kv, req.precision, req.attention)
        act_detail = act
        b["activations"] = act["peak"]
        b["session_tensors"] = session_bytes(cfg, compute)
        if len(ranges) > 1:  # the stage hand-off: one item arriving while the previous one is sent on
            from .comm import handoff_bytes

            b["pipeline_buffers"] = 2 * handoff_bytes(cfg, (req.size[0] // 8, req.size[1] // 8), compute)
        b["t5"] = ENCODERS["t5"] * c if (req.t5 == "gpu" and host) else 0
        b["wav2vec2"] = ENCODERS["wav2vec2"] * c if (req.wav2vec2 == "gpu" and host) else 0
        b["vae"] = (ENCODERS["vae_decoder"] * c + vae_decode_bytes(req.size, compute)) \
            if (req.vae == "gpu" and host and dit_ranks == req.gpus) else 0
        b["reserve"] = RESERVE_BYTES
        ranks.append(RankPlan(rank, b))
    return Plan(req, tp, params, fs, lc, ranks, act_detail, host_rank,
                vae_at=host_rank if dit_ranks == req.gpus else req.gpus - 1)


def _fmt(n: int) -> str:
    return f"{n / GiB:6.2f} GiB" if n >= 0.01 * GiB else f"{n / 2**20:6.1f} MiB"


def format_plan(plan: Plan) -> str:
    req = plan.request
    stages, _ = layout(req)
    where = ("full DiT replica per GPU, one sampler step each (the reference's layout)" if req.replicated_dit
             else f"tensor parallel x{plan.tp}" + (f" in each of {stages} sampler-step pipeline stages (sizing only:"
                                                   f" qavatar runs one stage today)" if stages > 1 else ""))
    if req.pp > 1:
        where = f"{req.pp} layer stages x tensor parallel x{plan.tp}"
    if req.vae_rank:
        where += "; VAE on its own rank"
    lines = [f"{req.config.name}: {plan.params:,} parameters; {req.precision} weights, KV cache {req.kv_dtype}, "
             f"compute {req.compute_dtype}",
             f"{req.gpus} GPU(s) x {req.vram / GiB:.0f} GiB, {where}; {req.size[0]}x{req.size[1]}: "
             f"{plan.tokens_per_frame} tokens per latent frame, {req.config.num_frames_per_block * plan.tokens_per_frame}"
             f" per block, sink {plan.sink_tokens}",
             f"{'per rank':36s}" + "".join(f"{'rank ' + str(r.rank):>12s}" for r in plan.ranks)]
    for key in plan.ranks[0].breakdown:
        if any(r.breakdown[key] for r in plan.ranks):
            lines.append(f"  {key:34s}" + "".join(f"{_fmt(r.breakdown[key]):>12s}" for r in plan.ranks))
    lines.append(f"  {'peak':34s}" + "".join(f"{_fmt(r.peak):>12s}" for r in plan.ranks))
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: largest rank {plan.peak_bytes_per_rank / GiB:.2f} GiB of {req.vram / GiB:.0f} GiB "
                 f"({'headroom' if plan.fits else 'short by'} {abs(plan.headroom) / GiB:.2f} GiB); reserve "
                 f"{RESERVE_BYTES / GiB:.1f} GiB for CUDA context, workspaces and fragmentation included")
    host, vae_at = plan.host_rank, plan.vae_at
    notes = ["T5 on " + (f"rank {host}" if req.t5 == "gpu" else "CPU (prompt embeddings cached on disk)"),
             "wav2vec2 on " + (f"rank {host}" if req.wav2vec2 == "gpu" else "CPU"),
             "VAE decode on " + (f"rank {vae_at}" if req.vae == "gpu" else "CPU") + " (activation estimate)"]
    lines.append("placement: " + "; ".join(notes))
    return "\n".join(lines)


def valid_degrees(cfg: ModelConfig, max_gpus: int) -> list[int]:
    """TP degrees that keep whole heads on each rank."""
    return [n for n in range(1, max_gpus + 1) if cfg.num_heads % n == 0]


def find_recipe(base: PlanRequest, max_gpus: int, goal: str) -> Optional[Plan]:
    """The cheapest plan that fits: goal 'fewest-gpus' (then best quality) or 'quality' (then fewest GPUs)."""
    options = []
    for gpus in valid_degrees(base.config, max_gpus):
        for qi, precision in enumerate(PRECISIONS):
            for ki, kv in enumerate(KV_DTYPES):
                req = PlanRequest(**{**asdict(base), "config": base.config, "gpus": gpus, "precision": precision,
                                     "kv_dtype": kv, "stored": None})
                plan = make_plan(req)
                if plan.fits:
                    key = (gpus, qi, ki) if goal == "fewest-gpus" else (qi, ki, gpus)
                    options.append((key, plan))
    return min(options, key=lambda o: o[0])[1] if options else None


from .comm import comm_bytes_per_block  # noqa: E402,F401  (the planner's byte predictor; parallel/comm.py)


def choose_layout(req: PlanRequest, gpu: str = "rtx4090", link_gbps: Optional[float] = None,
                  tflops: Optional[float] = None, world: Optional[int] = None,
                  allow_vae_rank: bool = False) -> tuple[int, int]:
    """(tp, pp) of the fastest layout that fits (parallel/speed.py), for `infer --layout auto`.

    world: the ranks already started; only layouts with exactly that many ranks count (with the VAE on the
    host rank, or on a rank of its own when allow_vae_rank). Raises ConfigError when none fits.
    """
    from dataclasses import replace

    from .speed import get_profile, layouts, recommended

    profile = get_profile(gpu, link_gbps, tflops)
    base = replace(req, gpus=world) if world is not None else req
    options = [o for o in layouts(base, profile)
               if (world is None or o.gpus == world) and (allow_vae_rank or o.vae != "rank")]
    best = recommended(options)
    if not options:  # not memory: no TP x PP split uses exactly this many ranks
        raise ConfigError(f"{base.gpus} ranks cannot be split as TP x PP for this model ({req.config.num_heads} "
                          f"heads, {req.config.num_layers} layers): start a number of ranks that is a TP degree "
                          f"dividing the heads times at most {req.config.num_layers} stages (--gpus, or "
                          f"torchrun --nproc-per-node)")
    if best is None:
        raise ConfigError(f"no layout of {base.gpus} GPU(s) fits {base.vram / GiB:.0f} GiB per GPU at "
                          f"{base.precision} {base.size[0]}x{base.size[1]}; try fp8, --kv-dtype fp8 or more GPUs")
    return options[best].tp, options[best].pp
