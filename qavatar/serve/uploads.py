"""Uploaded media: a size limit, the type checked by content (Pillow for images, PyAV for audio, never the file
name), and a copy under the server's own temp dir with a name the server chose. Errors are the CLI's
(pipeline/media.py), with the user's file name in place of the server's path, in one line.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..pipeline.media import MediaError

MAX_UPLOAD_MB = 50


def _check_image(path: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return (im.format or "img").lower()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"{path}: not a readable image ({e.__class__.__name__})") from None


def _check_audio(path: Path) -> str:
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                raise MediaError(f"{path}: has no audio stream")
            return "audio"
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{path}: not a readable audio file ({e.__class__.__name__})") from None


def accept(upload: "str | Path | None", kind: str, job_dir: Path, max_mb: float = MAX_UPLOAD_MB) -> Path:
    """Copy an upload (a path Gradio gives) into job_dir as `image` or `audio`, after checking its size and its
    content. Raises MediaError naming the user's file."""
    if upload is None:
        raise MediaError(f"no {kind} given: upload a {'portrait image' if kind == 'image' else 'speech track'}")
    src = Path(upload)
    name = src.name
    if not src.is_file():
        raise MediaError(f"{name}: {kind} not found")
    size = src.stat().st_size
    if size > max_mb * 1e6:
        raise MediaError(f"{name}: {size / 1e6:.1f} MB is over this server's upload limit of {max_mb:g} MB")
    dst = Path(job_dir) / kind  # our name, in our dir: an upload's name never becomes a path
    shutil.copyfile(src, dst)
    try:
        (_check_image if kind == "image" else _check_audio)(dst)
    except MediaError as e:
        raise MediaError(user_message(e, dst, name)) from None
    return dst


def user_message(e: BaseException, path: Path, name: str) -> str:
    """The error with the server's copy's path replaced by the user's file name, one line."""
    return str(e).replace(str(path), name).splitlines()[0]


def sweep(root: Path, max_age_s: float) -> int:
    """Remove job dirs under root older than max_age_s; returns how many were removed."""
    now, gone = time.time(), 0
    for d in Path(root).iterdir() if Path(root).is_dir() else []:
        try:
            if d.is_dir() and now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
                gone += 1
        except FileNotFoundError:
            pass
    return gone
