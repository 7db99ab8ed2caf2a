"""Benchmarks of `qavatar quantize` and of the 8-bit matmul paths on this machine.

    python scripts/bench_quantize.py convert [--blocks 2] [--workdir DIR]
        A synthetic checkpoint with BLOCKS blocks of the full 14B width (dim 5120, ffn 13824, 40 heads, the
        14B audio injector on every block) is written, then quantized to int8 and fp8 in a fresh process
        (--calibration none: conversion only). Prints MB/s of checkpoint written and the peak RSS of the
        conversion (VmHWM) next to the largest tensor.
    python scripts/bench_quantize.py calibrate
        Peak RSS of a full calibrated quantize of the tiny toy model at its default size and at 704x384.
    python scripts/bench_quantize.py matmul [--tokens 256]
        One Linear of each 14B shape (q/k/v/o 5120x5120, ffn.0 13824x5120, ffn.2 5120x13824), every matmul
        path side by side: fp32, bf16, int8 W8A8 (bitsandbytes, torch._int_mm, dequantize), fbgemm dynamic
        (per-tensor activations, for reference), fp8 weight-only, fp8 W8A8 through torch._scaled_mm.
Figures from the CI machine are in docs/quantization.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _run(code: str, *args: str) -> dict:
    """Run code in a fresh interpreter (so its peak RSS is its own); it prints one JSON line last."""
    r = subprocess.run([sys.executable, "-c", RSS + textwrap.dedent(code), *args], capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode or not lines:
        raise SystemExit(f"benchmark child failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])


RSS = """
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
"""


def convert(blocks: int, workdir: Path) -> None:
    src = workdir / "src"
    if not src.exists():
        t = time.perf_counter()
        _run(f"""
            import sys, json; sys.path.insert(0, {str(REPO)!r})
            from qavatar.checkpoint.toy import make_toy_checkpoint
            from qavatar.model import PRESETS
            cfg = PRESETS["liveavatar-14b"].replace(name="14b-{blocks}blocks", num_layers={blocks},
                                                    audio_inject_layers=tuple(range({blocks})))
            make_toy_checkpoint(sys.argv[1], config=cfg, seed=0, lora_rank=128, num_shards=2)
            print(json.dumps({{}}))
        """, str(src))
        print(f"synthetic checkpoint ({blocks} full-size blocks) written in {time.perf_counter() - t:.0f} s")
    from qavatar.checkpoint import CheckpointReader

    reader = CheckpointReader(src / "Wan2.2-S2V-14B")
    total = sum(reader.nbytes(k) for k in reader.keys())
    largest = max(reader.nbytes(k) for k in reader.keys())
    print(f"source: {total / 1e9:.2f} GB bf16, largest tensor {largest / 1e6:.0f} MB bf16; LoRA rank 128 merged")
    for precision in ("int8", "fp8"):
        out = workdir / precision
        m = _run(f"""
            import sys, json, time; sys.path.insert(0, {str(REPO)!r})
            from qavatar.quant import QuantConfig
            from qavatar.quant.convert import quantize_checkpoint
            start = []
            t = time.perf_counter()
            s = quantize_checkpoint(sys.argv[1], sys.argv[2], QuantConfig("{precision}"), calibration="none",
                                    overwrite=True,
                                    log=lambda m: start.append(rss("VmRSS")) if m.startswith("writing") else None)
            print(json.dumps({{"total_s": time.perf_counter() - t, "write_s": s.write_seconds,
                              "bytes": s.bytes_written, "before": start[0], "peak": rss("VmHWM")}}))
        """, str(src), str(out))
        print(f"{precision}: wrote {m['bytes'] / 1e9:.2f} GB in {m['write_s']:.1f} s = "
              f"{m['bytes'] / 1e6 / m['write_s']:.0f} MB/s written ({total / 1e6 / m['write_s']:.0f} MB/s of source "
              f"read); peak RSS {m['peak'] / 1e9:.2f} GB, of which the write phase added "
              f"{(m['peak'] - m['before']) / 1e6:.0f} MB = {(m['peak'] - m['before']) / largest:.1f}x the largest "
              f"bf16 tensor")


def calibrate() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        from qavatar.checkpoint.toy import make_toy_checkpoint

        make_toy_checkpoint(Path(tmp) / "toy", seed=0)
        for size in ("128*64", "704*384"):
            m = _run(f"""
                import sys, json, time; sys.path.insert(0, {str(REPO)!r})
                from qavatar.quant import QuantConfig
                from qavatar.quant.convert import quantize_checkpoint
                base = rss("VmRSS")
                t = time.perf_counter()
                s = quantize_checkpoint(sys.argv[1], sys.argv[2], QuantConfig("int8", smooth_alpha=0.5),
                                        size="{size}", log=lambda m: None)
                print(json.dumps({{"s": time.perf_counter() - t, "base": base, "peak": rss("VmHWM"),
                                  "e2e": s.end_to_end_db}}))
            """, str(Path(tmp) / "toy"), str(Path(tmp) / f"q{size.replace('*', 'x')}"))
            print(f"tiny, 8 pairs at {size}: {m['s']:.1f} s, peak RSS {m['peak'] / 1e6:.0f} MB "
                  f"({(m['peak'] - m['base']) / 1e6:.0f} MB above the interpreter with torch imported); "
                  f"end-to-end SQNR {', '.join(f'{v:.1f}' for v in m['e2e'])} dB")


def matmul(tokens: int) -> None:
    import torch
    import torch.nn.functional as F

    from qavatar.quant import kernels as K

    torch.manual_seed(0)
    rows = []

    def bench(fn, ref, n=3):
        fn()
        best = float("inf")
        for _ in range(n):
            t = time.perf_counter()
            y = fn()
            best = min(best, time.perf_counter() - t)
        return best * 1e3, ((y.float() - ref).norm() / ref.norm()).item()

    for name, (n_out, n_in) in {"q/k/v/o": (5120, 5120), "ffn.0": (13824, 5120), "ffn.2": (5120, 13824)}.items():
        x = torch.randn(tokens, n_in)
        w = torch.randn(n_out, n_in) / n_in ** 0.5
        ref = F.linear(x, w)
        wq, sw = K.quantize_weight(w, torch.int8)
        w8, s8 = K.quantize_weight(w, K.FP8)
        xb, wb = x.bfloat16(), w.bfloat16()

        def int8(kernel):
            def f():
                xq, sx = K.quantize_activation(x, torch.int8, K.token_absmax(x))
                return K.int8_matmul(xq, sx, wq, sw, kernel)
            return f

        def fp8_w8a8():
            xq, sx = K.quantize_activation(x, K.FP8, K.token_absmax(x))
            return torch._scaled_mm(xq, w8.t(), scale_a=sx, scale_b=s8.t(), out_dtype=torch.float32)

        packed = torch.ops.quantized.linear_prepack(
            torch.quantize_per_channel(w, sw[:, 0].double(), torch.zeros(n_out, dtype=torch.long), 0, torch.qint8), None)
        paths = {
            "fp32 F.linear": lambda: F.linear(x, w),
            "bf16 F.linear": lambda: F.linear(xb, wb),
            "int8 W8A8 bitsandbytes": int8("bnb") if K._bnb() else None,
            "int8 W8A8 dequantize+fp32": int8("dequant"),
            "int8 W8A8 torch._int_mm": int8("int_mm") if tokens <= 512 else None,
            "int8 fbgemm dynamic (per-tensor act)": lambda: torch.ops.quantized.linear_dynamic(x, packed, True),
            "int8 weight-only (dequantize)": lambda: F.linear(x, K.dequantize_weight(wq, sw)),
            "fp8 weight-only (dequantize)": lambda: F.linear(x, K.dequantize_weight(w8, s8)),
            "fp8 W8A8 torch._scaled_mm": fp8_w8a8,
        }
        for path, fn in paths.items():
            if fn is None:
                continue
            ms, err = bench(fn, ref)
            rows.append((name, path, ms, err))
    print(f"| layer ({tokens} tokens) | path | ms | rel. error |\n|---|---|---|---|")
    for name, path, ms, err in rows:
        print(f"| {name} | {path} | {ms:.0f} | {err:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--blocks", type=int, default=2)
    c.add_argument("--workdir", type=Path, default=None)
    sub.add_parser("calibrate")
    m = sub.add_parser("matmul")
    m.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    if args.cmd == "convert":
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            convert(args.blocks, args.workdir)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                convert(args.blocks, Path(tmp))
    elif args.cmd == "calibrate":
        calibrate()
    else:
        matmul(args.tokens)


if __name__ == "__main__":
    main()
