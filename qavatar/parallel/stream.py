"""Streaming latents with a sharded DiT: every rank loads its slices and runs the same session in lockstep.

    torchrun --nproc-per-node 4 -m qavatar.parallel.stream --checkpoint ckpt-fp8/ --tp 4 --blocks 8
    python -m qavatar.parallel.stream --checkpoint ckpt-fp8/ --tp 2        # starts the 2 ranks itself

Inputs here are seeded random condition latents, text and audio states (the DiT's own interface): a
benchmark of the sharded DiT alone. `qavatar infer` (pipeline/infer.py) runs the same StreamingSession on
the real encoders' outputs and writes the video. Every rank ends with the same latents (the row-parallel
layers all-reduce); rank 0 reports timing, bytes read and memory per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..model.streaming import StreamingSession, flow_match_schedule
from .group import TPGroup
from .launch import init_tp, spawn_ranks
from .load import load_rank


@dataclass
class StreamReport:
    rank: int
    latents: torch.Tensor
    seconds_per_block: list[float]
    bytes_read: int
    held_bytes: int
    cache_bytes: int


def random_inputs(cfg, latent_hw: tuple[int, int], blocks: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    frames = blocks * cfg.num_frames_per_block
    ref = torch.randn(1, cfg.in_dim, 1, h, w, generator=g)
    return {"ref": ref, "motion": ref.expand(-1, -1, cfg.motion_frames[1], -1, -1),
            "context": torch.randn(1, 12, cfg.text_dim, generator=g),
            "noise": torch.randn(1, cfg.in_dim, frames, h, w, generator=g),
            "audio": torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 4 * frames, generator=g)}


def stream_latents(checkpoint: "str | Path", tp: TPGroup, blocks: int, latent_hw: tuple[int, int], seed: int = 0,
                   device: str = "cpu", dtype: torch.dtype = torch.float32) -> StreamReport:
    loaded = load_rank(checkpoint, tp, dtype=dtype, device=device)
    model, cfg = loaded.model, loaded.model.cfg
    inp = random_inputs(cfg, latent_hw, blocks, seed)
    session = StreamingSession(model, inp["context"], inp["ref"], inp["motion"], *flow_match_schedule(), seed=seed)
    fpb = cfg.num_frames_per_block
    out, times = [], []
    for b in range(blocks):
        t = time.perf_counter()
        out.append(session.denoise_block(inp["noise"][:, :, b * fpb:(b + 1) * fpb],
                                         inp["audio"][..., 4 * b * fpb:4 * (b + 1) * fpb]).cpu())
        times.append(time.perf_counter() - t)
    return StreamReport(tp.rank, torch.cat(out, dim=2), times, loaded.bytes_read, loaded.param_bytes,
                        session.cache_bytes())


def _rank_main(rank: int, args: argparse.Namespace) -> dict:
    from ..hub import resolve_checkpoint

    args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # ORG/NAME[@REV]: from the Hub cache
    tp = init_tp(args.tp, device=args.device, timeout_s=args.timeout, exact_int8_reduce=not args.bf16_reduce)
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    h, w = (int(v) for v in args.size.split("*"))
    rep = stream_latents(args.checkpoint, tp, args.blocks, (h // 8, w // 8), args.seed, device, dtype)
    return {"rank": rep.rank, "seconds_per_block": rep.seconds_per_block, "bytes_read": rep.bytes_read,
            "held_bytes": rep.held_bytes, "cache_bytes": rep.cache_bytes,
            "latents_abs_sum": float(rep.latents.double().abs().sum())}


def main(argv: Optional[list[str]] = None) -> int:
    from ..errors import QavatarError

    try:
        return _main(argv)
    except QavatarError as e:  # one line, exit 2, as the qavatar CLI does
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--size", default="128*64", help="pixel H*W")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--bf16-reduce", action="store_true",
                    help="int8: all-reduce dequantized partials in the compute dtype (half the bytes of the exact "
                         "int32 reduction; not bit-identical to one GPU)")
    args = ap.parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        reports = [_rank_main(int(os.environ["RANK"]), args)]
    elif args.tp > 1:
        reports = spawn_ranks(_rank_main, args.tp, args=(args,), timeout_s=args.timeout)
    else:
        reports = [_rank_main(0, args)]
    for r in reports:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
