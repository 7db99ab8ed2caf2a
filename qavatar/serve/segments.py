"""One decoded block as a short MPEG-TS segment (H.264 + AAC) that the browser can play on its own.

A segment is what Gradio's streaming video output takes: it probes each chunk, keeps its H.264 as is and
re-encodes the audio through one long-lived AAC encoder, then serves the chunks as an HLS playlist that hls.js
plays in a <video>. Each segment starts with a keyframe (a fresh encoder), so the first one plays as soon as
it arrives. The audio is the slice of the speech under the segment's frames, shifted by the frames the stream
drops at its start, the same alignment as the mp4 (video_writer.py).
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

AUDIO_RATE = 16000  # load_audio's rate; an AAC rate


def write_segment(path: "str | Path", frames: np.ndarray, fps: int, wave: Optional[np.ndarray], first_frame: int,
                  audio_offset_s: float = 0.0) -> Path:
    """frames [T, H, W, 3] uint8, output frames first_frame..first_frame+T-1; wave: mono float32 at 16 kHz.
    Written to a temp name and renamed: the player never sees half a segment."""
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with av.open(str(tmp), "w", format="mpegts") as c:
        v = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "tune": "zerolatency", "crf": "20"})
        v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        v.codec_context.time_base = Fraction(1, fps)
        a = None
        if wave is not None:
            a = c.add_stream("aac", rate=AUDIO_RATE, layout="mono")
            a.codec_context.time_base = Fraction(1, AUDIO_RATE)
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, fps)  # each segment starts at 0: the player places it
            for pkt in v.encode(vf):
                c.mux(pkt)
        for pkt in v.encode():
            c.mux(pkt)
        if a is not None:
            start = int(round((audio_offset_s + first_frame / fps) * AUDIO_RATE))
            stop = int(round((audio_offset_s + (first_frame + len(frames)) / fps) * AUDIO_RATE))
            pcm = np.zeros(max(0, stop - start), np.float32)
            have = wave[start:stop]
            pcm[:len(have)] = have  # past the end of the speech: silence
            size = a.codec_context.frame_size or 1024
            for off in range(0, len(pcm), size):
                chunk = pcm[off:off + size]
                af = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = AUDIO_RATE, off, Fraction(1, AUDIO_RATE)
                for pkt in a.encode(af):
                    c.mux(pkt)
            for pkt in a.encode():
                c.mux(pkt)
    os.replace(tmp, path)
    return path
