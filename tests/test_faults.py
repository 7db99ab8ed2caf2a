"""Bad input and faults as a user meets them: every one ends in a clear one-line error (exit 2 from a command),
never a traceback, and images of every kind are read the way a photo viewer shows them (issue 10, items 3, 4,
5, 9, 10 and 12)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO
from qavatar.cli import app
from qavatar.errors import CheckpointError
from qavatar.pipeline.media import MediaError, load_image

MIN_IMAGE_SIDE = 64  # qavatar.pipeline.media.MIN_IMAGE_SIDE, spelled out: the documented minimum

runner = CliRunner()


def _pixels(t: torch.Tensor) -> np.ndarray:
    """load_image's [-1, 1] float back to [H, W, 3] uint8."""
    return ((t + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _one_line_error(r, *parts: str) -> str:
    """The command failed with exit 2 and its stderr is exactly one `error: ...` line."""
    assert r.exit_code == 2, r.output
    out = r.stderr.strip()
    assert out.startswith("error: ") and "\n" not in out and "Traceback" not in r.output, r.output
    for p in parts:
        assert p in out, out
    return out


# ------------------------------------------------------------------------ item 3: every Pillow mode
def test_16_bit_grayscale_png_keeps_its_grey_levels(tmp_path):
    a = np.full((64, 80), 32768, np.uint16)
    a[0, :4] = [0, 257 * 100, 65535, 257 * 3]
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    px = _pixels(load_image(tmp_path / "g16.png"))
    assert px[0, :4, 0].tolist() == [0, 100, 255, 3] and px[1, 0].tolist() == [128, 128, 128]  # not solid white
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()


def test_big_endian_32_bit_and_float_images_are_scaled(tmp_path):
    big = np.full((64, 64), 257 * 200, dtype=">u2")  # I;16B, as TIFF stores it
    big[0, 0] = 0
    Image.fromarray(big).save(tmp_path / "b.tif")
    assert Image.open(tmp_path / "b.tif").mode == "I;16B"
    px = _pixels(load_image(tmp_path / "b.tif"))
    assert px[0, 0, 0] == 0 and px[5, 5, 0] == 200

    i32 = np.full((64, 64), 65535, np.int32)
    i32[0, 0] = 257 * 7
    Image.fromarray(i32).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    px = _pixels(load_image(tmp_path / "i.tif"))
    assert px[0, 0, 0] == 7 and px[1, 1, 0] == 255

    Image.fromarray(np.full((64, 64), 200, np.uint8)).convert("I").save(tmp_path / "i8.tif")  # 8-bit, widened
    assert Image.open(tmp_path / "i8.tif").mode == "I"
    assert _pixels(load_image(tmp_path / "i8.tif"))[3, 3, 0] == 200  # not 200/257: black

    f = np.full((64, 64), 0.5, np.float32)
    f[0, 0] = 1.0
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    px = _pixels(load_image(tmp_path / "f.tif"))
    assert px[0, 0, 0] == 255 and px[1, 1, 0] == 128  # 0..1 floats, not clipped to black

    i32[0, 0] = -5
    Image.fromarray(i32).save(tmp_path / "neg.tif")
    with pytest.raises(MediaError, match=r"neg.tif: I pixel values span -5\.\.65535, outside 0\.\.65535"):
        load_image(tmp_path / "neg.tif")


def test_transparency_is_composited_on_white_and_other_modes_convert(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200  # red, hidden under alpha 0 on the left half
    rgba[:, 32:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    px = _pixels(load_image(tmp_path / "rgba.png"))
    assert px[0, 0].tolist() == [255, 255, 255] and px[0, 40].tolist() == [200, 0, 0]

    la = Image.fromarray(np.stack([np.full((64, 64), 60, np.uint8), np.full((64, 64), 0, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert _pixels(load_image(tmp_path / "la.png"))[3, 3].tolist() == [255, 255, 255]

    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.paste(0, (0, 0, 32, 64))
    pal.save(tmp_path / "p.png", transparency=0)
    px = _pixels(load_image(tmp_path / "p.png"))
    assert px[0, 0].tolist() == [255, 255, 255] and px[0, 40].tolist() == [10, 20, 30]

    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(tmp_path / "c.tif")  # pure cyan
    assert _pixels(load_image(tmp_path / "c.tif"))[0, 0].tolist() == [0, 255, 255]
    one = Image.new("1", (64, 64), 0)
    one.putpixel((1, 0), 1)
    one.save(tmp_path / "one.png")
    assert _pixels(load_image(tmp_path / "one.png"))[0, :2, 0].tolist() == [0, 255]


# ------------------------------------------------------------------------ item 4: EXIF orientation
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = np.zeros((64, 96, 3), np.uint8)  # 96 wide, 64 tall, as the camera wrote it
    stored[:32] = (255, 0, 0)  # top half red
    stored[32:] = (0, 0, 255)  # bottom half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=95, exif=exif.tobytes())
    px = _pixels(load_image(tmp_path / "photo.jpg")).astype(int)
    red = lambda p: p[0] > 200 and p[2] < 60  # noqa: E731
    blue = lambda p: p[2] > 200 and p[0] < 60  # noqa: E731
    if orientation == 3:  # rotated 180: red at the bottom
        assert px.shape[:2] == (64, 96) and red(px[60, 48]) and blue(px[4, 48])
    elif orientation == 6:  # shown turned 90 clockwise: a portrait, the stored top on the right
        assert px.shape[:2] == (96, 64) and red(px[48, 60]) and blue(px[48, 4])
    else:  # 8: turned 90 counter-clockwise, the stored top on the left
        assert px.shape[:2] == (96, 64) and red(px[48, 4]) and blue(px[48, 60])


# ------------------------------------------------------------------------ item 5: too small
def test_tiny_images_are_refused(tmp_path):
    for size in [(1, 1), (MIN_IMAGE_SIDE - 1, 500)]:
        Image.new("RGB", size).save(tmp_path / "tiny.png")
        with pytest.raises(MediaError, match=rf"tiny.png: {size[0]}x{size[1]} pixels is too small; the shorter "
                                             rf"side must be at least {MIN_IMAGE_SIDE} px"):
            load_image(tmp_path / "tiny.png")
    Image.new("RGB", (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").shape == (3, MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)


# ------------------------------------------------------------------------ item 9: pixel limit
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG that declares width x height (Pillow refuses at open, before decoding anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_limit_is_one_clear_error(tmp_path):
    _png_header_only(tmp_path / "huge.png", 14000, 14000)
    with pytest.raises(MediaError, match=r"huge.png: 196000000 pixels is past Pillow's decompression-bomb limit "
                                         r"\(178956970 pixels\); scale it down"):
        load_image(tmp_path / "huge.png")


# ------------------------------------------------------------------------ item 9: push
def test_push_to_an_unreachable_hub_or_a_bad_repo_id_is_one_line(toy_ckpt, tmp_path, monkeypatch):
    from qavatar.parallel.launch import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_qavatarTestToken0123456789abcdef")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    dit = _quantize(toy_ckpt, tmp_path / "int8").out  # push publishes quantized checkpoints only
    r = runner.invoke(app, ["push", str(dit), "--repo-id", "me/avatar"])
    _one_line_error(r, "upload to me/avatar failed: cannot reach the Hub at http://127.0.0.1:",
                    "the remote is unchanged")
    for bad in ("a/b/c", "bad id"):
        r = runner.invoke(app, ["push", str(dit), "--repo-id", bad])
        _one_line_error(r, f"--repo-id {bad!r} is not a Hub repo id: use ORG/NAME")


# ------------------------------------------------------------------------ item 9: full or read-only disk
def test_disk_errors_name_the_output(tmp_path):
    from qavatar.errors import OutputError, output_error

    out = tmp_path / "o.mp4"
    for code, says in [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only file system"),
                       (errno.EACCES, "permission denied")]:
        err = output_error(OSError(code, os.strerror(code)), out)
        assert isinstance(err, OutputError) and str(err).startswith(f"cannot write {out}: {says}")
    assert output_error(OSError(errno.EACCES, "denied", str(tmp_path / "in" / "image.png")), tmp_path / "x" / "o") \
        is None  # an input that cannot be read is not the output's fault
    assert output_error(OSError(errno.ENOENT, "gone"), out) is None


def _write_video(out) -> None:
    from qavatar.pipeline.video_writer import Mp4Writer

    w = Mp4Writer(out, 25, 64, 64)
    try:
        for _ in range(10):  # the muxer buffers: the disk is touched when it flushes
            w.write(torch.zeros(4, 64, 64, 3, dtype=torch.uint8))
        w.close()
    except BaseException:
        w.abort()
        raise


def test_mp4_writer_on_a_full_or_forbidden_disk(tmp_path):
    from qavatar.errors import OutputError

    with pytest.raises(OutputError, match=r"cannot write /sys/o.mp4: permission denied; .*\(EACCES\)"):
        _write_video("/sys/o.mp4")  # sysfs refuses new files, even to root
    out = tmp_path / "o.mp4"
    out.write_bytes(b"the previous video")
    (tmp_path / f".o.mp4.partial-{os.getpid()}").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(OutputError, match=rf"cannot write {out}: no space left on the device; .*\(ENOSPC\)"):
        _write_video(out)
    assert out.read_bytes() == b"the previous video" and not list(tmp_path.glob(".*partial*"))


def test_quantize_onto_a_full_or_forbidden_disk_is_one_line(toy_ckpt, tmp_path, monkeypatch):
    from qavatar.checkpoint.safetensors_format import SafetensorsWriter

    r = runner.invoke(app, ["quantize", str(toy_ckpt), "--out", "/sys/qavatar-q", "--calibration", "none"])
    _one_line_error(r, "/sys")
    real = SafetensorsWriter.write
    calls = []

    def full(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", full)
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", str(toy_ckpt), "--out", str(out), "--calibration", "none"])
    _one_line_error(r, f"cannot write {out}: no space left on the device", "(ENOSPC)")
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


# ------------------------------------------------------------------------ item 9: headers and encoder files
def _safetensors_with_header(path: Path, header: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.parametrize("header", [b"[1, 2, 3]", b'"text"', b"42", b'{"__metadata__": [1]}',
                                    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}'])
def test_a_safetensors_header_that_is_json_but_not_an_object(toy_ckpt, tmp_path, header):
    from qavatar.checkpoint import read_header

    shutil.copy(toy_ckpt / "Wan2.2-S2V-14B" / "config.json", tmp_path)
    _safetensors_with_header(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt"):
        read_header(tmp_path / "model.safetensors")
    r = runner.invoke(app, ["inspect", str(tmp_path)])
    _one_line_error(r, "model.safetensors: corrupt")


def test_config_and_index_that_are_json_but_not_objects(toy_ckpt, tmp_path):
    from qavatar.checkpoint import CheckpointReader

    dit = tmp_path / "dit"
    shutil.copytree(toy_ckpt / "Wan2.2-S2V-14B", dit, ignore=shutil.ignore_patterns("google", "wav2vec2*", "*.pth"))
    (dit / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: a JSON list, not an object"):
        CheckpointReader(dit).config
    (dit / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": ["a", "b"]}')
    with pytest.raises(CheckpointError, match=r"index.json: not a valid safetensors index"):
        CheckpointReader(dit)


@pytest.fixture
def encoders(toy_ckpt, tmp_path):
    """A copy of the toy encoder files that a test may damage."""
    root = tmp_path / "enc"
    src = toy_ckpt / "Wan2.2-S2V-14B"
    shutil.copytree(src / "wav2vec2-large-xlsr-53-english", root / "wav2vec2-large-xlsr-53-english")
    shutil.copytree(src / "google", root / "google")
    shutil.copy(src / "models_t5_umt5-xxl-enc-bf16.pth", root)
    return root


@pytest.mark.parametrize("name,content,says", [
    ("config.json", "{not json", "not valid JSON"),
    ("config.json", "[1]", "a JSON list where an object belongs"),
    ("model.safetensors", "garbage" * 10, "corrupt or truncated safetensors file"),
    ("preprocessor_config.json", '"x"', "a JSON str where an object belongs")])
def test_a_bad_wav2vec2_file_is_named(encoders, name, content, says):
    from qavatar.pipeline.audio_encoder import AudioEncoder

    bad = encoders / "wav2vec2-large-xlsr-53-english" / name
    bad.write_text(content)
    with pytest.raises(CheckpointError) as e:
        AudioEncoder(encoders)
    assert str(e.value).startswith(f"{bad}: cannot load the wav2vec2 audio encoder: {says}")


def test_a_bad_wav2vec2_config_is_named_before_the_run(toy_ckpt, tmp_path):
    from qavatar.pipeline.infer import InferRequest, prepare

    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_ckpt, ckpt)
    bad = ckpt / "Wan2.2-S2V-14B" / "wav2vec2-large-xlsr-53-english" / "config.json"
    bad.write_text("{oops")
    bundled = REPO / "calibration" / "bundled"
    req = InferRequest(str(ckpt), str(bundled / "images" / "p00.png"), str(bundled / "audio" / "p00.wav"), "hi",
                       str(tmp_path / "o.mp4"))
    with pytest.raises(CheckpointError, match=rf"{bad}: cannot read the wav2vec2 config \(JSONDecodeError\)"):
        prepare(req)


@pytest.mark.parametrize("content,says", [("garbage{", "not valid JSON"), ("[1, 2]", "a JSON list")])
def test_a_bad_tokenizer_file_is_named(encoders, content, says):
    from qavatar.pipeline.text_encoder import TextEncoder

    bad = encoders / "google" / "umt5-xxl" / "tokenizer.json"
    bad.write_text(content)
    with pytest.raises(CheckpointError) as e:
        TextEncoder(encoders).tokenizer
    assert str(e.value).startswith(f"{bad}: cannot load the umT5 tokenizer: {says}")


class _Code:
    def __reduce__(self):
        return (print, ("this would run",))


def test_t5_errors_are_whole_sentences(encoders, tmp_path):
    from qavatar.pipeline.text_encoder import load_wan_t5_state

    t5 = encoders / "models_t5_umt5-xxl-enc-bf16.pth"
    t5.write_bytes(t5.read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError) as e:
        load_wan_t5_state(t5)
    assert str(e.value) == (f"{t5}: not a loadable umT5 checkpoint (RuntimeError: PytorchStreamReader failed reading "
                            f"zip archive: failed finding central directory); re-download it")
    torch.save({"token_embedding.weight": _Code()}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match=r"code.pth: not a loadable umT5 checkpoint: it holds Python objects "
                                              r"besides tensors, which qavatar does not unpickle \(weights_only: no "
                                              r"code from a weights file is run\); use Wan's original umT5 file$"):
        load_wan_t5_state(tmp_path / "code.pth")


def test_first_sentence_never_cuts_a_word():
    from qavatar.errors import first_sentence

    assert first_sentence("Weights only load failed. In PyTorch 2.6, we changed\nmore") == "Weights only load failed"
    long = "word " * 100
    cut = first_sentence(long, limit=50)
    assert cut.endswith(" ...") and len(cut) <= 54 and set(cut[:-4].split()) == {"word"}


# ------------------------------------------------------------------------ item 9: python -m qavatar.parallel.stream
def test_stream_arguments_are_checked_up_front(toy_ckpt, tmp_path, monkeypatch, capsys):
    from qavatar.parallel.launch import free_port
    from qavatar.parallel.stream import main

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    ck = str(toy_ckpt)
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such checkpoint directory"),
        (["--checkpoint", ck, "--tp", "3"], "--tp 3 does not divide the 4 attention heads; use one of [1, 2, 4]"),
        (["--checkpoint", ck, "--tp", "0"], "--tp 0: the tensor-parallel degree is at least 1"),
        (["--checkpoint", "nobody/no-such-model"], "nobody/no-such-model: no such local directory"),
        (["--checkpoint", ck, "--size", "abc"], "--size 'abc': give pixel H*W with both sides multiples of 64"),
        (["--checkpoint", ck, "--size", "120*64"], "--size '120*64': give pixel H*W"),
        (["--checkpoint", ck, "--blocks", "0"], "--blocks 0: stream at least 1 block"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {msg}") and "\n" not in err, (argv, err)


# ------------------------------------------------------------------------ item 10: the rank that died first
def _killed_host_job(rank: int) -> None:
    from qavatar.parallel.launch import init_tp

    tp = init_tp(2, timeout_s=60)
    tp.all_reduce(torch.ones(4))  # the group is formed
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 of the host rank
    tp.all_reduce(torch.ones(4))  # rank 0 waits in a collective for a peer that is gone


def test_a_killed_rank_is_blamed_not_its_peer():
    from qavatar.parallel.launch import RankError, spawn_ranks

    with pytest.raises(RankError) as e:
        spawn_ranks(_killed_host_job, 2, timeout_s=60)
    assert str(e.value) == ("rank 1 was killed by signal 9 (SIGKILL: out of memory, or kill -9?); all 2 ranks were "
                            "stopped")


def test_first_failure_prefers_the_killed_rank_over_a_faster_report():
    from qavatar.parallel.launch import first_failure

    # the survivor reported before the launcher saw the killed rank exit: the order of a loaded machine
    peer = (0, "error", "Traceback ...\nRuntimeError: [gloo] Connection closed by peer [127.0.0.1]:29500")
    assert first_failure([peer], {0: 1, 1: -9}).startswith("rank 1 was killed by signal 9 (SIGKILL")
    assert first_failure([peer], {0: 1}) == ("rank 0 failed: RuntimeError: [gloo] Connection closed by peer "
                                             "[127.0.0.1]:29500")
    own = (1, "error", "ConfigError: bad")
    assert first_failure([own, peer], {1: 1, 0: 1}) == "rank 1 failed: ConfigError: bad"
    assert first_failure([], {1: 3}) == "rank 1 failed: exited with code 3 without a report"


# ------------------------------------------------------------------------ item 12: progress off a TTY, quiet bnb
def test_one_progress_line_per_clip_off_a_tty():
    import io

    from qavatar.pipeline.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    pipe, tty, quiet = io.StringIO(), Tty(), io.StringIO()
    for stream, q in ((pipe, False), (tty, False), (quiet, True)):
        p = Progress(2, 8, 4, 90, quiet=q, stream=stream)
        for clip in range(2):
            for block in range(4):
                for step in range(4):
                    p.step(clip, block, step)
                p.wrote(12 if clip == 0 else 10)
            p.clip_done(clip)
        p.close()
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in pipe.getvalue()
    assert lines[0].startswith("clip 1/2: 48 frames in ") and "frames/s), frames 48/90, ETA " in lines[0]
    assert lines[1].startswith("clip 2/2: 40 frames in ") and lines[1].endswith("frames 88/90, ETA 00:00:00")
    assert "clip 1/2: " not in tty.getvalue() and "\rclip 2/2  block 4  step 4/4" in tty.getvalue()
    assert quiet.getvalue() == ""


def _stderr_of(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_bitsandbytes_noise_stays_off_the_console(tmp_path):
    r = _stderr_of("-m", "qavatar.cli", "toy-checkpoint", str(tmp_path / "toy"))  # imports diffusers' VAE
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    r = _stderr_of("-c", "import torch; from qavatar.quant.kernels import pick_int8_kernel; "
                         "print(pick_int8_kernel(torch.device('cpu'), 32, 64, 64))")
    assert r.stdout.strip() == "bnb" and "gemm_4bit" not in r.stderr, r.stderr  # still used, quietly


# --------------------------------------------------------------------- found by independent readers (stop 19)
def _quantize(src, out, **kw):
    from qavatar.quant import QuantConfig
    from qavatar.quant.convert import quantize_checkpoint

    return quantize_checkpoint(src, out, QuantConfig("int8", ignore=kw.pop("ignore", ())),
                               calibration=kw.pop("calibration", "none"), log=lambda s: None, **kw)


def _lora_with(toy_ckpt, tmp_path, edit, meta_edit=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(toy_ckpt / "LiveAvatar" / "liveavatar.safetensors"), "pt") as f:
        meta, sd = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(sd)
    if meta_edit:
        meta_edit(meta)
    path = tmp_path / f"lora-{len(list(tmp_path.glob('lora-*')))}.safetensors"
    save_file(sd, str(path), meta)
    return path


def test_quantize_never_overwrites_what_it_reads(toy_ckpt, tmp_path):
    from qavatar.errors import QavatarError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_ckpt, ckpt)
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))
    for out, says in [(ckpt, "is the source checkpoint"), (ckpt / "Wan2.2-S2V-14B", "is the source DiT"),
                      (tmp_path, "holds the source checkpoint")]:
        with pytest.raises(QavatarError, match=f"--out .* {says} .*writing there would delete it"):
            _quantize(ckpt, out, overwrite=True)
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before
    r = runner.invoke(app, ["quantize", str(ckpt), "--out", str(ckpt), "--overwrite", "--calibration", "none"])
    _one_line_error(r, "is the source checkpoint")


def test_a_damaged_lora_value_is_refused_by_quantize_without_calibration(toy_ckpt, tmp_path):
    def damage(sd):
        k = next(k for k in sd if "lora_A" in k)
        sd[k] = sd[k].clone()
        sd[k][0, 0] = 1e4  # one value: without the screen it would set its rows' int8 scales

    with pytest.raises(CheckpointError, match=r"\(rows .*\) holds .* its typical magnitude .*after merging the LoRA"):
        _quantize(toy_ckpt, tmp_path / "q", lora=_lora_with(toy_ckpt, tmp_path, damage))
    assert not (tmp_path / "q").exists()


def test_a_changed_config_is_caught_by_the_manifest(toy_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_ckpt, ckpt)
    cfg = ckpt / "Wan2.2-S2V-14B" / "config.json"
    text = cfg.read_text()
    heads = json.loads(text)["num_heads"]
    cfg.write_text(text.replace(f'"num_heads": {heads}', f'"num_heads": {heads * 2}'))  # same size, same shapes
    assert len(cfg.read_text()) == len(text) and json.loads(cfg.read_text())["num_heads"] == 2 * heads
    with pytest.raises(CheckpointError, match="config.json: sha256 differs from qavatar-manifest.json"):
        _quantize(ckpt, tmp_path / "q")


@pytest.mark.parametrize("glob", ["blocks.0.self_attn.q.weight", "blocks.99.*", "head.head"])
def test_an_ignore_pattern_that_matches_no_quantized_linear_is_an_error(toy_ckpt, tmp_path, glob):
    from qavatar.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--ignore '{re.escape(glob)}' matches none of the"):
        _quantize(toy_ckpt, tmp_path / "q", ignore=(glob,))


def test_lora_rank_and_alpha_are_checked(toy_ckpt, tmp_path):
    from qavatar.errors import LoraError

    def rank0(sd):
        a = next(k for k in sd if "lora_A" in k)
        b = a.replace("lora_A", "lora_B")
        sd[a], sd[b] = sd[a][:0].clone(), sd[b][:, :0].clone()

    with pytest.raises(LoraError, match="has LoRA rank 0"):
        _quantize(toy_ckpt, tmp_path / "q", lora=_lora_with(toy_ckpt, tmp_path, rank0))
    words = _lora_with(toy_ckpt, tmp_path, lambda sd: None, lambda m: m.update(lora_alpha="sixty-four"))
    with pytest.raises(LoraError, match="its alpha 'sixty-four' is not a number; pass --lora-alpha"):
        _quantize(toy_ckpt, tmp_path / "q", lora=words)
    with pytest.raises(LoraError, match="--lora-alpha nan is not finite"):
        _quantize(toy_ckpt, tmp_path / "q", lora_alpha=float("nan"))
    _one_line_error(runner.invoke(app, ["toy-checkpoint", str(tmp_path / "t"), "--lora-rank", "0"]),
                    "--lora-rank 0: a LoRA has rank 1 or more")


def test_quantize_checks_device_and_pairs_before_reading(toy_ckpt, tmp_path):
    from qavatar.errors import ConfigError

    for device, says in [("gpu", "--device gpu: choose cpu, cuda or cuda:N")] + (
            [] if torch.cuda.is_available() else [("cuda", "--device cuda but torch .* is a CPU-only build")]):
        with pytest.raises(ConfigError, match=says):
            _quantize(toy_ckpt, tmp_path / "q", device=device)
    for n in (0, -1):
        with pytest.raises(ConfigError, match=f"--max-pairs {n}: calibrate on at least 1 pair"):
            _quantize(toy_ckpt, tmp_path / "q", max_pairs=n, calibration=None)


@pytest.mark.parametrize("pairs", ['["a.png"]', '{"a": 1}', '[{"image": 1, "audio": "a.wav"}]'])
def test_a_calibration_manifest_of_the_wrong_shape_is_one_line(tmp_path, pairs):
    from qavatar.errors import CalibrationError
    from qavatar.quant.dataset import CalibrationSet

    (tmp_path / "manifest.json").write_text(f'{{"pairs": {pairs}}}')
    with pytest.raises(CalibrationError, match="manifest.json: .*(must be a list of objects|needs both)"):
        CalibrationSet(tmp_path)


@pytest.mark.parametrize("manifest", ['{"files": {"config.json": {', '{"files": {"config.json": {}}}', '[]',
                                      '{"files": []}'])
def test_inspect_of_a_damaged_manifest_is_one_line(toy_ckpt, tmp_path, manifest):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_ckpt / "Wan2.2-S2V-14B", ckpt)
    (ckpt / "qavatar-manifest.json").write_text(manifest)
    for args in ([], ["--verify"]):
        _one_line_error(runner.invoke(app, ["inspect", str(ckpt), *args]), "unreadable manifest")


def test_overlapping_tensors_in_a_safetensors_header_are_refused(tmp_path):
    from qavatar.checkpoint.reader import CheckpointReader
    from safetensors.torch import save_file

    path = tmp_path / "two.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(4)}, str(path))
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["b"]["data_offsets"] = header["a"]["data_offsets"]  # b read from a's bytes
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(CheckpointError, match="tensor '[ab]' starts at byte 0 of the data, inside another tensor"):
        CheckpointReader(path).get("b")


def test_a_path_like_name_that_is_not_here_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _one_line_error(runner.invoke(app, ["inspect", "ckpt/Wan2.2-S2V-14B"]),
                    f"no such local directory ({tmp_path / 'ckpt' / 'Wan2.2-S2V-14B'}), and as a Hub repo")
