"""Publishing to and pulling from the Hub, against a local stand-in server (tests/hub_server.py).

Every command runs as a user runs it, in a fresh interpreter with HF_ENDPOINT, HF_HOME and HF_TOKEN set, so
huggingface_hub reads its settings the way it does for real, and the test can read everything it printed.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from hub_server import LocalHub
from qavatar.quant import QuantConfig
from qavatar.quant.convert import quantize_checkpoint

TOKEN = "hf_qavatarTestToken0123456789abcdef"


@pytest.fixture(scope="module")
def ckpt(toy_ckpt, tmp_path_factory):
    """A calibrated int8 checkpoint in 3 shards, each large enough to go up as LFS."""
    return quantize_checkpoint(toy_ckpt, tmp_path_factory.mktemp("hubq") / "int8", QuantConfig("int8"),
                               max_pairs=2, max_shard_bytes=400_000, log=lambda s: None).out


@pytest.fixture
def hub():
    with LocalHub() as h:
        yield h


def run(hub, home, *args, offline=False, token=True):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = TOKEN
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, "-m", "qavatar.cli", *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert TOKEN not in r.stdout + r.stderr  # the token is never printed or logged
    return r


def _commits(hub, repo):
    return [q for q in hub.state.requests if q["method"] == "POST" and q["path"] == f"/api/models/{repo}/commit/main"]


def test_push_one_commit_with_card(hub, ckpt, tmp_path):
    r = run(hub, tmp_path / "home", "push", str(ckpt), "--repo-id", "me/avatar-int8", "--message", "int8 v1")
    assert r.returncode == 0, r.stderr
    assert "model card generated" in r.stdout
    commits = _commits(hub, "me/avatar-int8")
    assert len(commits) == 1  # everything in one commit
    header = json.loads(commits[0]["body"].decode().splitlines()[0])
    assert header["value"]["summary"] == "int8 v1"
    assert all(q["headers"].get("authorization") == f"Bearer {TOKEN}" or q["headers"].get("Authorization") ==
               f"Bearer {TOKEN}" for q in hub.state.requests if q["path"].startswith("/api/"))
    _, files = hub.state.tree("me/avatar-int8", "main")
    local = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert set(files) == local | {"README.md"}
    for name in local:
        assert files[name] == (ckpt / name).read_bytes(), name  # the bytes that arrived are the files
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == ["Wan-AI/Wan2.2-S2V-14B", "Quark-Vision/Live-Avatar"]
    assert meta["library_name"] == "qavatar" and meta["license"] == "apache-2.0"
    assert {"quantized", "int8", "live-avatar", "audio-driven", "talking-head"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "image-to-video"
    assert "end-to-end flow prediction, sampler step 0" in card and "| 4 x 24 GB | bf16 |" in card
    assert "qavatar plan --checkpoint me/avatar-int8" in card
    assert not (ckpt / "README.md").exists()  # the card is generated in memory, the checkpoint is untouched
    for p in list(ckpt.rglob("*")) + list((tmp_path / "home").rglob("*")):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes()  # nor written anywhere


def test_retry_after_a_failed_upload_sends_only_what_is_missing(hub, ckpt, tmp_path):
    hub.state.fail_puts = {2}  # the second LFS upload fails
    r = run(hub, tmp_path / "home", "push", str(ckpt), "--repo-id", "me/retry")
    assert r.returncode == 2 and "the remote is unchanged" in r.stderr
    assert _commits(hub, "me/retry") == []  # no commit was made
    oid, files = hub.state.tree("me/retry", "main")
    assert files == {}  # the remote is as it was
    stored_first = set(hub.state.lfs)
    assert stored_first  # something got up before the failure
    n = len(hub.state.requests)
    r = run(hub, tmp_path / "home", "push", str(ckpt), "--repo-id", "me/retry")
    assert r.returncode == 0, r.stderr
    second = [q["path"].rsplit("/", 1)[1] for q in hub.state.requests[n:] if q["method"] == "PUT"]
    assert second and not set(second) & stored_first  # objects already on the Hub are not sent again
    assert len(_commits(hub, "me/retry")) == 1
    _, files = hub.state.tree("me/retry", "main")
    assert files["qavatar-manifest.json"] == (ckpt / "qavatar-manifest.json").read_bytes()


@pytest.mark.parametrize("damage", ["missing-shard", "flipped-byte", "no-manifest", "partial-dir"])
def test_partial_or_damaged_checkpoints_are_refused(hub, ckpt, tmp_path, damage):
    bad = tmp_path / (".bad.partial-1234" if damage == "partial-dir" else "bad")
    shutil.copytree(ckpt, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    if damage == "missing-shard":
        shard.unlink()
    elif damage == "flipped-byte":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (bad / "qavatar-manifest.json").unlink()
    r = run(hub, tmp_path / "home", "push", str(bad), "--repo-id", "me/bad")
    assert r.returncode == 2 and r.stderr.startswith("error: ")
    assert {"missing-shard": "missing", "flipped-byte": "sha256 differs", "no-manifest": "no qavatar-manifest.json",
            "partial-dir": "interrupted write"}[damage] in r.stderr
    assert hub.state.requests == []  # nothing was sent


def test_pull_verify_and_offline(hub, ckpt, tmp_path):
    assert run(hub, tmp_path / "pub", "push", str(ckpt), "--repo-id", "me/pull").returncode == 0
    home = tmp_path / "home"
    n = len(hub.state.requests)
    r = run(hub, home, "inspect", "me/pull", token=False)
    assert r.returncode == 0, r.stderr
    assert "quantized   int8" in r.stdout and "keys        match the config" in r.stdout
    fetched = {q["path"].rsplit("/", 1)[1] for q in hub.state.requests[n:] if q["method"] == "GET" and "/resolve/" in q["path"]}
    assert "calibration_stats.safetensors" not in fetched and "config.json" in fetched  # only what it needs
    assert (home / "hub" / "models--me--pull").is_dir()  # the standard cache, under HF_HOME
    n = len(hub.state.requests)
    r = run(hub, home, "inspect", "me/pull", offline=True, token=False)
    assert r.returncode == 0, r.stderr
    assert len(hub.state.requests) == n  # HF_HUB_OFFLINE: served from the cache, nothing asked


def test_corrupted_download_is_caught_by_the_manifest(hub, ckpt, tmp_path):
    assert run(hub, tmp_path / "pub", "push", str(ckpt), "--repo-id", "me/rot").returncode == 0
    shard = sorted(p.name for p in ckpt.glob("*.safetensors"))[1]
    hub.state.corrupt("me/rot", shard)
    r = run(hub, tmp_path / "home", "inspect", "me/rot")
    assert r.returncode == 2
    assert "me/rot: the download does not match its manifest" in r.stderr and shard in r.stderr


def test_plan_reads_only_config(hub, ckpt, tmp_path):
    assert run(hub, tmp_path / "pub", "push", str(ckpt), "--repo-id", "me/plan").returncode == 0
    n = len(hub.state.requests)
    r = run(hub, tmp_path / "home", "plan", "--checkpoint", "me/plan", "--gpus", "2", "--vram", "24GiB",
            "--size", "128*64", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["request"]["precision"] == "int8" and out["fits"] and out["params"] == 661_385
    resolved = [q["path"] for q in hub.state.requests[n:] if "/resolve/" in q["path"]]
    assert resolved and all(p.endswith("/config.json") for p in resolved)


def test_infer_from_the_hub_with_encoders_from_another_repo(hub, ckpt, toy_ckpt, tmp_path):
    from qavatar.pipeline.video_writer import probe

    assert run(hub, tmp_path / "pub", "push", str(ckpt), "--repo-id", "me/avatar").returncode == 0
    # an upstream-style repo (no qavatar manifest) holding the DiT shards AND the encoders
    upload = ("import sys; from huggingface_hub import HfApi; api = HfApi(); api.create_repo('wan/s2v'); "
              "api.upload_folder(folder_path=sys.argv[1], repo_id='wan/s2v', ignore_patterns=['qavatar-manifest.json'])")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "up"), "HF_HUB_DISABLE_XET": "1",
           "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    r = subprocess.run([sys.executable, "-c", upload, str(toy_ckpt / "Wan2.2-S2V-14B")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n = len(hub.state.requests)
    bundled = os.path.join(os.path.dirname(__file__), "..", "calibration", "bundled")
    out = tmp_path / "o.mp4"
    r = run(hub, tmp_path / "home", "infer", "--checkpoint", "me/avatar", "--encoders", "wan/s2v",
            "--image", os.path.join(bundled, "images", "p00.png"), "--audio", os.path.join(bundled, "audio", "p00.wav"),
            "--num-clip", "1", "--out", str(out), "--quiet", token=False)
    assert r.returncode == 0, r.stderr
    assert probe(out)["frames"] == 45
    fetched = {re.sub(r"^.*?/resolve/[^/]+/", "", q["path"]) for q in hub.state.requests[n:]
               if q["method"] == "GET" and "/wan/s2v/resolve/" in q["path"]}
    assert "Wan2.1_VAE.pth" in fetched and "models_t5_umt5-xxl-enc-bf16.pth" in fetched
    assert not any(f.startswith("diffusion_pytorch_model") for f in fetched)  # only the encoders


def test_a_bf16_checkpoint_is_not_published_as_a_quantized_one(toy_ckpt):
    from qavatar.errors import CheckpointError
    from qavatar.hub.push import validate_for_upload

    with pytest.raises(CheckpointError, match="a bf16 checkpoint; push publishes qavatar-quantized ones"):
        validate_for_upload(toy_ckpt / "Wan2.2-S2V-14B")


def test_the_card_says_whether_the_lora_is_merged(ckpt, toy_ckpt, tmp_path):
    from qavatar.hub.card import model_card

    assert "the Wan2.2-S2V-14B DiT with the Live Avatar LoRA merged" in model_card(ckpt, "me/x")
    base = quantize_checkpoint(toy_ckpt, tmp_path / "base", QuantConfig("int8"), calibration="none", lora=False,
                               log=lambda s: None).out
    card = model_card(base, "me/x")
    assert "**without** the Live Avatar LoRA" in card and "LoRA merged" not in card
