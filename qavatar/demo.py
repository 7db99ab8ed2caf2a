"""The embedded demo: everything runs on a toy checkpoint with random weights, on the CPU, with no downloads.

1. write the toy checkpoint (real layout, LoRA alongside) and inspect it;
2. quantize it to fp8 with the bundled calibration set (LoRA merged first);
3. plan liveavatar-14b on 4 x 24 GB GPUs;
4. stream one clip of latents through the fp8 DiT sharded over 2 CPU ranks (sink prefill, 4 blocks x 4 Euler
   steps, rolling KV caches), and check both ranks agree.
The weights are random, so the latents are noise with the right structure. Video decoding (the Wan VAE) and
the mp4 come with `qavatar infer`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import MANIFEST
from .checkpoint.inspect import format_report, inspect_checkpoint
from .checkpoint.toy import make_toy_checkpoint
from .checkpoint.writer import save_file_atomic
from .errors import QavatarError
from .model import PRESETS
from .parallel.launch import init_tp, spawn_ranks
from .parallel.plan import GiB, PlanRequest, format_plan, make_plan

TP = 2


def _rank(rank: int, ckpt: str, seed: int) -> dict:
    from .parallel.stream import stream_latents

    tp = init_tp(TP, timeout_s=120)
    cfg = PRESETS["tiny"]
    h, w = cfg.default_size
    rep = stream_latents(ckpt, tp, cfg.clip_latent_frames // cfg.num_frames_per_block, (h // 8, w // 8), seed)
    return {"latents": rep.latents, "seconds": rep.seconds_per_block, "bytes_read": rep.bytes_read,
            "held": rep.held_bytes, "cache": rep.cache_bytes}


def run_demo(out: "str | Path", seed: int = 0, print_fn: Callable[[str], None] = print) -> Path:
    from .quant import QuantConfig
    from .quant.convert import quantize_checkpoint

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = out / "toy-checkpoint"
    if not (ckpt / "Wan2.2-S2V-14B" / MANIFEST).is_file():
        make_toy_checkpoint(ckpt, config="tiny", seed=seed, overwrite=ckpt.exists())
        print_fn(f"[1/4] wrote the toy checkpoint {ckpt} (random weights, the real layout)")
    else:
        print_fn(f"[1/4] reusing the toy checkpoint {ckpt}")
    print_fn(format_report(inspect_checkpoint(ckpt)))

    fp8 = out / "toy-checkpoint-fp8"
    t = time.perf_counter()
    summary = quantize_checkpoint(ckpt, fp8, QuantConfig("fp8"), max_pairs=4, overwrite=True, log=lambda s: None)
    print_fn(f"[2/4] quantized to fp8 in {time.perf_counter() - t:.1f} s with the bundled calibration set: "
             f"{summary.layers_quantized} Linears fp8, layer SQNR min {summary.sqnr_min_db:.1f} dB, end-to-end "
             f"{', '.join(f'{v:.1f}' for v in summary.end_to_end_db)} dB per step -> {fp8}")

    plan = make_plan(PlanRequest(PRESETS["liveavatar-14b"], gpus=4, vram=24 * GiB, precision="fp8"))
    print_fn("[3/4] qavatar plan --gpus 4 --vram 24GiB --precision fp8 --size 704*384")
    print_fn(format_plan(plan))

    t = time.perf_counter()
    ranks = spawn_ranks(_rank, TP, args=(str(fp8), seed), timeout_s=300)
    if not all(torch.equal(r["latents"], ranks[0]["latents"]) for r in ranks):
        raise QavatarError("the tensor-parallel ranks disagree on the latents")
    latents = ranks[0]["latents"]
    per_block = [sum(r["seconds"][b] for r in ranks) / TP for b in range(len(ranks[0]["seconds"]))]
    path = out / "latents.safetensors"
    save_file_atomic(path, {"latents": latents.contiguous()})
    print_fn(f"[4/4] streamed one clip at TP={TP} on the CPU in {time.perf_counter() - t:.1f} s "
             f"({', '.join(f'{s:.2f}' for s in per_block)} s per block of 3 latent frames): latents "
             f"{list(latents.shape)} -> {path}")
    for r in ranks:
        print_fn(f"      each rank read {r['bytes_read'] / 1e6:.2f} MB of the checkpoint, holds "
                 f"{r['held'] / 1e6:.2f} MB of weights and {r['cache'] / 1e6:.2f} MB of KV caches")
        break
    print_fn(f"done in {time.perf_counter() - t0:.1f} s. The toy weights are random, so these latents are noise "
             f"with the right structure.")
    print_fn("With real weights: `qavatar quantize ckpt/ --precision fp8 --out ckpt-fp8/`, then "
             "`torchrun --nproc-per-node 4 -m qavatar.parallel.stream --checkpoint ckpt-fp8/ --tp 4 --device cuda`.")
    return path
