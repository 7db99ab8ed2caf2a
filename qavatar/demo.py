"""The embedded demo: everything runs on a toy checkpoint with random weights, on the CPU, with no downloads.

1. write the toy checkpoint (real layout: DiT shards, LoRA, and tiny umT5, tokenizer, VAE and wav2vec2) and
   inspect it;
2. quantize it to fp8 with the bundled calibration set (LoRA merged first, the toy encoders feeding it);
3. plan liveavatar-14b on 4 x 24 GB GPUs;
4. run `infer` at TP=2 on the CPU with a bundled portrait and speech clip: sink prefill, blocks of 3 latent
   frames x 4 Euler steps, rolling KV caches and sink, streaming VAE decode, mp4 with the audio muxed in;
5. say where the video is.
The weights are random, so the video is noise with the right structure (size, frame rate, length, sound).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from .checkpoint import MANIFEST
from .checkpoint.inspect import format_report, inspect_checkpoint
from .checkpoint.toy import make_toy_checkpoint
from .model import PRESETS
from .parallel.plan import GiB, PlanRequest, format_plan, make_plan
from .preflight import OutputError
from .pipeline.components import missing_parts

TP = 2
BUNDLED = Path(__file__).resolve().parents[1] / "calibration" / "bundled"
PORTRAIT, SPEECH = BUNDLED / "images" / "p00.png", BUNDLED / "audio" / "p00.wav"
PROMPT = "A young woman with short hair talks to the camera in a bright studio, natural expression."


class _DemoRecord:
    """`.qavatar-demo.json` in the demo's folder: what the demo wrote there (size and mtime, so that a file the
    user put in its place since is not taken for the demo's) and the seed of the toy weights."""

    NAME = ".qavatar-demo.json"

    def __init__(self, work: Path):
        self.path = work / self.NAME
        try:
            self.data = json.loads(self.path.read_text())
            assert isinstance(self.data.get("outputs"), dict)
        except (OSError, ValueError, AssertionError, AttributeError):
            self.data = {"outputs": {}}

    @property
    def seed(self):
        return self.data.get("seed")

    @staticmethod
    def _stamp(path: Path) -> list:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def wrote(self, path: Path) -> bool:
        return self.data["outputs"].get(path.name) == self._stamp(path)

    def add(self, path: Path, seed: int) -> None:
        if path.name == "toy-checkpoint":
            self.data["seed"] = seed
        self.data["outputs"][path.name] = self._stamp(path)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


def run_demo(out: "str | Path" = "qavatar-demo/demo.mp4", seed: int = 0,
             print_fn: Callable[[str], None] = print, quiet: bool = False, overwrite: bool = False) -> Path:
    """Write the demo video to `out`; the toy checkpoints go next to it."""
    from .pipeline.infer import InferRequest, infer
    from .quant import QuantConfig
    from .quant.convert import quantize_checkpoint

    out = Path(out).absolute()
    if out.suffix.lower() != ".mp4":
        if out.suffix and not out.is_dir():
            raise OutputError(f"--out {out}: the demo writes an mp4; give NAME.mp4, or a directory")
        out = out / "demo.mp4"  # a directory was given
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    record = _DemoRecord(work)
    # the demo replaces only what an earlier demo wrote here: anything else is the user's, unless --overwrite
    for path in (out, work / "toy-checkpoint", work / "toy-checkpoint-fp8"):
        if path.exists() and not overwrite and not record.wrote(path):
            raise OutputError(f"{path} exists and was not written by an earlier `qavatar demo`; pass --overwrite "
                              f"to replace it, or choose another --out")
    t0 = time.perf_counter()
    ckpt = work / "toy-checkpoint"
    dit = ckpt / "Wan2.2-S2V-14B"
    if (dit / MANIFEST).is_file() and not missing_parts(dit) and record.seed == seed and record.wrote(ckpt):
        print_fn(f"[1/5] reusing the toy checkpoint {ckpt}")
    else:
        make_toy_checkpoint(ckpt, config="tiny", seed=seed, overwrite=ckpt.exists())
        record.add(ckpt, seed)
        print_fn(f"[1/5] wrote the toy checkpoint {ckpt} (random weights of seed {seed}, the real layout, with "
                 f"tiny umT5, tokenizer, VAE and wav2vec2)")
    print_fn(format_report(inspect_checkpoint(ckpt)))

    fp8 = work / "toy-checkpoint-fp8"
    t = time.perf_counter()
    summary = quantize_checkpoint(ckpt, fp8, QuantConfig("fp8"), max_pairs=4, overwrite=fp8.exists(),
                                  log=lambda s: None)
    record.add(fp8, seed)
    print_fn(f"[2/5] quantized to fp8 in {time.perf_counter() - t:.1f} s with the bundled calibration set: "
             f"{summary.layers_quantized} Linears fp8, layer SQNR min {summary.sqnr_min_db:.1f} dB, end-to-end "
             f"{', '.join(f'{v:.1f}' for v in summary.end_to_end_db)} dB per step -> {fp8}")

    plan = make_plan(PlanRequest(PRESETS["liveavatar-14b"], gpus=4, vram=24 * GiB, precision="fp8"))
    print_fn("[3/5] qavatar plan --gpus 4 --vram 24GiB --precision fp8 --size 704*384")
    print_fn(format_plan(plan))

    print_fn(f"[4/5] qavatar infer --checkpoint {fp8} --image {PORTRAIT.name} --audio {SPEECH.name} --tp {TP} "
             f"--device cpu --out {out}")
    t = time.perf_counter()
    results = infer(InferRequest(str(fp8), str(PORTRAIT), str(SPEECH), PROMPT, str(out), tp=TP, seed=seed,
                                 device="cpu", quiet=quiet, timeout_s=300, overwrite=out.exists()))
    record.add(out, seed)
    host = next(r for r in results if r.host)
    clips = ", ".join(f"{c:.1f}" for c in host.clip_seconds)
    print_fn(f"      {host.frames} frames ({host.frames / 25:.2f} s at 25 fps) in {time.perf_counter() - t:.1f} s "
             f"at TP={TP}: encoders {host.encode_seconds:.1f} s, per clip {clips} s; each rank read "
             f"{host.bytes_read / 1e6:.2f} MB of the checkpoint and holds {host.held_bytes / 1e6:.2f} MB of weights "
             f"and {host.cache_bytes / 1e6:.2f} MB of KV caches")
    print_fn(f"[5/5] wrote {out} in {time.perf_counter() - t0:.1f} s in all.")
    print_fn("The toy weights are RANDOM: the video is noise with the right structure (size, frame rate, length, "
             "sound in sync), not a face.")
    print_fn("With real weights (ckpt/Wan2.2-S2V-14B from Wan-AI/Wan2.2-S2V-14B, ckpt/LiveAvatar from "
             "Quark-Vision/Live-Avatar): `qavatar quantize ckpt/ --precision fp8 --out ckpt-fp8/`, then "
             "`qavatar infer --checkpoint ckpt-fp8/ --image face.jpg --audio speech.wav --tp 4 --out out.mp4`.")
    return out
