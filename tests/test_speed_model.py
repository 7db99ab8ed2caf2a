"""The planner's speed model: bytes between ranks against counters of real TP runs, FLOPs against torch's own
flop counter, the GPU profile table, and the layouts it ranks."""
import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from qavatar.cli import app
from qavatar.model import PRESETS
from qavatar.parallel import ByteCounter
from qavatar.parallel.launch import init_tp, spawn_ranks
from qavatar.parallel.load import load_rank
from qavatar.parallel.plan import comm_bytes_per_block
from qavatar.quant import QuantConfig, QuantLinear
from qavatar.quant.convert import quantize_checkpoint

runner = CliRunner()
TINY, B14 = PRESETS["tiny"], PRESETS["liveavatar-14b"]
SIZE = (128, 64)  # latents 16 x 8: 32 tokens per frame, 96 per block
BLOCKS = 2

# (name, checkpoint, compute dtype, exact int32 int8 reduction, fp8 kernel the CPU runs)
CASES = [("bf16-fp32", "bf16", torch.float32, True, "native"),
         ("bf16-bf16", "bf16", torch.bfloat16, True, "native"),
         ("int8-exact", "int8", torch.float32, True, "native"),
         ("int8-bf16-reduce", "int8", torch.bfloat16, False, "native"),
         ("fp8-weight-only", "fp8", torch.float32, True, "weight-only"),  # no sm89 GPU: fp8 runs weight-only
         ("fp8-w8a8", "fp8", torch.float32, True, "emulate")]  # the sm89 W8A8 numerics (fp32 out)


@pytest.fixture(scope="module")
def ckpts(toy_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    out = {"bf16": str(toy_ckpt)}
    for p in ("int8", "fp8"):
        out[p] = str(quantize_checkpoint(toy_ckpt, root / p, QuantConfig(p), calibration="none",
                                         log=lambda s: None).out)
    return out


def _count(rank: int, world: int, paths: dict) -> dict:
    from qavatar.model.streaming import StreamingSession, flow_match_schedule

    torch.set_num_threads(1)
    base = init_tp(world, timeout_s=60)
    out = {}
    for name, ckpt, dtype, exact, fp8_kernel in CASES:
        counter = ByteCounter()
        tp = dataclasses.replace(base, exact_int8_reduce=exact, counter=counter)
        model = load_rank(paths[ckpt], tp, dtype=dtype).model
        if fp8_kernel == "emulate":
            for m in model.modules():
                if isinstance(m, QuantLinear):
                    m.kernel_override = "emulate"
        g = torch.Generator().manual_seed(0)
        lh, lw = SIZE[0] // 8, SIZE[1] // 8
        ref, motion = torch.randn(1, 16, 1, lh, lw, generator=g), torch.randn(1, 16, 19, lh, lw, generator=g)
        s = StreamingSession(model, torch.randn(1, 9, TINY.text_dim, generator=g), ref, motion,
                             *flow_match_schedule(), seed=0)
        per_block = []
        for _ in range(BLOCKS):
            counter.reset()  # the sink prefill and the loader's scale reduction are not part of a block
            s.denoise_block(torch.randn(1, 16, 3, lh, lw, generator=g), torch.randn(1, 25, TINY.audio_dim, 12,
                                                                                     generator=g))
            per_block.append(counter.snapshot())
        out[name] = per_block
    return out


@pytest.fixture(scope="module")
def counted(ckpts):
    return spawn_ranks(_count, 2, args=(2, ckpts), timeout_s=180)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tp2_counters_equal_the_plan(counted, case):
    name, ckpt, dtype, exact, fp8_kernel = case
    want = comm_bytes_per_block(TINY, SIZE, tp=2, pp=1, precision=ckpt, compute_dtype=dtype,
                                exact_int8_reduce=exact, steps=4, fp8_kernel=fp8_kernel)
    assert len(want) == 2
    for rank in range(2):
        assert want[rank]["p2p"] == 0
        expected = {k: v for k, v in want[rank].items() if v}
        for block in counted[rank][name]:
            assert block == expected, (rank, block, expected)


def test_counter_kinds_differ_as_the_schemes_say(counted):
    """Exact int8 sends int32 partials (4 B), the bf16 reduction half; fp8 weight-only skips the absmax reduce."""
    block = {name: counted[0][name][0] for name, *_ in CASES}
    assert block["int8-exact"]["all_reduce"] > block["bf16-fp32"]["all_reduce"]  # + the absmax max-reduce
    assert block["int8-bf16-reduce"]["all_reduce"] < 0.6 * block["int8-exact"]["all_reduce"]
    assert block["fp8-weight-only"] == block["bf16-fp32"]
    assert block["bf16-fp32"]["all_gather"] == block["int8-exact"]["all_gather"]  # norms gather fp32 sums
