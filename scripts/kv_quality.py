"""Quality of the 8-bit KV caches, measured: SQNR against a run with the compute-dtype cache.

    PYTHONPATH=. python scripts/kv_quality.py [--clips 4] [--markdown]

For each model (the reference fixture tests/fixtures/liveavatar-tiny, and the toy checkpoint `tiny`) and each
KV dtype, it streams the same seeded inputs (text, noise, audio, condition; the sink rolls after clip 0) twice:
once with the compute-dtype cache, once with the 8-bit one, and reports
  - per layer: SQNR of the self-attention output (o projection included) over every streaming call, the
    8-bit run against the reference run at the same call. Earlier layers' errors reach later layers through
    the residual stream, so this is what the layer sees in a real run, not an isolated error;
  - end to end: SQNR of the latents of clip 1 and of clip N (default 4): drift through the rolling cache
    and the rolled sink shows as a falling figure.
SQNR = 10 log10(sum ref^2 / sum (got - ref)^2), in dB. Compute is fp32 on the CPU (the default), or bf16.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LATENT_HW = (16, 8)
KV = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def sqnr(got: torch.Tensor, ref: torch.Tensor) -> float:
    noise = float((got.double() - ref.double()).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.double().pow(2).sum()) / noise)


def load_model(which: str, dtype: torch.dtype, workdir: Path):
    """The fixture's reference weights, or the toy checkpoint (built once in workdir)."""
    if which == "fixture":
        from qavatar.parity import Fixture

        return Fixture(REPO / "tests" / "fixtures" / "liveavatar-tiny").model().to(dtype)
    from qavatar.checkpoint.toy import make_toy_checkpoint
    from qavatar.parallel.group import SINGLE
    from qavatar.parallel.load import load_rank

    path = workdir / "toy"
    if not (path / ".kv_quality_done").exists():
        make_toy_checkpoint(path, "tiny", seed=0, overwrite=True)
        (path / ".kv_quality_done").touch()
    return load_rank(path, SINGLE, dtype=dtype).model


@torch.no_grad()
def stream(model, kv, clips: int, seed: int = 5) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Latents [1, C, F, h, w] of `clips` clips and every stream call's self-attention output, per layer."""
    from qavatar.model.streaming import StreamingSession, flow_match_schedule, stream_sequential
    from qavatar.parallel.stream import random_inputs

    cfg = model.cfg
    per_clip = cfg.clip_latent_frames // cfg.num_frames_per_block
    blocks = clips * per_clip
    context, inputs = random_inputs(cfg, LATENT_HW, blocks, seed)
    context = context.to(model.dtype)
    outs: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    streaming = [False]

    def hook(layer):
        def fn(module, args, out):
            if streaming[0]:
                outs[layer].append(out.float().clone())
        return fn

    handles = [b.self_attn.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    try:
        session = StreamingSession(model, context, *inputs.condition(0, None), *flow_match_schedule(), seed=seed,
                                   kv_dtype=kv)
        latents = []
        orig = session.denoise_block

        def denoise(*a, **k):  # only the streaming calls count (the sink prefills are compared via the latents)
            streaming[0] = True
            try:
                return orig(*a, **k)
            finally:
                streaming[0] = False

        session.denoise_block = denoise
        stream_sequential(session, blocks, inputs, lambda b, x: latents.append(x))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(latents, dim=2), outs


def measure(which: str, clips: int, dtype: torch.dtype, workdir: Path, kvs=("fp8", "int8")) -> dict:
    model = load_model(which, dtype, workdir)
    cfg = model.cfg
    frames = cfg.clip_latent_frames
    ref_lat, ref_outs = stream(model, None, clips)
    res = {"model": which, "compute": str(dtype).removeprefix("torch."), "clips": clips, "kv": {}}
    for name in kvs:
        lat, outs = stream(model, KV[name], clips)
        layers = [sqnr(torch.cat(o), torch.cat(r)) for o, r in zip(outs, ref_outs)]
        res["kv"][name] = {
            "attention_sqnr_db_per_layer": layers,
            "latent_sqnr_db_clip1": sqnr(lat[:, :, :frames], ref_lat[:, :, :frames]),
            f"latent_sqnr_db_clip{clips}": sqnr(lat[:, :, (clips - 1) * frames:], ref_lat[:, :, (clips - 1) * frames:]),
        }
    return res


def markdown(results: list[dict]) -> str:
    rows = ["| model | compute | KV | attention-output SQNR per layer (dB) | latents clip 1 (dB) | latents clip N (dB) |",
            "|---|---|---|---|---|---|"]
    for r in results:
        for name, m in r["kv"].items():
            per = ", ".join(f"{v:.1f}" for v in m["attention_sqnr_db_per_layer"])
            rows.append(f"| {r['model']} | {r['compute']} | {name} | {per} | {m['latent_sqnr_db_clip1']:.1f} | "
                        f"{m['latent_sqnr_db_clip' + str(r['clips'])]:.1f} (N={r['clips']}) |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--models", default="fixture,toy")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(m, args.clips, dtype, Path(tmp)) for m in args.models.split(",")]
    print(markdown(results) if args.markdown else json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
