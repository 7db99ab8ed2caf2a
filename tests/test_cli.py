"""The command line as a user drives it: outputs, exit codes, one-line errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from conftest import REPO
from qavatar.cli import app

runner = CliRunner()


def test_toy_checkpoint_then_inspect(tmp_path):
    out = tmp_path / "ckpt"
    r = runner.invoke(app, ["toy-checkpoint", str(out), "--config", "tiny", "--seed", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["toy-checkpoint", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["inspect", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert "keys        match the config" in r.output and "sha256 verified" in r.output
    assert re.search(r"parameters  [\d,]+", r.output)
    r = runner.invoke(app, ["inspect", str(out / "Wan2.2-S2V-14B"), "--json"])
    report = json.loads(r.output)
    assert report["ok"] and report["lora"]["targets"] == 52 and len(report["shards"]) == 4


def test_inspect_against_another_config_lists_mismatches(tmp_path):
    out = tmp_path / "ckpt"
    runner.invoke(app, ["toy-checkpoint", str(out)])
    r = runner.invoke(app, ["inspect", str(out), "--config", "liveavatar-14b"])
    assert r.exit_code == 1
    assert "keys        1080 missing, 0 unexpected, 178 wrong shape" in r.output
    assert "shape       audio_injector.injector.0.k.bias: checkpoint [64] vs config [5120]" in r.output
    assert "missing     ... and 1070 more" in r.output


def test_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {tmp_path / 'missing'}: no such checkpoint directory"


def test_demo_writes_a_video_with_sound(tmp_path):
    from qavatar.pipeline.video_writer import probe

    out = tmp_path / "demo" / "demo.mp4"
    r = runner.invoke(app, ["demo", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    info = probe(out)  # the bundled 5.83 s speech: 145 frames, less the 3 the stream drops
    assert (info["frames"], info["fps"], info["height"], info["width"]) == (142, 25.0, 128, 64)
    assert abs(info["audio_seconds"] - 142 / 25) < 0.07
    assert "RANDOM" in r.output and "55 Linears fp8" in r.output and "FITS: largest rank" in r.output
    assert "at TP=2" in r.output and f"wrote {out}" in r.output
    assert (tmp_path / "demo" / "toy-checkpoint-fp8" / "qavatar-manifest.json").is_file()
    r = runner.invoke(app, ["demo", "--out", str(out), "--quiet"])  # a second run reuses the checkpoint
    assert r.exit_code == 0 and "reusing the toy checkpoint" in r.output
    assert not list((tmp_path / "demo").glob(".*partial*"))

    from qavatar.demo import _DemoRecord

    record = _DemoRecord(tmp_path / "demo")  # the toy weights' seed: another --seed rebuilds them
    assert record.seed == 0 and record.wrote(tmp_path / "demo" / "toy-checkpoint") and record.wrote(out)
    # what the demo did not write is never replaced without --overwrite (checked before any work)
    notes = tmp_path / "demo" / "toy-checkpoint-fp8" / "notes.txt"
    notes.write_text("mine")
    mine = tmp_path / "demo" / "mine.mp4"
    mine.write_bytes(b"my own video")
    for args, path in [(["--out", str(out)], notes.parent), (["--out", str(mine)], mine)]:
        r = runner.invoke(app, ["demo", *args, "--quiet"])
        assert r.exit_code == 2 and r.output.strip() == (
            f"error: {path} exists and was not written by an earlier `qavatar demo`; pass --overwrite to replace "
            f"it, or choose another --out"), r.output
    assert notes.read_text() == "mine" and mine.read_bytes() == b"my own video"
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "clip.mov")])
    assert r.exit_code == 2 and "the demo writes an mp4; give NAME.mp4, or a directory" in r.output
    assert not (tmp_path / "clip.mov").exists()


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "qavatar.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "check-parity" in r.stdout


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    assert "qavatar demo" in blocks[0] and blocks[1].endswith("pytest")
    assert blocks[1] in (REPO / ".ci" / "run").read_text()
