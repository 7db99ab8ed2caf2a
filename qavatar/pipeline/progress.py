"""One status line for `infer`: clip, block, step, frames per second and ETA. Silent when not a TTY."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, clips: int, blocks: int, steps: int, frames: int, quiet: bool = False,
                 stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.enabled = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clips, self.blocks, self.steps, self.frames_total = clips, blocks, steps, frames
        self.calls_total = blocks * steps  # blocks over the whole run
        self.calls = 0
        self.frames = 0
        self.start = time.perf_counter()
        self._where = (0, 0, 0)

    def step(self, clip: int, block: int, step: int) -> None:
        self.calls += 1
        self._where = (clip, block, step)
        self._draw()

    def wrote(self, frames: int) -> None:
        self.frames += frames
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        el = time.perf_counter() - self.start
        clip, block, step = self._where
        fps = self.frames / el if el > 0 else 0.0
        eta = el / self.calls * (self.calls_total - self.calls) if self.calls else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
        self.stream.write(f"\rclip {clip + 1}/{self.clips}  block {block + 1}  step {step + 1}/{self.steps}  "
                          f"frames {self.frames}/{self.frames_total}  {fps:5.2f} frames/s  ETA {eta_s}  ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
