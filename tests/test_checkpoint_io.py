"""Checkpoint I/O: streaming writer, lazy/sliced reader, atomic output, LoRA merge, bad input."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qavatar.checkpoint import (MANIFEST, CheckpointReader, LoraAdapter, MergedWeights, ShardedWriter, TensorSpec,
                                atomic_directory, load_dit, open_weights, verify_manifest)
from qavatar.checkpoint.inspect import inspect_checkpoint
from qavatar.checkpoint.toy import make_toy_checkpoint
from qavatar.errors import CheckpointError, LoraError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int32, torch.float8_e4m3fn,
          torch.bool]


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        t = torch.randn(7, 5 + i, generator=g) * 4
        out[f"t{i}.{str(dt).removeprefix('torch.')}"] = t > 0 if dt == torch.bool else t.to(dt)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def _bytes(t):
    return t.reshape(-1).view(torch.uint8)


def _write(directory, tensors, **kw):
    w = ShardedWriter(directory, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], **kw)
    for k, v in tensors.items():
        w.write(k, v)
    w.finish()
    return w


def test_sharded_round_trip_all_dtypes(tmp_path):
    tensors = _tensors()
    w = _write(tmp_path, tensors, num_shards=3)
    assert len(w.files) == 3
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    reader = CheckpointReader(tmp_path)
    for k, v in tensors.items():
        got = reader.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(_bytes(got), _bytes(v))
    # our files are plain safetensors: the library reads them, and the recorded hashes are the files' hashes
    for name in w.files:
        with safe_open(str(tmp_path / name), "pt") as f:
            for k in f.keys():
                assert torch.equal(_bytes(f.get_tensor(k)), _bytes(tensors[k]))
        assert w.hashes[name] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def test_single_shard_has_no_index(tmp_path):
    _write(tmp_path, {"a": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["diffusion_pytorch_model.safetensors"]
    assert torch.equal(CheckpointReader(tmp_path).get("a"), torch.ones(3))


def test_writer_enforces_the_plan(tmp_path):
    w = ShardedWriter(tmp_path, [TensorSpec("a", torch.float32, (2,))])
    with pytest.raises(CheckpointError, match="expected a torch.float32\\[2\\]"):
        w.write("a", torch.zeros(3))
    w.abort()


def test_slices_read_only_their_bytes(tmp_path):
    full = torch.randn(64, 48).to(torch.bfloat16)
    _write(tmp_path, {"w": full})
    reader = CheckpointReader(tmp_path)
    rows = reader.get_slice("w", 0, 16, 32)
    assert torch.equal(rows, full[16:32]) and reader.bytes_read == 16 * 48 * 2
    cols = reader.get_slice("w", 1, 12, 24)
    assert torch.equal(cols, full[:, 12:24]) and reader.bytes_read == 16 * 48 * 2 + 64 * 12 * 2
    with pytest.raises(CheckpointError, match="outside dim 0"):
        reader.get_slice("w", 0, 60, 70)


def test_atomic_directory(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []  # nothing, not even the partial directory
    with atomic_directory(out) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(CheckpointError, match="already exists"):
        with atomic_directory(out):
            pass
    assert (out / "v1").read_text() == "1"  # an existing output is never touched without overwrite
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            raise RuntimeError("crash")
    assert (out / "v1").read_text() == "1"  # a failed overwrite keeps the old output
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["v2"]


def test_partial_directory_is_refused(tmp_path):
    partial = tmp_path / ".ckpt.partial-1234"
    partial.mkdir()
    _write(partial, {"a": torch.ones(2)})
    with pytest.raises(CheckpointError, match="interrupted write"):
        CheckpointReader(partial)


def test_toy_checkpoint_is_deterministic(tmp_path):
    a = make_toy_checkpoint(tmp_path / "a", seed=3)
    b = make_toy_checkpoint(tmp_path / "b", seed=3)
    c = make_toy_checkpoint(tmp_path / "c", seed=4)
    files = lambda p: {f.relative_to(p).as_posix(): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}
    assert files(a) == files(b)
    assert files(a) != files(c)
    assert not verify_manifest(a / "Wan2.2-S2V-14B")


def test_toy_layout_and_inspect(toy_ckpt):
    dit = toy_ckpt / "Wan2.2-S2V-14B"
    assert sorted(p.name for p in dit.iterdir()) == [
        "Wan2.1_VAE.pth", "config.json", "diffusion_pytorch_model-00001-of-00004.safetensors",
        "diffusion_pytorch_model-00002-of-00004.safetensors", "diffusion_pytorch_model-00003-of-00004.safetensors",
        "diffusion_pytorch_model-00004-of-00004.safetensors", "diffusion_pytorch_model.safetensors.index.json",
        "google", "models_t5_umt5-xxl-enc-bf16.pth", MANIFEST, "wav2vec2-large-xlsr-53-english"]
    report = inspect_checkpoint(toy_ckpt, verify=True)
    assert report["ok"] and report["config"] == "tiny"
    with torch.device("meta"):
        from qavatar.model import build_model
        n = sum(p.numel() for p in build_model("tiny").parameters())
    assert report["params"] == n
    assert report["bytes_by_dtype"] == {"bfloat16": 2 * n}
    assert report["lora"]["valid"] and report["lora"]["rank"] == 8 and report["lora"]["alpha"] == 4
    assert report["lora"]["targets"] == 4 * 10 + 3 * 4  # blocks q,k,v,o x2 + ffn.0/2, injector q,k,v,o


def test_lora_merge_matches_an_independent_fp32_merge(toy_ckpt):
    dit = toy_ckpt / "Wan2.2-S2V-14B"
    merged = load_dit(toy_ckpt)
    base = load_dit(toy_ckpt, lora=False)
    lora = load_file(toy_ckpt / "LiveAvatar" / "liveavatar.safetensors")
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    changed = 0
    for key, w in base_sd.items():
        module = key.removesuffix(".weight")
        a = lora.get(f"base_model.model.{module}.lora_A.weight")
        if a is None or not key.endswith(".weight"):
            assert torch.equal(merged_sd[key], w), key
            continue
        b = lora[f"base_model.model.{module}.lora_B.weight"]
        bf16 = CheckpointReader(dit).get(key)
        want = (bf16.float() + 0.5 * (b.float() @ a.float())).to(torch.bfloat16).float()  # alpha 4 / rank 8
        assert torch.equal(merged_sd[key], want), key
        changed += 1
    assert changed == 52


def test_merged_slices_equal_slices_of_the_merge(toy_ckpt):
    weights, _, _ = open_weights(toy_ckpt)
    assert isinstance(weights, MergedWeights)
    for key in ("blocks.1.self_attn.q.weight", "blocks.2.ffn.2.weight", "audio_injector.injector.0.o.weight"):
        full = weights.get(key)
        assert torch.equal(weights.get_slice(key, 0, 16, 48), full[16:48])
        assert torch.equal(weights.get_slice(key, 1, 8, 40), full[:, 8:40])


def _copy(toy_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(toy_ckpt, dst)
    return dst, dst / "Wan2.2-S2V-14B"


def test_missing_shard(toy_ckpt, tmp_path):
    root, dit = _copy(toy_ckpt, tmp_path)
    (dit / "diffusion_pytorch_model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00004.safetensors: shard listed in .*is missing .*holds '"):
        load_dit(root)


def test_truncated_and_corrupt_shards(toy_ckpt, tmp_path):
    root, dit = _copy(toy_ckpt, tmp_path)
    shard = dit / "diffusion_pytorch_model-00003-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="00003-of-00004.safetensors: truncated"):
        CheckpointReader(dit)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    with pytest.raises(CheckpointError, match="00003-of-00004.safetensors: corrupt safetensors header"):
        CheckpointReader(dit)
    shard.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        CheckpointReader(dit)
    # the manifest catches silent corruption of the same length
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    problems = verify_manifest(dit)
    assert len(problems) == 1 and "sha256 differs" in problems[0]
    assert not inspect_checkpoint(root, verify=True)["ok"]


def test_wrong_shape_missing_and_unexpected_keys(toy_ckpt, tmp_path):
    root, dit = _copy(toy_ckpt, tmp_path)
    name = "diffusion_pytorch_model-00001-of-00004.safetensors"
    shard = load_file(dit / name)
    key = next(k for k in shard if k.endswith("ffn.0.weight"))
    shard[key] = shard[key][:, :-1].contiguous()
    dropped = next(k for k in shard if k.endswith("modulation"))
    del shard[dropped]
    shard["blocks.0.extra.weight"] = torch.zeros(2)
    save_file(shard, dit / name)
    index_path = dit / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][dropped]
    index["weight_map"]["blocks.0.extra.weight"] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_dit(root, lora=False)
    msg = str(e.value)
    assert f"1 missing keys (e.g. {dropped})" in msg
    assert "1 unexpected keys (e.g. blocks.0.extra.weight)" in msg
    assert f"{key}: [128, 63] in {name}, config wants [128, 64]" in msg
    report = inspect_checkpoint(root)
    assert report["missing_keys"] == [dropped] and not report["ok"]


def test_index_promising_a_key_the_shard_lacks(toy_ckpt, tmp_path):
    root, dit = _copy(toy_ckpt, tmp_path)
    index_path = dit / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "diffusion_pytorch_model-00004-of-00004.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"holds '{key}', which .* puts in .*00004"):
        CheckpointReader(dit)


def test_lora_targets_must_match_the_model(toy_ckpt, tmp_path):
    root, dit = _copy(toy_ckpt, tmp_path)
    path = root / "LiveAvatar" / "liveavatar.safetensors"
    lora = load_file(path)
    lora["base_model.model.blocks.9.self_attn.q.lora_A.weight"] = torch.zeros(8, 64)
    lora["base_model.model.blocks.9.self_attn.q.lora_B.weight"] = torch.zeros(64, 8)
    save_file(lora, path, metadata={"lora_alpha": "4"})
    with pytest.raises(LoraError, match="LoRA targets 'blocks.9.self_attn.q'.*which the model does not have"):
        load_dit(root)
    del lora["base_model.model.blocks.9.self_attn.q.lora_A.weight"]
    del lora["base_model.model.blocks.9.self_attn.q.lora_B.weight"]
    lora["base_model.model.blocks.0.ffn.0.lora_A.weight"] = torch.zeros(8, 32)
    save_file(lora, path, metadata={"lora_alpha": "4"})
    with pytest.raises(LoraError, match=r"LoRA for blocks.0.ffn.0 is \[128, 32\] but blocks.0.ffn.0.weight is \[128, 64\]"):
        load_dit(root)
    del lora["base_model.model.blocks.0.ffn.0.lora_A.weight"]
    save_file(lora, path, metadata={"lora_alpha": "4"})
    with pytest.raises(LoraError, match="blocks.0.ffn.0 has only lora_B"):
        load_dit(root)
    save_file({"something.else": torch.zeros(1)}, path)  # not a LoRA factor, nor a model parameter
    with pytest.raises(LoraError, match=r"neither LoRA factors nor a model parameter .*something\.else \(no such"):
        load_dit(root)


def test_lora_key_variants_and_alpha(tmp_path):
    a, b = torch.randn(4, 6), torch.randn(10, 4)
    variants = {
        "peft_default": {"base_model.model.blocks.0.ffn.0.lora_A.default.weight": a,
                         "base_model.model.blocks.0.ffn.0.lora_B.default.weight": b},
        "kohya": {"diffusion_model.blocks.0.ffn.0.lora_down.weight": a,
                  "diffusion_model.blocks.0.ffn.0.lora_up.weight": b,
                  "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(2.0)},
    }
    for name, tensors in variants.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        lora = LoraAdapter(tmp_path / f"{name}.safetensors", default_alpha=8.0)
        t = lora.targets["blocks.0.ffn.0"]
        assert t.rank == 4 and t.scale == (0.5 if name == "kohya" else 2.0)
        assert torch.allclose(lora.delta("blocks.0.ffn.0"), t.scale * b @ a)
    save_file(variants["peft_default"], tmp_path / "noalpha.safetensors")
    with pytest.raises(LoraError, match="alpha unknown"):
        LoraAdapter(tmp_path / "noalpha.safetensors")
