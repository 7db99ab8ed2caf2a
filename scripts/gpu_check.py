"""GPU check for sessions that have a GPU (one short run; record what it prints in docs/quantization.md).

One full-size 14B DiT block (dim 5120, ffn 13824, 40 heads) on the GPU at the 704x384 token count:
3 latent frames x 1056 tokens = 3168 query tokens, attending to a full rolling window (12 frames = 12672
tokens) plus the 2640-token sink, as a streaming call does. Weights are random (N(0,1)/sqrt(fan_in)).
For bf16, int8, fp8, int8-wo and fp8-wo: milliseconds per forward, peak memory, and SQNR of the block output
against bf16 (and of bf16 against an fp32 block). Which kernel ran is printed too.

Then (--tp-rank, on by default) rank 0 of a TP=4 liveavatar-14b in fp8, built at its real sharded shapes
with random weights under a fake process group (collectives are no-ops, memory is real): a stream session
at 704x384 with the rolling window full runs one block, and torch.cuda.max_memory_allocated is compared
with what `qavatar plan --gpus 4 --precision fp8` plans for that rank (weights + KV + activations).

First, the copy-free self-attention (window and sink attended apart, merged by log-sum-exp) against one
SDPA over the concatenated keys, in bf16, fp16 and fp32 (each takes another CUDA kernel).

Last (--infer, on by default), `qavatar infer` end to end on the GPU with the toy checkpoint (tiny DiT and
encoders, random weights) at 704x384, bf16 and fp8 (quantized while loading), 2 clips: it exercises the CUDA
paths of the pipeline (VAE in bf16 on the GPU, the fp8 kernels, the mp4 writer) and prints frames, wall
time per clip and peak GPU memory.

    python scripts/gpu_check.py [--iters 10] [--json OUT.json] [--no-tp-rank] [--no-infer]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qavatar.model.block import DiTBlock, Segments  # noqa: E402
from qavatar.model.kv_cache import LayerKV, RollingKVCache, SinkCache  # noqa: E402
from qavatar.model.rope import rope_table, video_positions, grid_positions  # noqa: E402
from qavatar.quant import QuantConfig, QuantLinear, quantize_  # noqa: E402
from qavatar.quant import kernels  # noqa: E402

DIM, FFN, HEADS, EPS = 5120, 13824, 40, 1e-6
GH, GW, FRAMES, WINDOW_FRAMES, SINK = 44, 24, 3, 12, 2640


def sqnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref, a = ref.float(), a.float()
    return 10 * math.log10(ref.pow(2).sum().item() / max((a - ref).pow(2).sum().item(), 1e-30))


def random_block(device: str) -> DiTBlock:
    g = torch.Generator().manual_seed(0)
    block = DiTBlock(DIM, FFN, HEADS, EPS)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.dim() >= 2 and "modulation" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "modulation" in name:
                p.copy_(torch.randn(p.shape, generator=g) / DIM ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return block.to(device)


def inputs(device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    frame_len = GH * GW
    n = FRAMES * frame_len
    x = torch.randn(1, n, DIM, generator=g).to(device, dtype)
    e0 = (0.1 * torch.randn(1, FRAMES, 6, 2, DIM, generator=g)).to(device)
    rope = rope_table(video_positions(WINDOW_FRAMES, FRAMES, GH, GW), (22, 21, 21)).to(device)
    context = torch.randn(1, 512, DIM, generator=g).to(device, dtype)
    sink = SinkCache(1)
    sink.k[0] = torch.randn(1, SINK, HEADS, DIM // HEADS, generator=g).to(device, dtype)
    sink.v[0] = torch.randn(1, SINK, HEADS, DIM // HEADS, generator=g).to(device, dtype)
    sink.positions = grid_positions([30], range(55), range(48))[:SINK]
    sink_rope = rope_table(sink.positions, (22, 21, 21)).to(device)
    return x, e0, rope, context, sink, sink_rope, Segments(FRAMES, frame_len)


def run(block, args, dtype, device, iters):
    x, e0, rope, context, sink, sink_rope, seg = args
    window = WINDOW_FRAMES * seg.frame_len
    rolling = RollingKVCache(1, 1, window, HEADS, DIM // HEADS, dtype, device)
    start = window  # the window is full: attend to all 12 frames + the sink
    kv = lambda: LayerKV("stream", 0, sink, rolling, start, sink_rope)  # noqa: E731
    with torch.no_grad():
        for _ in range(3):
            out = block(x, e0, seg, rope, context, kv())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(iters):
            out = block(x, e0, seg, rope, context, kv())
        t1.record()
        torch.cuda.synchronize()
    return out, t0.elapsed_time(t1) / iters, torch.cuda.max_memory_allocated() - base


def tp_rank_check(precision: str = "fp8", tp_size: int = 4, preset: str = "liveavatar-14b", device: str = "cuda",
                  size: tuple[int, int] = (704, 384)) -> dict:
    """Rank 0 of TP=tp_size at the real 14B shapes: measured peak vs the plan (device="cpu" dry-runs the flow
    on a small preset, without memory figures)."""
    import time

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from qavatar.model import PRESETS, build_model
    from qavatar.model.streaming import StreamingSession, flow_match_schedule
    from qavatar.parallel import TPGroup
    from qavatar.parallel.plan import GiB, PlanRequest, make_plan

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp_size)
    tp = TPGroup(0, tp_size, dist.group.WORLD)
    cfg = PRESETS[preset]
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("meta"):
        model = build_model(cfg, tp)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) / fan_in ** 0.5)
    if precision != "bf16":
        quantize_(model, QuantConfig(precision))
    if cuda:
        torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated() if cuda else 0
    h, w = size[0] // 8, size[1] // 8
    gc = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 16, 1, h, w, generator=gc)
    session = StreamingSession(model, torch.randn(1, 20, cfg.text_dim, generator=gc), ref,
                               ref.expand(-1, -1, 19, -1, -1), *flow_match_schedule(), seed=0)
    session.next_frame = cfg.clip_latent_frames  # the window is full: attend to all 12 frames + the sink
    noise = torch.randn(1, 16, 3, h, w, generator=gc)
    audio = torch.randn(1, 25, cfg.audio_dim, 12, generator=gc)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    session.denoise_block(noise, audio)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    plan = make_plan(PlanRequest(cfg, gpus=tp_size, precision=precision, vae="cpu", size=size,
                                 compute_dtype="bf16" if cuda else "fp32", kv_dtype="bf16" if cuda else "fp32"))
    b = plan.ranks[0].breakdown
    planned = sum(v for k, v in b.items() if k not in ("reserve", "vae", "t5", "wav2vec2"))
    out = {"precision": precision, "tp": tp_size, "weights_measured_gib": weights / GiB,
           "weights_planned_gib": sum(v for k, v in b.items() if k.startswith(("weights", "scales", "params"))) / GiB,
           "kv_planned_gib": (b["kv_rolling"] + b["kv_sink"]) / GiB, "kv_measured_gib": session.cache_bytes() / GiB,
           "peak_measured_gib": peak / GiB, "peak_planned_gib": planned / GiB,
           "seconds_per_block_4_steps": seconds}
    print(f"TP={tp_size} rank 0, {precision}, {size[0]}x{size[1]}, window full: weights {out['weights_measured_gib']:.2f} GiB "
          f"(plan {out['weights_planned_gib']:.2f}), KV {out['kv_measured_gib']:.2f} (plan {out['kv_planned_gib']:.2f}),"
          f" peak {out['peak_measured_gib']:.2f} GiB (plan without reserve {out['peak_planned_gib']:.2f}); one block "
          f"(4 calls, collectives faked) {seconds:.2f} s")
    return out


def segment_attention_check(device: str = "cuda") -> list[dict]:
    """The copy-free attention's CUDA paths (model/segment_attention.py: flash for bf16/fp16, memory-efficient
    for fp32) against one SDPA over the concatenated [window | sink], at a TP=2 rank's 704x384 shapes."""
    from qavatar.model.segment_attention import attend_two, sdpa

    g = torch.Generator(device=device).manual_seed(0)
    heads, d, lq, w = HEADS // 2, DIM // HEADS, FRAMES * GH * GW, WINDOW_FRAMES * GH * GW
    rnd = lambda n: torch.randn(1, n, heads, d, generator=g, device=device)  # noqa: E731
    q, kw, vw, ks, vs = rnd(lq), rnd(w), rnd(w), rnd(SINK) * 1.5, rnd(SINK)
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a = [t.to(dtype) for t in (q, kw, vw, ks, vs)]
        got = attend_two(*a).float()
        want = sdpa(a[0], torch.cat(a[1:2] + a[3:4], 1), torch.cat(a[2:3] + a[4:5], 1)).float()
        ref32 = sdpa(q, torch.cat([kw, ks], 1), torch.cat([vw, vs], 1))
        rows.append({"dtype": str(dtype), "max_abs_vs_concat": float((got - want).abs().max()),
                     "sqnr_vs_fp32_db": sqnr(got, ref32), "concat_sqnr_vs_fp32_db": sqnr(want, ref32)})
        print(f"segment attention {dtype}: max |merged - concatenated| {rows[-1]['max_abs_vs_concat']:.2e}, SQNR vs fp32 "
              f"{rows[-1]['sqnr_vs_fp32_db']:.1f} dB (concatenated: {rows[-1]['concat_sqnr_vs_fp32_db']:.1f} dB)")
    return rows


def infer_check(device: str = "cuda", size: str = "704*384") -> list[dict]:
    import tempfile

    from qavatar.checkpoint.toy import make_toy_checkpoint
    from qavatar.pipeline.infer import InferRequest, infer
    from qavatar.pipeline.video_writer import probe

    root = Path(tempfile.mkdtemp(prefix="qavatar-gpu-"))
    ckpt = make_toy_checkpoint(root / "toy")
    bundled = Path(__file__).resolve().parents[1] / "calibration" / "bundled"
    rows = []
    for precision in ("bf16", "fp8"):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = root / f"{precision}.mp4"
        res = infer(InferRequest(str(ckpt), str(bundled / "images" / "p00.png"), str(bundled / "audio" / "p00.wav"),
                                 "a woman talking", str(out), precision=precision, size=size, num_clip=2,
                                 device=device, quiet=True))[-1]
        info = probe(out)
        rows.append({"precision": precision, "frames": info["frames"], "size": [info["height"], info["width"]],
                     "audio_s": info["audio_seconds"], "seconds": res.seconds, "clip_seconds": res.clip_seconds,
                     "peak_gpu_mb": res.peak_gpu_bytes / 1e6})
        print(f"infer toy {precision} {size} 2 clips: {info['frames']} frames {info['height']}x{info['width']}, "
              f"audio {info['audio_seconds']:.2f} s, {res.seconds:.1f} s (per clip "
              f"{', '.join(f'{c:.2f}' for c in res.clip_seconds)} s), peak GPU {res.peak_gpu_bytes / 1e6:.0f} MB")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-tp-rank", action="store_true")
    ap.add_argument("--no-infer", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs on a GPU session")
    dev = "cuda"
    name = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    print(f"device {name} (sm{cap[0]}{cap[1]}), torch {torch.__version__}")
    segments = segment_attention_check(dev)
    fp32 = random_block(dev)
    with torch.no_grad():
        ref32, _, _ = run(fp32, inputs(dev, torch.float32), torch.float32, dev, 1)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    del fp32
    rows = []
    ref, ms, mem = run(bf16, inputs(dev, torch.bfloat16), torch.bfloat16, dev, args.iters)
    weights = sum(p.numel() * p.element_size() for p in bf16.parameters())
    rows.append({"precision": "bf16", "ms": ms, "peak_extra_mb": mem / 1e6, "weights_mb": weights / 1e6,
                 "sqnr_vs_bf16_db": float("inf"), "sqnr_vs_fp32_db": sqnr(ref, ref32), "kernel": "cuBLAS bf16"})
    for precision in ("int8", "fp8", "int8-wo", "fp8-wo"):
        q = quantize_(copy.deepcopy(bf16), QuantConfig(precision))
        lin = next(m for m in q.modules() if isinstance(m, QuantLinear))
        kernel = {"int8": f"int8 {kernels.pick_int8_kernel(torch.device(dev), 3168, DIM, DIM)}",
                  "fp8": "torch._scaled_mm rowwise" if kernels.fp8_matmul_supported(torch.device(dev))
                  else "fp8 weight-only fallback"}.get(precision, "dequantize + bf16 matmul")
        out, ms, mem = run(q, inputs(dev, torch.bfloat16), torch.bfloat16, dev, args.iters)
        weights = sum(b.numel() * b.element_size() for b in q.buffers()) + sum(
            p.numel() * p.element_size() for p in q.parameters())
        rows.append({"precision": precision, "ms": ms, "peak_extra_mb": mem / 1e6, "weights_mb": weights / 1e6,
                     "sqnr_vs_bf16_db": sqnr(out, ref), "sqnr_vs_fp32_db": sqnr(out, ref32), "kernel": kernel})
        del q, lin
        torch.cuda.empty_cache()
    print("| precision | kernel | ms / block forward | block weights MB | peak activations MB | SQNR vs bf16 dB "
          "| SQNR vs fp32 dB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['kernel']} | {r['ms']:.2f} | {r['weights_mb']:.0f} | {r['peak_extra_mb']:.0f} "
              f"| {r['sqnr_vs_bf16_db']:.1f} | {r['sqnr_vs_fp32_db']:.1f} |")
    del bf16
    torch.cuda.empty_cache()
    tp_rank = None if args.no_tp_rank else tp_rank_check()
    torch.cuda.empty_cache()
    infer_rows = None if args.no_infer else infer_check()
    out_path = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if out_path:
        out_path.write_text(json.dumps({"device": name, "capability": cap, "rows": rows, "tp_rank": tp_rank, "infer": infer_rows,
                                        "segment_attention": segments},
                                       indent=2))


if __name__ == "__main__":
    main()
