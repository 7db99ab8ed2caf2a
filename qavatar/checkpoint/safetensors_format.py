"""The safetensors file format, read and written tensor by tensor.

A file is: 8 bytes (little-endian u64) header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. Writing needs every tensor's dtype and shape up front (the header
comes first), so the writer takes a plan of TensorSpecs and then streams each tensor's bytes, hashing as it
goes: peak memory is one tensor, whatever the file size. Files round-trip through the safetensors library.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from ..errors import CheckpointError

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class HeaderEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


def read_header(path: Path) -> tuple[dict[str, HeaderEntry], dict[str, str], int]:
    """Parse and validate a safetensors header: (entries, metadata, data section start).

    Raises CheckpointError naming the file when it is truncated or not a safetensors file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, "
                                      f"file of {size}); re-download or re-create it")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); re-download or re-create it") from None
    if not isinstance(header, dict):  # valid JSON, but a list, a number or a string
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON {type(header).__name__}, not an object); "
                              f"re-download or re-create it")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings)")
    entries, data_end = {}, 0
    for name, e in header.items():
        try:
            dtype = CODE_DTYPES[e["dtype"]]
            begin, end = e["data_offsets"]
            shape = tuple(int(s) for s in e["shape"])
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or min(shape, default=0) < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name!r}") from None
        expect = TensorSpec(name, dtype, shape).nbytes
        if end - begin != expect:
            raise CheckpointError(f"{path}: tensor {name!r} {e['dtype']}{list(shape)} spans {end - begin} bytes, "
                                  f"expected {expect}")
        entries[name] = HeaderEntry(dtype, shape, begin, end)
        data_end = max(data_end, end)
    cursor = 0  # tensors lie back to back from the data section's start, as the safetensors library requires
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != cursor:
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} starts at byte {e.begin} of the data, "
                                  f"{'inside another tensor' if e.begin < cursor else 'after a gap'} (expected "
                                  f"{cursor}); re-download or re-create it")
        cursor = e.end
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + n + data_end}); "
                              f"re-download or re-create it")
    return entries, metadata, 8 + n


class SafetensorsWriter:
    """Writes one safetensors file from a plan, streaming tensor bytes and hashing them."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: Optional[dict[str, str]] = None):
        self.path, self.specs = Path(path), list(specs)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for s in self.specs:
            if s.dtype not in DTYPE_CODES:
                raise CheckpointError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors")
            header[s.name] = {"dtype": DTYPE_CODES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.sha256 = hashlib.sha256()
        self.bytes_written = 0
        self._next = 0
        self._f: Optional[BinaryIO] = open(self.path, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data) -> None:
        self._f.write(data)
        self.sha256.update(data)
        self.bytes_written += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise CheckpointError(f"{self.path}: unexpected tensor {name!r} (all planned tensors written)")
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"{self.path}: expected {spec.name} {spec.dtype}{list(spec.shape)}, "
                                  f"got {name} {tensor.dtype}{list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._write(memoryview(data))
        self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self.specs)

    def close(self) -> None:
        if self._f is None:
            return
        if not self.done:
            missing = [s.name for s in self.specs[self._next:]]
            self._f.close()
            self._f = None
            raise CheckpointError(f"{self.path}: closed before writing {missing[:3]} ({len(missing)} tensors)")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
