"""`--latents-out FILE`: the generated latents of a run, as one safetensors file.

    latents   float32 [B, C, F_total, H, W]: every block in order, concatenated along the frame axis
    metadata  seed, precision, tp, pp, kv_dtype, noise, size (pixel H*W), blocks, frames_per_block, sample_steps
              (strings)

The latents are what tensor parallelism keeps bit-identical (int8 all-reduces exact integer partial sums);
decoded frames also depend on the float kernels of the VAE and their thread count, so comparisons of runs
belong here. Written by the host rank only. Blocks go to their place in the file as they come (a
positional write per channel), so memory stays one block whatever the length; the file is built under a
hidden temporary name and renamed into place when the last block is in, never left half-written under FILE.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

import torch

from ..errors import QavatarError
from ..leftovers import check_name_room, hidden_path, remove_stale

KEY = "latents"


class LatentsOutError(QavatarError):
    pass


def check_latents_out(path: "str | Path | None", overwrite: bool = False) -> None:
    """Before anything expensive: the file's directory exists, the name is not a directory, and an existing
    file is replaced only with --overwrite (as for --out: a previous run's latents are evidence)."""
    if path is None:
        return
    p = Path(path)
    check_name_room(p, "--latents-out", LatentsOutError)
    remove_stale(p)  # what a killed run's writer left (a replaced file is renamed back)
    if p.is_dir():
        raise LatentsOutError(f"--latents-out {p} is a directory; give a file name such as {p / 'latents.safetensors'}")
    if not p.parent.is_dir():
        raise LatentsOutError(f"--latents-out {p}: directory {p.parent} does not exist")
    if p.exists() and not overwrite:
        raise LatentsOutError(f"--latents-out {p} already exists; pass --overwrite to replace it, or choose another name")


class LatentsWriter:
    """write(block) for each block in order along the frame axis, then close(); abort() on failure."""

    def __init__(self, path: "str | Path", shape: tuple[int, ...], metadata: dict):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)  # B, C, F_total, H, W
        b, c, f, h, w = self.shape
        nbytes = b * c * f * h * w * 4
        header = {"__metadata__": {k: str(v) for k, v in metadata.items()},
                  KEY: {"dtype": "F32", "shape": list(self.shape), "data_offsets": [0, nbytes]}}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.tmp = hidden_path(self.path, "partial")  # the name leftovers.remove_stale knows
        self._f = open(self.tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._data = 8 + len(raw)
        self._f.truncate(self._data + nbytes)
        self.frames = 0  # frames written so far

    def write(self, block: torch.Tensor) -> None:
        b, c, f, h, w = self.shape
        if block.dim() != 5 or (block.shape[0], block.shape[1], block.shape[3], block.shape[4]) != (b, c, h, w) \
                or self.frames + block.shape[2] > f:
            raise LatentsOutError(f"{self.path}: block of shape {list(block.shape)} does not fit {list(self.shape)} "
                                  f"after {self.frames} frames")
        fb = block.shape[2]
        data = block.detach().to("cpu", torch.float32).contiguous()
        for i in range(b):
            for j in range(c):  # the block's frames of one channel are contiguous in the [B, C, F, H, W] layout
                self._f.seek(self._data + (((i * c + j) * f) + self.frames) * h * w * 4)
                self._f.write(data[i, j].reshape(-1).numpy().tobytes())
        self.frames += fb

    def close(self) -> Path:
        if self.frames != self.shape[2]:
            self.abort()
            raise LatentsOutError(f"{self.path}: {self.frames} of {self.shape[2]} latent frames written; not saved")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def save_latents(path: "str | Path", latents: torch.Tensor, metadata: dict) -> Path:
    """The whole [B, C, F, H, W] tensor at once (qavatar.parallel.stream holds it anyway)."""
    w = LatentsWriter(path, tuple(latents.shape), metadata)
    try:
        w.write(latents)
        return w.close()
    except BaseException:
        w.abort()
        raise


def load_latents(path: "str | Path") -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(KEY), dict(f.metadata() or {})


def run_metadata(seed: int, precision: str, tp: int, size: str, blocks: int, frames_per_block: int,
                 sample_steps: int, **extra) -> dict:
    return dict(seed=seed, precision=precision, tp=tp, size=size, blocks=blocks, frames_per_block=frames_per_block,
                sample_steps=sample_steps, **extra)


def open_for_run(prep, tp: int) -> Optional[LatentsWriter]:
    """The writer for a `qavatar infer` run (host rank), or None without --latents-out."""
    req = prep.request
    if not req.latents_out:
        return None
    fpb = prep.cfg.num_frames_per_block
    h, w = prep.latent_hw
    meta = run_metadata(req.seed, prep.runtime_quant or prep.parts.precision, tp, f"{prep.height}*{prep.width}",
                        prep.blocks, fpb, req.sample_steps, pp=req.pp, kv_dtype=req.kv_dtype, noise=prep.noise)
    return LatentsWriter(req.latents_out, (1, prep.cfg.in_dim, prep.blocks * fpb, h, w), meta)


def save_stream_latents(path: "str | Path", latents: torch.Tensor, checkpoint: "str | Path", seed: int, tp: int,
                        size: str, blocks: int, pp: int = 1, kv_dtype: str = "bf16") -> Path:
    """`python -m qavatar.parallel.stream --latents-out FILE` (its host rank): the same file as infer's."""
    from ..checkpoint.load import find_dit_dir
    from ..checkpoint.reader import CheckpointReader
    from ..model.streaming import flow_match_schedule

    qc = (CheckpointReader(find_dit_dir(checkpoint)).config or {}).get("quantization_config") or {}
    precision = qc.get("qavatar", {}).get("scheme", {}).get("precision", "int8") if qc else "bf16"
    meta = run_metadata(seed, precision, tp, size, blocks, latents.shape[2] // max(blocks, 1),
                        len(flow_match_schedule()[0]), pp=pp, kv_dtype=kv_dtype,
                        inputs="seeded random (qavatar.parallel.stream)")
    return save_latents(path, latents, meta)
