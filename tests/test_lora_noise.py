"""Issue 11 fidelity fixes: a missing LoRA is an error (unless --no-lora; never for a quantized checkpoint
with the LoRA merged), non-LoRA tensors in the LoRA file replace their parameter (whole, sliced per TP rank,
and in `quantize`), and each clip's noise is drawn as the reference draws it on GPUs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qavatar.checkpoint import load_dit
from qavatar.checkpoint.load import LORA_RELPATH, require_lora
from qavatar.checkpoint.reader import CheckpointReader
from qavatar.cli import app
from qavatar.errors import ConfigError, LoraError
from qavatar.parallel.group import TPGroup
from qavatar.parallel.load import load_rank
from qavatar.parallel.shard import shard_dim, shard_range
from qavatar.pipeline import noise as noise_mod
from qavatar.pipeline.infer import InferRequest, prepare
from qavatar.quant import QuantConfig
from qavatar.quant.convert import quantize_checkpoint

BUNDLED = Path(__file__).parents[1] / "calibration" / "bundled"
IMAGE, SPEECH = BUNDLED / "images" / "p00.png", BUNDLED / "audio" / "p00.wav"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _prompt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QAVATAR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def no_lora_ckpt(toy_ckpt, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nolora") / "ckpt"
    shutil.copytree(toy_ckpt, root)
    shutil.rmtree(root / "LiveAvatar")
    return root


def _infer_args(ckpt, out):
    return ["infer", "--checkpoint", str(ckpt), "--image", str(IMAGE), "--audio", str(SPEECH), "--out", str(out),
            "--num-clip", "1", "--quiet"]


def test_infer_without_the_lora_is_an_error_unless_no_lora(no_lora_ckpt, tmp_path):
    out = tmp_path / "o.mp4"
    r = runner.invoke(app, _infer_args(no_lora_ckpt, out))
    assert r.exit_code == 2 and not out.exists()
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "LiveAvatar/liveavatar.safetensors" in line and str(no_lora_ckpt / "LiveAvatar") in line
    assert "--no-lora" in line
    r = runner.invoke(app, _infer_args(no_lora_ckpt, out) + ["--no-lora"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "45 frames" in r.output


def test_quantize_without_the_lora_and_what_the_checkpoint_records(no_lora_ckpt, toy_ckpt, tmp_path):
    r = runner.invoke(app, ["quantize", str(no_lora_ckpt), "--out", str(tmp_path / "q"), "--calibration", "none"])
    assert r.exit_code == 2 and "liveavatar.safetensors" in r.output and not (tmp_path / "q").exists()
    base = quantize_checkpoint(no_lora_ckpt, tmp_path / "base-int8", QuantConfig("int8"), calibration="none",
                               lora=False, log=lambda s: None).out
    merged = quantize_checkpoint(toy_ckpt, tmp_path / "int8", QuantConfig("int8"), calibration="none",
                                 log=lambda s: None).out
    info = lambda d: json.loads((d / "config.json").read_text())["quantization_config"]["qavatar"]  # noqa: E731
    assert info(merged)["lora_merged"] is True and info(base)["lora_merged"] is False
    # the merged one needs no LoRA anywhere (here none is next to it), the base one says so unless --no-lora
    assert require_lora(merged) is None
    with pytest.raises(LoraError, match="quantized without the Live Avatar LoRA.*--no-lora"):
        require_lora(base)
    assert require_lora(base, no_lora=True) is None
    # a checkpoint from before lora_merged was recorded: the LoRA path says it
    cfg = json.loads((merged / "config.json").read_text())
    del cfg["quantization_config"]["qavatar"]["lora_merged"]
    (merged / "config.json").write_text(json.dumps(cfg))
    from qavatar.checkpoint.writer import write_manifest

    write_manifest(merged)  # as such a checkpoint was written: consistent with its own config
    assert require_lora(merged) is None
    req = InferRequest(str(merged), str(IMAGE), str(SPEECH), "", str(tmp_path / "o.mp4"), num_clip=1,
                       encoders=str(toy_ckpt))
    assert prepare(req).parts.dit == merged


def test_a_hub_checkpoint_fetches_the_lora_where_it_is_looked_for():
    from qavatar.hub.pull import WEIGHTS

    assert LORA_RELPATH.name in WEIGHTS and LORA_RELPATH.as_posix() in WEIGHTS


def _lora_with_extras(toy_ckpt: Path, tmp_path: Path, extras: dict[str, torch.Tensor]) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(toy_ckpt, root, ignore=shutil.ignore_patterns("*.pth", "google", "wav2vec2*"))
    lora = load_file(root / LORA_RELPATH)
    lora.update(extras)
    save_file(lora, root / LORA_RELPATH, {"format": "pt", "lora_alpha": "4.0", "r": "8"})
    return root


def _replacements(toy_ckpt):
    base = CheckpointReader(toy_ckpt / "Wan2.2-S2V-14B")
    g = torch.Generator().manual_seed(5)
    norm3 = torch.randn(base.shape("blocks.0.norm3.weight"), generator=g).to(torch.bfloat16)
    q = torch.randn(base.shape("blocks.1.self_attn.q.weight"), generator=g).to(torch.bfloat16)
    o = torch.randn(base.shape("blocks.1.self_attn.o.weight"), generator=g).to(torch.bfloat16)
    # PEFT names: the plain parameter, and a LoRA-wrapped Linear's base_layer
    return {"base_model.model.blocks.0.norm3.weight": norm3,
            "base_model.model.blocks.1.self_attn.q.base_layer.weight": q,
            "base_model.model.blocks.1.self_attn.o.base_layer.weight": o}, {
        "blocks.0.norm3.weight": norm3, "blocks.1.self_attn.q.weight": q, "blocks.1.self_attn.o.weight": o}


def test_non_lora_tensors_replace_their_parameter_whole_and_per_rank(toy_ckpt, tmp_path, capfd):
    extras, named = _replacements(toy_ckpt)
    root = _lora_with_extras(toy_ckpt, tmp_path, extras)
    plain = load_dit(toy_ckpt).state_dict()
    capfd.readouterr()
    model = load_dit(root).state_dict()
    assert "3 parameter(s) replaced by full tensors from liveavatar.safetensors" in capfd.readouterr().err
    lora = load_file(root / LORA_RELPATH)
    for key, t in named.items():
        module = key.removesuffix(".weight")
        a, b = lora.get(f"base_model.model.{module}.lora_A.weight"), lora.get(f"base_model.model.{module}.lora_B.weight")
        want = t.float() if a is None else (t.float() + 0.5 * (b.float() @ a.float())).to(torch.bfloat16).float()
        torch.testing.assert_close(model[key], want, rtol=0, atol=0)
        assert not torch.equal(model[key], plain[key])
    same = [k for k in plain if k not in named]
    assert all(torch.equal(model[k], plain[k]) for k in same)
    # each TP rank reads its slice of the replacement (q by rows, o by columns)
    for rank in range(2):
        tp = TPGroup(rank=rank, size=2)
        part = load_rank(root, tp).model.state_dict()
        for key in ("blocks.1.self_attn.q.weight", "blocks.1.self_attn.o.weight", "blocks.0.norm3.weight"):
            dim = shard_dim(key)
            full = model[key]
            if dim is not None:
                start, stop = shard_range(key, full.shape[dim], tp)
                full = full.narrow(dim, start, stop - start)
            torch.testing.assert_close(part[key], full, rtol=0, atol=0)


def test_quantize_writes_the_replacements(toy_ckpt, tmp_path):
    extras, named = _replacements(toy_ckpt)
    root = _lora_with_extras(toy_ckpt, tmp_path, extras)
    out = quantize_checkpoint(root, tmp_path / "q", QuantConfig("int8"), calibration="none", log=lambda s: None).out
    q = CheckpointReader(out)
    assert torch.equal(q.get("blocks.0.norm3.weight"), named["blocks.0.norm3.weight"])  # kept bf16, replaced
    ref = load_dit(root)
    w = q.get("blocks.1.self_attn.o.weight").float() * q.get("blocks.1.self_attn.o.weight_scale")
    err = (w - ref.state_dict()["blocks.1.self_attn.o.weight"]).norm() / ref.state_dict()["blocks.1.self_attn.o.weight"].norm()
    assert err < 0.02  # int8 of the replacement, not of the base weight (that would be ~1.4: unrelated tensors)


@pytest.mark.parametrize("extra,match", [
    ({"base_model.model.blocks.0.no_such.weight": torch.zeros(4)}, r"blocks\.0\.no_such\.weight \(no such model"),
    ({"blocks.0.norm3.weight": torch.zeros(3)}, r"blocks\.0\.norm3\.weight \[3\] \(the model's blocks\.0\.norm3"),
])
def test_unknown_or_misshaped_extra_tensors_are_errors_naming_them(toy_ckpt, tmp_path, extra, match):
    root = _lora_with_extras(toy_ckpt, tmp_path, extra)
    with pytest.raises(LoraError, match=match):
        load_dit(root)
    r = runner.invoke(app, ["quantize", str(root), "--out", str(tmp_path / "q"), "--calibration", "none"])
    assert r.exit_code == 2 and "neither LoRA factors nor a model parameter" in r.output


def test_noise_kinds_by_device():
    assert noise_mod.resolve_noise(None, "cpu") == "cpu"
    assert noise_mod.resolve_noise(None, "cuda") == "reference"
    assert noise_mod.resolve_noise("cpu", "cuda") == "cpu"
    with pytest.raises(ConfigError, match="CPU cannot reproduce"):
        noise_mod.resolve_noise("reference", "cpu")
    with pytest.raises(ConfigError, match="choose reference or cpu"):
        noise_mod.resolve_noise("gpu", "cuda")


def test_cpu_noise_is_the_seeded_fp32_draw_per_clip():
    n = noise_mod.clip_noise("cpu", 7, 2, 16, 12, 8, 6)
    assert n.shape == (1, 16, 12, 8, 6) and n.dtype == torch.float32
    assert torch.equal(n, torch.randn(1, 16, 12, 8, 6, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(n, noise_mod.clip_noise("cpu", 9, 0, 16, 12, 8, 6))  # seed + clip, as the reference
    assert not torch.equal(n, noise_mod.clip_noise("cpu", 7, 3, 16, 12, 8, 6))


def test_reference_noise_is_the_references_cuda_call(monkeypatch):
    calls = []

    class FakeGenerator:
        def __init__(self, device="cpu"):
            self.device, self.seed = device, None

        def manual_seed(self, seed):
            self.seed = seed
            return self

    def fake_randn(*shape, dtype=None, device=None, generator=None):
        calls.append((shape, dtype, device, generator.device, generator.seed))
        return torch.zeros(shape, dtype=dtype)

    monkeypatch.setattr(noise_mod.torch, "Generator", FakeGenerator)
    monkeypatch.setattr(noise_mod.torch, "randn", fake_randn)
    n = noise_mod.clip_noise("reference", 100, 3, 16, 12, 88, 48, "cuda:1")
    assert n.shape == (1, 16, 12, 88, 48) and n.dtype == torch.bfloat16
    assert calls == [((16, 12, 88, 48), torch.bfloat16, "cuda:1", "cuda:1", 103)]


def test_infer_draws_each_clips_noise_once_with_the_resolved_kind(no_lora_ckpt, tmp_path, monkeypatch):
    from qavatar.pipeline.infer import infer

    drawn = []
    real = noise_mod.clip_noise

    def spy(kind, seed, clip, *a):
        drawn.append((kind, seed, clip))
        return real(kind, seed, clip, *a)

    monkeypatch.setattr(noise_mod, "clip_noise", spy)
    infer(InferRequest(str(no_lora_ckpt), str(IMAGE), str(SPEECH), "", str(tmp_path / "o.mp4"), num_clip=2,
                       seed=4, quiet=True, no_lora=True))
    assert drawn == [("cpu", 4, 0), ("cpu", 4, 1)]
    # on a GPU the reference's draw is the default (prepare only: this machine has no CUDA)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    prep = prepare(InferRequest(str(no_lora_ckpt), str(IMAGE), str(SPEECH), "", str(tmp_path / "o.mp4"),
                                device="cuda", no_lora=True, overwrite=True))
    assert prep.noise == "reference"
    prep = prepare(InferRequest(str(no_lora_ckpt), str(IMAGE), str(SPEECH), "", str(tmp_path / "o.mp4"),
                                device="cuda", no_lora=True, noise="cpu", overwrite=True))
    assert prep.noise == "cpu"


def test_inspect_says_what_the_lora_does(toy_ckpt, no_lora_ckpt, tmp_path):
    extras, _ = _replacements(toy_ckpt)
    root = _lora_with_extras(toy_ckpt, tmp_path, extras)
    r = runner.invoke(app, ["inspect", str(root)])
    assert "52 targets, rank 8, alpha 4; replaces 3 parameter(s) whole" in r.output, r.output
    base = quantize_checkpoint(no_lora_ckpt, tmp_path / "base-int8", QuantConfig("int8"), calibration="none",
                               lora=False, log=lambda s: None).out
    r = runner.invoke(app, ["inspect", str(base)])
    assert "quantized without the LoRA (infer needs --no-lora)" in r.output, r.output
