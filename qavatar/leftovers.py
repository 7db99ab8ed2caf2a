"""Hidden work files (`.OUT.partial-PID-XXXX`, `.OUT.old-PID-XXXX`, `.OUT.mp4.partial-PID`) never outlive their run.

Each carries the id of the process that made it. The process removes it on every exit path it controls:
exceptions (the writers' own `except BaseException`), and SIGTERM, which `install_terminate_handler` turns
into an exception (`Terminated`) for as long as the work runs. What a SIGKILL or a power cut leaves is
removed by the next run writing the same output, once the process that made it is gone (`remove_stale`),
with a one-line note; a replaced output whose replacement never arrived is renamed back, not removed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable, Optional

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(?:-[0-9a-f]{8})?$")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup code (`finally`, `except BaseException`) runs; not an
    Exception, so nothing mistakes it for an error to handle, and not a KeyboardInterrupt, which typer turns
    into exit 130. The CLI prints one line and exits 143 (128 + SIGTERM), as a process killed by it would."""


def hidden_path(out: Path, kind: str) -> Path:
    """`.NAME.partial-PID-XXXXXXXX` (kind partial) or `.NAME.old-PID-XXXXXXXX` (kind old) next to `out`."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


HIDDEN_EXTRA = len("..partial-") + 7 + 1 + 8  # what hidden_path adds to a name (pids up to 7 digits)


def check_name_room(out: "str | Path", flag: str, error: type) -> None:
    """The hidden work file beside `out` must be a legal name too: otherwise the run fails at its first write,
    after minutes of work."""
    out = Path(out)
    try:
        limit = os.pathconf(out.parent if out.parent.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(out.name.encode()) + HIDDEN_EXTRA > limit:
        raise error(f"{flag} {out.name[:40]}...: a name of {len(out.name.encode())} bytes is too long; at most "
                    f"{limit - HIDDEN_EXTRA} here (qavatar writes a hidden .NAME.partial-PID-XXXXXXXX beside it "
                    f"first): choose a shorter name")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (OverflowError: not a pid at all)
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(out: "str | Path", note: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Remove the hidden leftovers of earlier runs writing `out` whose process is gone; return them."""
    out = Path(out).absolute()
    note = note or (lambda s: print(f"qavatar: {s}", file=sys.stderr))
    removed = []
    try:
        entries = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return removed
    stale = []
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if m is not None and m["name"] == out.name and not pid_alive(int(m["pid"])):
            stale.append((p, m))
    olds = sorted((p for p, m in stale if m["kind"] == "old"), key=lambda p: p.lstat().st_mtime)
    if olds and not out.exists() and not out.is_symlink():
        # killed between moving the previous output aside and renaming the new one in: the old one is the output
        os.replace(olds[-1], out)
        note(f"restored {out.name} from {olds[-1].name}: a run of process {_LEFTOVER.match(olds[-1].name)['pid']} "
             f"was replacing it when it was killed")
    for p, m in stale:
        if not (p.exists() or p.is_symlink()):
            continue
        remove(p)
        if not p.exists():
            removed.append(p)
            what = "an interrupted write" if m["kind"] == "partial" else "a replaced output"
            note(f"removed {p.name}, left by {what} of process {m['pid']}, which is gone")
    return removed


def _handler(signum, frame) -> None:
    import multiprocessing

    for child in multiprocessing.active_children():  # spawned ranks clean up their own files, then we go
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout=30)
    raise Terminated(f"terminated by signal {signum}")


def install_terminate_handler() -> Callable[[], None]:
    """Make SIGTERM raise Terminated in this (main) thread; returns the function that restores the old handler.
    A no-op outside the main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return restore
