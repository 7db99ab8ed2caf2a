"""Compiled DiT blocks (model/compile.py): no graph breaks at any precision, one set of graphs for every layer,
and compiled outputs within the parity tolerances of eager (inductor runs on the CPU too).

Inductor compiles are slow on 2 cores: the compiled models are shared per module and the shapes are tiny;
dynamo.explain (tracing only) proves the graph-break claim.
"""
import copy

import pytest
import torch
import torch._dynamo as dynamo

from conftest import fixture_with_case
from qavatar.model import PRESETS, build_model
from qavatar.model.block import Segments
from qavatar.model.compile import block_forward, compile_blocks, is_compiled, prepare_tracing
from qavatar.model.kv_cache import LayerKV, RollingKVCache, SinkCache
from qavatar.model.streaming import StreamingSession, flow_match_schedule
from qavatar.parallel import SINGLE
from qavatar.parallel.load import load_rank
from qavatar.parity import TOLERANCES, Fixture, _streaming
from qavatar.quant import QuantConfig, quantize_
from qavatar.quant.convert import quantize_checkpoint


def _block_inputs(cfg, dtype, mode, frame_len=8):
    g = torch.Generator().manual_seed(0)
    heads, d = cfg.num_heads, cfg.dim // cfg.num_heads
    x = torch.randn(1, 3 * frame_len, cfg.dim, generator=g).to(dtype)
    e0 = 0.1 * torch.randn(1, 3, 6, 2, cfg.dim, generator=g)
    rope = torch.randn(3 * frame_len, d // 2, 2, generator=g)
    context = torch.randn(1, 8, cfg.dim, generator=g).to(dtype)
    sink = SinkCache(2, first_layer=0)
    for i in range(2):
        sink.k[i], sink.v[i] = (torch.randn(1, 20, heads, d, generator=g).to(dtype) for _ in range(2))
    window = 12 * frame_len
    rolling = RollingKVCache(2, 1, window, heads, d, dtype)
    kv = {"stream": LayerKV("stream", 1, sink, rolling, window, torch.randn(20, d // 2, 2, generator=g)),
          "sink": LayerKV("sink", 1, SinkCache(2)), "none": None}[mode]
    return x, e0, Segments(3, frame_len), rope, context, None if kv is None else kv.one_layer()[0]


@pytest.mark.parametrize("precision,mode", [(p, "stream") for p in ("fp32", "bf16", "int8", "fp8", "int8-wo", "fp8-wo")]
                         + [("int8", "sink"), ("int8", "none")])
def test_a_block_is_one_graph_without_breaks(precision, mode):
    prepare_tracing()
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = build_model(cfg).eval()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = model.to(dtype)
    if precision not in ("fp32", "bf16"):
        quantize_(model, QuantConfig(precision))
    with torch.no_grad():
        explained = dynamo.explain(block_forward)(model.blocks[1], *_block_inputs(cfg, dtype, mode))
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.fixture(scope="module")
def fixture_runs():
    """The fixture model's streaming case, eager and compiled, stopped after block 0 (sink + 4 calls)."""
    fx = Fixture(fixture_with_case("streaming"))
    case = next(c for c in fx.cases if c["name"] == "streaming")

    def run(model):
        checks = []
        for c in _streaming(fx, model, case):
            checks.append(c)
            if c.key.endswith("block0.final_latents"):
                return checks
        raise AssertionError("the streaming case has no block 0")

    model = fx.model()
    stats = compile_blocks(model)
    return run(fx.model()), run(model), stats, model


def test_compiled_fixture_model_matches_the_reference(fixture_runs):
    eager, compiled, stats, model = fixture_runs
    assert is_compiled(model)
    assert [c.key for c in compiled] == [c.key for c in eager]
    keys = {c.key for c in compiled}
    assert {"streaming.sink.cond_k", "streaming.sink.cond_v", "streaming.block0.final_latents"} <= keys
    for c in compiled:  # within the reference's own parity tolerance, like eager
        assert c.ok, c


def test_every_layer_shares_the_same_graphs(fixture_runs):
    _, _, stats, model = fixture_runs
    # sink prefill + block 0 (window filling) + the audio injector: 3 graphs for all layers, not one per layer
    assert len(model.blocks) > 2 and len(model.cfg.audio_inject_layers) > 1
    assert stats.graphs == 3, stats.summary()
    assert stats.calls == len(model.blocks) * (1 + 4)  # the sink prefill, then 4 sampler steps
    assert stats.seconds > 0


@pytest.fixture(scope="module")
def quantized_toys(toy_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile-q")
    out = {}
    for precision in ("int8", "fp8-wo"):
        quantize_checkpoint(toy_ckpt, root / precision, QuantConfig(precision), calibration="none",
                            log=lambda *a, **k: None)
        out[precision] = root / precision
    return out


def _full_window_call(model):
    """One streaming call with the rolling window full (the steady state), on seeded inputs."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    h, w = 16, 8
    ref = torch.randn(1, cfg.in_dim, 1, h, w, generator=g)
    steps = flow_match_schedule(1)
    session = StreamingSession(model, torch.randn(1, 6, cfg.text_dim, generator=g), ref,
                               ref.expand(-1, -1, cfg.motion_frames[1], -1, -1), *steps, seed=0)
    session.next_frame = cfg.clip_latent_frames
    noise = torch.randn(1, cfg.in_dim, cfg.num_frames_per_block, h, w, generator=g)
    audio = torch.randn(1, cfg.num_wav2vec_layers, cfg.audio_dim, 4 * cfg.num_frames_per_block, generator=g)
    return session.denoise_block(noise, audio)


@pytest.mark.parametrize("precision", ["int8", "fp8-wo"])
def test_compiled_quantized_checkpoint_matches_eager(quantized_toys, toy_ckpt, precision):
    eager = load_rank(quantized_toys[precision], SINGLE).model
    compiled = copy.deepcopy(eager)
    float_model = load_rank(toy_ckpt, SINGLE).model
    stats = compile_blocks(compiled)
    want, got, ref = (_full_window_call(m) for m in (eager, compiled, float_model))
    assert stats.graphs == 3  # the sink prefill, the full-window call and the injector, for every layer
    quant_err, compile_err = (want - ref).norm().item(), (got - want).norm().item()
    assert quant_err > 0
    # compiling moves a few activations across an int8 rounding boundary (fused ops round differently): a small
    # fraction of the quantization error, and 0 for fp8-wo up to float reassociation
    assert compile_err <= max(0.1 * quant_err, TOLERANCES["streaming"]), (compile_err, quant_err)
    print(f"{precision}: |compiled - eager| {compile_err:.2e}, |eager - float| {quant_err:.2e}")


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_the_gpu_kernel_paths_trace_without_breaks(precision, monkeypatch):
    """The CUDA branches of QuantLinear (fp8 rowwise _scaled_mm inside its try/except, int8 torch._int_mm), traced
    on the CPU: the device checks are patched to say yes and _scaled_mm to its fp32 emulation."""
    import torch.nn.functional as F

    import qavatar.quant.linear as ql

    monkeypatch.setattr(ql, "fp8_matmul_supported", lambda device: True)
    monkeypatch.setattr(ql, "fp8_matmul", lambda xq, sx, wq, sw, dt: F.linear(xq.float() * sx, wq.float() * sw).to(dt))
    monkeypatch.setattr(ql, "pick_int8_kernel", lambda *a, **k: "int_mm")
    prepare_tracing()
    cfg = PRESETS["tiny"]
    model = quantize_(build_model(cfg).eval(), QuantConfig(precision))
    with torch.no_grad():
        explained = dynamo.explain(block_forward)(model.blocks[1], *_block_inputs(cfg, torch.float32, "stream"))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_the_audio_injector_is_one_graph_without_breaks():
    from qavatar.model.audio import inject

    prepare_tracing()
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = quantize_(build_model(cfg).eval(), QuantConfig("int8"))
    inj, g = model.audio_injector, torch.Generator().manual_seed(0)
    x = torch.randn(1, 3 * 8, cfg.dim, generator=g)
    audio = (torch.randn(1, 3, 1, cfg.dim, generator=g), torch.randn(1, 3, cfg.num_audio_token + 1, cfg.dim, generator=g))
    with torch.no_grad():
        explained = dynamo.explain(inject)(inj.injector_adain_layers[1], inj.injector[1], x, Segments(3, 8), *audio)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_unknown_compile_mode_is_a_clear_error():
    from qavatar.errors import ConfigError

    with pytest.raises(ConfigError, match="compile mode"):
        compile_blocks(build_model(PRESETS["tiny"]), mode="fastest")


def test_the_compile_flags_reach_compile_blocks(toy_ckpt, monkeypatch, tmp_path):
    """`qavatar infer --compile` and the stream entry point's --compile compile the loaded model (the compile
    itself is replaced by a recorder here: the tests above run it)."""
    import qavatar.model.compile as compile_mod
    from typer.testing import CliRunner

    from qavatar.cli import app
    from qavatar.parallel.stream import stream_latents

    seen = []
    monkeypatch.setattr(compile_mod, "compile_blocks", lambda model, **kw: seen.append(model))
    rep = stream_latents(toy_ckpt, SINGLE, 1, (16, 8), steps=1, compile=True)
    assert len(seen) == 1 and rep.latents is not None

    requests = []
    monkeypatch.setattr("qavatar.pipeline.infer.infer", lambda req, on_frames=None: requests.append(req) or [])
    for flags, want in (([], False), (["--compile"], True)):
        result = CliRunner().invoke(app, ["infer", "--checkpoint", str(toy_ckpt), "--image", str(tmp_path / "a.png"),
                                          "--audio", str(tmp_path / "a.wav"), "--out", str(tmp_path / "o.mp4"),
                                          *flags])
        assert result.exit_code == 0, result.output
        assert requests[-1].compile is want
