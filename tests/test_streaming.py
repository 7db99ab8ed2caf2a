"""The streaming mode: rolling KV window, sink offsets, rolling sink, reproducibility, flat memory."""
import random

import pytest
import torch

from qavatar.checkpoint import load_dit
from qavatar.model.kv_cache import RollingKVCache, SinkCache
from qavatar.model.segment_attention import attend_two, sdpa, sdpa_lse, sdpa_lse_math
from qavatar.model.streaming import StreamingSession, flow_match_schedule

HW = (16, 8)  # latent H x W: 32 tokens per frame


@pytest.fixture(scope="module")
def model(toy_ckpt):
    return load_dit(toy_ckpt)


def _inputs(cfg, seed=0, blocks=1):
    g = torch.Generator().manual_seed(seed)
    fpb = cfg.num_frames_per_block
    return dict(
        ref=torch.randn(1, 16, 1, *HW, generator=g),
        motion=torch.randn(1, 16, 19, *HW, generator=g),
        context=torch.randn(1, 9, cfg.text_dim, generator=g),
        noise=torch.randn(1, 16, fpb * blocks, *HW, generator=g),
        audio=torch.randn(1, 25, cfg.audio_dim, 4 * fpb * blocks, generator=g),
    )


def _run(model, inp, blocks, calls=None, **session_kw):
    ts, sig = flow_match_schedule(4, 3.0)
    s = StreamingSession(model, inp["context"], inp["ref"], inp["motion"], ts, sig, **session_kw)
    fpb = model.cfg.num_frames_per_block
    out = [s.denoise_block(inp["noise"][:, :, b * fpb:(b + 1) * fpb], inp["audio"][..., 4 * b * fpb:4 * (b + 1) * fpb],
                           on_call=None if calls is None else calls.append) for b in range(blocks)]
    return s, torch.cat(out, dim=2)


def test_rolling_window_writes_modulo_its_size():
    cache = RollingKVCache(1, 1, 8, 2, 4, torch.float32)
    block = lambda v: torch.full((1, 4, 2, 4), float(v))
    k, _ = cache.write(0, 0, block(1), block(1))
    assert k.shape[1] == 4
    k, _ = cache.write(0, 4, block(2), block(2))
    assert k.shape[1] == 8
    k, _ = cache.write(0, 8, block(3), block(3))  # full: overwrite the oldest rows, attend to all of them
    assert k.shape[1] == 8 and k[0, :4].eq(3).all() and k[0, 4:].eq(2).all()
    k, _ = cache.write(0, 12, block(4), block(4))
    assert k[0, :4].eq(3).all() and k[0, 4:].eq(4).all()
    with pytest.raises(ValueError, match="overflows"):
        cache.write(0, 6, block(5), block(5))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_two_segments_merged_by_logsumexp_equal_one_attention_over_both(dtype, atol):
    """The window is a strided view of a cache (as in LayerKV.attend), the sink a tensor of its own; scores far
    apart in scale, so one segment takes almost all of the softmax mass for some heads."""
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 1, 40, 3, 16, generator=g)  # [K/V, B, window, H, d]
    q = torch.randn(1, 9, 3, 16, generator=g) * torch.tensor([0.1, 1.0, 4.0])[:, None]
    ks, vs = torch.randn(1, 11, 3, 16, generator=g) * 2, torch.randn(1, 11, 3, 16, generator=g)
    kw, vw = cache[0, :, 5:37], cache[1, :, 5:37]
    args = [t.to(dtype) for t in (q, kw, vw, ks, vs)]
    got = attend_two(*args)
    want = sdpa(q, torch.cat([kw, ks], 1), torch.cat([vw, vs], 1))  # fp32, one softmax over all keys
    assert got.dtype == dtype and got.shape == (1, 9, 48)
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)
    # the log-sum-exp of the fused kernel is the log of the softmax's denominator, as the plain ops give it
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    out, lse = sdpa_lse(t(q), t(kw), t(vw))
    out_m, lse_m = sdpa_lse_math(t(q), t(kw), t(vw))
    scores = (t(q) @ t(kw).transpose(-1, -2)) / 4
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse_m, lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_m, out, atol=1e-6, rtol=0)


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest storage any op creates while active (views and in-place writes create none)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_streaming_attention_copies_no_window(model, monkeypatch):
    """With the window full, the self-attention of a streaming call allocates nothing as large as one layer's
    window of K: the rolling cache and the sink are attended where they are stored (no [window | sink]
    concatenation; the largest things left are the sink's re-roped keys and the block's outputs)."""
    from qavatar.model.kv_cache import LayerKV

    cfg = model.cfg
    inp = _inputs(cfg, blocks=5)
    s, _ = _run(model, inp, 4, seed=0)  # 4 blocks x 3 frames: the 12-frame window is full
    window_k = s.caches[0].k[0].numel() * s.caches[0].k.element_size()
    mode, attend, calls = _LargestAllocation(), LayerKV.attend, []

    def tracked(self, *args):
        calls.append(self.layer)
        with mode:
            return attend(self, *args)

    monkeypatch.setattr(LayerKV, "attend", tracked)
    fpb = cfg.num_frames_per_block
    s.denoise_block(inp["noise"][:, :, 4 * fpb:], inp["audio"][..., 16 * fpb:])
    assert len(calls) == 4 * cfg.num_layers
    assert 0 < mode.largest < window_k / 2, (mode.largest, window_k)


def test_same_seed_same_latents_and_python_random_draws(model):
    inp = _inputs(model.cfg, blocks=2)
    calls_a, calls_b = [], []
    _, a = _run(model, inp, 2, calls_a, seed=7)
    _, b = _run(model, inp, 2, calls_b, seed=7)
    assert torch.equal(a, b)
    rng = random.Random(7)
    assert [c.sink_offset for c in calls_a] == [rng.randint(4, 30) for _ in range(8)]
    assert [(c.block, c.step, c.start_frame) for c in calls_a] == [(b, s, 3 * b) for b in range(2) for s in range(4)]


def test_sink_offset_moves_the_reference_once_frames_pass_it(model):
    """shift = max(0, frame - (30 - offset)): zero early on, then the reference keeps a fixed lead."""
    inp = _inputs(model.cfg, blocks=10)
    calls = []
    _, near = _run(model, inp, 10, calls, sink_offset=lambda: 4)
    assert [c.sink_shift for c in calls if c.step == 0] == [max(0, 3 * b - 26) for b in range(10)]
    _, far = _run(model, inp, 10, sink_offset=lambda: 30)
    fpb = model.cfg.num_frames_per_block
    assert torch.equal(near[:, :, :fpb], far[:, :, :fpb])  # block 0 at frame 0: no shift either way
    assert not torch.allclose(near[:, :, -fpb:], far[:, :, -fpb:], atol=1e-4)


def test_window_wraps_and_memory_stays_flat(model):
    cfg = model.cfg
    inp = _inputs(cfg, blocks=6)  # 6 blocks x 3 frames > the 12-frame window
    s, out = _run(model, inp, 6, seed=0)
    window = cfg.clip_latent_frames * 32
    assert all(c.k.shape[2] == window for c in s.caches)
    assert s.cache_bytes() == len(s.caches) * 2 * cfg.num_layers * window * cfg.dim * 4 + s.sink.nbytes()
    assert torch.isfinite(out).all() and s.next_frame == 18


def test_roll_sink_changes_what_follows(model):
    inp = _inputs(model.cfg, blocks=2)
    s1, _ = _run(model, inp, 1, seed=1)
    s2, _ = _run(model, inp, 1, seed=1)
    s2.roll_sink(inp["noise"][:, :, :1] * 0.5, inp["motion"])
    assert s2.sink.positions[0, 0].item() == 30  # the new reference takes the reference's place
    fpb = model.cfg.num_frames_per_block
    nxt = lambda s: s.denoise_block(inp["noise"][:, :, fpb:], inp["audio"][..., 4 * fpb:])
    assert not torch.allclose(nxt(s1), nxt(s2), atol=1e-4)


def test_bad_streaming_input(model):
    inp = _inputs(model.cfg)
    ts, sig = flow_match_schedule(4, 3.0)
    s = StreamingSession(model, inp["context"], inp["ref"], inp["motion"], ts, sig, seed=0)
    with pytest.raises(ValueError, match="audio covers 2 latent frames, the block has 3"):
        s.denoise_block(inp["noise"], inp["audio"][..., :8])
    with pytest.raises(ValueError, match="differ from the condition"):
        s.denoise_block(torch.zeros(1, 16, 3, 8, 8), inp["audio"])
    with pytest.raises(RuntimeError, match="prefill_sink must run"):
        model.forward_stream(inp["noise"], torch.zeros(1, 3), s.context, None, model.encode_audio(inp["audio"]),
                             s.caches[0], SinkCache(model.cfg.num_layers), 0, 0)
    with pytest.raises(ValueError, match="text context"):
        model.embed_text(torch.zeros(1, 600, model.cfg.text_dim))


def test_no_cond_states_means_zero_pose_latents(model):
    x = torch.randn(1, 16, 3, *HW)
    assert torch.allclose(model.embed_video(x, None), model.embed_video(x, torch.zeros_like(x)), atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_schedule_and_euler_step_equal_diffusers(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    timesteps, sigmas = flow_match_schedule(steps)
    assert torch.equal(timesteps, sched.timesteps.float()) and torch.equal(sigmas, sched.sigmas.float())
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(1, 16, 3, 4, 2, generator=g)
    for i, t in enumerate(sched.timesteps):
        flow = torch.randn(x.shape, generator=g)
        want = sched.step(flow, t, x, return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]).item() * flow  # StreamingSession.denoise_block's update
        assert torch.allclose(x, want, atol=1e-6)
        x = want
