"""`qavatar infer` end to end on the toy checkpoint, on the CPU: precisions, TP degrees, the mp4, determinism,
flat memory over clips, and one clear error (with nothing left at --out) for each kind of bad input."""
from __future__ import annotations

import os
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qavatar.cli import app
from qavatar.errors import CheckpointError, ConfigError, QavatarError
from qavatar.pipeline.components import locate
from qavatar.pipeline.infer import InferRequest, infer, prepare, resolve_precision
from qavatar.pipeline.media import MediaError
from qavatar.pipeline.video_writer import probe
from qavatar.quant import QuantConfig
from qavatar.quant.convert import quantize_checkpoint

BUNDLED = Path(__file__).parents[1] / "calibration" / "bundled"
IMAGE, SPEECH = BUNDLED / "images" / "p00.png", BUNDLED / "audio" / "p00.wav"  # 384x704 portrait, 5.83 s


@pytest.fixture(autouse=True)
def _prompt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QAVATAR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def ckpts(toy_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("infer-ckpts")
    out = {"bf16": toy_ckpt}
    for p in ("int8", "fp8"):
        out[p] = quantize_checkpoint(toy_ckpt, d / p, QuantConfig(p), max_pairs=2, log=lambda s: None).out
    return out


def _run(ckpt, out, **kw):
    kw.setdefault("num_clip", 1)
    kw.setdefault("quiet", True)
    req = InferRequest(str(ckpt), str(kw.pop("image", IMAGE)), str(kw.pop("audio", SPEECH)), "a woman talking",
                       str(out), **kw)
    return infer(req)


def _frames(path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("name,precision", [("bf16", None), ("int8", None), ("fp8", None), ("bf16", "int8")])
def test_end_to_end_at_tp1_and_tp2(ckpts, tmp_path, name, precision):
    videos = {}
    threads = torch.get_num_threads()
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.mp4"
        # the spawned ranks split the cores; float kernels (VAE, wav2vec2) depend on the thread count
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        try:
            results = _run(ckpts[name], out, tp=tp, precision=precision)
        finally:
            torch.set_num_threads(threads)
        host = next(r for r in results if r.host)
        assert host.out == str(out) and host.frames == 45 and len(results) == tp
        info = probe(out)
        # one clip = 48 frames, less the 3 the stream drops at its start; the portrait's aspect at 128*64
        assert (info["frames"], info["fps"], info["height"], info["width"]) == (45, 25.0, 128, 64)
        assert abs(info["audio_seconds"] - 45 / 25) < 1024 / info["audio_rate"] + 1e-6
        videos[tp] = _frames(out)
        assert videos[tp].std() > 5  # random weights: noise, but not a blank video
    diff = np.abs(videos[1].astype(np.int16) - videos[2]).mean()
    if name == "int8":
        assert diff == 0  # int8 TP all-reduces exact int32 accumulators: the same video as one rank
    else:
        assert diff < 1.0  # float reduction order only


def test_the_same_seed_gives_the_same_frames(ckpts, tmp_path):
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    _run(ckpts["bf16"], a, seed=7)
    _run(ckpts["bf16"], b, seed=7)
    _run(ckpts["bf16"], c, seed=8)
    fa, fb, fc = _frames(a), _frames(b), _frames(c)
    assert np.array_equal(fa, fb)
    assert np.abs(fa.astype(np.int16) - fc).mean() > 5


def test_clips_default_to_the_audio_and_memory_stays_flat(ckpts, tmp_path):
    from qavatar.parallel.measure import AllocationTracker

    peaks, frames = {}, {}
    for clips in (2, 4):
        out = tmp_path / f"c{clips}.mp4"
        live: list[int] = []
        with AllocationTracker() as tracker:
            # 4: the default, what the audio covers (5.83 s -> 4 clips, 145 frames)
            req = InferRequest(str(ckpts["int8"]), str(IMAGE), str(SPEECH), "a woman talking", str(out),
                               quiet=True, num_clip=None if clips == 4 else clips)
            infer(req, on_frames=lambda f: live.append(tracker.live))
        peaks[clips], frames[clips] = tracker.peak, probe(out)["frames"]
        if clips == 4:
            per_clip = len(live) // 4
            assert max(live[-per_clip:]) <= max(live[per_clip:2 * per_clip]) * 1.01  # nothing accumulates
    assert frames == {2: 2 * 48 - 3, 4: int(5.83 * 25) - 3}  # the last clip stops where the audio does
    assert peaks[4] <= peaks[2] * 1.02, peaks  # twice the video, the same peak


def _write_wav(path: Path, seconds: float) -> Path:
    n = int(16000 * seconds)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(n) / 10) * 8000).astype(np.int16).tobytes())
    return path


def test_bad_input_is_one_clear_error_and_leaves_out_alone(ckpts, tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"the previous video")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    cases = [
        (dict(image=tmp_path / "missing.png"), MediaError, "image not found"),
        (dict(image=garbage), MediaError, "not a readable image"),
        (dict(audio=tmp_path / "missing.wav"), MediaError, "audio not found"),
        (dict(audio=garbage), MediaError, "no audio stream|not a readable audio file"),
        (dict(audio=_write_wav(tmp_path / "short.wav", 0.3)), MediaError, "one block of video needs at least 0.48 s"),
        (dict(size="32*32"), ConfigError, "below one 64x64 tile"),
        (dict(tp=3), ConfigError, "does not divide the 4 attention heads"),
        (dict(precision="bf16", ckpt="fp8"), ConfigError, "holds no bf16 weights"),
        (dict(precision="int8", ckpt="fp8"), ConfigError, "--precision int8 but the checkpoint is fp8"),
        (dict(device="cuda"), ConfigError, "no CUDA GPU is visible"),
        (dict(t5_precision="fp8"), ConfigError, "--t5-precision fp8: choose bf16 or int8"),
    ]
    for kw, err, msg in cases:
        ckpt = ckpts[kw.pop("ckpt", "bf16")]
        with pytest.raises(err, match=msg):
            _run(ckpt, out, **kw)
    assert out.read_bytes() == b"the previous video" and not list(tmp_path.glob(".*partial*"))


def test_a_failure_mid_run_leaves_out_alone(ckpts, tmp_path, monkeypatch):
    from qavatar.model.streaming import StreamingSession

    out = tmp_path / "o.mp4"
    out.write_bytes(b"the previous video")
    real = StreamingSession.denoise_block
    calls = []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in block 3")
        return real(self, *a, **k)

    monkeypatch.setattr(StreamingSession, "denoise_block", flaky)
    with pytest.raises(RuntimeError, match="block 3"):
        _run(ckpts["bf16"], out, overwrite=True)
    assert out.read_bytes() == b"the previous video" and not list(tmp_path.glob(".*partial*"))


def test_missing_components_and_encoders_flag(toy_ckpt, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(toy_ckpt, broken)
    (broken / "Wan2.2-S2V-14B" / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match=r"missing VAE \(Wan2.1_VAE.pth\).*--encoders"):
        locate(broken)
    parts = locate(broken, encoders=str(toy_ckpt))  # the encoders from elsewhere
    assert parts.dit == broken / "Wan2.2-S2V-14B" and parts.encoders == toy_ckpt / "Wan2.2-S2V-14B"
    with pytest.raises(CheckpointError, match="no such"):
        locate(broken, encoders=str(tmp_path / "nowhere"))


def test_quantized_checkpoint_finds_its_source_encoders(ckpts):
    parts = locate(ckpts["fp8"])
    assert parts.precision == "fp8" and parts.encoders == Path(ckpts["bf16"]) / "Wan2.2-S2V-14B"


def test_gpu_checks(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="--tp 4 but only 2 GPU"):
        prepare(InferRequest(str(ckpts["bf16"]), str(IMAGE), str(SPEECH), "", str(tmp_path / "o.mp4"), tp=4,
                             device="cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))  # an RTX 3090
    runtime, notes = resolve_precision("fp8", "bf16", "cuda")
    assert runtime == "fp8-wo" and "no FP8 tensor cores" in notes[-1]
    runtime, notes = resolve_precision(None, "fp8", "cuda")  # an fp8 checkpoint runs weight-only, said once
    assert runtime is None and "weight-only" in notes[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))  # an RTX 4090
    assert resolve_precision("fp8", "bf16", "cuda") == ("fp8", [resolve_precision("fp8", "bf16", "cpu")[1][0]])


def test_more_clips_than_the_audio_covers_is_capped(ckpts, tmp_path):
    prep = prepare(InferRequest(str(ckpts["bf16"]), str(IMAGE), str(SPEECH), "", str(tmp_path / "o.mp4"),
                                num_clip=9))
    assert prep.clips == 4 and prep.frames == 145 - 3 and "covers 4 clip(s)" in prep.notes[0]
    assert (prep.height, prep.width) == (128, 64)
    big = prepare(InferRequest(str(ckpts["bf16"]), str(IMAGE), str(SPEECH), "", str(tmp_path / "o.mp4"),
                               size="704*384"))
    assert (big.height, big.width) == (704, 384)


runner = CliRunner()


def test_cli_infer(ckpts, tmp_path):
    out = tmp_path / "o.mp4"
    args = ["infer", "--checkpoint", str(ckpts["int8"]), "--image", str(IMAGE), "--audio", str(SPEECH),
            "--out", str(out), "--num-clip", "1", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}: 45 frames at 25 fps" in r.output and out.is_file()
    r = runner.invoke(app, args[:3] + ["--image", str(tmp_path / "none.png")] + args[5:])
    assert r.exit_code == 2 and "image not found" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
