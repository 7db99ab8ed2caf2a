"""Streaming latents with a sharded DiT: every rank loads its slices and runs the same session in lockstep.

    torchrun --nproc-per-node 4 -m qavatar.parallel.stream --checkpoint ckpt-fp8/ --tp 4 --blocks 8
    python -m qavatar.parallel.stream --checkpoint ckpt-fp8/ --tp 2        # starts the 2 ranks itself
    python -m qavatar.parallel.stream --checkpoint ckpt-fp8/ --pp 4 --trace trace.json   # 4 layer stages

Inputs here are seeded random condition latents, text and audio states (the DiT's own interface): a
benchmark of the sharded DiT alone. `qavatar infer` (pipeline/infer.py) runs the same StreamingSession on
the real encoders' outputs and writes the video. Every rank ends with the same latents (the row-parallel
layers all-reduce); rank 0 reports timing, bytes read and memory per rank. With --pp the layers are split into
stages (parallel/pipeline.py) and stage 0 ends with the latents.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..model.streaming import BlockInputs, StreamingSession, flow_match_schedule, rolled_condition, stream_sequential
from ..pipeline.latents_out import check_latents_out, save_stream_latents
from .group import ByteCounter, TPGroup
from .launch import init_tp, launcher_rank, spawn_ranks
from .load import load_rank
from .pipeline import PipeGroup, PipelineStage, check_layout, init_pipeline, schedule_for
from .stages import stage_layers
from .trace import write_trace


@dataclass
class StreamReport:
    rank: int
    latents: Optional[torch.Tensor]  # every block in order [1, C, F_total, h, w] (ranks that finish blocks)
    seconds_per_block: list[float]
    bytes_read: int
    held_bytes: int
    cache_bytes: int
    trace: list = field(default_factory=list)  # pipeline ranks: (stage, block, step, slot, start, end)
    bytes_sent: dict = field(default_factory=dict)


def random_inputs(cfg, latent_hw: tuple[int, int], blocks: int, seed: int) -> tuple[torch.Tensor, BlockInputs]:
    """Seeded stand-ins for the encoders' outputs: (text states, per-block noise and audio, the condition)."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    fpb = cfg.num_frames_per_block
    ref = torch.randn(1, cfg.in_dim, 1, h, w, generator=g)
    motion = ref.expand(-1, -1, cfg.motion_frames[1], -1, -1)
    context = torch.randn(1, 12, cfg.text_dim, generator=g)
    noise = torch.randn(1, cfg.in_dim, blocks * fpb, h, w, generator=g)
    audio = torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 4 * blocks * fpb, generator=g)
    return context, BlockInputs(lambda b: noise[:, :, b * fpb:(b + 1) * fpb],
                                lambda b: audio[..., 4 * b * fpb:4 * (b + 1) * fpb], rolled_condition(ref, motion))


def stream_latents(checkpoint: "str | Path", group: "TPGroup | PipeGroup", blocks: int, latent_hw: tuple[int, int],
                   seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   steps: int = 4, kv_dtype: Optional[torch.dtype] = None, compile: bool = False) -> StreamReport:
    """Stream `blocks` blocks (the sink rolls after the first clip) on this rank of a TP or pipeline layout."""
    pipe = isinstance(group, PipeGroup)
    tp = group.tp if pipe else group
    stage = (group.layers, group.first, group.last) if pipe else None
    loaded = load_rank(checkpoint, tp, dtype=dtype, device=device, stage=stage)
    model, cfg = loaded.model, loaded.model.cfg
    if compile:
        from ..model.compile import compile_blocks
        compile_blocks(model)  # torch.compile every block (model/compile.py)
    context, inputs = random_inputs(cfg, latent_hw, blocks, seed)
    out, times = [], []
    t_last = [time.perf_counter()]

    def on_block(b: int, latents: torch.Tensor) -> None:
        out.append(latents.cpu())
        now = time.perf_counter()
        times.append(now - t_last[0])
        t_last[0] = now

    timesteps, sigmas = flow_match_schedule(steps)
    if not pipe:
        session = StreamingSession(model, context, *inputs.condition(0, None), timesteps, sigmas, seed=seed,
                                   kv_dtype=kv_dtype)
        stream_sequential(session, blocks, inputs, on_block)
        return StreamReport(tp.rank, torch.cat(out, dim=2), times, loaded.bytes_read, loaded.param_bytes,
                            session.cache_bytes(), bytes_sent=_sent(tp))
    runner = PipelineStage(model, group, latent_hw, timesteps, sigmas, seed, kv_dtype=kv_dtype)
    items = schedule_for(cfg, blocks, steps, group.stages, roll_sink=True)
    ctx = runner.share_context(context if group.first else None)
    runner.run(items, ctx, inputs if group.first else None, on_block, t0=0.0)  # one clock for every rank of a host
    return StreamReport(group.rank, torch.cat(out, dim=2) if out else None, times, loaded.bytes_read,
                        loaded.param_bytes, runner.cache_bytes(), [dataclasses.astuple(e) for e in runner.trace],
                        _sent(tp))


def _sent(tp: TPGroup) -> dict:
    counter = getattr(tp, "counter", None)
    return counter.snapshot() if counter is not None else {}


def _rank_main(rank: int, args: argparse.Namespace) -> dict:
    from ..hub import resolve_checkpoint

    args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # ORG/NAME[@REV]: from the Hub cache
    h, w = (int(v) for v in args.size.split("*"))
    latent_hw = (h // 8, w // 8)
    if args.pp > 1:
        cfg = _config(args.checkpoint)
        group = init_pipeline(args.pp, args.tp, stage_layers(cfg, args.pp, latent_hw), args.device, args.timeout,
                              exact_int8_reduce=not args.bf16_reduce, counter=ByteCounter())
    else:
        group = init_tp(args.tp, device=args.device, timeout_s=args.timeout, exact_int8_reduce=not args.bf16_reduce)
        group = dataclasses.replace(group, counter=ByteCounter())
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    from ..model.kv_quant import kv_storage_dtype

    rep = stream_latents(args.checkpoint, group, args.blocks, latent_hw, args.seed, device, dtype,
                         kv_dtype=kv_storage_dtype(args.kv_dtype), compile=args.compile)
    if args.latents_out and rep.latents is not None and group.rank == (group.tp.size if args.pp > 1 else group.size) - 1:
        # the host rank, as in qavatar infer (the first stage's last TP rank)
        save_stream_latents(args.latents_out, rep.latents, args.checkpoint, args.seed, args.tp, args.size, args.blocks,
                            args.pp, args.kv_dtype)
    out = {"rank": rep.rank, "seconds_per_block": rep.seconds_per_block, "bytes_read": rep.bytes_read,
           "held_bytes": rep.held_bytes, "cache_bytes": rep.cache_bytes, "bytes_sent": rep.bytes_sent}
    if rep.latents is not None:
        out["latents_abs_sum"] = float(rep.latents.double().abs().sum())
    if args.pp > 1 and args.trace:
        traces = [None] * dist.get_world_size()
        dist.gather_object(rep.trace, traces if rep.rank == 0 else None, dst=0)
        if rep.rank == 0:
            write_trace(args.trace, [e for t in traces for e in t], args.pp, args.tp, args.blocks)
    return out


def _config(checkpoint: str):
    from ..checkpoint.load import find_dit_dir
    from ..checkpoint.reader import CheckpointReader
    from ..model import from_wan_config

    return from_wan_config(CheckpointReader(find_dit_dir(checkpoint)).config)


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before a rank starts: one ConfigError/CheckpointError instead of a rank's traceback.
    A Hub name is resolved here (downloaded once; the ranks then find it in the cache)."""
    from ..checkpoint.load import find_dit_dir
    from ..checkpoint.reader import CheckpointReader
    from ..errors import ConfigError
    from ..hub import resolve_checkpoint
    from ..model import from_wan_config
    from ..pipeline.sizing import DIVISOR

    if args.tp < 1:
        raise ConfigError(f"--tp {args.tp}: the tensor-parallel degree is at least 1")
    if args.blocks < 1:
        raise ConfigError(f"--blocks {args.blocks}: stream at least 1 block")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout:g}: give a positive number of seconds")
    m = re.fullmatch(r"\s*(\d+)\s*[*xX]\s*(\d+)\s*", args.size)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1 or int(m.group(1)) % DIVISOR or int(m.group(2)) % DIVISOR:
        raise ConfigError(f"--size {args.size!r}: give pixel H*W with both sides multiples of {DIVISOR}, e.g. 128*64")
    args.size = f"{m.group(1)}*{m.group(2)}"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is visible")
    if args.device == "cuda" and "WORLD_SIZE" not in os.environ and args.tp * args.pp > torch.cuda.device_count():
        raise ConfigError(f"--tp {args.tp} --pp {args.pp} needs {args.tp * args.pp} GPUs but only "
                          f"{torch.cuda.device_count()} are visible")
    dit = find_dit_dir(resolve_checkpoint(args.checkpoint))
    cfg = from_wan_config(CheckpointReader(dit).config or {}, name=dit.name)
    if cfg.num_heads % args.tp:
        raise ConfigError(f"--tp {args.tp} does not divide the {cfg.num_heads} attention heads; use one of "
                          f"{[d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0 and d <= 8]}")
    check_layout(args.pp, args.tp, cfg.num_layers, cfg.num_heads)
    if args.trace and args.pp == 1:
        raise ConfigError("--trace records the pipeline's work items: use it with --pp 2 or more")


def main(argv: Optional[list[str]] = None) -> int:
    """The command line: a bad argument or input is one `error: ...` line and exit status 2."""
    from ..errors import QavatarError

    try:
        return _main(argv)
    except QavatarError as e:  # one line, exit 2, as the qavatar CLI does
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (per pipeline stage)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (layer ranges of the DiT); world = pp * tp")
    ap.add_argument("--trace", default=None, help="pipeline: write every stage's work items to this JSON file")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--size", default="128*64", help="pixel H*W")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8", "int8"],
                    help="KV caches: bf16 = the compute dtype; fp8 / int8 with per-(token, head) fp32 scales")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--bf16-reduce", action="store_true",
                    help="int8: all-reduce dequantized partials in the compute dtype (half the bytes of the exact "
                         "int32 reduction; not bit-identical to one GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every DiT block (inductor, static shapes)")
    ap.add_argument("--latents-out", help="write the latents (every block, float32) to this safetensors file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --latents-out file")
    args = ap.parse_args(argv)
    check_args(args)
    check_latents_out(args.latents_out, args.overwrite)
    if (rank := launcher_rank()) is not None:  # under torchrun: this process is one rank
        reports = [_rank_main(rank, args)]
    elif args.tp * args.pp > 1:
        reports = spawn_ranks(_rank_main, args.tp * args.pp, args=(args,), timeout_s=args.timeout)
    else:
        reports = [_rank_main(0, args)]
    for r in reports:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
