"""Speech -> the per-video-frame audio features the DiT consumes, one clip at a time.

wav2vec2 (transformers Wav2Vec2Model, all hidden states: 25 for the large model) runs on 16 kHz audio
normalised to zero mean and unit variance over the whole track, as Wav2Vec2FeatureExtractor does. The 50 Hz
states are resampled linearly to 30 Hz (align_corners over the whole track) and one bucket per 25 fps video
frame is taken (audio_features.py holds the reference's whole-track form of both steps).

`AudioConditioning.clip(r)` computes only what clip r needs: the wav2vec2 states come from windows of
`window_s` seconds with `context_s` seconds of context each side, the last window kept for the next clip.
A track no longer than one window is encoded in one pass, which is exactly the reference; longer tracks
stay at flat memory (the reference holds 25 x 1024 states per 20 ms for the whole track).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import CheckpointError
from .audio_features import _frame_indices
from .clips import clip_count
from .hf_files import load_error

WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
SAMPLE_RATE = 16000
HOP = 320  # samples per wav2vec2 frame (50 Hz): the product of the conv strides


def read_wav2vec_config(path: Path) -> dict:
    """wav2vec2's config.json as a dict; a broken one is a CheckpointError naming it."""
    import json

    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the wav2vec2 config ({e.__class__.__name__}); replace the file "
                              f"(re-download it)") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a JSON {type(config).__name__}, not a wav2vec2 config; replace the file")
    return config


class AudioEncoder:
    """wav2vec2 from a Hugging Face directory (the real layout's wav2vec2-large-xlsr-53-english/)."""

    def __init__(self, root: "str | Path", device: "str | torch.device" = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model
        from transformers.utils import logging as tlog

        path = Path(root) / WAV2VEC_DIR
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{root}: missing the audio encoder ({WAV2VEC_DIR}/config.json)")
        level = tlog.get_verbosity()
        tlog.set_verbosity_error()  # a CTC checkpoint's unused lm_head is expected, not news
        tlog.disable_progress_bar()  # ours is the only progress display
        try:
            self.model = Wav2Vec2Model.from_pretrained(str(path), dtype=dtype).to(device).eval()
            self.extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(path))
        except Exception as e:  # OSError, JSONDecodeError, TypeError, SafetensorError...: name the file
            raise load_error(path, "wav2vec2 audio encoder", e) from None
        finally:
            tlog.set_verbosity(level)
        self.device, self.dtype = torch.device(device), dtype
        self.layers = self.model.config.num_hidden_layers + 1
        self.dim = self.model.config.hidden_size

    def normalize(self, wave: np.ndarray) -> np.ndarray:
        if not getattr(self.extractor, "do_normalize", True):
            return wave.astype(np.float32)
        return ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)

    def num_frames(self, num_samples: int) -> int:
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(num_samples)))

    @torch.no_grad()
    def hidden_states(self, normalized: np.ndarray) -> torch.Tensor:
        """[samples] -> [layers, T, C] fp32 on CPU."""
        x = torch.from_numpy(np.ascontiguousarray(normalized))[None].to(self.device, self.dtype)
        out = self.model(input_values=x, output_hidden_states=True)
        return torch.cat(out.hidden_states).float().cpu()


class AudioConditioning:
    """The audio of one track, served clip by clip as [1, layers, C, clip_frames]."""

    def __init__(self, encoder: AudioEncoder, wave: np.ndarray, fps: int = 25, clip_frames: int = 48,
                 video_rate: int = 30, window_s: float = 30.0, context_s: float = 2.0):
        self.encoder, self.fps, self.clip_frames = encoder, fps, clip_frames
        self.wave = encoder.normalize(wave)
        self.num_samples = len(wave)
        self.T = encoder.num_frames(self.num_samples)
        if self.T < 1:
            raise ValueError("audio shorter than one wav2vec2 frame")
        self.L = int(self.T / 50.0 * video_rate)  # frames after the 50 -> 30 Hz resampling
        self.clips = clip_count(self.T, fps, clip_frames, video_rate)
        frames = self.clips * clip_frames
        self.index = _frame_indices(video_rate, math.ceil(frames / fps * video_rate), fps, frames)  # 30 Hz feature of each video frame
        self.window = max(1, int(window_s * 50))
        self.context = int(context_s * 50)
        self._win: Optional[tuple[int, int, torch.Tensor]] = None  # (first frame, last frame + 1, states)

    @property
    def duration_s(self) -> float:
        return self.num_samples / SAMPLE_RATE

    def _states(self, j0: int, j1: int) -> torch.Tensor:
        """wav2vec2 states of 50 Hz frames [j0, j1) (within one window's core)."""
        if self._win is None or not (self._win[0] <= j0 and j1 <= self._win[1]):
            if self.T <= self.window + 2 * self.context:  # the whole track in one pass: the reference
                a, b = 0, self.T
            else:  # a window starting at j0, long enough for the request
                a, b = j0, min(self.T, max(j1, j0 + self.window))
            s0 = max(0, a - self.context) * HOP
            s1 = min(self.num_samples, (b + self.context - 1) * HOP + 400)
            states = self.encoder.hidden_states(self.wave[s0:s1])
            off = a - s0 // HOP
            if states.shape[1] < off + (b - a):
                raise RuntimeError("wav2vec2 window frames disagree with the track's frame count")
            self._win = (a, b, states[:, off:off + (b - a)])
        a = self._win[0]
        return self._win[2][:, j0 - a:j1 - a]

    def clip(self, r: int) -> torch.Tensor:
        """Audio features of clip r: [1, layers, C, clip_frames] (zeros past the end of the track)."""
        idx = self.index[r * self.clip_frames:(r + 1) * self.clip_frames]
        out = torch.zeros(self.encoder.layers, self.clip_frames, self.encoder.dim)
        live = [(f, int(i)) for f, i in enumerate(idx) if i < self.L]
        if live:
            # linear, align_corners: 30 Hz feature i sits at 50 Hz position i * (T-1) / (L-1)
            scale = np.float32(self.T - 1) / np.float32(max(self.L - 1, 1)) if self.L > 1 else np.float32(0)
            pos = np.array([i for _, i in live], dtype=np.float32) * scale
            lo = np.minimum(np.floor(pos).astype(np.int64), self.T - 1)
            hi = np.minimum(lo + 1, self.T - 1)
            lam = torch.from_numpy((pos - lo).astype(np.float32))[None, :, None]
            states = self._states(int(lo.min()), int(hi.max()) + 1)
            base = int(lo.min())
            a, b = states[:, lo - base], states[:, hi - base]
            out[:, [f for f, _ in live]] = (1 - lam) * a + lam * b  # F.interpolate's arithmetic
        return out.permute(0, 2, 1).unsqueeze(0)  # [1, layers, C, frames]
