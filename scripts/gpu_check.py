"""The one prepared GPU script: everything qavatar claims about GPUs, measured in one run of a few minutes.

Stages (each runs in a process of its own, with its own timeout; `--stages` picks some):
  attention          the copy-free self-attention (window and sink attended apart, merged by log-sum-exp:
                     model/segment_attention.py) against one SDPA over the concatenated keys, bf16/fp16/fp32
                     (each dtype takes another CUDA kernel), at a TP=2 rank's 704x384 shapes
  bench              scripts/bench_dit.py: one 14B layer at the streaming shapes, 5 precisions eager and compiled,
                     TFLOPS against the datasheet peak, SDPA backends
  emulate-tp4        4x24 GB on one big GPU: 4 ranks on the one GPU (gloo, collectives through host memory), each
                     process's allocator capped at 24 GiB minus its measured CUDA context; liveavatar-14b at TP=4
                     with fp8 weights (random, generated per rank at the real sharded shapes, no checkpoint); the
                     sink prefill and 2 blocks at 704x384 through the real StreamingSession with the rolling window
                     full; each rank's max_memory_allocated / max_memory_reserved against `qavatar plan`
  emulate-pp4        the same for the pipeline layout: 4 layer stages (parallel/pipeline.py), 2 blocks
  emulate-tp2-kvfp8  TP=2 with the fp8 KV cache (model/kv_quant.py)
  infer              `qavatar infer` end to end on the toy checkpoint at 704x384, bf16 and fp8, 2 clips
Writes OUT/gpu_check.json (every stage: status, seconds, result) and OUT/gpu_check.md (the tables).

    python scripts/gpu_check.py --out gpu_out                    # every stage, on the GPU
    python scripts/gpu_check.py --out gpu_out --stages emulate-tp4 --emulate 4x24GiB
    python scripts/gpu_check.py --dry-run --out tmp               # CPU: every stage's plumbing, tiny shapes

--dry-run walks every stage on the CPU with the tiny config: the ranks spawn on one device over gloo, the memory
cap is computed (set_per_process_memory_fraction itself needs CUDA), the plan is compared, the reports are written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qavatar.errors import ConfigError  # noqa: E402
from qavatar.parallel.group import TPGroup  # noqa: E402

GiB = 1 << 30
STAGES = ("attention", "bench", "emulate-tp4", "emulate-pp4", "emulate-tp2-kvfp8", "infer")
# seconds per stage on one H100/H200 (their sum stays under 8 minutes); --timeout-scale stretches them
TIMEOUTS = {"attention": 20, "bench": 210, "emulate-tp4": 80, "emulate-pp4": 70, "emulate-tp2-kvfp8": 40, "infer": 60}
DRY_RUN_TIMEOUT = 900  # per stage on a CPU: only a guard against hangs (a loaded 2-core CI box is slow)


# ---------------------------------------------------------------------------- memory caps
def parse_emulate(spec: str) -> tuple[int, int]:
    """'4x24GiB' -> (4 ranks, 24 GiB per emulated card)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+(?:\.\d+)?)\s*(GiB|GB|MiB)\s*", spec)
    if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
        raise ConfigError(f"--emulate {spec!r}: give RANKSxSIZE, e.g. 4x24GiB")
    unit = {"GiB": GiB, "GB": 10 ** 9, "MiB": 1 << 20}[m.group(3)]
    return int(m.group(1)), int(float(m.group(2)) * unit)


def memory_fraction(card_bytes: int, total_bytes: int, context_bytes: int = 0) -> float:
    """The set_per_process_memory_fraction that lets a process's allocator use what an emulated card of
    card_bytes leaves after the CUDA context (which a real card holds too, outside the allocator)."""
    if total_bytes <= 0:
        raise ConfigError("the GPU reports no memory")
    usable = card_bytes - context_bytes
    if usable <= 0:
        raise ConfigError(f"the CUDA context ({context_bytes / GiB:.2f} GiB) leaves nothing of a "
                          f"{card_bytes / GiB:.1f} GiB card")
    if usable > total_bytes:
        raise ConfigError(f"cannot emulate a {card_bytes / GiB:.1f} GiB card on a {total_bytes / GiB:.1f} GiB GPU")
    return usable / total_bytes


def _smi_used_bytes() -> Optional[int]:
    """Memory used on GPU 0 by every process, from nvidia-smi (outside CUDA, so it sees contexts too)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
        return int(out.stdout.strip().splitlines()[0]) << 20
    except Exception:  # no nvidia-smi in the container: the context is then not measured
        return None


# ---------------------------------------------------------------------------- several ranks on one GPU
@dataclasses.dataclass(frozen=True)
class HostStagedGroup(TPGroup):
    """A TP group over gloo whose ranks share one GPU: gloo reduces CUDA tensors only for all_reduce and
    broadcast, so every collective goes through host memory (no GPU memory is added by it)."""

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.size == 1 or not x.is_cuda:
            return super().all_reduce(x, op)
        return x.copy_(super().all_reduce(x.cpu(), op))

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1 or not x.is_cuda:
            return super().all_gather(x, dim)
        return super().all_gather(x.cpu(), dim).to(x.device)

    def broadcast(self, x, src: int, device="cpu") -> torch.Tensor:
        return super().broadcast(x, src, "cpu").to(device)


def _staged(g: TPGroup) -> TPGroup:
    return HostStagedGroup(**{f.name: getattr(g, f.name) for f in dataclasses.fields(g)})


def random_rank_model(cfg, tp: TPGroup, precision: str, device: str, dtype: torch.dtype,
                      stage: Optional[tuple[range, bool, bool]] = None, seed: int = 0):
    """This rank's model at its real sharded shapes with random weights drawn on the device, one tensor at a
    time (as load_rank fills it from a checkpoint: the rank never holds bf16 copies of 8-bit weights). A pipeline
    stage gets only what it holds (parallel/stages.py); the rest stays on the meta device."""
    from qavatar.model import build_model
    from qavatar.parallel.stages import stage_holds
    from qavatar.quant import QuantConfig, QuantLinear, quantized_skeleton
    from qavatar.quant.api import linear_names

    with torch.device("meta"):
        model = build_model(cfg, tp)
    if precision != "bf16":
        qc = QuantConfig(precision)
        quantized_skeleton(model, qc, {f"{n}.weight_scale": (1,) for n in linear_names(model) if qc.targets(n)},
                           dtype)
    keep = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for b in ("weight", "weight_scale")}
    g = torch.Generator(device=device).manual_seed(seed * 1000 + tp.rank)
    state = {}
    for key, meta in model.state_dict().items():
        if stage is not None and not stage_holds(cfg, key, *stage):
            continue
        state[key] = _random_tensor(key, meta, dtype if key not in keep else meta.dtype, device, g, cfg.dim)
    model.load_state_dict(state, assign=True, strict=stage is None)
    return model.eval()


def _random_tensor(key: str, meta: torch.Tensor, dtype: torch.dtype, device: str, g: torch.Generator,
                   dim: int) -> torch.Tensor:
    shape = tuple(meta.shape)
    if key.endswith(".weight_scale"):
        return torch.full(shape, 1.0, dtype=torch.float32, device=device)  # set with the weight below
    t = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16 if dtype.itemsize == 1 else dtype)
    if dtype.itemsize == 1:  # 8-bit weight codes spread over the range; the scale above makes them ~N(0,1)*64
        return (t * 64).clamp(-127, 127).to(dtype)
    if "modulation" in key:
        return t.div_(dim ** 0.5)
    if len(shape) >= 2:
        return t.div_(math.sqrt(math.prod(shape[1:])))
    if ".norm" in key and key.endswith("weight"):
        return t.mul_(0.1).add_(1)
    return t.mul_(0.1)


def _fix_scales(model) -> None:
    """8-bit weight codes ~N(0, 64): scale them to N(0,1)/sqrt(fan_in), as a real checkpoint's layer would be."""
    from qavatar.quant import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear) and not m.weight.is_meta:
            m.weight_scale.fill_(1 / (64 * math.sqrt(m.in_features * (m.tp.size if m.row_parallel else 1))))


def emulate_rank(rank: int, spec: dict) -> dict:
    """One emulated rank: join the gloo group, measure its CUDA context, cap its allocator, build its slice of the
    model, stream the sink prefill and the blocks, report memory against the plan."""
    import torch.distributed as dist

    from qavatar.model import PRESETS
    from qavatar.model.kv_quant import kv_storage_dtype
    from qavatar.model.streaming import StreamingSession, flow_match_schedule
    from qavatar.parallel.launch import init_tp
    from qavatar.parallel.pipeline import PipelineStage, init_pipeline, schedule_for
    from qavatar.parallel.plan import PlanRequest, make_plan
    from qavatar.parallel.stages import stage_layers
    from qavatar.parallel.stream import random_inputs

    cfg = PRESETS[spec["preset"]]
    tp_size, pp, cuda = spec["tp"], spec["pp"], spec["device"] == "cuda"
    h, w = spec["size"]
    latent_hw = (h // 8, w // 8)
    os.environ["LOCAL_RANK"] = "0"  # every rank on the one GPU
    # the group forms on the CPU side first (gloo), so the CUDA context can be measured rank by rank
    if pp > 1:
        pipe = init_pipeline(pp, tp_size, stage_layers(cfg, pp, latent_hw), "cpu", spec["timeout"], backend="gloo")
        pipe = dataclasses.replace(pipe, tp=_staged(pipe.tp))
        tp = pipe.tp
    else:
        pipe, tp = None, _staged(init_tp(tp_size, "cpu", spec["timeout"], backend="gloo"))
    world = tp_size * pp
    out = {"rank": rank, "context_bytes": None, "cap_fraction": None}
    if cuda:
        for r in range(world):  # one rank at a time, so nvidia-smi's difference is this rank's context
            dist.barrier()
            if r == rank:
                before = _smi_used_bytes()
                torch.cuda.set_device(0)
                torch.zeros(1, device="cuda")
                torch.cuda.synchronize()
                after = _smi_used_bytes()
                if before is not None and after is not None:
                    out["context_bytes"] = after - before - torch.cuda.memory_reserved()
        dist.barrier()
        total = torch.cuda.get_device_properties(0).total_memory
        out["cap_fraction"] = memory_fraction(spec["card_bytes"], total, out["context_bytes"] or 0)
        torch.cuda.set_per_process_memory_fraction(out["cap_fraction"], 0)
    else:  # dry run: the cap is computed for an H200, the call itself needs CUDA
        out["cap_fraction"] = memory_fraction(spec["card_bytes"], 141 * 10 ** 9, 0)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    stage = (pipe.layers, pipe.first, pipe.last) if pipe else None
    t = time.perf_counter()
    model = random_rank_model(cfg, tp, spec["precision"], device, dtype, stage, seed=pipe.stage if pipe else 0)
    _fix_scales(model)
    out["build_seconds"] = time.perf_counter() - t
    if cuda:
        torch.cuda.synchronize()
        out["weights_allocated"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    context, inputs = random_inputs(cfg, latent_hw, spec["blocks"], seed=0)
    timesteps, sigmas = flow_match_schedule(spec["steps"])
    kv_dtype = kv_storage_dtype(spec["kv_dtype"])
    t = time.perf_counter()
    with torch.no_grad():
        if pipe is None:
            session = StreamingSession(model, context.to(device), *(x.to(device) for x in inputs.condition(0, None)),
                                       timesteps, sigmas, seed=0, kv_dtype=kv_dtype)  # the sink prefill
            session.next_frame = cfg.clip_latent_frames  # the rolling window full: the largest attention
            for b in range(spec["blocks"]):
                session.denoise_block(inputs.noise(b).to(device), inputs.audio(b).to(device))
            out["cache_bytes"] = session.cache_bytes()
        else:
            runner = PipelineStage(model, pipe, latent_hw, timesteps, sigmas, 0, kv_dtype=kv_dtype)
            ctx = runner.share_context(context.to(device) if pipe.first else None)
            runner.run(schedule_for(cfg, spec["blocks"], spec["steps"], pp, roll_sink=False), ctx,
                       inputs if pipe.first else None, lambda b, lat: None, t0=0.0)
            out["cache_bytes"] = runner.cache_bytes()
    if cuda:
        torch.cuda.synchronize()
        out["max_allocated"] = torch.cuda.max_memory_allocated()
        out["max_reserved"] = torch.cuda.max_memory_reserved()
    out["stream_seconds"] = time.perf_counter() - t
    plan = make_plan(PlanRequest(cfg, gpus=world, vram=spec["card_bytes"], precision=spec["precision"],
                                 size=(h, w), kv_dtype=spec["kv_dtype"] if cuda else "fp32" if spec["kv_dtype"] == "bf16"
                                 else spec["kv_dtype"], compute_dtype="bf16" if cuda else "fp32", vae="cpu", pp=pp))
    b = plan.ranks[rank].breakdown
    out["plan"] = {k: v for k, v in b.items() if v}
    out["plan_without_reserve"] = sum(v for k, v in b.items() if k != "reserve")
    out["plan_total"] = sum(b.values())
    out["plan_fits"] = plan.fits
    return out


def run_emulation(name: str, args) -> dict:
    from qavatar.parallel.launch import spawn_ranks

    ranks, card = parse_emulate(args.emulate)
    tp, pp, kv = {"emulate-tp4": (ranks, 1, "bf16"), "emulate-pp4": (1, ranks, "bf16"),
                  "emulate-tp2-kvfp8": (2, 1, "fp8")}[name]
    cuda = not args.dry_run
    spec = {"preset": "tiny" if args.dry_run else "liveavatar-14b", "tp": tp, "pp": pp, "kv_dtype": kv,
            "precision": "fp8", "device": "cuda" if cuda else "cpu", "card_bytes": card,
            "size": (128, 64) if args.dry_run else (704, 384), "blocks": 2, "steps": 4 if cuda else 2,
            "timeout": 60 if args.dry_run else 240}
    reports = spawn_ranks(emulate_rank, tp * pp, args=(spec,), timeout_s=spec["timeout"],
                          start_method="fork" if not cuda else "spawn")
    for r in reports:
        r["fits_card"] = (r["max_reserved"] + (r["context_bytes"] or 0) <= card) if cuda else None
    return {"spec": spec, "ranks": reports}


# ---------------------------------------------------------------------------- attention
def _sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum().clamp(min=1e-30)))


def segment_attention_check(device: str = "cuda", dry_run: bool = False) -> list[dict]:
    """model/segment_attention.py's kernels (CUDA: flash for bf16/fp16, memory-efficient for fp32) against one
    SDPA over [window | sink]. Shapes: a TP=2 rank of the 14B at 704x384 (20 heads of 128; 3168 queries, a
    12672-token window, a 2640-token sink), or small ones on a dry run."""
    from qavatar.model.segment_attention import attend_two, sdpa

    heads, d, lq, w, sink = (2, 16, 24, 96, 40) if dry_run else (20, 128, 3168, 12672, 2640)
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda n: torch.randn(1, n, heads, d, generator=g, device=device)  # noqa: E731
    q, kw, vw, ks, vs = rnd(lq), rnd(w), rnd(w), rnd(sink) * 1.5, rnd(sink)
    ref32 = sdpa(q, torch.cat([kw, ks], 1), torch.cat([vw, vs], 1))
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a = [t.to(dtype) for t in (q, kw, vw, ks, vs)]
        got = attend_two(*a).float()
        want = sdpa(a[0], torch.cat([a[1], a[3]], 1), torch.cat([a[2], a[4]], 1)).float()
        rows.append({"dtype": str(dtype).removeprefix("torch."), "max_abs_vs_concat": float((got - want).abs().max()),
                     "sqnr_vs_fp32_db": _sqnr_db(got, ref32), "concat_sqnr_vs_fp32_db": _sqnr_db(want, ref32)})
    return rows


# ---------------------------------------------------------------------------- infer
def infer_check(device: str = "cuda", size: Optional[str] = "704*384", clips: int = 2,
                precisions: tuple[str, ...] = ("bf16", "fp8"), steps: int = 4) -> list[dict]:
    from qavatar.checkpoint.toy import make_toy_checkpoint
    from qavatar.pipeline.infer import InferRequest, infer
    from qavatar.pipeline.video_writer import probe

    root = Path(tempfile.mkdtemp(prefix="qavatar-gpu-"))
    ckpt = make_toy_checkpoint(root / "toy")
    bundled = Path(__file__).resolve().parents[1] / "calibration" / "bundled"
    rows = []
    for precision in precisions:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = root / f"{precision}.mp4"
        res = infer(InferRequest(str(ckpt), str(bundled / "images" / "p00.png"), str(bundled / "audio" / "p00.wav"),
                                 "a woman talking", str(out), precision=precision, size=size, num_clip=clips,
                                 sample_steps=steps, device=device, quiet=True))[-1]
        info = probe(out)
        rows.append({"precision": precision, "frames": info["frames"], "size": [info["height"], info["width"]],
                     "audio_s": info["audio_seconds"], "seconds": res.seconds, "clip_seconds": res.clip_seconds,
                     "peak_gpu_bytes": res.peak_gpu_bytes})
    return rows


# ---------------------------------------------------------------------------- stages
def run_stage(name: str, args) -> dict:
    if name == "attention":
        return {"rows": segment_attention_check("cpu" if args.dry_run else "cuda", args.dry_run)}
    if name == "bench":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_dit

        if args.dry_run:  # eager rows on the reduced CPU shapes (the compiled rows: tests/test_bench_dit.py)
            return bench_dit.run("cpu", bench_dit.TINY, iters=1, compiled=False, say=lambda m: None)
        return bench_dit.run("cuda", iters=args.iters, say=lambda m: print(m, flush=True))
    if name.startswith("emulate-"):
        return run_emulation(name, args)
    if name == "infer":
        if args.dry_run:
            return {"rows": infer_check("cpu", None, clips=1, precisions=("fp8",), steps=1)}
        return {"rows": infer_check()}
    raise ConfigError(f"unknown stage {name!r}")


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "date_utc": time.strftime("%Y-%m-%d %H:%M",
                                                                                              time.gmtime())}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = list(torch.cuda.get_device_capability())
        env["memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            env["driver"] = None
    else:
        env["device"] = "cpu (dry run)"
    return env


def _gib(v) -> str:
    return "n/a" if v is None else f"{v / GiB:.2f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_check {'(dry run, CPU, tiny shapes)' if report['dry_run'] else ''}", "",
             f"{env['date_utc']} UTC, {env['device']}, torch {env['torch']}, CUDA {env.get('cuda')}, "
             f"driver {env.get('driver')}", "", "| stage | status | seconds |", "|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} |")
    for name, s in report["stages"].items():
        r = s.get("result")
        if s["status"] != "ok":
            lines += ["", f"## {name}: {s['status']}", "", "```", s.get("error", "")[-3000:], "```"]
        elif name == "bench":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import bench_dit

            lines += ["", "## bench", "", bench_dit.format_table(r)]
        elif name.startswith("emulate-"):
            sp = r["spec"]
            lines += ["", f"## {name}: {sp['preset']} TP={sp['tp']} PP={sp['pp']} {sp['precision']} weights, KV "
                          f"{sp['kv_dtype']}, {sp['size'][0]}x{sp['size'][1]}, card {_gib(sp['card_bytes'])} GiB", "",
                      "| rank | context GiB | cap fraction | weights GiB | max allocated GiB | max reserved GiB | "
                      "plan (no reserve) GiB | plan total GiB | fits card |", "|---|---|---|---|---|---|---|---|---|"]
            for k in r["ranks"]:
                lines.append(f"| {k['rank']} | {_gib(k['context_bytes'])} | {k['cap_fraction']:.4f} | "
                             f"{_gib(k.get('weights_allocated'))} | {_gib(k.get('max_allocated'))} | "
                             f"{_gib(k.get('max_reserved'))} | {_gib(k['plan_without_reserve'])} | "
                             f"{_gib(k['plan_total'])} | {k['fits_card']} |")
        elif name == "attention":
            lines += ["", "## attention: window and sink merged by log-sum-exp vs one SDPA over the concatenation", "",
                      "| dtype | max abs difference | SQNR vs fp32, merged | SQNR vs fp32, concatenated |",
                      "|---|---|---|---|"]
            for row in r["rows"]:
                lines.append(f"| {row['dtype']} | {row['max_abs_vs_concat']:.2e} | {row['sqnr_vs_fp32_db']:.1f} dB | "
                             f"{row['concat_sqnr_vs_fp32_db']:.1f} dB |")
        elif name == "infer":
            lines += ["", "## infer (toy checkpoint)", "", "| precision | frames | size | seconds | peak GPU GiB |",
                      "|---|---|---|---|---|"]
            for row in r["rows"]:
                lines.append(f"| {row['precision']} | {row['frames']} | {row['size'][0]}x{row['size'][1]} | "
                             f"{row['seconds']:.1f} | {_gib(row['peak_gpu_bytes'] or None)} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    ap.add_argument("--emulate", default="4x24GiB", help="RANKSxCARD for the emulate stages")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per bench row")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check every stage's plumbing")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every stage's timeout")
    ap.add_argument("--stage-worker", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = ap.parse_args(argv)
    try:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in stages if s not in STAGES]
        if bad or not stages:
            raise ConfigError(f"--stages {args.stages!r}: choose from {', '.join(STAGES)}")
        parse_emulate(args.emulate)
        if not args.dry_run and not torch.cuda.is_available():
            raise ConfigError("no CUDA device: run on a GPU, or --dry-run on the CPU")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage_worker:  # the child: one stage, its result as JSON
        result = run_stage(args.stage_worker, args)
        _write_atomic(args.out / f"stage-{args.stage_worker}.json", json.dumps(result, default=str))
        return 0
    report = {"dry_run": args.dry_run, "environment": environment(), "stages": {}}
    for name in stages:
        part = args.out / f"stage-{name}.json"
        part.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--out", str(args.out), "--stage-worker", name, "--emulate", args.emulate,
               "--iters", str(args.iters)] + (["--dry-run"] if args.dry_run else [])
        timeout = (DRY_RUN_TIMEOUT if args.dry_run else TIMEOUTS[name]) * args.timeout_scale
        print(f"gpu_check: {name} (timeout {timeout:.0f} s)", flush=True)
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            ok = proc.returncode == 0 and part.is_file()
            entry = {"status": "ok" if ok else "failed"}
            if not ok:
                entry["error"] = (proc.stdout[-2000:] + proc.stderr[-4000:]).strip()
        except subprocess.TimeoutExpired as e:
            entry = {"status": "timeout", "error": f"over {timeout:.0f} s\n" + (e.stderr or b"").decode()[-4000:]}
        entry["seconds"] = time.perf_counter() - t
        if entry["status"] == "ok":
            entry["result"] = json.loads(part.read_text())
            part.unlink()
        report["stages"][name] = entry
        print(f"gpu_check: {name} {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        _write_atomic(args.out / "gpu_check.json", json.dumps(report, indent=2, default=str))  # after every stage
    _write_atomic(args.out / "gpu_check.md", markdown(report))
    print(markdown(report))
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
