"""The planner's speed model: seconds per block of every layout (TP, layer-stage PP, PP x TP; the VAE on the last
stage or on a rank of its own) on a named GPU, from exact FLOP and byte counts and the vendor's peak rates.

Per DiT rank and streaming call (one sampler step of one block):
  compute   linear FLOPs / T at the scheme's tensor rate (bf16; int8 W8A8 at the int8 rate; fp8 W8A8 at the
            fp8 rate on GPUs that have fp8 tensor cores, else fp8 runs weight-only at the bf16 rate), attention
            products / T at the bf16 rate, the replicated embeddings (first stage) and head (last stage) whole;
            all at COMPUTE_EFFICIENCY of the dense peak. A roofline: never faster than reading the rank's weights
            and its KV rows once at MEMORY_EFFICIENCY of the memory bandwidth.
  link      TP collectives as a ring: all-reduce 2(T-1)/T x payload, all-gather (T-1) x the local part; the stage
            hand-off (and the latents going back to stage 0) point to point; at the profile's achievable link rate,
            not overlapped with compute (an upper bound on time). Per-collective latency (~300 small collectives
            per call, tens of microseconds each) is left out.
Per block: every DiT stage runs `steps` items; the last stage (or the VAE rank) also decodes the block's latent
frames (vae_decode_flops at the bf16 rate), the first one runs the audio encoder. In the steady state the
timestep-forcing schedule keeps one item per block in flight and one block per sampler step, so the pipeline
holds min(S, steps) items: with S <= steps it is full and a block takes the busiest stage's time; with S > steps
only `steps` of the S stages work at once, and a block takes the sum of the stages' item times (a bubble of
1 - steps/S). Clip boundaries (the rolling sink's re-prefill) are not in the steady state. With --vae cpu the
decode runs beside the GPUs and is not timed here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError
from .comm import comm_bytes_per_block, handoff_bytes, latents_bytes, tp_layer_bytes
from .flops import (audio_encoder_flops, embed_flops, head_flops, layer_attention_flops, layer_flops,
                    vae_decode_flops)
from .stages import stage_layers

# Fraction of the dense tensor peak that large GEMMs and flash attention reach (cuBLAS/cuBLASLt GEMMs of these
# shapes run at 60-80% of peak; 0.6 is the conservative end). Stated, not measured on these GPUs.
COMPUTE_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.8  # of the datasheet memory bandwidth for streaming reads. Stated.
# Achievable link rates per direction, stated: 0.8 of a PCIe x16 link's 31.5 GB/s (gen 4) / 63 GB/s (gen 5) per
# direction (PCI-SIG: 16 / 32 GT/s per lane, 128b/130b encoding), 0.8 of NVLink's per-direction rate; GeForce
# cards without peer-to-peer stage every transfer through host memory (GPU -> pinned host -> GPU: two PCIe
# crossings and a host copy), about 10 GB/s per direction.
LINK_EFFICIENCY = 0.8
PCIE4 = 31.5 * LINK_EFFICIENCY
PCIE5 = 63.0 * LINK_EFFICIENCY
HOST_STAGED = 10.0


@dataclass(frozen=True)
class GpuProfile:
    name: str
    bf16_tflops: float  # dense tensor TFLOPS, bf16 inputs with fp32 accumulation
    int8_tops: float  # dense int8 tensor TOPS (int32 accumulation)
    fp8_tflops: Optional[float]  # dense fp8 tensor TFLOPS with fp32 accumulation; None: no fp8 tensor cores
    memory_gbps: float  # datasheet memory bandwidth, GB/s
    link_gbps: float  # achievable GB/s per direction between two GPUs of the box (see above)
    memory_gib: float
    link: str  # what the link is
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # field -> public source

    def linear_tflops(self, precision: str) -> float:
        """The tensor rate of the scheme's Linears on this GPU."""
        if precision == "int8":
            return self.int8_tops
        if precision == "fp8" and self.fp8_tflops:
            return self.fp8_tflops
        return self.bf16_tflops  # bf16, weight-only schemes (dequantized to bf16), fp8 without fp8 tensor cores


_ADA = "NVIDIA Ada Lovelace GPU Architecture whitepaper v2.01 (2023), Appendix A, GeForce RTX 4090 specifications"
_GA102 = "NVIDIA Ampere GA102 GPU Architecture whitepaper v2.0 (2021), Appendix A, GeForce RTX 3090 specifications"
_L40S = "NVIDIA L40S GPU datasheet (2023): tensor performance table, memory and interconnect rows"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (2021, 80GB PCIe / 80GB SXM columns)"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (2022-2023, H100 SXM / H100 PCIe columns)"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (2024, H200 SXM column)"
_NO_P2P = ("GeForce RTX 40 series drivers do not enable PCIe peer-to-peer (NVIDIA: RTX 4090 has no NVLink; "
           "CUDA p2pBandwidthLatencyTest reports P2P disabled), so NCCL stages through host memory: ~10 GB/s "
           "per direction, a stated estimate")
_PCIE4 = "PCI-SIG PCIe 4.0: 16 GT/s x16 = 31.5 GB/s per direction; x 0.8 achievable (stated) = 25.2 GB/s"
_PCIE5 = "PCI-SIG PCIe 5.0: 32 GT/s x16 = 63 GB/s per direction; x 0.8 achievable (stated) = 50.4 GB/s"

# Dense rates: the datasheets' "with sparsity" figures halved where they give only those.
PROFILES: dict[str, GpuProfile] = {
    "rtx4090": GpuProfile(
        "GeForce RTX 4090", bf16_tflops=165.2, int8_tops=660.6, fp8_tflops=330.3, memory_gbps=1008,
        link_gbps=HOST_STAGED, memory_gib=24, link="PCIe 4.0, no NVLink, no P2P: host-staged",
        sources={"bf16_tflops": _ADA + ": Peak BF16 Tensor TFLOPS with FP32 Accumulate 165.2",
                 "int8_tops": _ADA + ": Peak INT8 Tensor TOPS 660.6",
                 "fp8_tflops": _ADA + ": Peak FP8 Tensor TFLOPS with FP32 Accumulate 330.3",
                 "memory_gbps": _ADA + ": Memory Bandwidth 1008 GB/sec", "memory_gib": _ADA + ": 24 GB GDDR6X",
                 "link_gbps": _NO_P2P}),
    "rtx3090": GpuProfile(
        "GeForce RTX 3090", bf16_tflops=71, int8_tops=284, fp8_tflops=None, memory_gbps=936,
        link_gbps=HOST_STAGED, memory_gib=24,
        link="PCIe 4.0 (its 2-way NVLink bridge pairs only two cards), P2P assumed off: host-staged",
        sources={"bf16_tflops": _GA102 + ": Peak BF16 Tensor TFLOPS with FP32 Accumulate 71",
                 "int8_tops": _GA102 + ": Peak INT8 Tensor TOPS 284",
                 "fp8_tflops": _GA102 + ": no FP8 tensor cores (Ampere); fp8 checkpoints run weight-only",
                 "memory_gbps": _GA102 + ": Memory Bandwidth 936 GB/sec", "memory_gib": _GA102 + ": 24 GB GDDR6X",
                 "link_gbps": "GeForce drivers do not enable PCIe P2P for NCCL; the NVLink bridge joins only 2 "
                              "cards, so 4- and 8-card layouts go through host memory: ~10 GB/s, a stated estimate"}),
    "l40s": GpuProfile(
        "L40S", bf16_tflops=362.05, int8_tops=733, fp8_tflops=733, memory_gbps=864, link_gbps=PCIE4,
        memory_gib=48, link="PCIe 4.0 x16 with P2P, no NVLink",
        sources={"bf16_tflops": _L40S + ": BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)",
                 "int8_tops": _L40S + ": INT8 Tensor Core 733 TOPS (1,466 with sparsity)",
                 "fp8_tflops": _L40S + ": FP8 Tensor Core 733 TFLOPS (1,466 with sparsity)",
                 "memory_gbps": _L40S + ": GPU Memory Bandwidth 864 GB/s", "memory_gib": _L40S + ": 48 GB GDDR6",
                 "link_gbps": _L40S + ": PCIe Gen4 x16 64 GB/s bidirectional, no NVLink; " + _PCIE4}),
    "a100-pcie": GpuProfile(
        "A100 80GB PCIe", bf16_tflops=312, int8_tops=624, fp8_tflops=None, memory_gbps=1935, link_gbps=PCIE4,
        memory_gib=80, link="PCIe 4.0 x16 with P2P (its NVLink bridge pairs only two cards)",
        sources={"bf16_tflops": _A100 + ": BF16 Tensor Core 312 TFLOPS (624 with sparsity)",
                 "int8_tops": _A100 + ": INT8 Tensor Core 624 TOPS (1,248 with sparsity)",
                 "fp8_tflops": _A100 + ": no FP8 tensor cores (Ampere); fp8 checkpoints run weight-only",
                 "memory_gbps": _A100 + ": 80GB PCIe GPU Memory Bandwidth 1,935 GB/s",
                 "memory_gib": _A100 + ": 80GB HBM2e",
                 "link_gbps": _A100 + ": PCIe Gen4 64 GB/s, NVLink Bridge for 2 GPUs only; " + _PCIE4}),
    "a100-sxm": GpuProfile(
        "A100 80GB SXM", bf16_tflops=312, int8_tops=624, fp8_tflops=None, memory_gbps=2039,
        link_gbps=300 * LINK_EFFICIENCY, memory_gib=80, link="NVLink 3 (NVSwitch), 300 GB/s per direction",
        sources={"bf16_tflops": _A100 + ": BF16 Tensor Core 312 TFLOPS (624 with sparsity)",
                 "int8_tops": _A100 + ": INT8 Tensor Core 624 TOPS (1,248 with sparsity)",
                 "fp8_tflops": _A100 + ": no FP8 tensor cores (Ampere); fp8 checkpoints run weight-only",
                 "memory_gbps": _A100 + ": 80GB SXM GPU Memory Bandwidth 2,039 GB/s",
                 "memory_gib": _A100 + ": 80GB HBM2e",
                 "link_gbps": _A100 + ": NVLink 600 GB/s (bidirectional) = 300 per direction; x 0.8 (stated)"}),
    "h100-pcie": GpuProfile(
        "H100 80GB PCIe", bf16_tflops=756.5, int8_tops=1513, fp8_tflops=1513, memory_gbps=2000, link_gbps=PCIE5,
        memory_gib=80, link="PCIe 5.0 x16 with P2P (its NVLink bridge pairs only two cards)",
        sources={"bf16_tflops": _H100 + ": H100 PCIe BF16 Tensor Core 1,513 TFLOPS with sparsity, halved",
                 "int8_tops": _H100 + ": H100 PCIe INT8 Tensor Core 3,026 TOPS with sparsity, halved",
                 "fp8_tflops": _H100 + ": H100 PCIe FP8 Tensor Core 3,026 TFLOPS with sparsity, halved",
                 "memory_gbps": _H100 + ": H100 PCIe GPU memory bandwidth 2 TB/s",
                 "memory_gib": _H100 + ": H100 PCIe 80 GB",
                 "link_gbps": _H100 + ": PCIe Gen5 128 GB/s (bidirectional), NVLink bridge 600 GB/s for pairs; "
                              + _PCIE5}),
    "h100-sxm": GpuProfile(
        "H100 80GB SXM", bf16_tflops=989.5, int8_tops=1979, fp8_tflops=1979, memory_gbps=3350,
        link_gbps=450 * LINK_EFFICIENCY, memory_gib=80, link="NVLink 4 (NVSwitch), 450 GB/s per direction",
        sources={"bf16_tflops": _H100 + ": H100 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity, halved",
                 "int8_tops": _H100 + ": H100 SXM INT8 Tensor Core 3,958 TOPS with sparsity, halved",
                 "fp8_tflops": _H100 + ": H100 SXM FP8 Tensor Core 3,958 TFLOPS with sparsity, halved",
                 "memory_gbps": _H100 + ": H100 SXM GPU memory bandwidth 3.35 TB/s",
                 "memory_gib": _H100 + ": H100 SXM 80 GB",
                 "link_gbps": _H100 + ": NVLink 900 GB/s (bidirectional) = 450 per direction; x 0.8 (stated)"}),
    "h200": GpuProfile(
        "H200 SXM", bf16_tflops=989.5, int8_tops=1979, fp8_tflops=1979, memory_gbps=4800,
        link_gbps=450 * LINK_EFFICIENCY, memory_gib=141, link="NVLink 4 (NVSwitch), 450 GB/s per direction",
        sources={"bf16_tflops": _H200 + ": BF16 Tensor Core 1,979 TFLOPS with sparsity, halved",
                 "int8_tops": _H200 + ": INT8 Tensor Core 3,958 TOPS with sparsity, halved",
                 "fp8_tflops": _H200 + ": FP8 Tensor Core 3,958 TFLOPS with sparsity, halved",
                 "memory_gbps": _H200 + ": GPU memory bandwidth 4.8 TB/s", "memory_gib": _H200 + ": 141 GB HBM3e",
                 "link_gbps": _H200 + ": NVLink 900 GB/s (bidirectional) = 450 per direction; x 0.8 (stated)"}),
}
PROFILE_NUMBERS = ("bf16_tflops", "int8_tops", "fp8_tflops", "memory_gbps", "link_gbps", "memory_gib")


# substrings of torch.cuda.get_device_name(), lower case -> profile (the first that matches). A100/H100 come as
# SXM or PCIe cards ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA H100 PCIe"); the H100 NVL is a
# PCIe card whose NVLink bridge joins pairs only, so it is planned as PCIe.
_DEVICE_NAMES = (("4090", "rtx4090"), ("3090", "rtx3090"), ("l40s", "l40s"), ("h200", "h200"))
_PCIE_OR_SXM = (("h100", "h100"), ("a100", "a100"))


def profile_for_device(device_name: str) -> Optional[str]:
    """The profile of a GPU by its CUDA name, or None for one the table does not know."""
    name = device_name.lower()
    for part, profile in _DEVICE_NAMES:
        if part in name:
            return profile
    for part, family in _PCIE_OR_SXM:
        if part in name:
            return f"{family}-pcie" if ("pcie" in name or " nvl" in name) else f"{family}-sxm"
    return None


def get_profile(name: str, link_gbps: Optional[float] = None, tflops: Optional[float] = None) -> GpuProfile:
    """A profile by name, with the link rate and/or the dense bf16 TFLOPS overridden (8-bit rates keep their
    ratio to bf16)."""
    if name not in PROFILES:
        raise ConfigError(f"unknown --gpu {name!r}; choose one of {', '.join(PROFILES)}")
    p = PROFILES[name]
    if link_gbps is not None:
        if link_gbps <= 0:
            raise ConfigError("--link-gbps must be positive")
        p = dataclasses.replace(p, link_gbps=float(link_gbps), link=f"{link_gbps:g} GB/s per direction (given)")
    if tflops is not None:
        if tflops <= 0:
            raise ConfigError("--tflops must be positive")
        r = tflops / p.bf16_tflops
        p = dataclasses.replace(p, bf16_tflops=float(tflops), int8_tops=p.int8_tops * r,
                                fp8_tflops=p.fp8_tflops * r if p.fp8_tflops else None)
    return p


@dataclass
class LayoutEstimate:
    tp: int
    pp: int
    vae: str  # "host" (the host rank decodes: last TP rank of stage 0), "rank" (a rank of its own), "cpu" (not on the GPUs)
    gpus: int  # GPUs the layout uses
    fits: bool
    peak_bytes_per_rank: int
    bytes_between_ranks_per_block: int  # the busiest rank's bytes sent per block (payload, ByteCounter's)
    block_seconds: float
    fps: float
    bottleneck: str  # compute | link | bubble
    stage_seconds: list[float] = field(default_factory=list)  # each stage's busy seconds per block
    compute_seconds: float = 0.0  # of the busiest stage, per block
    link_seconds: float = 0.0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["vae_rank"] = self.vae == "rank"
        return d


def estimate(req, tp: int, pp: int, vae: str, gpu: GpuProfile):
    """(LayoutEstimate, Plan) of one layout for a PlanRequest (its config, size, precision, steps, dtypes)."""
    from .plan import make_plan

    cfg, steps = req.config, req.steps
    gpus = pp * tp + (vae == "rank")
    plan = make_plan(dataclasses.replace(req, gpus=gpus, pp=pp, vae_rank=vae == "rank", pipeline=1,
                                         replicated_dit=False, vae="cpu" if vae == "cpu" else "gpu"))
    hw = (req.size[0] // 8, req.size[1] // 8)
    fp8_kernel = "native" if gpu.fp8_tflops else "weight-only"
    sent = comm_bytes_per_block(cfg, req.size, tp, pp, req.precision, req.compute_dtype, req.exact_int8_reduce,
                                steps, fp8_kernel=fp8_kernel, vae_rank=vae == "rank")
    ranges = stage_layers(cfg, pp, hw)
    layers = layer_flops(cfg, hw)
    attention = layer_attention_flops(cfg, hw)
    lin = gpu.linear_tflops(req.precision) * 1e12 * COMPUTE_EFFICIENCY
    bf16 = gpu.bf16_tflops * 1e12 * COMPUTE_EFFICIENCY
    mem = gpu.memory_gbps * 1e9 * MEMORY_EFFICIENCY
    link = gpu.link_gbps * 1e9
    vae_s = vae_decode_flops(hw, cfg.num_frames_per_block) / bf16 if vae != "cpu" else 0.0
    ring = 2 * (tp - 1) / tp
    items, busy, computes, links = [], [], [], []
    for j, (a, b) in enumerate(ranges):
        att = sum(attention[a:b])
        linear = sum(layers[a:b]) - att
        extra = (embed_flops(cfg, hw) if j == 0 else 0) + (head_flops(cfg, hw) if j == pp - 1 else 0)
        t_compute = (linear / tp + extra) / lin + (att / tp) / bf16
        rank = plan.ranks[j * tp]
        held = sum(v for k, v in rank.breakdown.items() if k.startswith(("weights", "scales", "params")))
        t_memory = (held + rank.breakdown["kv_rolling"] / steps + rank.breakdown["kv_sink"]) / mem
        t_call = max(t_compute, t_memory)
        coll = [tp_layer_bytes(cfg, hw, tp, i, req.precision, req.compute_dtype, req.exact_int8_reduce, fp8_kernel)
                for i in range(a, b)]
        t_link = (sum(c["all_reduce"] for c in coll) * ring + sum(c["all_gather"] for c in coll) * (tp - 1)) / link
        if j < pp - 1:
            t_link += handoff_bytes(cfg, hw, req.compute_dtype) / link
        if j == pp - 1 and pp > 1:
            t_link += latents_bytes(cfg, hw) / link  # the flow back to stage 0, every call
        items.append(t_call + t_link)
        stage_busy = steps * (t_call + t_link)
        if j == 0:
            stage_busy += audio_encoder_flops(cfg) / bf16
        if j == 0 and vae == "host":
            stage_busy += vae_s
        busy.append(stage_busy)
        computes.append(steps * t_call)
        links.append(steps * t_link)
    if vae == "rank":
        busy.append(vae_s + latents_bytes(cfg, hw) / link)
    full = max(busy)
    drained = sum(items)  # S > steps: only `steps` items in flight, a block takes one pass through every stage
    block = max(full, drained)
    k = max(range(len(ranges)), key=lambda i: busy[i])
    if drained > full:
        bottleneck = "bubble"
    elif vae == "rank" and busy[-1] == full:
        bottleneck = "compute"  # the VAE rank
    else:
        bottleneck = "link" if links[k] > computes[k] else "compute"
    frames = 4 * cfg.num_frames_per_block
    est = LayoutEstimate(tp, pp, vae, gpus, plan.fits, plan.peak_bytes_per_rank,
                         max(sum(r.values()) for r in sent), block, frames / block, bottleneck,
                         busy, computes[k], links[k])
    return est, plan


def layouts(req, gpu: GpuProfile) -> list[LayoutEstimate]:
    """Every layout on up to req.gpus GPUs: TP degree T (dividing the heads) x S layer stages, S*T <= gpus,
    with the VAE on the host rank or on one more rank (when a GPU is left for it)."""
    from .plan import valid_degrees

    out = []
    placements = ("cpu",) if req.vae == "cpu" else ("host", "rank")
    for tp in valid_degrees(req.config, req.gpus):
        for pp in range(1, min(req.gpus // tp, req.config.num_layers) + 1):
            for vae in placements:
                if pp * tp + (vae == "rank") > req.gpus:
                    continue
                out.append(estimate(req, tp, pp, vae, gpu)[0])
    return out


TIE = 0.01  # layouts within 1% of the fastest are as fast: the model is not that precise


def recommended(options: list[LayoutEstimate]) -> Optional[int]:
    """Index of the fastest layout that fits; among those within TIE of it, the one with the fewest GPUs, then
    the smallest peak. None if nothing fits."""
    fitting = [i for i, o in enumerate(options) if o.fits]
    if not fitting:
        return None
    fastest = min(options[i].block_seconds for i in fitting)
    near = [i for i in fitting if options[i].block_seconds <= fastest * (1 + TIE)]
    return min(near, key=lambda i: (options[i].gpus, options[i].peak_bytes_per_rank, options[i].block_seconds))


def format_layouts(req, gpu: GpuProfile, options: list[LayoutEstimate], best: Optional[int]) -> str:
    """The layouts side by side, one row each, the recommended one marked."""
    lines = [f"speed model: {gpu.name}, {gpu.link} ({gpu.link_gbps:g} GB/s per direction); "
             f"{COMPUTE_EFFICIENCY:g} of the dense tensor peak ({gpu.linear_tflops(req.precision):g} T/s "
             f"{req.precision} Linears, {gpu.bf16_tflops:g} TFLOPS bf16 attention and VAE); "
             f"{4 * req.config.num_frames_per_block} frames per block, {req.steps} steps",
             f"  {'layout':18s}{'GPUs':>5s}{'VAE':>7s}{'fits':>6s}{'peak GiB':>10s}{'MB sent/block':>15s}"
             f"{'s/block':>9s}{'fps':>7s}  bottleneck"]
    for i, o in enumerate(options):
        name = f"TP={o.tp}" if o.pp == 1 else (f"PP={o.pp}" if o.tp == 1 else f"PP={o.pp} x TP={o.tp}")
        vae = {"host": "host", "rank": "own", "cpu": "cpu"}[o.vae]
        lines.append(f"{'*' if i == best else ' '} {name:18s}{o.gpus:5d}{vae:>7s}{'yes' if o.fits else 'no':>6s}"
                     f"{o.peak_bytes_per_rank / 2**30:10.2f}{o.bytes_between_ranks_per_block / 1e6:15.1f}"
                     f"{o.block_seconds:9.3f}{o.fps:7.2f}  {o.bottleneck}")
    if best is None:
        lines.append("no layout fits")
    else:
        o = options[best]
        lines.append(f"* fastest that fits: tp={o.tp} pp={o.pp}, VAE {'on its own rank' if o.vae == 'rank' else o.vae}"
                     f" ({o.fps:.1f} fps predicted; MB sent = the busiest rank's payload per block, before the ring"
                     f" algorithm's 2(T-1)/T)")
        if o.vae == "rank":  # the reference's 5th-GPU decode: planned, not a layout infer starts
            runnable = [i for i, x in enumerate(options) if x.vae != "rank"]
            r = recommended([options[i] for i in runnable])
            alt = (f"the fastest it runs: tp={options[runnable[r]].tp} pp={options[runnable[r]].pp} "
                   f"({options[runnable[r]].fps:.1f} fps)" if r is not None else "none of its layouts fits")
            lines.append(f"  VAE on its own rank is planned only: `qavatar infer` decodes on the host rank; {alt}")
    return "\n".join(lines)
