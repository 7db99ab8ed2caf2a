"""User-facing errors. The CLI prints their message as one line, without a traceback."""
import contextlib
import os


class QavatarError(Exception):
    """An error whose message tells the user what went wrong and what to do."""


class ConfigError(QavatarError):
    pass


class CheckpointError(QavatarError):
    pass


class LoraError(CheckpointError):
    pass


class CalibrationError(QavatarError):
    pass


class OutputError(QavatarError):
    """The output could not be written: a full disk, a read-only file system, no permission."""


def first_sentence(text: str, limit: int = 200) -> str:
    """The first sentence of an exception's text, whole: library messages run on for lines, and a message cut
    at a fixed width ends mid-word."""
    line = (str(text).strip().splitlines() or [""])[0].strip()
    for end in (". ", "; "):
        if end in line:
            line = line[:line.index(end)]
    line = line.rstrip(".")
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


_DISK_ERRNOS = {"ENOSPC": "no space left on the device; free some space or write elsewhere",
                "EDQUOT": "over the disk quota; free some space or write elsewhere",
                "EROFS": "read-only file system; write elsewhere",
                "EACCES": "permission denied; write to a directory you may write to",
                "EPERM": "operation not permitted; write to a directory you may write to"}


def output_error(e: OSError, out: "str | os.PathLike") -> "OutputError | None":
    """A one-line OutputError for an OSError met while writing `out`, or None when it is not a disk-side
    failure of the output (it is then re-raised as it is). An error naming another file (an input being read)
    is not the output's."""
    import errno
    from pathlib import Path

    name = errno.errorcode.get(e.errno or 0)
    if name not in _DISK_ERRNOS:
        return None
    out = Path(out).absolute()
    if e.filename is not None:
        f = Path(os.fsdecode(e.filename)).absolute()
        if not (f == out.parent or out.parent in f.parents or f in out.parents):  # an input, not the output
            return None
    return OutputError(f"cannot write {out}: {_DISK_ERRNOS[name]} ({name}); the output was not written")


@contextlib.contextmanager
def writing_to(out: "str | os.PathLike"):
    """Turn a full, read-only or forbidden disk under `out` into one OutputError (see output_error)."""
    try:
        yield
    except OSError as e:
        err = output_error(e, out)
        if err is None:
            raise
        raise err from None
