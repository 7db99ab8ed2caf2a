"""Reading (sharded) safetensors checkpoints lazily: one tensor, a set of keys, or a slice of a tensor.

Nothing is loaded at open time except the headers, which are validated (missing shards, truncated files,
keys the index promises but a shard lacks). Tensors are read with positioned file reads of exactly their
bytes (no mmap), so memory holds only what was asked for, a slice reads only its own bytes, and
`bytes_read` counts them (the tensor-parallel loader proves with it that a rank reads only its share).
"""
from __future__ import annotations

import json
from pathlib import Path
import math
from typing import BinaryIO, Iterable, Iterator, Optional

import torch

from ..errors import CheckpointError
from .safetensors_format import HeaderEntry, read_header
from .writer import MANIFEST, PARTIAL_MARK

INDEX_SUFFIX = ".safetensors.index.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")  # unsharded weights, by convention
SIDE_FILES = ("calibration_stats.safetensors",)  # written next to quantized weights, not weights themselves


class CheckpointReader:
    def __init__(self, path: "str | Path"):
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint file or directory")
        if PARTIAL_MARK in path.name:
            raise CheckpointError(f"{path}: an interrupted write left this incomplete directory; delete it and "
                                  f"run the command again")
        self.directory = path if path.is_dir() else path.parent
        self.index_path: Optional[Path] = None
        weight_map: Optional[dict[str, str]] = None
        if path.is_file():
            files = [path]
        else:
            indexes = sorted(path.glob("*" + INDEX_SUFFIX))
            if len(indexes) > 1:
                raise CheckpointError(f"{path}: several index files {[p.name for p in indexes]}; keep one")
            if indexes:
                self.index_path = indexes[0]
                try:
                    weight_map = json.loads(self.index_path.read_text())["weight_map"]
                    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                        raise TypeError
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    raise CheckpointError(f"{self.index_path}: not a valid safetensors index (no weight_map)") from None
                files = [path / name for name in dict.fromkeys(weight_map.values())]
                for f in files:
                    if not f.is_file():
                        held = [k for k, v in weight_map.items() if v == f.name]
                        raise CheckpointError(f"{f}: shard listed in {self.index_path.name} is missing (it holds "
                                              f"{held[0]!r} and {len(held) - 1} more tensors); re-download it")
            else:
                named = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
                files = named[:1] or sorted(p for p in path.glob("*.safetensors") if p.name not in SIDE_FILES)
                if not files:
                    raise CheckpointError(f"{path}: no .safetensors files")
                if len(files) > 1:
                    raise CheckpointError(f"{path}: {len(files)} .safetensors files but no {INDEX_SUFFIX}")
        self.files = files
        self.entries: dict[str, tuple[Path, HeaderEntry]] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self._data_start: dict[Path, int] = {}
        for f in files:
            entries, meta, start = read_header(f)
            self.metadata[f.name] = meta
            self._data_start[f] = start
            for key, e in sorted(entries.items(), key=lambda kv: kv[1].begin):  # file order: reads stream
                if weight_map is not None and weight_map.get(key) != f.name:
                    raise CheckpointError(f"{f}: holds {key!r}, which {self.index_path.name} "
                                          f"{'puts in ' + weight_map[key] if key in weight_map else 'does not list'}")
                if key in self.entries:
                    raise CheckpointError(f"{f}: tensor {key!r} is also in {self.entries[key][0].name}")
                self.entries[key] = (f, e)
        if weight_map is not None:
            lost = [k for k in weight_map if k not in self.entries]
            if lost:
                raise CheckpointError(f"{self.directory / weight_map[lost[0]]}: lacks {lost[0]!r} "
                                      f"(and {len(lost) - 1} more) promised by {self.index_path.name}")
        self._handles: dict[Path, BinaryIO] = {}
        self.bytes_read = 0
        self._hashes: dict[Path, "StreamHash"] = {}

    # -------------------------------------------------------------- metadata
    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def _entry(self, key: str) -> tuple[Path, HeaderEntry]:
        try:
            return self.entries[key]
        except KeyError:
            raise CheckpointError(f"{self.directory}: checkpoint has no tensor {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1].shape

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{key: shape} from the headers: what a quantized skeleton or a plan is built from."""
        return {k: self.shape(k) for k in self.keys()}

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[1].dtype

    def nbytes(self, key: str) -> int:
        e = self._entry(key)[1]
        return e.end - e.begin

    def file_of(self, key: str) -> Path:
        return self._entry(key)[0]

    @property
    def config(self) -> Optional[dict]:
        p = self.directory / "config.json"
        if not p.is_file():
            return None
        try:
            config = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{p}: a JSON {type(config).__name__}, not an object; re-download or re-create it")
        return config

    @property
    def has_manifest(self) -> bool:
        return (self.directory / MANIFEST).is_file()

    # -------------------------------------------------------------- manifest hashes, computed while reading
    def verify_while_reading(self) -> bool:
        """Hash every weight file as its tensors are read (in file order: no second pass) and raise as soon as
        a completely read file differs from the manifest. Sizes are checked now. False when there is no manifest."""
        from .integrity import StreamHash, manifest_hashes

        listed = manifest_hashes(self.directory)
        if listed is None:
            return False
        for f in self.files:
            rel = f.relative_to(self.directory).as_posix() if f.is_relative_to(self.directory) else f.name
            if rel not in listed:
                raise CheckpointError(f"{f}: not listed in {self.directory / MANIFEST}; the checkpoint was changed "
                                      f"after it was written")
            size = f.stat().st_size
            if size != listed[rel]["bytes"]:
                raise CheckpointError(f"{f}: {size} bytes, {MANIFEST} says {listed[rel]['bytes']}; re-download it")
            self._hashes[f] = StreamHash(f, listed[rel]["sha256"], size)
            with open(f, "rb") as fh:  # the header (read at open, before hashing started)
                self._hashes[f].feed(fh, 0, fh.read(self._data_start[f]))
        return True

    def unverified(self) -> list[Path]:
        """Files being hashed whose bytes were not all read (so not yet checked)."""
        return [f for f, h in self._hashes.items() if not h.done]

    def finish_verification(self) -> None:
        """Hash what was not read (none, after a full read in file order) and check every file."""
        for f, h in self._hashes.items():
            if not h.done:
                with open(f, "rb") as fh:
                    h.feed(fh, h.size, b"")  # hashes the gap up to the end, then compares

    @property
    def hash_extra_bytes(self) -> int:
        return sum(h.extra_bytes for h in self._hashes.values())

    # -------------------------------------------------------------- tensors
    def _read(self, f: Path, offset: int, buf: memoryview) -> None:
        if f not in self._handles:
            self._handles[f] = open(f, "rb")
        fh = self._handles[f]
        at = self._data_start[f] + offset
        fh.seek(at)
        if fh.readinto(buf) != len(buf):
            raise CheckpointError(f"{f}: truncated while reading (file changed on disk?)")
        self.bytes_read += len(buf)
        if f in self._hashes:
            self._hashes[f].feed(fh, at, buf)

    def get(self, key: str) -> torch.Tensor:
        f, e = self._entry(key)
        buf = bytearray(e.end - e.begin)
        if buf:
            self._read(f, e.begin, memoryview(buf))
        return _tensor(buf, e.dtype, e.shape)

    def get_slice(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) of `key` along `dim`, reading only those bytes."""
        f, e = self._entry(key)
        shape = e.shape
        if not (0 <= dim < len(shape)) or not (0 <= start <= stop <= shape[dim]):
            raise CheckpointError(f"{key}: slice [{start}:{stop}] outside dim {dim} of {list(shape)}")
        item = (e.end - e.begin) // max(1, math.prod(shape))
        outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
        chunk = (stop - start) * inner * item
        buf = bytearray(outer * chunk)
        view = memoryview(buf)
        for o in range(outer if chunk else 0):  # one contiguous run per outer index (one read for dim 0)
            self._read(f, e.begin + (o * shape[dim] + start) * inner * item, view[o * chunk:(o + 1) * chunk])
        return _tensor(buf, e.dtype, shape[:dim] + (stop - start,) + shape[dim + 1:])

    def iter_tensors(self, keys: Optional[Iterable[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        for k in (self.keys() if keys is None else keys):
            yield k, self.get(k)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensor(buf: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)
