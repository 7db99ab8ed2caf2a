"""`qavatar push`: publish a complete qavatar checkpoint, with its model card, in one Hub commit.

The directory is checked first against its sha256 manifest and its config (a partial or damaged checkpoint
is refused). Everything goes up in a single commit, so a failure leaves the remote as it was, and
huggingface_hub's pre-upload negotiation skips large files the Hub already holds, so a retry sends only what
is missing. The token comes from huggingface_hub's usual sources (HF_TOKEN, the login cache) and is never
printed, logged or written.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..checkpoint import MANIFEST, CheckpointReader, check_keys, verify_manifest
from ..checkpoint.load import model_shapes
from ..checkpoint.writer import PARTIAL_MARK
from ..errors import CheckpointError, QavatarError, first_sentence
from ..model import from_wan_config
from .card import model_card


class PushError(QavatarError):
    pass


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    commit_oid: str
    files: list[str]
    card_generated: bool


def validate_for_upload(ckpt: "str | Path") -> list[str]:
    """Files to upload (relative paths); raises CheckpointError for anything partial or damaged."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory")
    if PARTIAL_MARK in ckpt.name:
        raise CheckpointError(f"{ckpt}: left by an interrupted write; it is not a complete checkpoint")
    if not (ckpt / MANIFEST).is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST}; only complete checkpoints written by qavatar are pushed "
                              f"(write one with `qavatar quantize`)")
    problems = verify_manifest(ckpt, hashes=True)
    if problems:
        raise CheckpointError(f"{ckpt}: does not match its manifest, refusing to upload: " + "; ".join(problems[:3]))
    reader = CheckpointReader(ckpt)
    raw = reader.config
    if raw is None:
        raise CheckpointError(f"{ckpt}: no config.json")
    if not raw.get("quantization_config"):  # the card, the tags and the usage all describe a quantized DiT
        raise CheckpointError(f"{ckpt}: a bf16 checkpoint; push publishes qavatar-quantized ones: run `qavatar "
                              f"quantize` on it and push the output")
    stored = reader.shapes()
    check_keys(reader, model_shapes(from_wan_config(raw), quantization=raw.get("quantization_config"), stored=stored),
               str(ckpt))
    import json

    listed = set(json.loads((ckpt / MANIFEST).read_text())["files"])
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    extra = sorted(on_disk - listed - {MANIFEST, "README.md"})
    if extra:
        raise CheckpointError(f"{ckpt}: files not in the manifest ({', '.join(extra[:3])}); remove them or re-create "
                              f"the checkpoint")
    return sorted(listed | {MANIFEST} | ({"README.md"} if (ckpt / "README.md").is_file() else set()))


def check_repo_id(repo_id: str) -> None:
    """huggingface_hub's own rule for repo ids, as a one-line PushError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PushError(f"--repo-id {repo_id!r} is not a Hub repo id: use ORG/NAME (or NAME for your own "
                        f"namespace) of letters, digits, '-', '_' and '.', at most 96 characters, not starting or "
                        f"ending with '-' or '.'") from None


def _transport_errors() -> tuple[type, ...]:
    """The HTTP client's connection-level errors (httpx2, httpx; requests' are OSErrors already), as loaded
    by huggingface_hub: which client it uses depends on its version."""
    found = []
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "TransportError"):
            found.append(module.TransportError)
    return tuple(found)


def push(ckpt: "str | Path", repo_id: str, private: bool = False, revision: Optional[str] = None,
         message: Optional[str] = None, log: Callable[[str], None] = print) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    ckpt = Path(ckpt)
    check_repo_id(repo_id)  # before hashing gigabytes
    files = validate_for_upload(ckpt)
    card_generated = "README.md" not in files
    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(ckpt / f)) for f in files]
    if card_generated:  # generated in memory: the checkpoint directory is not touched
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card(ckpt, repo_id).encode()))
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now, not at huggingface_hub's import
    branch = revision or "main"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        total = sum((ckpt / f).stat().st_size for f in files)
        log(f"uploading {len(ops)} files ({total / 1e9:.2f} GB) to {repo_id}@{branch} in one commit")
        info = api.create_commit(repo_id, operations=ops, revision=branch,
                                 commit_message=message or f"Upload qavatar checkpoint ({ckpt.name})")
    except _transport_errors() as e:  # no answer at all: DNS, refused connection, timeout, TLS
        raise PushError(f"upload to {repo_id} failed: cannot reach the Hub at {api.endpoint} ({first_sentence(e)}); "
                        f"the remote is unchanged: check the network (or HF_ENDPOINT) and run the same command "
                        f"again") from None
    except (HfHubHTTPError, RuntimeError, OSError) as e:  # huggingface_hub wraps LFS failures in RuntimeError
        cause = e.__cause__ or e  # the server's reason and URL; huggingface_hub never puts the token in them
        raise PushError(f"upload to {repo_id} failed, the remote is unchanged (one commit or nothing); run the same "
                        f"command again to resume, files already on the Hub are not sent again: "
                        f"{str(cause).splitlines()[0]}") from None
    return PushResult(repo_id, branch, info.commit_url, info.oid,
                      [op.path_in_repo for op in ops], card_generated)
