"""Cheap checks that run before any expensive step (encoders, calibration, loading): each failure is one line.

- the output: not there unless --overwrite, its directory writable (a real probe: read-only mounts and
  permissions both show), and, when the output's size is known, enough free space for it;
- the weights: every key and shape against the config, the LoRA's keys and shapes, the manifest's sizes,
  all from headers (seconds for 32 GB).
Leftovers of killed earlier runs writing the same output are removed here too (qavatar/leftovers.py).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import CheckpointError


class OutputError(CheckpointError):  # a CheckpointError, as atomic_directory's own refusal always was
    pass


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(directory: Path, what: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".qavatar-write-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {directory} ({e.strerror or e}); choose a writable location") \
            from None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_not_a_source(out: "str | Path", sources: dict) -> None:
    """OUT is none of the inputs (named by what they are), nor a folder holding one: replacing it would delete
    them."""
    target = Path(out).resolve()
    for what, path in sources.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if p == target or target in p.parents:
            raise OutputError(f"--out {out} {'is' if p == target else 'holds'} {what} ({p}); writing there would "
                              f"delete it: choose another output directory")


def check_distinct(paths: dict) -> None:
    """No output is also another output or an input (--out = --latents-out, or --out = --image with
    --overwrite, would silently replace one with the other)."""
    seen: dict = {}
    for flag, value in paths.items():
        if not value:
            continue
        p = Path(value).resolve()
        if p in seen:
            raise OutputError(f"{flag} and {seen[p]} are the same file ({p}); give the output its own name")
        seen[p] = flag


def check_output(out: "str | Path", overwrite: bool, flag: str = "--out", planned_bytes: Optional[int] = None,
                 kind: str = "file") -> Path:
    """Refuse an existing output without --overwrite, an unwritable directory, too little free space.
    kind 'file' needs the directory to exist; 'directory' creates missing parents later (checks the nearest
    existing one)."""
    from .leftovers import check_name_room, remove_stale

    out = Path(out).absolute()
    check_name_room(out, flag, OutputError)
    remove_stale(out)  # first: a killed run's replaced output is renamed back, and then counts as existing
    if out.exists() and not overwrite:
        raise OutputError(f"{flag} {out} already exists; choose another output or pass --overwrite")
    if kind == "file":
        if out.is_dir():
            raise OutputError(f"{flag} {out} is a directory; give a file name such as {out / 'out.mp4'}")
        if not out.parent.is_dir():
            raise OutputError(f"{flag} {out}: directory {out.parent} does not exist")
    where = out.parent if kind == "file" else _existing_ancestor(out.parent)
    if not where.is_dir():
        raise OutputError(f"{flag} {out}: {where} is not a directory")
    _probe_writable(where, f"{flag} {out}")
    if planned_bytes is not None:
        free = shutil.disk_usage(where).free
        if free < planned_bytes:
            raise OutputError(f"{flag} {out}: the output needs about {_human(planned_bytes)} but {where} has "
                              f"{_human(free)} free; free some space or choose another disk")
    return out


def check_weights(dit_dir: Path, lora: "str | Path | bool | None" = True) -> None:
    """Keys and shapes against the config (quantized or not), the LoRA against the weights, manifest sizes:
    headers only."""
    from .checkpoint.load import check_keys, model_shapes, open_weights

    from .checkpoint.reader import CheckpointReader

    reader = CheckpointReader(dit_dir)
    qc = (reader.config or {}).get("quantization_config")
    weights, cfg, _ = open_weights(dit_dir, False if qc is not None else lora)  # parses and validates the LoRA
    stored = {k: tuple(weights.shape(k)) for k in weights.keys()}
    check_keys(weights, model_shapes(cfg, quantization=qc, stored=stored), str(dit_dir))
    check_manifest_sizes(reader)


def check_manifest_sizes(reader) -> bool:
    """Every weight file and config.json has the size the manifest records (no hashing); False: no manifest."""
    from .checkpoint.writer import MANIFEST, verify_manifest

    if not reader.has_manifest:
        return False
    d = reader.directory
    names = [f.relative_to(d).as_posix() for f in reader.files if f.is_relative_to(d)]
    # sizes of the weights (hashed while they are read); config.json, 1 KB, hashed now: a changed num_heads keeps
    # the file's size and every tensor's shape
    problems = verify_manifest(d, hashes=False, only=names) + verify_manifest(d, hashes=True, only=["config.json"])
    if problems:
        raise CheckpointError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                              + f"; the checkpoint differs from its {MANIFEST}: re-download or re-create it")
    return True
