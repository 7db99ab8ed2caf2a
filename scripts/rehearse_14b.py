"""Full-size rehearsal of the real 14B shapes on a CPU machine (a benchmark to run by hand, not a test).

    nice -n 10 python scripts/rehearse_14b.py [--workdir DIR] [--pairs 1] [--size 128*64]
                                              [--steps toy,int8,fp8] [--keep]

Steps, each in a fresh process so its peak RSS (from wait4) is its own:
    toy        qavatar toy-checkpoint W/ckpt --config liveavatar-14b --lora-rank 128: the real layout at full
               size (32.6 GB bf16 in 4 shards, a rank-128 LoRA), random weights, written tensor by tensor
    quantize   qavatar quantize at int8 / fp8, calibrated on --pairs bundled pairs at --size (small latents)
    inspect    qavatar inspect --verify on the output (headers, key check, sha256 of every file)
    rank0      rank 0 of TP=4 loaded from the quantized checkpoint (no collective is needed to load one), then
               the sink prefill and --blocks streaming blocks (4 DiT calls each) at --size. The collectives of the
               sharded layers are stood in for in-process (all-reduce keeps rank 0's partial sums,
               all-gather repeats its piece; same shapes and bytes), so the
               latents are not the model's, the shapes, bytes and time are rank 0's. Parameter, KV-cache
               and activation bytes are compared with `qavatar plan`'s for the same settings (CPU: fp32
               compute and KV cache).
    stage0     stage 0 of the pipeline layout (PP=4, TP=1: its layers and the embeddings) loaded from the
               quantized checkpoint, then its share of the sink prefill and of --blocks blocks' calls, with
               stages 1-3 stood in for (what it sends is counted and dropped, the flow it waits for comes back
               as zeros). Parameter, KV-cache and activation bytes against `qavatar plan --pp 4`.
    rank0-bf16 (--steps rank0-bf16) the same from the bf16 checkpoint quantized to int8 while loading (`infer
               --precision int8` on a bf16 checkpoint): no calibration, so much cheaper than `quantize`
Free disk space is checked first (the bf16 checkpoint and one quantized one at a time: about 52 GB); every
file written is removed at the end, also on failure, unless --keep. Prints a markdown table and writes the
figures as JSON next to the work directory (--json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEED_BYTES = 55 * 10**9  # 32.6 GB bf16 + 1.35 GB LoRA + ~17 GB quantized + toy encoders, with a margin


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_step(name: str, argv: list[str], log: Path) -> dict:
    """Run argv as a child; wall time, peak RSS (its own, via wait4), exit code, stdout lines."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    lines = log.read_text().splitlines()
    res = {"step": name, "seconds": wall, "peak_rss": usage.ru_maxrss * 1024, "rc": proc.returncode,
           "tail": lines[-3:]}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: rc {proc.returncode}, {wall:.0f} s, peak RSS "
          f"{res['peak_rss'] / 2**30:.2f} GiB", flush=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(lines[-15:]))
    return res


RANK0 = r"""
import json, sys, tempfile, time
import torch
from qavatar.checkpoint import CheckpointReader
from qavatar.model import PRESETS
from qavatar.model.streaming import StreamingSession, flow_match_schedule
from qavatar.parallel.group import TPGroup
from qavatar.parallel.load import load_rank
from qavatar.parallel.measure import AllocationTracker, held_bytes
from qavatar.parallel.plan import PlanRequest, make_plan

path, precision, size, preset = sys.argv[1], sys.argv[2], tuple(int(v) for v in sys.argv[3].split("*")), sys.argv[4]
RUNS_AS = {} if torch.cuda.is_available() else {"fp8": "fp8-wo"}  # what this device computes
at_load = sys.argv[5] == "at-load"


class StandIn(TPGroup):
    # the other three ranks, stood in for: all-reduce keeps rank 0's partial sums, all-gather repeats
    # rank 0's piece; the same shapes and bytes as the real collectives, no processes

    def all_reduce(self, x, op="sum"):
        return x

    def all_gather(self, x, dim):
        return torch.cat([x] * self.size, dim=dim)


group = StandIn(rank=0, size=4)
t = time.perf_counter()
if at_load:  # a bf16 checkpoint quantized while loading: row-parallel scales take a max over the ranks
    from qavatar.quant import QuantConfig
    loaded = load_rank(path, group, quantize=QuantConfig(precision))
else:
    loaded = load_rank(path, TPGroup(rank=0, size=4))  # a quantized checkpoint loads with no collective
load_s = time.perf_counter() - t
model = loaded.model
for m in model.modules():
    if hasattr(m, "tp"):
        m.tp = group
cfg = model.cfg
lh, lw = size[0] // 8, size[1] // 8
g = torch.Generator().manual_seed(0)
ref, motion = torch.randn(1, 16, 1, lh, lw, generator=g), torch.randn(1, 16, cfg.motion_frames[1], lh, lw, generator=g)
t = time.perf_counter()
s = StreamingSession(model, torch.randn(1, 12, cfg.text_dim, generator=g), ref, motion, *flow_match_schedule(), seed=0)
prefill_s = time.perf_counter() - t
noise = torch.randn(1, 16, cfg.num_frames_per_block, lh, lw, generator=g)
audio = torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 4 * cfg.num_frames_per_block, generator=g)
block_s, act = [], 0
for _ in range(int(sys.argv[6])):  # 4 blocks fill the rolling window (the planned steady state)
    tr = AllocationTracker()
    t = time.perf_counter()
    with tr:
        out = s.denoise_block(noise, audio)
    block_s.append(time.perf_counter() - t)
    act = max(act, tr.peak)
stored = None
if not at_load:
    reader = CheckpointReader(path)
    stored = reader.shapes()
plan = make_plan(PlanRequest(PRESETS[preset], gpus=4, precision=precision, size=size, compute_dtype="fp32",
                             kv_dtype="fp32", vae="cpu", stored=stored))
b = plan.ranks[0].breakdown
# the CPU runs fp8 weight-only (no fp8 matmul): its activations are fp8-wo's (each Linear's weight dequantized)
ran = make_plan(PlanRequest(PRESETS[preset], gpus=4, precision=RUNS_AS.get(precision, precision), size=size,
                            compute_dtype="fp32", kv_dtype="fp32", vae="cpu")).ranks[0].breakdown
gpu = make_plan(PlanRequest(PRESETS[preset], gpus=4, precision=precision, size=size, stored=stored))
print(json.dumps({"load_s": load_s, "prefill_s": prefill_s, "block_s": block_s, "bytes_read": loaded.bytes_read,
                  "finite": bool(torch.isfinite(out).all()),
                  "held": held_bytes(model), "kv": s.cache_bytes(), "act": act,
                  "plan_held": sum(v for k, v in b.items() if k.startswith(("weights", "scales", "params"))),
                  "plan_kv": b["kv_rolling"] + b["kv_sink"], "plan_act": ran["activations"],
                  "plan_rank_total": plan.ranks[0].peak, "gpu_plan_rank_total": gpu.ranks[0].peak}))
"""


STAGE0 = r"""
import json, sys, time
import torch
from qavatar.checkpoint import CheckpointReader
from qavatar.model import PRESETS
from qavatar.model.streaming import flow_match_schedule
from qavatar.parallel.group import TPGroup
from qavatar.parallel.load import load_rank
from qavatar.parallel.measure import AllocationTracker
from qavatar.parallel.pipeline import PipeGroup, PipelineStage, schedule_for
from qavatar.parallel.plan import PlanRequest, make_plan
from qavatar.parallel.stages import stage_layers
from qavatar.parallel.stream import random_inputs

# stage 0 of the pipeline layout (PP=4, TP=1) loaded from the quantized checkpoint: its layers, the embeddings
path, precision, size, preset, blocks = sys.argv[1], sys.argv[2], tuple(int(v) for v in sys.argv[3].split("*")), \
    sys.argv[4], int(sys.argv[5])
RUNS_AS = {} if torch.cuda.is_available() else {"fp8": "fp8-wo"}  # what this device computes
cfg = PRESETS[preset]
latent_hw = (size[0] // 8, size[1] // 8)
first = stage_layers(cfg, 4, latent_hw)[0]
t = time.perf_counter()
loaded = load_rank(path, TPGroup(), stage=(range(*first), True, False))
load_s = time.perf_counter() - t
held = sum(v.numel() * v.element_size() for v in loaded.model.state_dict().values() if not v.is_meta)


class Loopback:
    # stages 1-3 stood in for: what stage 0 sends is counted and dropped, the flow it waits for comes back as
    # zeros of the real shape (the sampler state is then not the model's; shapes, bytes and time are stage 0's)
    sent = 0

    def send(self, tensors, stage):
        self.sent += sum(t.numel() * t.element_size() for t in tensors)

    def recv(self, specs, stage):
        return [torch.zeros(shape, dtype=dtype) for shape, dtype in specs]

    def flush(self):
        pass


group = PipeGroup(0, 4, TPGroup(), range(*first))
timesteps, sigmas = flow_match_schedule(4)
context, inputs = random_inputs(cfg, latent_hw, blocks, 0)
stage = PipelineStage(loaded.model, group, latent_hw, timesteps, sigmas, seed=0)
stage.link = Loopback()
tracker = AllocationTracker()
t = time.perf_counter()
with tracker:  # the sink prefill, then every call of `blocks` blocks through this stage's layers
    stage.run(schedule_for(cfg, blocks, 4, 4, roll_sink=True), stage.share_context(context), inputs)
run_s = time.perf_counter() - t
calls = [e.end - e.start for e in stage.trace if e.step >= 0]
reader = CheckpointReader(path)
stored = reader.shapes()
plan = make_plan(PlanRequest(cfg, gpus=4, pp=4, precision=precision, size=size, compute_dtype="fp32",
                             kv_dtype="fp32", vae="cpu", stored=stored))
b = plan.ranks[0].breakdown
ran = make_plan(PlanRequest(cfg, gpus=4, pp=4, precision=RUNS_AS.get(precision, precision), size=size,
                            compute_dtype="fp32", kv_dtype="fp32", vae="cpu")).ranks[0].breakdown
print(json.dumps({"layers": list(first), "load_s": load_s, "bytes_read": loaded.bytes_read, "held": held,
                  "plan_held": sum(v for k, v in b.items() if k.startswith(("weights", "scales", "params"))),
                  "kv": stage.cache_bytes(), "plan_kv": b["kv_rolling"] + b["kv_sink"],
                  # the run's peak less the sink it fills (held to the end): a call's activations, the text
                  # context and audio tokens it holds throughout, the hand-off messages
                  "act": tracker.peak - stage.sink.nbytes(),
                  "plan_act": ran["activations"] + ran["session_tensors"] + ran["pipeline_buffers"],
                  "run_s": run_s, "call_s": calls, "sent": stage.link.sent}))
"""


def sqnr_range(report: Path) -> dict:
    layers = json.loads(report.read_text())["layers"]
    dbs = sorted((max(l["sqnr_db"].values()), l["layer"]) for l in layers if l.get("sqnr_db") and l["quantized"])
    return {"layers": len(dbs), "min_db": dbs[0][0], "min_layer": dbs[0][1], "median_db": dbs[len(dbs) // 2][0],
            "max_db": dbs[-1][0], "max_layer": dbs[-1][1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="Where to write (default: a new temp dir).")
    ap.add_argument("--pairs", type=int, default=1, help="Calibration pairs.")
    ap.add_argument("--size", default="128*64", help="Calibration and streaming video size H*W.")
    ap.add_argument("--steps", default="toy,int8,fp8", help="toy and/or int8, fp8 (each: quantize, inspect, rank 0 of TP=4, stage 0 of PP=4).")
    ap.add_argument("--config", default="liveavatar-14b", help="Preset (tiny: a dry run of the script).")
    ap.add_argument("--blocks", type=int, default=1, help="Streaming blocks of the rank-0 step (4 fill the window).")
    ap.add_argument("--keep", action="store_true", help="Leave the checkpoints on disk.")
    ap.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    args = ap.parse_args()
    steps = args.steps.split(",")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="qavatar-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < NEED_BYTES and "toy" in steps and args.config == "liveavatar-14b":
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, the rehearsal needs about {NEED_BYTES / 1e9:.0f} GB")
    py = [sys.executable]
    cli = py + ["-m", "qavatar.cli"]
    ckpt = work / "ckpt"
    results: list[dict] = []
    try:
        if "toy" in steps:
            r = run_step("toy-checkpoint", cli + ["toy-checkpoint", str(ckpt), "--config", args.config,
                                                  "--lora-rank", "128", "--overwrite"], work / "toy.log")
            r["bytes"] = _dir_bytes(ckpt)
            r["dit_bytes"] = sum(p.stat().st_size for p in (ckpt / "Wan2.2-S2V-14B").glob("*.safetensors"))
            r["lora_bytes"] = (ckpt / "LiveAvatar" / "liveavatar.safetensors").stat().st_size
            r["shards"] = len(list((ckpt / "Wan2.2-S2V-14B").glob("diffusion_pytorch_model-*.safetensors")))
            results.append(r)
        for precision in (p for p in ("int8", "fp8") if p in steps):  # quantize, inspect, rank 0
            out = work / precision
            r = run_step(f"quantize {precision}", cli + ["quantize", str(ckpt), "--precision", precision, "--out",
                                                         str(out), "--max-pairs", str(args.pairs), "--size", args.size,
                                                         "--overwrite"], work / f"quantize-{precision}.log")
            r["bytes"] = _dir_bytes(out)
            r["sqnr"] = sqnr_range(out / "quantization_report.json")
            results.append(r)
            r = run_step(f"inspect --verify {precision}", cli + ["inspect", str(out), "--verify"],
                         work / f"inspect-{precision}.log")
            r["bytes"] = _dir_bytes(out)
            results.append(r)
            r = run_step(f"rank 0 of TP=4 {precision}", py + ["-c", RANK0, str(out), precision, args.size, args.config, "stored", str(args.blocks)],
                         work / f"rank0-{precision}.log")
            r.update(json.loads(r["tail"][-1]))
            results.append(r)
            r = run_step(f"stage 0 of PP=4 {precision}", py + ["-c", STAGE0, str(out), precision, args.size, args.config, str(args.blocks)],
                         work / f"stage0-{precision}.log")
            r.update(json.loads(r["tail"][-1]))
            results.append(r)
            if not args.keep:
                shutil.rmtree(out)  # one quantized checkpoint on disk at a time
        if "rank0-bf16" in steps:
            r = run_step("rank 0 of TP=4, bf16 quantized to int8 at load",
                         py + ["-c", RANK0, str(ckpt), "int8", args.size, args.config, "at-load", str(args.blocks)], work / "rank0-bf16.log")
            r.update(json.loads(r["tail"][-1]))
            results.append(r)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            for p in work.parent.glob(f".{work.name}*partial*"):
                shutil.rmtree(p, ignore_errors=True)
        print(json.dumps(results, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print("\n| step | time | peak RSS | bytes | planned vs measured |\n|---|---|---|---|---|")
    for r in results:
        extra = ""
        if "sqnr" in r:
            s = r["sqnr"]
            extra = (f"{r['bytes'] / 1e6 / r['seconds']:.0f} MB/s written overall; layer SQNR {s['min_db']:.1f} "
                     f"({s['min_layer']}) .. {s['max_db']:.1f} dB, median {s['median_db']:.1f}")
        elif "layers" in r:
            extra = (f"layers {r['layers'][0]}-{r['layers'][1] - 1} and the embeddings: params+buffers "
                     f"{r['plan_held'] / 1e9:.3f} / {r['held'] / 1e9:.3f} GB, KV {r['plan_kv'] / 1e6:.1f} / "
                     f"{r['kv'] / 1e6:.1f} MB, activations {r['plan_act'] / 1e6:.1f} / {r['act'] / 1e6:.1f} MB; "
                     f"load {r['load_s']:.0f} s, {len(r['call_s'])} calls of {min(r['call_s']):.0f}-"
                     f"{max(r['call_s']):.0f} s")
        elif "plan_held" in r:
            extra = (f"params+buffers {r['plan_held'] / 1e9:.3f} / {r['held'] / 1e9:.3f} GB, KV {r['plan_kv'] / 1e6:.1f}"
                     f" / {r['kv'] / 1e6:.1f} MB, activations {r['plan_act'] / 1e6:.1f} / {r['act'] / 1e6:.1f} MB; "
                     f"load {r['load_s']:.0f} s, prefill {r['prefill_s']:.0f} s, blocks "
                     f"{', '.join(f'{b:.0f}' for b in r['block_s'])} s")
        elif "shards" in r:
            extra = f"{r['shards']} shards, {r['bytes'] / 1e6 / r['seconds']:.0f} MB/s"
        size = r.get("bytes") or r.get("bytes_read") or 0
        print(f"| {r['step']} | {r['seconds']:.0f} s | {r['peak_rss'] / 2**30:.2f} GiB | {size / 1e9:.2f} GB | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
