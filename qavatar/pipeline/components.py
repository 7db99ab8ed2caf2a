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


def _recorded_source(dit: Path) -> Optional[Path]:
    report = dit / "quantization_report.json"
    try:
        src = json.loads(report.read_text()).get("source")
    except (OSError, json.JSONDecodeError):
        return None
    return Path(src) if src else None


def locate(checkpoint: "str | Path", encoders: "str | Path | None" = None) -> Components:
    from ..hub import resolve_checkpoint

    dit = find_dit_dir(resolve_checkpoint(checkpoint))
    qc = (CheckpointReader(dit).config or {}).get("quantization_config")
    candidates: list[Path] = []
    if encoders is not None:
        root = resolve_checkpoint(encoders, files="encoders")
        if not root.exists():
            raise CheckpointError(f"--encoders {encoders}: no such directory")
        candidates.append(root / DIT_DIRNAME if (root / DIT_DIRNAME).is_dir() else root)
    else:
        candidates += [dit, *filter(None, [_recorded_source(dit)]), dit.parent / DIT_DIRNAME]
    for root in candidates:
        if root.is_dir() and not missing_parts(root):
            return Components(dit, root, qc)
    first = candidates[0]
    raise CheckpointError(
        f"{first}: missing {', '.join(missing_parts(first))}. A quantized checkpoint holds only the DiT: pass "
        f"--encoders with the Wan2.2-S2V-14B directory (or --encoders Wan-AI/Wan2.2-S2V-14B to download only "
        f"the encoders, about 12 GB)")
