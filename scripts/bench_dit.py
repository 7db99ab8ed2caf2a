"""Benchmark one DiT layer of Live Avatar at its real streaming shapes, eager and compiled, at every precision.

The layer is one 14B block (dim 5120, 40 heads, ffn 13824) followed by an audio-injector layer, running one
streaming call at 704x384: 3 latent frames x 1056 tokens = 3168 query tokens, attending to the rolling window full
(one clip, 12 frames = 12672 tokens) plus the 2640-token sink. Weights are random, generated on the device
(no checkpoint). Rows: bf16, int8 W8A8, fp8 W8A8, int8-wo, fp8-wo, each eager and compiled (model/compile.py).
Columns: ms per call, SQNR of the output against bf16 eager, achieved TFLOPS (FLOPs from qavatar/parallel/flops.py) against the device's peak (GPU:
the datasheet profile of qavatar/parallel/speed.py; CPU: a measured fp32 matmul rate), the bytes of weights the
call reads, and the speed-up against bf16 eager. Then the attention product alone under every SDPA backend, and
which backend SDPA picks by itself.

    python scripts/bench_dit.py                       # the device it finds; full size on CUDA
    python scripts/bench_dit.py --device cpu --json   # width-reduced (dim 256, 2 heads, 11x6 tokens/frame)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qavatar.model import PRESETS  # noqa: E402
from qavatar.model.audio import AudioInjector  # noqa: E402
from qavatar.model.block import DiTBlock, Segments  # noqa: E402
from qavatar.model.kv_cache import LayerKV, RollingKVCache, SinkCache  # noqa: E402
from qavatar.model.rope import grid_positions, rope_table, video_positions  # noqa: E402
from qavatar.parallel.flops import CallShape, block_flops, injector_flops  # noqa: E402
from qavatar.quant import QuantConfig, quantize_  # noqa: E402

PRECISIONS = ("bf16", "int8", "fp8", "int8-wo", "fp8-wo")
ROPE_SPLIT = (22, 21, 21)  # head_dim 128, as the 14B model


@dataclass(frozen=True)
class Shape:
    dim: int
    heads: int
    ffn: int
    gh: int  # latent tokens per frame = gh * gw
    gw: int
    frames: int = 3  # latent frames per block (one streaming call)
    window_frames: int = 12  # the rolling window, full: one clip
    sink: int = 2640  # condition tokens (reference frame + FramePack motion at 704x384)
    text: int = 512
    audio_tokens: int = 5  # local audio tokens per frame (+1 padding token)
    eps: float = 1e-6

    @property
    def frame_len(self) -> int:
        return self.gh * self.gw

    @property
    def call(self) -> CallShape:
        n = self.frames * self.frame_len
        return CallShape(n, self.window_frames * self.frame_len + self.sink, self.text, self.frames, self.sink)

    def flops(self) -> int:
        cfg = replace(PRESETS["liveavatar-14b"], dim=self.dim, num_heads=self.heads, ffn_dim=self.ffn,
                      text_len=self.text, num_audio_token=self.audio_tokens - 1)
        return block_flops(cfg, self.call) + injector_flops(cfg, self.call)


FULL = Shape(5120, 40, 13824, 44, 24)  # 704x384: 88x48 latents, patch 2x2
SMALL = Shape(256, 2, 704, 11, 6, sink=165, text=64)  # the same layout, width and tokens reduced for CPUs
TINY = Shape(128, 1, 352, 4, 4, sink=32, text=16)  # gpu_check --dry-run: plumbing only


class Layer(nn.Module):
    """A DiT block and one audio-injector layer, as the model runs an inject layer (model/dit.py run_blocks)."""

    def __init__(self, s: Shape):
        super().__init__()
        self.blocks = nn.ModuleList([DiTBlock(s.dim, s.ffn, s.heads, s.eps)])
        self.audio_injector = AudioInjector(s.dim, s.heads, 1, s.eps)

    def forward(self, x, e0, seg, rope, context, kv, audio):
        return self.audio_injector(0, self.blocks[0](x, e0, seg, rope, context, kv), seg, *audio)


def random_layer(s: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> Layer:
    """Random weights drawn on the device: matrices N(0,1)/sqrt(fan_in), norms 1+0.1N, modulations N/sqrt(dim)."""
    with torch.device("meta"):
        layer = Layer(s)
    layer = layer.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(generator=g)
            if "modulation" in name:
                p.div_(s.dim ** 0.5)
            elif p.dim() >= 2:
                p.div_(math.sqrt(p.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                p.mul_(0.1).add_(1)
            else:
                p.mul_(0.1)
    return layer.to(dtype).eval()


def call_inputs(s: Shape, device: str, dtype: torch.dtype, seed: int = 1):
    """One streaming call's inputs with the rolling window full; kv() gives a fresh per-call cache view."""
    g = torch.Generator(device=device).manual_seed(seed)
    heads, hd = s.heads, s.dim // s.heads

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)
    x = randn(1, s.frames * s.frame_len, s.dim).to(dtype)
    e0 = 0.1 * randn(1, s.frames, 6, 2, s.dim)
    rope = rope_table(video_positions(s.window_frames, s.frames, s.gh, s.gw), ROPE_SPLIT).to(device)
    context = randn(1, s.text, s.dim).to(dtype)
    sink = SinkCache(1)
    sink.k[0], sink.v[0] = randn(1, s.sink, heads, hd).to(dtype), randn(1, s.sink, heads, hd).to(dtype)
    sink.positions = grid_positions([30], range(64), range(64))[:s.sink]
    sink_rope = rope_table(sink.positions, ROPE_SPLIT).to(device)
    window = s.window_frames * s.frame_len
    rolling = RollingKVCache(1, 1, window, heads, hd, dtype, device)
    rolling.k.normal_(generator=g), rolling.v.normal_(generator=g)
    audio = (randn(1, s.frames, 1, s.dim).to(dtype), randn(1, s.frames, s.audio_tokens, s.dim).to(dtype))
    seg = Segments(s.frames, s.frame_len)
    return lambda layer: layer(x, e0, seg, rope, context, LayerKV("stream", 0, sink, rolling, window, sink_rope), audio)


def timed(fn: Callable[[], object], device: str, iters: int, warmup: int = 1) -> float:
    """Milliseconds per call after `warmup` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(iters):
                fn()
            t1.record()
            torch.cuda.synchronize()
            return t0.elapsed_time(t1) / iters
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters


def sqnr(a: torch.Tensor, ref: torch.Tensor) -> Optional[float]:
    """Signal-to-quantization-noise ratio of a against ref, dB (None when identical)."""
    noise = (a - ref).pow(2).sum().item()
    return None if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def weight_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def peak_tflops(device: str, iters: int) -> dict:
    """The device's peak per precision: the GPU's datasheet profile, or on a CPU a measured fp32 matmul rate."""
    if device == "cuda":
        from qavatar.parallel.speed import get_profile, profile_for_device

        name = profile_for_device(torch.cuda.get_device_name())
        if name is None:
            return {"source": f"no profile for {torch.cuda.get_device_name()}", **{p: None for p in PRECISIONS}}
        prof = get_profile(name)
        return {"source": f"datasheet ({prof.name}, qavatar/parallel/speed.py)",
                **{p: prof.linear_tflops(p) for p in PRECISIONS}}
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = timed(lambda: a @ b, "cpu", max(iters, 3))
    rate = 2 * n ** 3 / (ms / 1e3) / 1e12
    return {"source": f"measured fp32 {n}^3 matmul on this CPU ({torch.get_num_threads()} threads)",
            **{p: rate for p in PRECISIONS}}


def bench_rows(s: Shape, device: str, iters: int, compiled: bool = True,
               say: Callable[[str], None] = print, backend: str = "inductor") -> list[dict]:
    from qavatar.model.compile import compile_blocks

    dtype = torch.bfloat16
    call = call_inputs(s, device, dtype)
    flops = s.flops()
    base = random_layer(s, device, dtype)
    peaks = peak_tflops(device, iters)
    rows, ref = [], None
    for precision in PRECISIONS:
        layer = base if precision == "bf16" else quantize_(copy.deepcopy(base), QuantConfig(precision))
        for mode in ("eager", "compiled") if compiled else ("eager",):
            compile_s = None
            if mode == "compiled":
                layer = copy.deepcopy(layer)
                stats = compile_blocks(layer, backend=backend)
                t = time.perf_counter()
                with torch.no_grad():
                    call(layer)  # compiles
                if device == "cuda":
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - t
                graphs = stats.graphs
            with torch.no_grad():
                y = call(layer).float()
            ref = y if precision == "bf16" and mode == "eager" else ref
            ms = timed(lambda: call(layer), device, iters)
            peak = peaks[precision]
            row = {"precision": precision, "mode": mode, "ms": ms, "tflops": flops / (ms / 1e3) / 1e12,
                   "peak_tflops": peak, "weight_bytes": weight_bytes(layer), "compile_s": compile_s,
                   "sqnr_vs_bf16_db": sqnr(y, ref)}
            if mode == "compiled":
                row["graphs"] = graphs
            row["pct_of_peak"] = 100 * row["tflops"] / peak if peak else None
            rows.append(row)
            say(f"  {precision:8s} {mode:8s} {ms:9.2f} ms" + (f"  (compile {compile_s:.1f} s)" if compile_s else ""))
        if precision != "bf16":
            del layer
        if device == "cuda":
            torch.cuda.empty_cache()
    ref = next(r["ms"] for r in rows if r["precision"] == "bf16" and r["mode"] == "eager")
    for r in rows:
        r["speedup_vs_bf16_eager"] = ref / r["ms"]
    return rows


def attention_backends(s: Shape, device: str, iters: int) -> dict:
    """The attention product of the call (q: the block's tokens, k/v: window + sink) under each SDPA backend."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=device).manual_seed(2)
    hd, n = s.dim // s.heads, s.call.noisy
    q = torch.randn(1, s.heads, n, hd, generator=g, device=device).to(torch.bfloat16)
    k = torch.randn(1, s.heads, s.call.keys, hd, generator=g, device=device).to(torch.bfloat16)
    v = torch.randn_like(k)
    flops = 2 * 2 * n * s.call.keys * s.dim
    out = {"q_tokens": n, "kv_tokens": s.call.keys, "picked": _picked_backend(q, k, v), "backends": {}}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), device, iters)
            out["backends"][name.lower()] = {"ms": ms, "tflops": flops / (ms / 1e3) / 1e12}
        except (RuntimeError, AttributeError) as e:  # not built for this device / these shapes
            out["backends"][name.lower()] = {"ms": None, "unavailable": str(e).splitlines()[0][:160]}
    return out


def _picked_backend(q, k, v) -> str:
    import torch.nn.functional as F

    with torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, k, v)
    names = {e.name for e in prof.events()}
    for op, name in (("_flash_attention", "flash"), ("_efficient_attention", "efficient"),
                     ("_cudnn_attention", "cudnn"), ("_attention_math", "math")):
        if any(op in n for n in names):
            return name
    return "unknown: " + ", ".join(sorted(n for n in names if "attention" in n))[:160]


def format_table(result: dict) -> str:
    lines = [f"DiT layer (block + audio injector) on {result['device_name']}, torch {result['torch']}, "
             f"shape {result['shape']['dim']}d/{result['shape']['heads']}h/ffn {result['shape']['ffn']}, "
             f"{result['call']['noisy']} query tokens, {result['call']['keys']} keys; "
             f"{result['flops_per_call'] / 1e9:.2f} GFLOP per call; "
             f"{'compiled with ' + result['backend'] if result['compiled'] else 'eager only'}; "
             f"peak: {result['peak_source']}", "",
             "| precision | mode | ms / call | TFLOPS | % of peak | weights MB read | speed-up vs bf16 eager | compile s "
             "| SQNR vs bf16 eager dB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pct = f"{r['pct_of_peak']:.1f}" if r["pct_of_peak"] is not None else "n/a"
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        lines.append(f"| {r['precision']} | {r['mode']} | {r['ms']:.2f} | {r['tflops']:.3f} | {pct} | "
                     f"{r['weight_bytes'] / 1e6:.1f} | {r['speedup_vs_bf16_eager']:.2f} | {comp} | "
                     f"{'exact' if r['sqnr_vs_bf16_db'] is None else format(r['sqnr_vs_bf16_db'], '.1f')} |")
    a = result["attention"]
    lines += ["", f"attention {a['q_tokens']} x {a['kv_tokens']} tokens: SDPA picks {a['picked']}", "",
              "| SDPA backend | ms | TFLOPS |", "|---|---|---|"]
    for name, b in a["backends"].items():
        lines.append(f"| {name} | {b['ms']:.2f} | {b['tflops']:.3f} |" if b["ms"] is not None
                     else f"| {name} | unavailable: {b['unavailable']} | |")
    return "\n".join(lines)


def run(device: Optional[str] = None, shape: Optional[Shape] = None, iters: Optional[int] = None,
        compiled: bool = True, say: Callable[[str], None] = print, backend: str = "inductor") -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = shape or (FULL if device == "cuda" else SMALL)
    iters = iters or (10 if device == "cuda" else 2)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    say(f"bench_dit on {name}: {shape}")
    rows = bench_rows(shape, device, iters, compiled, say, backend)
    peaks = peak_tflops(device, iters)
    return {"device": device, "device_name": name, "torch": torch.__version__, "shape": asdict(shape),
            "call": asdict(shape.call), "flops_per_call": shape.flops(), "peak_source": peaks["source"],
            "iters": iters, "compiled": compiled, "backend": backend, "rows": rows, "attention": attention_backends(shape, device, iters)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per row (default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--full", action="store_true", help="the full 14B shapes on a CPU too (slow)")
    ap.add_argument("--no-compile", action="store_true", help="eager rows only")
    ap.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager"],
                    help="torch.compile backend of the compiled rows (aot_eager: no code generation, a quick "
                         "plumbing check on slow CPUs)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON (the table goes to stderr)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.iters is not None and args.iters < 1:
        print(f"error: --iters {args.iters}: time at least 1 call", file=sys.stderr)
        return 2
    shape = FULL if args.full else None
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    result = run(args.device, shape, args.iters, not args.no_compile, log, args.backend)
    log(format_table(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
