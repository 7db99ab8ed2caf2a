"""Finding the parts of a run: the DiT (maybe quantized) and the encoders (umT5, tokenizer, VAE, wav2vec2).

The encoders live in the Wan2.2-S2V-14B directory of the real layout. A quantized checkpoint holds only the
DiT, so its encoders are looked for, in order: `--encoders DIR|ORG/NAME`, the checkpoint directory itself,
the directory it was quantized from (recorded in quantization_report.json), the `ckpt/Wan2.2-S2V-14B`
sibling of the checkpoint. A missing part is named with the file it should be.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint.load import DIT_DIRNAME, find_dit_dir
from ..checkpoint.reader import CheckpointReader
from ..errors import CheckpointError
from .audio_encoder import WAV2VEC_DIR
from .text_encoder import T5_FILE, TOKENIZER_DIR
from .vae import VAE_FILE

PARTS = {"umT5 encoder": Path(T5_FILE), "umT5 tokenizer": TOKENIZER_DIR, "VAE": Path(VAE_FILE),
         "wav2vec2": Path(WAV2VEC_DIR) / "config.json"}


def missing_parts(root: Path) -> list[str]:
    return [f"{what} ({rel})" for what, rel in PARTS.items() if not (root / rel).exists()]


@dataclass
class Components:
    dit: Path  # the DiT directory (config.json + shards)
    encoders: Path  # the directory holding PARTS
    quantization: Optional[dict]  # the checkpoint's quantization_config, None for bf16

    @property
    def precision(self) -> str:
        if not self.quantization:
            return "bf16"
        return self.quantization.get("qavatar", {}).get("scheme", {}).get("precision", "int8")


_FP_CHUNK = 1 << 20


def _file_fingerprint(path: Path) -> str:
    """'SIZE:SHA256' of the whole file up to 2 MiB, else of its first and last MiB (cheap on 11 GB files)."""
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * _FP_CHUNK:
            h.update(f.read())
        else:
            h.update(f.read(_FP_CHUNK))
            f.seek(size - _FP_CHUNK)
            h.update(f.read(_FP_CHUNK))
    return f"{size}:{h.hexdigest()}"


def encoder_fingerprint(root: Path) -> dict[str, str]:
    """{relative file: 'SIZE:SHA256'} of every encoder file under root (umT5, tokenizer, VAE, wav2vec2): tells
    one set of encoders from another in milliseconds, without hashing 11 GB."""
    out = {}
    for rel in (Path(T5_FILE), TOKENIZER_DIR, Path(VAE_FILE), Path(WAV2VEC_DIR)):
        p = root / rel
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
        for q in files:
            out[q.relative_to(root).as_posix()] = _file_fingerprint(q)
    return out


def fingerprint_mismatch(root: Path, recorded: dict[str, str]) -> Optional[str]:
    """The first recorded encoder file that is missing or differs under root, None when all match."""
    for rel, fp in recorded.items():
        p = root / rel
        if not p.is_file() or _file_fingerprint(p) != fp:
            return rel
    return None


def _recorded_source(dit: Path) -> tuple[Optional[Path], dict[str, str]]:
    """The source directory quantization_report.json records, when absolute (a relative one, from an older
    qavatar, depends on where quantize ran and is not trusted), and its encoders' fingerprint."""
    report = dit / "quantization_report.json"
    try:
        data = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return None, {}
    src = data.get("source") if isinstance(data, dict) else None
    if not isinstance(src, str) or not Path(src).is_absolute():
        return None, {}
    fp = data.get("source_encoders")
    return Path(src), fp if isinstance(fp, dict) else {}


def locate(checkpoint: "str | Path", encoders: "str | Path | None" = None) -> Components:
    from ..hub import resolve_checkpoint

    dit = find_dit_dir(resolve_checkpoint(checkpoint))
    qc = (CheckpointReader(dit).config or {}).get("quantization_config")
    candidates: list[Path] = []
    recorded: dict[str, str] = {}
    if encoders is not None:
        root = resolve_checkpoint(encoders, files="encoders")
        if not root.exists():
            raise CheckpointError(f"--encoders {encoders}: no such directory")
        candidates.append(root / DIT_DIRNAME if (root / DIT_DIRNAME).is_dir() else root)
    else:
        source, recorded = _recorded_source(dit)
        candidates += [dit, *filter(None, [source]), dit.parent / DIT_DIRNAME]
    differs = []
    for root in candidates:
        if root.is_dir() and not missing_parts(root):
            bad = fingerprint_mismatch(root, recorded) if recorded and root != dit else None
            if bad is None:  # found, and (for a quantized checkpoint) the very encoders it was calibrated with
                return Components(dit, root, qc)
            differs.append(f"{root / bad}")
    first = candidates[0]
    if differs:
        raise CheckpointError(
            f"{dit / 'quantization_report.json'} records the encoders this checkpoint was quantized with, and "
            f"{differs[0]} is not one of them (changed or another download); pass --encoders with the "
            f"Wan2.2-S2V-14B directory to use")
    raise CheckpointError(
        f"{first}: missing {', '.join(missing_parts(first))}. A quantized checkpoint holds only the DiT: pass "
        f"--encoders with the Wan2.2-S2V-14B directory (or --encoders Wan-AI/Wan2.2-S2V-14B to download only "
        f"the encoders, about 12 GB)")
