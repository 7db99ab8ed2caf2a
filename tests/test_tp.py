"""Tensor parallelism on CPU with gloo: TP=2 and TP=4 equal TP=1 through the streaming path, each rank reads
only its slices, and bad degrees, crashed ranks and missing ranks end with clear errors."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from conftest import REPO
from qavatar.checkpoint import CheckpointReader
from qavatar.errors import ConfigError
from qavatar.parallel import TPGroup
from qavatar.parallel.launch import RankError, free_port, init_tp, spawn_ranks
from qavatar.parallel.load import load_rank
from qavatar.parallel.shard import shard_dim, shard_range
from qavatar.quant import QuantConfig, QuantLinear
from qavatar.quant.convert import quantize_checkpoint

BLOCKS = 5  # 15 latent frames: the 12-frame window wraps in block 4


@pytest.fixture(scope="module")
def checkpoints(toy_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    out = {"bf16": toy_ckpt}
    for name, cfg in {"int8": QuantConfig("int8"), "fp8": QuantConfig("fp8"),
                      "int8-static-smooth": QuantConfig("int8", activations="static", per_timestep=True,
                                                         smooth_alpha=0.5)}.items():
        out[name] = quantize_checkpoint(toy_ckpt, root / name, cfg, max_pairs=2, max_shard_bytes=300_000,
                                        log=lambda s: None).out
    return out


def _stream(model, emulate_fp8: bool) -> np.ndarray:
    from qavatar.model.streaming import StreamingSession, flow_match_schedule

    if emulate_fp8:
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.config.precision == "fp8":
                m.kernel_override = "emulate"
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    ref, motion = torch.randn(1, 16, 1, 16, 8, generator=g), torch.randn(1, 16, 19, 16, 8, generator=g)
    ctx = torch.randn(1, 9, cfg.text_dim, generator=g)
    noise = torch.randn(1, 16, 3 * BLOCKS, 16, 8, generator=g)
    audio = torch.randn(1, 25, cfg.audio_dim, 12 * BLOCKS, generator=g)
    s = StreamingSession(model, ctx, ref, motion, *flow_match_schedule(), seed=3)
    out = [s.denoise_block(noise[:, :, 3 * b:3 * b + 3], audio[..., 12 * b:12 * b + 12]) for b in range(BLOCKS)]
    return torch.cat(out, dim=2).numpy()


def _rank_job(rank: int, world: int, ckpts: dict) -> dict:
    torch.set_num_threads(1)
    tp = init_tp(world, timeout_s=60)
    result = {}
    for name, path in ckpts.items():
        for emulate in ((False, True) if name == "fp8" else (False,)):
            loaded = load_rank(path, tp)
            key = name + ("-emulated" if emulate else "")
            result[key] = {"latents": _stream(loaded.model, emulate), "bytes_read": loaded.bytes_read,
                           "param_bytes": loaded.param_bytes}
    fast = dataclasses.replace(tp, exact_int8_reduce=False)  # reduce dequantized partials instead of int32
    result["int8-float-reduce"] = {"latents": _stream(load_rank(ckpts["int8"], fast).model, False)}
    return result


@pytest.fixture(scope="module")
def runs(checkpoints):
    paths = {k: str(v) for k, v in checkpoints.items()}
    out = {1: [_rank_job(0, 1, paths)]}
    for world in (2, 4):
        out[world] = spawn_ranks(_rank_job, world, args=(world, paths), timeout_s=120)
    return out


def _db(approx, ref):
    return 10 * np.log10((ref ** 2).sum() / max(((approx - ref) ** 2).sum(), 1e-30))


@pytest.mark.parametrize("name", ["bf16", "int8", "fp8", "fp8-emulated", "int8-static-smooth", "int8-float-reduce"])
@pytest.mark.parametrize("world", [2, 4])
def test_tp_streaming_matches_tp1(runs, name, world):
    """Sink prefill and 5 blocks (the rolling window wraps) through the whole sharded model."""
    ref = runs[1][0][name.replace("-float-reduce", "")]["latents"]
    got = runs[world][0][name]["latents"]
    assert all(np.array_equal(runs[world][r][name]["latents"], got) for r in range(world))  # ranks agree
    if name.startswith("int8") and name != "int8-float-reduce":
        # integer partial sums and a head-ordered norm reduction: bit-identical to the unsharded model
        assert np.array_equal(got, ref)
    elif name in ("fp8-emulated", "int8-float-reduce"):
        # fp32 partial sums of the row-parallel layers flip a few fp8 activation roundings downstream: the TP
        # difference stays far below fp8's own quantization error
        quant_error_db = _db(ref, runs[1][0]["bf16"]["latents"])
        assert _db(got, ref) > quant_error_db + 6, (_db(got, ref), quant_error_db)
    else:  # bf16 (fp32 on CPU) and fp8 weight-only: only fp32 rounding differs
        assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-5


def _expected_read(path, world, rank) -> tuple[int, int, int]:
    """(bytes this rank should read, sharded bytes in total, replicated bytes) from the headers alone."""
    reader = CheckpointReader(path)
    tp = TPGroup(rank, world)
    mine = sharded = replicated = 0
    for key in reader.keys():
        n, shape = reader.nbytes(key), reader.shape(key)
        dim = shard_dim(key)
        if dim is None:
            mine += n
            replicated += n
        else:
            start, stop = shard_range(key, shape[dim], tp)
            mine += n * (stop - start) // shape[dim]
            sharded += n
    return mine, sharded, replicated


@pytest.mark.parametrize("name", ["int8", "int8-static-smooth"])
def test_each_rank_reads_only_its_slices(runs, checkpoints, name):
    for world in (2, 4):
        for rank in range(world):
            mine, sharded, replicated = _expected_read(checkpoints[name], world, rank)
            got = runs[world][rank][name]["bytes_read"]
            assert got == mine  # exactly its slices and the replicated tensors, nothing else
            assert got <= sharded / world * 1.02 + replicated
    total = sum(_expected_read(checkpoints[name], 1, 0)[:1])
    assert runs[1][0][name]["bytes_read"] == total


def test_bf16_ranks_merge_the_lora_on_slices(runs, checkpoints):
    base, _, _ = _expected_read(checkpoints["bf16"] / "Wan2.2-S2V-14B", 1, 0)
    lora = os.path.getsize(checkpoints["bf16"] / "LiveAvatar" / "liveavatar.safetensors")
    for world in (2, 4):
        for rank in range(world):
            mine, sharded, replicated = _expected_read(checkpoints["bf16"] / "Wan2.2-S2V-14B", world, rank)
            got = runs[world][rank]["bf16"]["bytes_read"]
            assert mine <= got <= mine + lora  # its base slices plus (slices of) the LoRA factors
            assert got < base + lora


def test_sharding_rules():
    assert shard_dim("blocks.3.self_attn.q.weight") == 0 and shard_dim("blocks.3.self_attn.q.weight_scale") == 0
    assert shard_dim("blocks.3.self_attn.q.input_scale") is None and shard_dim("blocks.3.self_attn.q.smooth_scale") is None
    assert shard_dim("blocks.3.self_attn.o.weight") == 1 and shard_dim("blocks.3.self_attn.o.bias") is None
    assert shard_dim("blocks.3.self_attn.o.weight_scale") is None and shard_dim("blocks.3.ffn.2.smooth_scale") == 0
    assert shard_dim("blocks.3.cross_attn.norm_k.weight") == 0 and shard_dim("blocks.3.norm3.weight") is None
    assert shard_dim("audio_injector.injector.7.v.bias") == 0 and shard_dim("audio_injector.injector.7.o.weight") == 1
    assert shard_dim("audio_injector.injector_adain_layers.7.linear.weight") is None
    for key in ("time_projection.1.weight", "head.head.weight", "blocks.0.modulation", "patch_embedding.weight"):
        assert shard_dim(key) is None
    # 13824 FFN rows over 5 ranks: 2765 x 4 + 2764, contiguous
    spans = [shard_range("blocks.0.ffn.0.weight", 13824, TPGroup(r, 5)) for r in range(5)]
    assert [b - a for a, b in spans] == [2765] * 4 + [2764] and spans[-1][1] == 13824
    assert shard_range("blocks.0.self_attn.k.weight", 5120, TPGroup(2, 5)) == (2048, 3072)  # 8 whole heads


def test_bad_degree_and_world_size(checkpoints, monkeypatch):
    with pytest.raises(ConfigError, match="num_heads=4 is not divisible by the tensor-parallel degree 3"):
        load_rank(checkpoints["int8"], TPGroup(0, 3))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(RankError, match="--tp 4 but the launcher started 2 ranks"):
        init_tp(4)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RankError, match="launch with `torchrun --nproc-per-node 2"):
        init_tp(2)


def _crash_job(rank: int) -> None:
    tp = init_tp(2, timeout_s=30)
    if rank == 1:
        raise RuntimeError("simulated crash on rank 1")
    tp.all_reduce(torch.ones(4))  # rank 0 waits for a peer that is gone


def test_a_crashed_rank_stops_every_rank_quickly():
    t = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed: .*simulated crash on rank 1; all 2 ranks were stopped"):
        spawn_ranks(_crash_job, 2)
    assert time.monotonic() - t < 30


def test_a_rank_that_never_arrives_times_out_with_a_message():
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        from qavatar.parallel.launch import init_tp, RankError
        try:
            init_tp(2, timeout_s=3)
        except RankError as e:
            print(e)
            sys.exit(3)
    """)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "rank 0: could not form the 2-rank group" in r.stdout and "within 3 s" in r.stdout
    assert time.monotonic() - t < 60


def test_stream_latents_out_at_tp2_equals_tp1(checkpoints, tmp_path):
    """`python -m qavatar.parallel.stream --latents-out`: the host rank writes every block's latents; int8 at TP=2
    equals the same stream at TP=1, bit for bit, at the per-rank thread count."""
    from qavatar.parallel.stream import main, stream_latents
    from qavatar.pipeline.latents_out import LatentsOutError, check_latents_out, load_latents

    out = tmp_path / "lat.safetensors"
    assert main(["--checkpoint", str(checkpoints["int8"]), "--tp", "2", "--blocks", "2", "--seed", "3",
                 "--latents-out", str(out)]) == 0
    latents, meta = load_latents(out)
    assert latents.dtype == torch.float32 and latents.shape[2:] == (6, 16, 8)  # 2 blocks x 3 frames, 128*64 / 8
    assert {k: meta[k] for k in ("seed", "precision", "tp", "size", "blocks")} == \
        {"seed": "3", "precision": "int8", "tp": "2", "size": "128*64", "blocks": "2"}
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # what each spawned rank runs with
    try:
        ref = stream_latents(checkpoints["int8"], TPGroup(), 2, (16, 8), seed=3).latents
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(latents, ref)
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(LatentsOutError, match="is a directory"):  # the check main() runs first
        check_latents_out(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "qavatar.parallel.stream", "--checkpoint", str(checkpoints["int8"]),
                        "--latents-out", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "is a directory" in r.stderr


def test_world_size_without_a_launcher_is_a_clear_error(monkeypatch):
    from qavatar.parallel.launch import launcher_rank

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launcher_rank() is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # some job schedulers export it on their own
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RankError, match="WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: launch "
                                        "with torchrun, or unset WORLD_SIZE"):
        launcher_rank()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launcher_rank() == 1
