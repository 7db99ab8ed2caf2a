"""Pipeline parallelism on CPU with gloo: the timestep-forcing schedule keeps its dependencies and its stages
busy, the pipelined latents equal the sequential ones bit for bit (every scheme, pure and hybrid layouts, over
two clip boundaries and a KV-window wrap), traces come from real runs, and failures end every rank."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from qavatar.errors import ConfigError
from qavatar.parallel.launch import RankError, free_port, spawn_ranks
from qavatar.parallel.schedule import PREFILL, occupancy, pipeline_schedule
from qavatar.parallel.stages import balance, stage_holds, stage_layers
from qavatar.quant import QuantConfig
from qavatar.quant.convert import quantize_checkpoint

BLOCKS = 9  # clips 0, 1 and 2: two clip boundaries (the sink rolls at the first); the 12-frame window wraps at 4
LATENT_HW = (16, 8)


# ------------------------------------------------------------------------------------------ the schedule
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("blocks,steps,per_clip", [(9, 4, 4), (13, 4, 4), (7, 3, 2), (5, 1, 4), (3, 4, 4)])
def test_schedule_keeps_the_dependencies(stages, blocks, steps, per_clip):
    items = pipeline_schedule(blocks, steps, stages, per_clip, roll_sink=True)
    calls = [(i.block, i.step) for i in items if not i.prefill]
    assert sorted(calls) == [(b, s) for b in range(blocks) for s in range(steps)]  # each call exactly once
    slot = {(i.block, i.step): i.slot for i in items}
    order = {(i.block, i.step): n for n, i in enumerate(items)}
    assert len({i.slot for i in items}) == len(items)  # one item enters per slot
    assert [i.slot for i in items] == sorted(i.slot for i in items)
    for b, s in calls:
        if s:
            assert slot[(b, s)] >= slot[(b, s - 1)] + stages  # the previous step has left the last stage
        if b:
            assert order[(b - 1, s)] < order[(b, s)]  # the previous block wrote its rows of cache s first
    assert items[0].prefill and items[0].block == 0
    rolls = [i for i in items if i.prefill and i.block == 1]
    if blocks > per_clip:
        (roll,) = rolls
        n = order[(1, PREFILL)]
        assert all(order[(b, s)] < n for b, s in calls if b < per_clip)  # clip 0 reads the old sink everywhere
        assert all(order[(b, s)] > n for b, s in calls if b >= per_clip)
        assert roll.slot >= slot[(0, steps - 1)] + stages  # block 0 is finished: its first frame is the new reference
    else:
        assert not rolls


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_steady_state_occupancy_over_8_clips(stages):
    occ = occupancy(pipeline_schedule(32, 4, stages, 4, roll_sink=True), stages)
    assert occ.steady >= 0.9
    assert occ.items == 32 * 4 + 2


def test_stage_balance_is_exact_and_contiguous(toy_ckpt):
    assert balance([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balance([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert balance([1, 1, 1, 1], 2, first_extra=3) == [(0, 1), (1, 4)]
    with pytest.raises(ConfigError, match="between 1 and 4 stages"):
        balance([1, 1, 1, 1], 5)
    from qavatar.model import build_model

    with torch.device("meta"):
        model = build_model("liveavatar-14b")
    cfg = model.cfg
    ranges = stage_layers(cfg, 4, (88, 48))
    assert ranges[0][0] == 0 and ranges[-1][1] == 40 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # every key of the model belongs to exactly the stages that need it: blocks once, embeddings first, head last
    for key in model.state_dict():
        holders = [s for s, (a, b) in enumerate(ranges) if stage_holds(cfg, key, range(a, b), s == 0, s == 3)]
        if key.startswith(("blocks.", "audio_injector.")):
            assert len(holders) == 1, key
        elif key.startswith("head."):
            assert holders == [3]
        else:
            assert holders == [0], key


# ------------------------------------------------------------------------------------------ exactness
@pytest.fixture(scope="module")
def checkpoints(toy_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    out = {"bf16": str(toy_ckpt)}
    for name, qc in {"int8": QuantConfig("int8"), "fp8": QuantConfig("fp8"), "fp8-wo": QuantConfig("fp8-wo"),
                     "int8-static-smooth": QuantConfig("int8", activations="static", per_timestep=True,
                                                        smooth_alpha=0.5)}.items():
        out[name] = str(quantize_checkpoint(toy_ckpt, root / name, qc, max_pairs=2, log=lambda s: None).out)
    return out


def _stream_job(rank: int, pp: int, tp: int, ckpts: dict) -> dict:
    from qavatar.parallel.launch import init_tp
    from qavatar.parallel.pipeline import init_pipeline
    from qavatar.parallel.stream import _config, stream_latents

    torch.set_num_threads(1)  # every layout computes with one thread per rank: GEMM results do not depend on it
    if pp > 1:
        group = init_pipeline(pp, tp, stage_layers(_config(ckpts["bf16"]), pp, LATENT_HW), timeout_s=60)
    else:
        group = init_tp(tp, timeout_s=60)
    out = {}
    for name, path in ckpts.items():
        rep = stream_latents(path, group, BLOCKS, LATENT_HW, seed=5)
        out[name] = {"latents": rep.latents, "held": rep.held_bytes, "cache": rep.cache_bytes, "trace": rep.trace}
    return out


@pytest.fixture(scope="module")
def runs(checkpoints):
    threads = torch.get_num_threads()
    try:
        out = {(1, 1): [_stream_job(0, 1, 1, checkpoints)]}
    finally:
        torch.set_num_threads(threads)
    for pp, tp in [(2, 1), (3, 1), (4, 1), (1, 2), (2, 2)]:
        out[(pp, tp)] = spawn_ranks(_stream_job, pp * tp, args=(pp, tp, checkpoints), timeout_s=300)
    return out


SCHEMES = ["bf16", "int8", "fp8", "fp8-wo", "int8-static-smooth"]


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("pp", [2, 3, 4])
def test_pure_pipeline_latents_equal_the_sequential_run(runs, name, pp):
    want = runs[(1, 1)][0][name]["latents"]
    got = runs[(pp, 1)][0][name]["latents"]  # stage 0 ends with the latents
    assert got.shape == (1, 16, 3 * BLOCKS, *LATENT_HW)
    assert torch.equal(got, want), f"max |diff| {float((got - want).abs().max())}"
    assert all(r[name]["latents"] is None for r in runs[(pp, 1)][1:])  # later stages never hold latents


@pytest.mark.parametrize("name", SCHEMES)
def test_hybrid_pipeline_equals_its_tensor_parallel_degree(runs, name):
    """PP=2 x TP=2 is bit-identical to TP=2 (same sums in the same order); with exact int8 reduction TP=2 is
    bit-identical to one rank, so the hybrid is too."""
    want = runs[(1, 2)][0][name]["latents"]
    for rank in (0, 1):  # both TP ranks of the first stage
        got = runs[(2, 2)][rank][name]["latents"]
        assert torch.equal(got, want), f"rank {rank}: max |diff| {float((got - want).abs().max())}"
    if name in ("int8", "int8-static-smooth"):
        assert torch.equal(runs[(2, 2)][0][name]["latents"], runs[(1, 1)][0][name]["latents"])


@pytest.mark.parametrize("pp", [2, 4])
def test_each_stage_holds_only_its_layers(runs, pp):
    """Weights and caches split over the stages: their sum is the whole model's (embeddings and head once)."""
    one = runs[(1, 1)][0]["int8"]
    stages = [r["int8"] for r in runs[(pp, 1)]]
    assert sum(s["held"] for s in stages) == one["held"]
    assert sum(s["cache"] for s in stages) == one["cache"]
    assert max(s["held"] for s in stages[1:]) < 0.5 * one["held"]  # (the toy's embeddings outweigh its blocks)


def test_every_stage_runs_the_items_in_the_schedule_order(runs):
    from qavatar.parallel.trace import summarize

    events = [e for r in runs[(4, 1)] for e in r["bf16"]["trace"]]
    s = summarize(events, 4)
    assert s["same_order_on_every_stage"]
    assert s["items"] == BLOCKS * 4 + 2  # every call and both sink prefills


def _cancel_job(rank: int, pp: int, ckpt: str, halt_at: int, blocks: int) -> dict:
    """A run stopped before block `halt_at` (stage 0 decides), then a whole run on the same loaded ranks."""
    from qavatar.model.streaming import flow_match_schedule
    from qavatar.parallel.load import load_rank
    from qavatar.parallel.pipeline import PipelineStage, init_pipeline, schedule_for
    from qavatar.parallel.stream import _config, random_inputs

    torch.set_num_threads(1)
    cfg = _config(ckpt)
    group = init_pipeline(pp, 1, stage_layers(cfg, pp, LATENT_HW), timeout_s=60)
    model = load_rank(ckpt, group.tp, stage=(group.layers, group.first, group.last)).model
    context, inputs = random_inputs(cfg, LATENT_HW, blocks, 5)
    out, asked = {}, []

    def stop_before(b):
        asked.append(b)
        return b >= halt_at

    for name, stop in (("halted", stop_before), ("whole", lambda b: False)):
        stage = PipelineStage(model, group, LATENT_HW, *flow_match_schedule(4), seed=5)
        got = []
        halted = stage.run(schedule_for(cfg, blocks, 4, pp, roll_sink=True),
                           stage.share_context(context if group.first else None), inputs if group.first else None,
                           (lambda b, x: got.append(x)) if group.first else None, cancellable=True,
                           stop_before=stop if group.first else None)
        out[name] = {"halted": halted, "latents": torch.cat(got, dim=2) if got else None,
                     "items": len(stage.trace)}
    out["asked"] = asked
    return out


@pytest.mark.parametrize("halt_at", [2, 4])  # 4: the first item of block 4 is the rolled sink's prefill
def test_a_cancelled_pipeline_stops_every_stage_at_the_same_block(toy_ckpt, halt_at):
    """Stage 0 asks before each new block and passes the answer down (through a middle stage here): every stage
    drops the same items, the blocks already started finish and equal the whole run's, and the same ranks then
    run a whole job (no message left in flight)."""
    blocks = 6
    runs = spawn_ranks(_cancel_job, 3, args=(3, str(toy_ckpt), halt_at, blocks), timeout_s=300)
    for r in runs:
        assert r["halted"]["halted"] == halt_at and r["whole"]["halted"] is None
    items = {r["halted"]["items"] for r in runs}
    assert len(items) == 1 and items.pop() < runs[0]["whole"]["items"]
    assert runs[0]["asked"] == list(range(1, halt_at + 1))  # before each new block, not again once halted
    halted, whole = runs[0]["halted"]["latents"], runs[0]["whole"]["latents"]
    assert halted.shape[2] == 3 * halt_at and whole.shape[2] == 3 * blocks
    assert torch.equal(halted, whole[:, :, :3 * halt_at])


def _kv_job(rank: int, pp: int, ckpt: str, kv: str) -> dict:
    from qavatar.model.kv_quant import kv_storage_dtype
    from qavatar.parallel.launch import init_tp
    from qavatar.parallel.pipeline import init_pipeline
    from qavatar.parallel.stream import _config, stream_latents

    torch.set_num_threads(1)
    group = init_pipeline(pp, 1, stage_layers(_config(ckpt), pp, LATENT_HW), timeout_s=60) if pp > 1 \
        else init_tp(1, timeout_s=60)
    rep = stream_latents(ckpt, group, 5, LATENT_HW, seed=5, kv_dtype=kv_storage_dtype(kv))  # roll + wrap at 4
    return {"latents": rep.latents, "cache": rep.cache_bytes}


@pytest.mark.parametrize("kv", ["fp8"])
def test_pipeline_with_8bit_kv_equals_the_sequential_run(toy_ckpt, kv):
    """The stages quantize and dequantize their own layers' caches with the same code: bit-identical latents;
    each stage's cache, scales included, is the planner's share for that stage."""
    from qavatar.model import PRESETS
    from qavatar.parallel.plan import PlanRequest, make_plan

    threads = torch.get_num_threads()
    try:
        one = _kv_job(0, 1, str(toy_ckpt), kv)
    finally:
        torch.set_num_threads(threads)
    two = spawn_ranks(_kv_job, 2, args=(2, str(toy_ckpt), kv), timeout_s=300)
    assert torch.equal(two[0]["latents"], one["latents"]), float((two[0]["latents"] - one["latents"]).abs().max())
    bf16 = _kv_job(0, 1, str(toy_ckpt), "bf16")["latents"]
    assert not torch.equal(bf16, one["latents"])  # the 8-bit cache is really in use
    plan = make_plan(PlanRequest(PRESETS["tiny"], gpus=2, pp=2, precision="bf16", kv_dtype=kv, compute_dtype="fp32",
                                 size=(LATENT_HW[0] * 8, LATENT_HW[1] * 8), vae="cpu"))
    for stage in (0, 1):
        b = plan.ranks[stage].breakdown
        assert two[stage]["cache"] == b["kv_rolling"] + b["kv_sink"]
    assert sum(r["cache"] for r in two) == one["cache"]


# ------------------------------------------------------------------------------------------ the entry point
def _stream_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "qavatar.parallel.stream", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)


def test_stream_trace_over_8_clips(toy_ckpt, tmp_path):
    trace = tmp_path / "trace.json"
    r = _stream_cli("--checkpoint", str(toy_ckpt), "--pp", "4", "--blocks", "32", "--trace", str(trace))
    assert r.returncode == 0, r.stderr
    doc = json.loads(trace.read_text())
    assert len(doc["events"]) == 4 * (32 * 4 + 2)
    s = doc["summary"]
    assert s["same_order_on_every_stage"] and s["steady_occupancy"] >= 0.9
    assert "stage 3" in doc["timeline"]
    reports = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["rank"] for x in reports] == [0, 1, 2, 3]
    assert "latents_abs_sum" in reports[0] and "latents_abs_sum" not in reports[1]


# ------------------------------------------------------------------------------------------ failures
def _dying_stage(rank: int, ckpt: str, how: str) -> None:
    from qavatar.parallel.pipeline import init_pipeline
    from qavatar.parallel.stream import _config, stream_latents

    torch.set_num_threads(1)
    group = init_pipeline(2, 1, stage_layers(_config(ckpt), 2, LATENT_HW), timeout_s=5)
    if rank == 1:
        if how == "crash":
            raise RuntimeError("stage 1 crashed")
        time.sleep(60)  # hangs: stage 0 must give up on its own
    stream_latents(ckpt, group, 2, LATENT_HW)


@pytest.mark.parametrize("how,culprit", [("crash", "rank 1"), ("hang", "stage 1")])
def test_a_dead_or_hung_stage_ends_every_rank_with_its_name(toy_ckpt, how, culprit):
    # bounded: the hung stage sleeps 60 s, its neighbour's receive gives up after the 5 s group timeout
    with pytest.raises(RankError, match=culprit):
        spawn_ranks(_dying_stage, 2, args=(str(toy_ckpt), how), timeout_s=30)


def test_wrong_layouts_are_one_line_errors(toy_ckpt, monkeypatch):
    from qavatar.parallel.pipeline import init_pipeline

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(RankError, match="--pp 2 --tp 2 but the launcher started 3 ranks"):
        init_pipeline(2, 2, [(0, 2), (2, 4)])
    r = _stream_cli("--checkpoint", str(toy_ckpt), "--pp", "5")  # the toy DiT has 4 layers
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "4 layers" in r.stderr


# ------------------------------------------------------------------------------------------ bytes
def _counted_job(rank: int, pp: int, tp: int, ckpts: dict) -> dict:
    from qavatar.parallel.group import ByteCounter
    from qavatar.parallel.pipeline import init_pipeline
    from qavatar.parallel.stream import _config, stream_latents

    torch.set_num_threads(1)
    counter = ByteCounter()
    group = init_pipeline(pp, tp, stage_layers(_config(ckpts["bf16"]), pp, LATENT_HW), timeout_s=60, counter=counter)
    out = {}
    for name in ("bf16", "int8"):
        sent = []
        for blocks in (2, 3):  # both inside clip 0: one sink prefill each, so the difference is one block
            counter.reset()
            stream_latents(ckpts[name], group, blocks, LATENT_HW)
            sent.append(counter.snapshot())
        out[name] = {k: sent[1].get(k, 0) - sent[0].get(k, 0) for k in set(sent[0]) | set(sent[1])}
    return out


@pytest.mark.parametrize("pp,tp", [(2, 1), (4, 1), (2, 2)])
def test_bytes_per_block_equal_the_plan(checkpoints, pp, tp):
    """The runtime's counters (p2p hand-offs, flows back, the stages' TP collectives) equal the planner's
    prediction for every rank."""
    from qavatar.parallel.comm import comm_bytes_per_block
    from qavatar.parallel.stream import _config

    cfg = _config(checkpoints["bf16"])
    runs = spawn_ranks(_counted_job, pp * tp, args=(pp, tp, checkpoints), timeout_s=300)
    size = (LATENT_HW[0] * 8, LATENT_HW[1] * 8)
    for name in ("bf16", "int8"):
        want = comm_bytes_per_block(cfg, size, tp=tp, pp=pp, precision=name, compute_dtype=torch.float32, steps=4)
        for rank, got in enumerate(r[name] for r in runs):
            assert {k: v for k, v in got.items() if v} == {k: v for k, v in want[rank].items() if v}, (name, rank)


# ------------------------------------------------------------------------------------------ --layout auto
def test_layout_auto_takes_the_planners_fastest_fitting_layout():
    from qavatar.model.config import resolve_config
    from qavatar.parallel.plan import PlanRequest, choose_layout
    from qavatar.pipeline.infer import InferRequest, resolve_layout

    cfg = resolve_config("liveavatar-14b")
    req, notes = resolve_layout(InferRequest("c", "i", "a", "p", "o", gpus=4), cfg, "fp8", (704, 384), "cpu")
    want = choose_layout(PlanRequest(cfg, gpus=4, vram=10 ** 6 * 2 ** 30, precision="fp8", size=(704, 384)),
                         "rtx4090", world=4)
    assert (req.tp, req.pp) == want and req.tp * req.pp == 4 and "layout auto" in notes[0]
    same, notes = resolve_layout(InferRequest("c", "i", "a", "p", "o", tp=2, pp=2), cfg, "fp8", (704, 384), "cpu")
    assert (same.tp, same.pp, notes) == (2, 2, [])  # given layouts are kept
    with pytest.raises(ConfigError, match="--tp 2 --pp 1 needs 2 ranks but 4 are started"):
        resolve_layout(InferRequest("c", "i", "a", "p", "o", tp=2, gpus=4), cfg, "fp8", (704, 384), "cpu")


def test_layout_auto_plans_fp8_weight_only_on_a_gpu_without_fp8_matmul(monkeypatch):
    """An RTX 3090 (sm86) runs an fp8 checkpoint weight-only: the layout is chosen with fp8-wo's memory."""
    import types

    from qavatar.model.config import resolve_config
    from qavatar.parallel import plan as plan_mod
    from qavatar.pipeline.infer import InferRequest, resolve_layout

    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: types.SimpleNamespace(total_memory=24 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 6))
    real = plan_mod.choose_layout
    monkeypatch.setattr(plan_mod, "choose_layout", lambda req, *a, **k: (seen.append(req.precision), real(req, *a, **k))[1])
    req, notes = resolve_layout(InferRequest("c", "i", "a", "p", "o", gpus=4), resolve_config("liveavatar-14b"), "fp8",
                                (704, 384), "cuda")
    assert seen == ["fp8-wo"] and req.tp * req.pp == 4 and "RTX 3090 as rtx3090" in notes[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 9))
    resolve_layout(InferRequest("c", "i", "a", "p", "o", gpus=4), resolve_config("liveavatar-14b"), "fp8",
                   (704, 384), "cuda")
    assert seen == ["fp8-wo", "fp8"]
