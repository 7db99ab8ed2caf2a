"""The layouts tables of docs/parallel.md: `qavatar plan --gpu G --gpus N --json` for each box, as markdown.

    PYTHONPATH=. python scripts/plan_layouts.py            # liveavatar-14b, fp8, 704x384, bf16 KV cache
    PYTHONPATH=. python scripts/plan_layouts.py --precision int8 --kv-dtype fp8
"""
from __future__ import annotations

import argparse
import json

from typer.testing import CliRunner

from qavatar.cli import app

BOXES = [("4x RTX 4090", "rtx4090", 4, "24GiB"), ("5x RTX 4090", "rtx4090", 5, "24GiB"),
         ("8x RTX 4090", "rtx4090", 8, "24GiB"), ("4x L40S", "l40s", 4, "48GiB"),
         ("8x H100 SXM", "h100-sxm", 8, "80GiB")]


def table(title: str, gpu: str, gpus: int, vram: str, precision: str, kv: str, size: str) -> str:
    r = CliRunner().invoke(app, ["plan", "--gpus", str(gpus), "--vram", vram, "--precision", precision,
                                 "--size", size, "--kv-dtype", kv, "--gpu", gpu, "--json"])
    out = json.loads(r.output)
    lines = [f"**{title}** ({vram} each, {precision}, KV {kv}, {size.replace('*', 'x')}; "
             f"`qavatar plan --gpus {gpus} --vram {vram} --precision {precision} --gpu {gpu}`)", "",
             "| layout | GPUs | VAE | fits | peak GiB / rank | MB sent / block (busiest rank) | s / block | fps | "
             "bottleneck |", "|---|---|---|---|---|---|---|---|---|"]
    for i, o in enumerate(out["layouts"]):
        name = f"TP={o['tp']}" if o["pp"] == 1 else (
            f"PP={o['pp']}" if o["tp"] == 1 else f"PP={o['pp']} x TP={o['tp']}")
        mark = "**" if i == out["recommended"] else ""
        vae = {"host": "host rank", "rank": "own rank", "cpu": "CPU"}[o["vae"]]
        lines.append(f"| {mark}{name}{mark} | {o['gpus']} | {vae} | {'yes' if o['fits'] else 'no'} | "
                     f"{o['peak_bytes_per_rank'] / 2**30:.2f} | {o['bytes_between_ranks_per_block'] / 1e6:,.1f} | "
                     f"{o['block_seconds']:.3f} | {o['fps']:.2f} | {o['bottleneck']} |")
    return "\n".join(lines)


def profile_table() -> str:
    from qavatar.parallel.speed import PROFILES

    lines = ["| --gpu | GPU | bf16 TFLOPS | int8 TOPS | fp8 TFLOPS | memory GB/s | link GB/s per direction "
             "| memory GiB | source |", "|---|---|---|---|---|---|---|---|---|"]
    for key, p in PROFILES.items():
        doc = p.sources["bf16_tflops"].split(":")[0]
        lines.append(f"| {key} | {p.name} | {p.bf16_tflops:g} | {p.int8_tops:g} | "
                     f"{'-' if p.fp8_tflops is None else f'{p.fp8_tflops:g}'} | {p.memory_gbps:g} | "
                     f"{p.link_gbps:.1f} ({p.link}) | {p.memory_gib:g} | {doc} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp8")
    ap.add_argument("--kv-dtype", default="bf16")
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--profiles", action="store_true", help="print the GPU profile table too")
    args = ap.parse_args()
    if args.profiles:
        print(profile_table())
        print()
    for title, gpu, gpus, vram in BOXES:
        print(table(title, gpu, gpus, vram, args.precision, args.kv_dtype, args.size))
        print()


if __name__ == "__main__":
    main()
