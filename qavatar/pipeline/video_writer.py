"""The output: an H.264 mp4 with the speech muxed in, written as frames arrive and renamed into place at the end.

Frames are encoded the moment they are decoded, and the audio is pumped alongside them (read from the source
file a packet at a time, resampled for AAC, interleaved up to the video's timestamp), so neither the video
nor the audio ever sits in memory whole. The file is written to a hidden sibling and os.replace'd onto
`out` only when complete: an interrupted run leaves whatever was at `out` before, untouched.

`audio_offset_s` drops the start of the track so sound and picture stay in sync when the first generated
frames are not shown (the reference drops 3 frames at the start of the stream); the audio stops where the
video does, like ffmpeg's -shortest.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import writing_to
from .media import MediaError

AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


class Mp4Writer:
    def __init__(self, out: "str | Path", fps: int, height: int, width: int, audio: "str | Path | None" = None,
                 audio_offset_s: float = 0.0, crf: int = 18):
        import av

        self.out = Path(out)
        if self.out.is_dir():
            raise MediaError(f"--out {self.out} is a directory; give a file name such as {self.out / 'out.mp4'}")
        if not self.out.parent.is_dir():
            raise MediaError(f"--out {self.out}: directory {self.out.parent} does not exist")
        self.tmp = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}")
        self.fps, self.frames = fps, 0
        with writing_to(self.out):
            self._container = av.open(str(self.tmp), "w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "medium"})
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.codec_context.time_base = Fraction(1, fps)
        self._audio = None
        if audio is not None:
            self._open_audio(Path(audio), audio_offset_s)

    # ---------------------------------------------------------------- audio
    def _open_audio(self, path: Path, offset_s: float) -> None:
        import av

        self._src = av.open(str(path))
        src = self._src.streams.audio[0]
        self.rate = src.rate if src.rate in AAC_RATES else 48000
        layout = "mono" if src.channels == 1 else "stereo"
        self._audio = self._container.add_stream("aac", rate=self.rate, layout=layout)
        self._audio.codec_context.time_base = Fraction(1, self.rate)
        self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=self.rate)
        self._fifo = av.AudioFifo()
        self._packets = self._src.decode(src)
        self._skip = int(round(offset_s * self.rate))  # source samples still to drop
        self._written = 0  # samples muxed so far
        self._eof = False

    def _fill(self, need: int) -> None:
        """Decode source audio until the fifo holds `need` samples (or the source ends)."""
        while self._fifo.samples < need and not self._eof:
            frame = next(self._packets, None)
            outs = self._resampler.resample(frame)
            if frame is None:
                self._eof = True
            for f in outs:
                f.pts = None
                self._fifo.write(f)
            while self._skip and self._fifo.samples:
                n = min(self._skip, self._fifo.samples)
                self._fifo.read(n)
                self._skip -= n

    def _pump_audio(self, until_s: float, final: bool = False) -> None:
        if self._audio is None:
            return
        target = int(round(until_s * self.rate))
        size = self._audio.codec_context.frame_size or 1024
        while self._written < target:
            n = min(size, target - self._written)
            self._fill(n)
            if self._fifo.samples < n:
                n = self._fifo.samples
            if n == 0 or (n < size and not final):
                break
            frame = self._fifo.read(n)
            frame.pts, frame.time_base = self._written, Fraction(1, self.rate)
            self._written += n
            for pkt in self._audio.encode(frame):
                self._container.mux(pkt)

    # ---------------------------------------------------------------- video
    def write(self, frames: torch.Tensor) -> None:
        """frames: [T, H, W, 3] uint8."""
        arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        with writing_to(self.out):
            self._write(arr)

    def _write(self, arr: np.ndarray) -> None:
        import av

        for img in arr:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts, vf.time_base = self.frames, Fraction(1, self.fps)
            self.frames += 1
            for pkt in self._video.encode(vf):
                self._container.mux(pkt)
        self._pump_audio(self.frames / self.fps)

    def close(self) -> Path:
        with writing_to(self.out):
            return self._close()

    def _close(self) -> Path:
        for pkt in self._video.encode():
            self._container.mux(pkt)
        if self._audio is not None:
            self._pump_audio(self.frames / self.fps, final=True)
            for pkt in self._audio.encode():
                self._container.mux(pkt)
            self._src.close()
        self._container.close()
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        for c in (getattr(self, "_container", None), getattr(self, "_src", None)):
            try:
                if c is not None:
                    c.close()
            except Exception:
                pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:  # e.g. a name the file system never accepted: there is nothing to remove
            pass

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def probe(path: "str | Path") -> dict:
    """What a player sees: frame count, fps, size, audio seconds (decoded, so the file must play)."""
    import av

    info: dict = {}
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = 0
        first: Optional[np.ndarray] = None
        for f in c.decode(v):
            if first is None:
                first = f.to_ndarray(format="rgb24")
            frames += 1
        info.update(frames=frames, fps=float(v.average_rate), width=v.width, height=v.height, first_frame=first)
    with av.open(str(path)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            samples = sum(f.samples for f in c.decode(a))
            info.update(audio_seconds=samples / a.rate, audio_rate=a.rate)
        else:
            info.update(audio_seconds=0.0)
    return info
