"""The planner against measurement on CPU: the tiny toy model at TP 1, 2 and 4, bf16 and int8.

Each rank loads its slices, runs a stream until the rolling window is full, and reports its parameter and
buffer bytes, its KV-cache bytes and the peak of the tensors allocated during a block (AllocationTracker).
    python scripts/plan_vs_measured.py [--size 256*128]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qavatar.checkpoint import CheckpointReader  # noqa: E402
from qavatar.checkpoint.toy import make_toy_checkpoint  # noqa: E402
from qavatar.model import PRESETS  # noqa: E402
from qavatar.parallel.launch import init_tp, spawn_ranks  # noqa: E402
from qavatar.parallel.load import load_rank  # noqa: E402
from qavatar.parallel.measure import AllocationTracker, held_bytes  # noqa: E402
from qavatar.parallel.plan import PlanRequest, make_plan  # noqa: E402
from qavatar.quant import QuantConfig  # noqa: E402
from qavatar.quant.convert import quantize_checkpoint  # noqa: E402


def measure(rank: int, world: int, path: str, size: tuple[int, int]) -> dict:
    from qavatar.model.streaming import StreamingSession, flow_match_schedule

    tp = init_tp(world, timeout_s=120)
    model = load_rank(path, tp).model
    cfg = model.cfg
    lh, lw = size[0] // 8, size[1] // 8
    g = torch.Generator().manual_seed(0)
    ref, motion = torch.randn(1, 16, 1, lh, lw, generator=g), torch.randn(1, 16, 19, lh, lw, generator=g)
    s = StreamingSession(model, torch.randn(1, 9, cfg.text_dim, generator=g), ref, motion, *flow_match_schedule(),
                         seed=0)
    noise, audio = torch.randn(1, 16, 3, lh, lw, generator=g), torch.randn(1, 25, cfg.audio_dim, 12, generator=g)
    peak = 0
    for _ in range(5):
        tr = AllocationTracker()
        with tr:
            s.denoise_block(noise, audio)
        peak = max(peak, tr.peak)
    return {"held": held_bytes(model), "kv": s.cache_bytes(), "act": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256*128")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("*"))
    with tempfile.TemporaryDirectory() as tmp:
        toy = make_toy_checkpoint(Path(tmp) / "toy", seed=0)
        q = quantize_checkpoint(toy, Path(tmp) / "int8", QuantConfig("int8"), calibration="none",
                                log=lambda s: None).out
        print("| precision | TP | parameters+buffers planned / measured | KV planned / measured | activations planned "
              "/ measured | total error |\n|---|---|---|---|---|---|")
        for name, path in (("bf16", toy), ("int8", q)):
            reader = CheckpointReader(path / "Wan2.2-S2V-14B" if name == "bf16" else path)
            stored = {k: tuple(reader.shape(k)) for k in reader.keys()}
            for world in (1, 2, 4):
                m = measure(0, 1, str(path), size) if world == 1 else \
                    spawn_ranks(measure, world, args=(world, str(path), size))[0]
                plan = make_plan(PlanRequest(PRESETS["tiny"], gpus=world, precision=name, size=size,
                                             compute_dtype="fp32", kv_dtype="fp32", vae="cpu",
                                             stored=stored if name != "bf16" else None))
                b = plan.ranks[0].breakdown
                held = sum(v for k, v in b.items() if k.startswith(("weights", "scales", "params")))
                kv = b["kv_rolling"] + b["kv_sink"]
                total_p, total_m = held + kv + b["activations"], m["held"] + m["kv"] + m["act"]
                print(f"| {name} | {world} | {held:,} / {m['held']:,} | {kv:,} / {m['kv']:,} | "
                      f"{b['activations']:,} / {m['act']:,} ({(b['activations'] / m['act'] - 1) * 100:+.1f}%) | "
                      f"{(total_p / total_m - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
