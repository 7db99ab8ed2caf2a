"""`--checkpoint ORG/NAME[@REVISION]`: fetch a published checkpoint into the standard Hugging Face cache.

snapshot_download honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and revisions, and fetches only the files
a command needs (plan reads config.json alone). Every downloaded file is then checked against the
checkpoint's sha256 manifest, so a corrupted download stops with a clear error instead of a broken model.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..checkpoint.writer import MANIFEST, verify_manifest
from ..errors import CheckpointError

_REPO = re.compile(r"^[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?$")
# what loading needs (not calibration_stats.safetensors, a record of the calibration that loading never reads)
# (a bf16 DiT needs its LoRA: fetched too when the repo holds it, where checkpoint.load.find_lora looks)
WEIGHTS = ["config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model.safetensors.index.json",
           MANIFEST, "quantization_report.json", "README.md", "liveavatar.safetensors",
           "LiveAvatar/liveavatar.safetensors"]


# the non-DiT parts of the Wan2.2-S2V-14B layout, for `infer --encoders ORG/NAME` (no DiT shards)
ENCODER_FILES = ["Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/*",
                 "wav2vec2-large-xlsr-53-english/*"]


def looks_like_repo(spec: str) -> bool:
    """ORG/NAME[@REVISION] that is not a local path."""
    return bool(_REPO.match(spec)) and not Path(spec.split("@")[0]).exists()


def _not_local(spec: str) -> str:
    """A path-like ORG/NAME (ckpt/Wan2.2-S2V-14B) is first a local path the user meant: say it is not here."""
    return f"no such local directory ({Path.cwd() / spec.split('@')[0]}), and as a Hub repo: "


def resolve_checkpoint(spec: "str | Path", files: str = "weights") -> Path:
    """A local path as it is; ORG/NAME[@REV] downloaded (files="weights", "config" or "encoders") and verified."""
    spec = str(spec)
    if not looks_like_repo(spec):
        return Path(spec)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    patterns = {"config": ["config.json"], "encoders": ENCODER_FILES + [MANIFEST]}.get(files, WEIGHTS)
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                      endpoint=os.environ.get("HF_ENDPOINT") or None))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{spec}: {_not_local(spec)}not in the local cache and the Hub is unreachable "
                              f"(HF_HUB_OFFLINE?)") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{spec}: {_not_local(spec)}download failed: {str(e).splitlines()[0]}") from None
    if files != "config":
        present = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        if files == "encoders" and MANIFEST not in present:
            return path  # an upstream repo (Wan-AI/Wan2.2-S2V-14B) carries no qavatar manifest
        if MANIFEST not in present:
            raise CheckpointError(f"{spec}: has no {MANIFEST}; not a checkpoint published by qavatar")
        problems = verify_manifest(path, hashes=True, only=[p for p in present if p != MANIFEST])
        if problems:
            raise CheckpointError(f"{spec}: the download does not match its manifest ({problems[0]}); delete it from "
                                  f"the cache (huggingface-cli delete-cache) and download again")
    return path
