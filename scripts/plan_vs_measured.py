"""The planner against measurement on CPU: tensor-parallel ranks of a toy checkpoint, weights and KV cache
in the chosen precisions, each compared with `qavatar plan` for the same settings.

Each rank loads its slices, streams until the rolling window is full, and reports its parameter and buffer
bytes, its KV-cache bytes and the peak of the tensors allocated during a block (AllocationTracker). The
block peak is the least over the full-window blocks (5th on), as in tests/test_plan.py: gloo's worker
thread frees a collective's tensors a moment late on a busy machine, which inflates one block's peak.
    python scripts/plan_vs_measured.py [--size 256*128]                   # tiny: bf16/int8 weights, TP 1, 2, 4
    python scripts/plan_vs_measured.py --tp 2 --kv fp8 --precision bf16,fp8
    python scripts/plan_vs_measured.py --config liveavatar-14b --layers 2 --size 128*64 --tp 2 --kv fp8 \\
        --precision fp8                                                   # 14B width, 2 layers (1 injector)
--layers keeps the first N blocks and the audio injectors among them (at least one: layer 0 injects in
both presets); the planner is given the same reduced config.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qavatar.checkpoint import CheckpointReader  # noqa: E402
from qavatar.checkpoint.load import find_dit_dir  # noqa: E402
from qavatar.checkpoint.toy import make_toy_checkpoint  # noqa: E402
from qavatar.model import ModelConfig, PRESETS  # noqa: E402
from qavatar.parallel.launch import init_tp, spawn_ranks  # noqa: E402
from qavatar.parallel.load import load_rank  # noqa: E402
from qavatar.parallel.measure import AllocationTracker, held_bytes  # noqa: E402
from qavatar.parallel.plan import PlanRequest, make_plan  # noqa: E402
from qavatar.quant import QuantConfig  # noqa: E402
from qavatar.quant.convert import quantize_checkpoint  # noqa: E402

KV = {"fp32": None, "fp8": torch.float8_e4m3fn, "int8": torch.int8}  # fp32: the compute dtype, no scales


def reduced_config(name: str, layers: int | None) -> ModelConfig:
    """A preset with only its first `layers` blocks and the audio injectors among them."""
    cfg = PRESETS[name]
    if layers is None:
        return cfg
    inject = tuple(i for i in cfg.audio_inject_layers if i < layers)
    return cfg.replace(num_layers=layers, audio_inject_layers=inject, name=f"{name}-{layers}layers")


def measure(rank: int, world: int, path: str, size: tuple[int, int], kv: str, blocks: int) -> dict:
    from qavatar.model.streaming import StreamingSession, flow_match_schedule

    tp = init_tp(world, timeout_s=600)
    model = load_rank(path, tp).model
    cfg = model.cfg
    lh, lw = size[0] // 8, size[1] // 8
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 16, 1, lh, lw, generator=g)
    motion = torch.randn(1, 16, cfg.motion_frames[1], lh, lw, generator=g)
    s = StreamingSession(model, torch.randn(1, 9, cfg.text_dim, generator=g), ref, motion, *flow_match_schedule(),
                         seed=0, kv_dtype=KV[kv])
    noise = torch.randn(1, 16, cfg.num_frames_per_block, lh, lw, generator=g)
    audio = torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 4 * cfg.num_frames_per_block, generator=g)
    full = cfg.clip_latent_frames // cfg.num_frames_per_block  # blocks before the window is full
    inside = [False]  # in a self-attention forward (the module's hooks set it)
    for block in model.blocks:
        if not block.self_attn.q.weight.is_meta:
            block.self_attn.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
            block.self_attn.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    peaks, attn = [], []
    for _ in range(max(blocks, full + 1)):
        tr = SelfAttentionTracker(inside)
        with tr:
            s.denoise_block(noise, audio)
        peaks.append(tr.peak)
        attn.append(tr.attention_peak)
    return {"held": held_bytes(model), "kv": s.cache_bytes(), "act": min(peaks[full:]), "attn": min(attn[full:]),
            "context": s.context.numel() * s.context.element_size()}


class SelfAttentionTracker(AllocationTracker):
    """Also the most bytes alive while a self-attention forward runs (what the block holds included)."""

    def __init__(self, inside: list) -> None:
        super().__init__()
        self.inside, self.attention_peak = inside, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.inside[0]:
            self.attention_peak = max(self.attention_peak, self.live)
        return out


# the planner's stages inside SelfAttention.forward (parallel/plan.py activation_bytes)
ATTENTION_STAGES = ("qk_projection", "qk_norm", "v_projection", "rope", "kv_concat", "sink_rope", "kv_quantize",
                    "kv_dequant", "attention", "o_projection")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256*128")
    ap.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="keep the first N blocks (default: all)")
    ap.add_argument("--tp", default="1,2,4", help="TP degrees, comma-separated")
    ap.add_argument("--precision", default="bf16,int8", help="weights: bf16 (run in fp32), int8, fp8, ...")
    ap.add_argument("--kv", default="fp32", help="KV caches: fp32 (the compute dtype), fp8, int8")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--workdir", default=None, help="where the toy checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("*"))
    cfg = reduced_config(args.config, args.layers)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t = time.perf_counter()
        toy = make_toy_checkpoint(Path(tmp) / "toy", config=cfg, seed=0, encoders=False)
        print(f"<!-- {cfg.name}: toy checkpoint in {time.perf_counter() - t:.0f} s -->", flush=True)
        print("| weights | KV | TP | parameters+buffers planned / measured | KV planned / measured | activations "
              "planned / measured | self-attention peak planned / measured | total planned / measured |\n"
              "|---|---|---|---|---|---|---|---|", flush=True)
        for name in args.precision.split(","):
            path = toy if name == "bf16" else quantize_checkpoint(toy, Path(tmp) / name, QuantConfig(name),
                                                                  calibration="none", log=lambda s: None).out
            stored = None
            if name != "bf16":
                reader = CheckpointReader(find_dit_dir(path))
                stored = reader.shapes()
            for kv in args.kv.split(","):
                for world in (int(w) for w in args.tp.split(",")):
                    t = time.perf_counter()
                    m = measure(0, 1, str(path), size, kv, args.blocks) if world == 1 else \
                        spawn_ranks(measure, world, args=(world, str(path), size, kv, args.blocks), timeout_s=3600)[0]
                    plan = make_plan(PlanRequest(cfg, gpus=world, precision=name, size=size, compute_dtype="fp32",
                                                 kv_dtype=kv, vae="cpu", stored=stored))
                    b = plan.ranks[0].breakdown
                    held = sum(v for k, v in b.items() if k.startswith(("weights", "scales", "params")))
                    kvb = b["kv_rolling"] + b["kv_sink"]
                    total_p = held + kvb + b["activations"] + b["session_tensors"]
                    total_m = m["held"] + m["kv"] + m["act"] + m["context"]
                    d = plan.activation_detail
                    attn = d["call_tensors"] + max(d.get(f"stage_{k}", 0) for k in ATTENTION_STAGES)
                    print(f"| {name} | {kv} | {world} | {held:,} / {m['held']:,} | {kvb:,} / {m['kv']:,} | "
                          f"{b['activations']:,} / {m['act']:,} ({(b['activations'] / m['act'] - 1) * 100:+.1f}%) | "
                          f"{attn:,} / {m['attn']:,} ({(attn / m['attn'] - 1) * 100:+.1f}%) | "
                          f"{total_p:,} / {total_m:,} ({(total_p / total_m - 1) * 100:+.1f}%) |", flush=True)
                    print(f"<!-- {time.perf_counter() - t:.0f} s; planned worst stage: "
                          f"{max((k for k in plan.activation_detail if k.startswith('stage_')), key=plan.activation_detail.get)} -->",
                          flush=True)


if __name__ == "__main__":
    main()
