"""Writing checkpoints so that nothing half-written ever looks complete.

`atomic_directory(out)` builds the output in a hidden sibling directory and renames it into place only when
everything (shards, index, config, and last the sha256 manifest) is written and fsynced. An existing
output is never touched unless overwrite=True, and even then it is only removed after the new one is in
place. An interrupted run leaves a `.NAME.partial-*` directory with no manifest, which readers refuse.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Optional

import torch

from .. import __version__
from ..errors import CheckpointError
from .safetensors_format import SafetensorsWriter, TensorSpec

MANIFEST = "qavatar-manifest.json"
PARTIAL_MARK = ".partial-"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(out: "str | Path", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block exits without an exception.

    The temporary (`.NAME.partial-PID-XXXX`) and the replaced output (`.NAME.old-PID-XXXX`) are removed on
    every exit, SIGTERM included; ones left by a killed earlier run are removed first (qavatar/leftovers.py)."""
    from ..leftovers import hidden_path, install_terminate_handler, remove, remove_stale

    out = Path(out).absolute()
    remove_stale(out)  # first: a killed run's replaced output is renamed back, and then counts as existing
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_path(out, "partial")
    restore = install_terminate_handler()
    old: Optional[Path] = None
    try:
        tmp.mkdir()
        yield tmp
        _fsync_dir(tmp)
        if out.exists() or out.is_symlink():
            old = hidden_path(out, "old")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                old = None
                raise
        else:
            tmp.rename(out)
        _fsync_dir(out.parent)
    finally:
        try:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                remove(old)  # a file or a directory
        finally:
            restore()


def atomic_write_bytes(path: "str | Path", data: bytes) -> None:
    """Write one file via a temporary sibling and os.replace."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_file_atomic(path: "str | Path", tensors: dict[str, torch.Tensor],
                     metadata: Optional[dict[str, str]] = None) -> str:
    """Write one safetensors file via a temporary sibling and os.replace; returns its sha256."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    try:
        writer = SafetensorsWriter(tmp, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                                   metadata)
        for k, v in tensors.items():
            writer.write(k, v)
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return writer.sha256.hexdigest()


def shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(specs: list[TensorSpec], max_shard_bytes: Optional[int] = None,
                num_shards: Optional[int] = None) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own),
    or into num_shards shards of about equal size."""
    total = sum(s.nbytes for s in specs)
    shards: list[list[TensorSpec]] = [[]]
    size = done = 0
    for s in specs:
        if shards[-1]:
            if num_shards is not None:
                cut = done >= total * len(shards) / num_shards and len(shards) < num_shards
            else:
                cut = size + s.nbytes > max_shard_bytes
            if cut:
                shards.append([])
                size = 0
        shards[-1].append(s)
        size += s.nbytes
        done += s.nbytes
    return shards


class ShardedWriter:
    """Streams planned tensors into `prefix-0000i-of-0000n.safetensors` shards plus the index json.

    Tensors must arrive in plan order. `finish()` writes the index and records every shard's sha256
    (computed while writing) for the manifest.
    """

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_bytes: int = 5 * 2**30,
                 prefix: str = "diffusion_pytorch_model", metadata: Optional[dict[str, str]] = None,
                 num_shards: Optional[int] = None):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise CheckpointError("duplicate tensor names in the checkpoint plan")
        self.directory, self.prefix, self.metadata = Path(directory), prefix, metadata
        self.plan = plan_shards(specs, max_shard_bytes, num_shards)
        self.files = [shard_name(prefix, i, len(self.plan)) for i in range(len(self.plan))]
        self.hashes: dict[str, str] = {}
        self._shard = -1
        self._writer: Optional[SafetensorsWriter] = None

    def _advance(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.hashes[self.files[self._shard]] = self._writer.sha256.hexdigest()
        self._shard += 1
        self._writer = SafetensorsWriter(self.directory / self.files[self._shard], self.plan[self._shard],
                                         self.metadata)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None or self._writer.done:
            if self._shard + 1 >= len(self.plan):
                raise CheckpointError(f"unexpected tensor {name!r}: every planned tensor is written")
            self._advance()
        self._writer.write(name, tensor)

    def finish(self) -> None:
        if self._writer is None:  # empty plan or nothing written yet
            self._advance()
        if self._shard + 1 != len(self.plan) or not self._writer.done:
            raise CheckpointError("checkpoint plan not fully written")
        self._writer.close()
        self.hashes[self.files[self._shard]] = self._writer.sha256.hexdigest()
        if len(self.plan) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for shard in self.plan for s in shard)},
                     "weight_map": {s.name: f for f, shard in zip(self.files, self.plan) for s in shard}}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, known_hashes: Optional[dict[str, str]] = None, **info) -> dict:
    """Record size and sha256 of every file under `directory` (written last: it marks a complete checkpoint)."""
    directory = Path(directory)
    known = dict(known_hashes or {})
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": known.get(rel) or sha256_file(p)}
    manifest = {"format": "qavatar-manifest/1", "qavatar_version": __version__, **info, "files": files}
    atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


def verify_manifest(directory: Path, hashes: bool = True, only: Optional[list[str]] = None) -> list[str]:
    """Problems found comparing the files to the manifest (empty when everything matches)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return [f"{directory}: no {MANIFEST} (incomplete or not written by qavatar)"]
    from .integrity import manifest_hashes

    try:
        files = manifest_hashes(directory)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for rel, info in files.items():
        if only is not None and rel not in only:
            continue
        p = directory / rel
        if not p.is_file():
            problems.append(f"{p}: missing (listed in {MANIFEST})")
        elif p.stat().st_size != info["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {info['bytes']}")
        elif hashes and sha256_file(p) != info["sha256"]:
            problems.append(f"{p}: sha256 differs from {MANIFEST} (corrupt download?)")
    return problems
