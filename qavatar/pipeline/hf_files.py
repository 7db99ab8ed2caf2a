"""Naming the broken file when a Hugging Face directory (wav2vec2, the umT5 tokenizer) fails to load.

transformers reports a bad directory with whatever its parser raised: a JSONDecodeError without a file name,
a TypeError from deep in a config class, a SafetensorError. After such a failure each file of the directory
is checked on its own (JSON files parse to an object, safetensors headers are sound), so the error can say
which file to replace.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, QavatarError, first_sentence


def bad_file(directory: Path) -> "tuple[Path, str] | None":
    """(file, what is wrong with it) for the first file of `directory` that is not sound, else None."""
    from ..checkpoint.safetensors_format import read_header

    for p in sorted(directory.iterdir()):
        if not p.is_file():
            continue
        if p.suffix == ".json":
            try:
                data = json.loads(p.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return p, f"not valid JSON ({first_sentence(e)})"
            except OSError as e:
                return p, f"unreadable ({e.strerror})"
            if not isinstance(data, dict):
                return p, f"a JSON {type(data).__name__} where an object belongs"
        elif p.suffix == ".safetensors":
            try:
                read_header(p)
            except QavatarError as e:
                return p, str(e).removeprefix(f"{p}: ")
    return None


def load_error(directory: Path, what: str, e: Exception) -> CheckpointError:
    """A CheckpointError for `what` (e.g. "wav2vec2") that failed to load from `directory`, naming the file."""
    found = bad_file(directory) if directory.is_dir() else None
    if found is not None:
        path, why = found
        return CheckpointError(f"{path}: cannot load the {what}: {why}; replace the file (re-download it)")
    return CheckpointError(f"{directory}: cannot load the {what} ({e.__class__.__name__}: {first_sentence(e)}); "
                           f"replace the directory (re-download it)")
