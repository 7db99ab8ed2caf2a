"""The per-rank memory table of docs/parallel.md, computed by `qavatar plan`'s planner.

    python scripts/plan_table.py [--size 704*384] [--vram 24GiB]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qavatar.model import PRESETS  # noqa: E402
from qavatar.parallel.plan import GiB, PlanRequest, make_plan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--vram", type=float, default=24.0, help="GiB per GPU")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("*"))
    cfg = PRESETS["liveavatar-14b"]
    print(f"| GPUs (TP) | precision | KV | weights | KV caches | activations | VAE (host rank) | peak, largest rank "
          f"| fits {args.vram:g} GiB |\n|---|---|---|---|---|---|---|---|---|")
    for gpus in (1, 2, 4, 5, 8):
        for precision in ("bf16", "int8", "fp8"):
            for kv in ("bf16", "fp8"):
                p = make_plan(PlanRequest(cfg, gpus=gpus, vram=int(args.vram * GiB), precision=precision,
                                          size=(h, w), kv_dtype=kv))
                b = p.worst.breakdown
                weights = sum(v for k, v in b.items() if k.startswith(("weights", "scales", "params")))
                print(f"| {gpus} | {precision} | {kv} | {weights / GiB:.2f} | {(b['kv_rolling'] + b['kv_sink']) / GiB:.2f}"
                      f" | {b['activations'] / GiB:.2f} | {b['vae'] / GiB:.2f} | {p.peak_bytes_per_rank / GiB:.2f} | "
                      f"{'yes' if p.fits else 'no'} |")
    for precision in ("bf16", "fp8"):
        p = make_plan(PlanRequest(cfg, gpus=5, vram=int(args.vram * GiB), precision=precision, size=(h, w),
                                  replicated_dit=True))
        print(f"| 5, reference layout (a replica per GPU, one step each) | {precision} | bf16 | "
              f"{sum(v for k, v in p.worst.breakdown.items() if k.startswith(('weights', 'scales', 'params'))) / GiB:.2f}"
              f" | {(p.worst.breakdown['kv_rolling'] + p.worst.breakdown['kv_sink']) / GiB:.2f} | "
              f"{p.worst.breakdown['activations'] / GiB:.2f} | on the 5th GPU | {p.peak_bytes_per_rank / GiB:.2f} | "
              f"{'yes' if p.fits else 'no'} |")


if __name__ == "__main__":
    main()
