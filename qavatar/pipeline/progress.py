"""Progress of `infer`: a live status line on a terminal, one log line per clip elsewhere.

On a TTY one line is redrawn in place: clip, block, step, frames per second and ETA. When stderr is not a
TTY (a job scheduler's log, a pipe) redrawing would fill the log with carriage returns, so each finished clip
prints one plain line instead: a 10-minute run logs as it goes, not only at its end. --quiet silences both.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds == seconds else "--:--:--"


class Progress:
    def __init__(self, clips: int, blocks: int, steps: int, frames: int, quiet: bool = False,
                 stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = not quiet and tty  # the redrawn status line
        self.per_clip = not quiet and not tty  # one line per finished clip
        self.clips, self.blocks, self.steps, self.frames_total = clips, blocks, steps, frames
        self.calls_total = blocks * steps  # blocks over the whole run
        self.calls = 0
        self.frames = 0
        self.start = time.perf_counter()
        self._where = (0, 0, 0)
        self._clip_start: Optional[float] = None  # set by the clip's first step: the VAE warm-up is not a clip's
        self._clip_frames = 0

    def step(self, clip: int, block: int, step: int) -> None:
        self.calls += 1
        if self._clip_start is None:
            self._clip_start = time.perf_counter()
        self._where = (clip, block, step)
        self._draw()

    def wrote(self, frames: int) -> None:
        self.frames += frames
        self._draw()

    def _eta(self, elapsed: float) -> float:
        return elapsed / self.calls * (self.calls_total - self.calls) if self.calls else float("nan")

    def _draw(self) -> None:
        if not self.enabled:
            return
        el = time.perf_counter() - self.start
        clip, block, step = self._where
        fps = self.frames / el if el > 0 else 0.0
        self.stream.write(f"\rclip {clip + 1}/{self.clips}  block {block + 1}  step {step + 1}/{self.steps}  "
                          f"frames {self.frames}/{self.frames_total}  {fps:5.2f} frames/s  "
                          f"ETA {_clock(self._eta(el))}  ")
        self.stream.flush()

    def clip_done(self, clip: int) -> None:
        """Clip `clip` (0-based) is written; off a TTY, say so in one line."""
        now = time.perf_counter()
        frames, seconds = self.frames - self._clip_frames, now - (self._clip_start or now)
        self._clip_start, self._clip_frames = now, self.frames
        if not self.per_clip:
            return
        fps = frames / seconds if seconds > 0 else 0.0
        self.stream.write(f"clip {clip + 1}/{self.clips}: {frames} frames in {seconds:.1f} s ({fps:.2f} frames/s), "
                          f"frames {self.frames}/{self.frames_total}, ETA {_clock(self._eta(now - self.start))}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
