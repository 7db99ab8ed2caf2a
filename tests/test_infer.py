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
from qavatar.pipeline.latents_out import load_latents
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
    videos, latents = {}, {}
    threads = torch.get_num_threads()
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.mp4"
        # the spawned ranks split the cores; run TP=1 on the same per-rank thread count
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        try:
            results = _run(ckpts[name], out, tp=tp, precision=precision, latents_out=tmp_path / f"tp{tp}.safetensors")
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
        latents[tp], meta = load_latents(tmp_path / f"tp{tp}.safetensors")
        # one clip = 4 blocks of 3 latent frames at 128x64 / 8
        assert latents[tp].dtype == torch.float32 and latents[tp].shape[2:] == (12, 16, 8)
        assert {k: meta[k] for k in ("seed", "precision", "tp", "size", "blocks")} == \
            {"seed": "0", "precision": precision or name, "tp": str(tp), "size": "128*64", "blocks": "4"}
    if name == "int8":
        # int8 TP all-reduces exact int32 accumulators: the same latents as one rank, bit for bit
        assert torch.equal(latents[1], latents[2])
    else:  # float partial sums reduced in another order: close, not equal
        assert (latents[1] - latents[2]).abs().max() < 1e-3 * latents[1].abs().max()
    # Decoded frames are compared with a tolerance even where the latents are identical: the VAE's float
    # kernels (and h264) do not promise the same bits from run to run, and a loaded machine once moved the
    # int8 video by a mean 0.031 of 255 with bit-identical latents. A real difference (another seed) is > 5.
    assert np.abs(videos[1].astype(np.int16) - videos[2]).mean() < 1.0


@pytest.mark.parametrize("pp,tp", [(2, 1), (2, 2)])
def test_pipeline_layout_gives_the_sequential_latents(ckpts, tmp_path, pp, tp):
    """infer --pp: 2 clips (the sink rolls), the int8 latents equal one rank's bit for bit (exact int32 reduction
    in the hybrid layout), and the video is the same one."""
    threads = torch.get_num_threads()
    latents, videos = {}, {}
    for layout in ((1, 1), (pp, tp)):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (pp * tp)))  # as many threads as each spawned rank
        try:
            out = tmp_path / f"{layout}.mp4"
            results = _run(ckpts["int8"], out, tp=layout[1], pp=layout[0], num_clip=2,
                           latents_out=tmp_path / f"{layout}.safetensors")
        finally:
            torch.set_num_threads(threads)
        assert len(results) == layout[0] * layout[1] and [r.rank for r in results if r.host] == [layout[1] - 1]
        latents[layout], _ = load_latents(tmp_path / f"{layout}.safetensors")
        videos[layout] = _frames(out)
    assert latents[(1, 1)].shape[2] == 24  # 2 clips x 4 blocks x 3 latent frames
    assert torch.equal(latents[(1, 1)], latents[(pp, tp)])
    assert videos[(1, 1)].shape == videos[(pp, tp)].shape == (93, 128, 64, 3)
    assert np.abs(videos[(1, 1)].astype(np.int16) - videos[(pp, tp)]).mean() < 1.0  # VAE float kernels: see above


def test_latents_out_decodes_to_the_video(ckpts, toy_ckpt, tmp_path):
    """The --latents-out file holds what the video was decoded from: the same VAE, warmed the same way, turns
    it back into the mp4's frames (up to the VAE's float kernels and h264's loss)."""
    from qavatar.model.config import resolve_config
    from qavatar.pipeline.media import load_image
    from qavatar.pipeline.sizing import fit_image
    from qavatar.pipeline.vae import VAE_FILE, WanVAE, to_uint8_frames

    out, lat_path, written = tmp_path / "o.mp4", tmp_path / "lat.safetensors", []
    req = InferRequest(str(ckpts["int8"]), str(IMAGE), str(SPEECH), "a woman talking", str(out), quiet=True,
                       num_clip=1, latents_out=str(lat_path))
    infer(req, on_frames=written.append)
    latents, meta = load_latents(lat_path)
    assert meta["frames_per_block"] == "3" and meta["sample_steps"] == "4"
    vae = WanVAE.load(toy_ckpt / "Wan2.2-S2V-14B" / VAE_FILE)
    pixels = fit_image(load_image(str(IMAGE)), 128, 64)[None, :, None]
    motion = vae.encode(pixels.expand(-1, -1, resolve_config(toy_ckpt / "Wan2.2-S2V-14B").motion_frames[0], -1, -1))
    decoder = vae.stream()
    decoder.decode(motion[:, :, :7])  # the warm-up infer does
    again = to_uint8_frames(decoder.decode(latents)[0][:, 3:]).numpy()  # the 3 dropped frames
    mp4, fed = _frames(out), torch.cat(written).numpy()
    assert again.shape == mp4.shape == fed.shape == (45, 128, 64, 3)
    assert np.abs(again.astype(np.int16) - fed).mean() < 0.5  # the frames infer handed to the encoder
    # the mp4: h264 at crf 18 with 4:2:0 chroma loses a mean ~12/255 on this noise, whichever copy of the frames
    h264 = np.abs(fed.astype(np.int16) - mp4).mean()
    assert abs(np.abs(again.astype(np.int16) - mp4).mean() - h264) < 0.5
    assert np.abs(np.roll(again, 1, axis=0).astype(np.int16) - mp4).mean() > h264 + 5  # and not just any frames


def test_latents_out_is_written_atomically_or_not_at_all(ckpts, tmp_path, monkeypatch):
    from qavatar.model.streaming import StreamingSession

    lat = tmp_path / "lat.safetensors"
    lat.write_bytes(b"previous latents")
    with pytest.raises(QavatarError, match=r"--latents-out .* is a directory"):
        _run(ckpts["int8"], tmp_path / "o.mp4", latents_out=tmp_path)
    with pytest.raises(QavatarError, match=r"directory .*nowhere does not exist"):
        _run(ckpts["int8"], tmp_path / "o.mp4", latents_out=tmp_path / "nowhere" / "l.safetensors")
    real, calls = StreamingSession.denoise_block, []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in block 3")
        return real(self, *a, **k)

    with pytest.raises(QavatarError, match=r"--latents-out .*lat.safetensors already exists; pass --overwrite"):
        _run(ckpts["int8"], tmp_path / "o.mp4", latents_out=lat)
    monkeypatch.setattr(StreamingSession, "denoise_block", flaky)
    with pytest.raises(RuntimeError, match="block 3"):
        _run(ckpts["int8"], tmp_path / "o.mp4", latents_out=lat, overwrite=True)
    assert lat.read_bytes() == b"previous latents" and not list(tmp_path.glob(".*partial*"))


def test_the_same_seed_gives_the_same_latents(ckpts, tmp_path):
    """Bit equality is a property of the latents; the decoded frames (VAE float kernels, h264) only agree closely."""
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        _run(ckpts["bf16"], tmp_path / f"{name}.mp4", seed=seed, latents_out=tmp_path / f"{name}.safetensors")
    la, lb, lc = (load_latents(tmp_path / f"{n}.safetensors")[0] for n in "abc")
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    fa, fb, fc = (_frames(tmp_path / f"{n}.mp4") for n in "abc")
    assert np.abs(fa.astype(np.int16) - fb).mean() < 1.0
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
        (dict(latents_out=out, overwrite=True), QavatarError, "--latents-out and --out are the same file"),
        (dict(image=out, overwrite=True), QavatarError, "--image and --out are the same file"),
        (dict(out=tmp_path / "o.mkv"), MediaError, "--out o.mkv: qavatar writes MP4 .H.264 and AAC.; name it o.mp4"),
        (dict(seed=-1), ConfigError, "--seed -1: use a seed from 0 to 2\\*\\*63 - 1"),
        (dict(seed=2 ** 64 - 1), ConfigError, "--seed 18446744073709551615: use a seed from 0"),
        (dict(latents_out=tmp_path / ("n" * 240)), QavatarError, "is too long; at most"),
    ]
    for kw, err, msg in cases:
        ckpt = ckpts[kw.pop("ckpt", "bf16")]
        with pytest.raises(err, match=msg):
            _run(ckpt, kw.pop("out", out), **kw)
    assert out.read_bytes() == b"the previous video" and not list(tmp_path.glob(".*partial*"))


def test_an_out_name_without_room_for_its_work_file_is_refused_up_front(ckpts, tmp_path):
    out = tmp_path / ("n" * 245 + ".mp4")  # legal, but .NAME.partial-PID-XXXXXXXX is not
    with pytest.raises(QavatarError, match="--out n{40}...: a name of 249 bytes is too long; at most 229"):
        prepare(InferRequest(str(ckpts["bf16"]), str(IMAGE), str(SPEECH), "", str(out)))
    ok = tmp_path / ("n" * 225 + ".mp4")
    prepare(InferRequest(str(ckpts["bf16"]), str(IMAGE), str(SPEECH), "", str(ok)))
    with open(tmp_path / f".{ok.name}.partial-4194304-0123abcd", "wb"):  # the longest work file it can make
        pass


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


def test_precision_must_name_the_stored_scheme():
    """W8A8 and weight-only are different numerics: asking for one on a checkpoint of the other is an error, never a
    silent run of the stored scheme."""
    for requested, stored in [("int8-wo", "int8"), ("int8", "int8-wo"), ("fp8", "fp8-wo")]:
        with pytest.raises(ConfigError, match=f"--precision {requested} but the checkpoint is {stored} .*"
                                              f"use --precision {stored}"):
            resolve_precision(requested, stored, "cpu")
    assert resolve_precision("int8", "int8", "cpu") == (None, [])
    assert resolve_precision("int8-wo", "bf16", "cpu")[0] == "int8-wo"
    with pytest.raises(ConfigError, match="choose bf16, int8, fp8, int8-wo or fp8-wo"):
        resolve_precision("int4", "bf16", "cpu")


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
    assert resolve_precision("fp8-wo", "fp8", "cuda") == (runtime, notes)  # what runs anyway: asking is fine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))  # an RTX 4090
    assert resolve_precision("fp8", "bf16", "cuda") == ("fp8", [resolve_precision("fp8", "bf16", "cpu")[1][0]])
    with pytest.raises(ConfigError, match="--precision fp8-wo but the checkpoint is fp8 .W8A8"):
        resolve_precision("fp8-wo", "fp8", "cuda")  # on sm89 the fp8 checkpoint runs W8A8, not what was asked


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
