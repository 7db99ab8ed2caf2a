"""Quantizers, matmul paths and QuantLinear numerics against explicit formulas."""
import copy

import pytest
import torch
import torch.nn.functional as F

from qavatar.errors import ConfigError
from qavatar.model.step_context import sampler_slot
from qavatar.quant import QuantConfig, QuantLinear, quantize_
from qavatar.quant import kernels
from qavatar.quant.kernels import FP8, dequantize_weight, int8_matmul, quantize_activation, quantize_weight, token_absmax


def test_weight_quantization_bounds():
    w = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different ranges
    q, s = quantize_weight(w, torch.int8)
    assert q.dtype == torch.int8 and s.shape == (48, 1) and s.dtype == torch.float32
    assert q.abs().max() <= 127 and (q.abs().amax(1) == 127).all()  # every row uses its full range
    assert ((dequantize_weight(q, s) - w).abs() <= s / 2 + 1e-7).all()
    q8, s8 = quantize_weight(w, FP8)
    assert q8.dtype == FP8 and torch.allclose(s8 * 448, w.abs().amax(1, keepdim=True))
    # e4m3 has 3 mantissa bits: rounding error <= 1/16 of the value, plus half the subnormal step (2^-10)
    assert ((dequantize_weight(q8, s8) - w).abs() <= w.abs() / 16 + s8 * 2 ** -10 + 1e-7).all()


def test_per_token_activation_scales():
    x = torch.randn(10, 32) * torch.arange(1, 11)[:, None]
    q, s = quantize_activation(x, torch.int8, token_absmax(x))
    assert torch.allclose(s[:, 0], x.abs().amax(1) / 127)
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def test_int8_matmul_paths_agree():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 64, generator=g), torch.randn(24, 64, generator=g)
    wq, sw = quantize_weight(w, torch.int8)
    xq, sx = quantize_activation(x, torch.int8, token_absmax(x))
    exact = (xq.long() @ wq.long().t()).double() * sx.double() * sw.double().t()  # int64 accumulation, by hand
    for kernel in ["dequant", "int_mm"] + (["bnb"] if kernels._bnb() is not None else []):
        got = int8_matmul(xq, sx, wq, sw, kernel)
        assert torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-6), kernel


def test_quant_linear_int8_is_the_w8a8_formula():
    lin = torch.nn.Linear(64, 40)
    q = QuantLinear.from_float(lin, QuantConfig("int8"))
    x = torch.randn(3, 5, 64)
    wq, sw = quantize_weight(lin.weight, torch.int8)
    x2 = x.reshape(-1, 64)
    xq, sx = quantize_activation(x2, torch.int8, token_absmax(x2))
    want = (xq.float() @ wq.float().t()) * sx * sw.t() + lin.bias
    assert torch.allclose(q(x), want.reshape(3, 5, 40), atol=1e-5)
    assert q.weight.dtype == torch.int8 and q.input_scale is None and q.smooth_scale is None


def test_fp8_emulation_matches_scaled_mm_and_cpu_falls_back_once(capsys):
    lin = torch.nn.Linear(64, 32)
    q = QuantLinear.from_float(lin, QuantConfig("fp8"))
    x = torch.randn(20, 64)
    q.kernel_override = "emulate"
    emulated = q(x)
    xq, sx = quantize_activation(x, FP8, token_absmax(x))
    scaled = torch._scaled_mm(xq, q.weight.t(), scale_a=sx, scale_b=q.weight_scale.t(), out_dtype=torch.float32)
    assert torch.allclose(emulated, scaled + lin.bias, atol=1e-5)
    q.kernel_override = None
    kernels._noticed.clear()
    fallback = q(x)
    q(x)
    err = capsys.readouterr().err
    assert err.count("runs weight-only") == 1  # said once, in one line
    assert torch.allclose(fallback, F.linear(x, dequantize_weight(q.weight, q.weight_scale)) + lin.bias, atol=1e-5)
    assert not torch.allclose(fallback, emulated, atol=1e-4)  # the fallback really skips activation quantization


def test_static_scales_follow_the_sampler_slot():
    lin = torch.nn.Linear(16, 8)
    scales = torch.tensor([0.01, 0.02, 0.5])
    q = QuantLinear.from_float(lin, QuantConfig("int8", activations="static", per_timestep=True), input_scale=scales)
    x = torch.randn(4, 16)
    outs = []
    for slot in (0, 1, 2, None):
        with sampler_slot(slot):
            outs.append(q(x))
    for slot, scale in enumerate([0.01, 0.02, 0.5]):
        xq = (x / scale).round().clamp(-127, 127)
        want = (xq @ q.weight.float().t()) * scale * q.weight_scale.t() + lin.bias
        assert torch.allclose(outs[slot], want, atol=1e-5)
    assert torch.equal(outs[3], outs[2])  # outside a sampler call: the largest (safest) scale


def test_smooth_scale_is_mathematically_neutral():
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32)
    x[:, 3] *= 50  # an outlier channel, what SmoothQuant is for
    smooth = (x.abs().amax(0) ** 0.5 / lin.weight.abs().amax(0) ** 0.5).detach()
    plain = QuantLinear.from_float(lin, QuantConfig("int8"))
    smoothed = QuantLinear.from_float(lin, QuantConfig("int8"), smooth=smooth)
    ref = lin(x)
    err = lambda y: (y - ref).pow(2).sum() / ref.pow(2).sum()
    assert err(smoothed(x)) < err(plain(x))


@pytest.mark.parametrize("kw,msg", [
    (dict(precision="int4"), "unknown precision"),
    (dict(precision="int8-wo", activations="static"), "static scales need"),
    (dict(per_timestep=True), "needs --activations static"),
    (dict(precision="fp8", smooth_alpha=0.5), "int8 W8A8 only"),
    (dict(smooth_alpha=1.5), r"lie in \(0, 1\)"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        QuantConfig(**kw)


def test_default_targets_and_ignore():
    c = QuantConfig("int8", ignore=("blocks.1.*", "*.ffn.2"))
    assert c.targets("blocks.0.self_attn.q") and c.targets("audio_injector.injector_adain_layers.3.linear")
    assert not c.targets("blocks.1.cross_attn.k") and not c.targets("blocks.0.ffn.2")
    for kept in ("text_embedding.0", "time_embedding.2", "time_projection.1", "head.head",
                 "casual_audio_encoder.encoder.final_linear"):
        assert not c.targets(kept)


def test_quantize_in_place_keeps_row_parallel_layers_row_parallel():
    from qavatar.model import build_model

    model = quantize_(build_model("tiny"), QuantConfig("int8"))
    assert isinstance(model.blocks[0].self_attn.o, QuantLinear) and model.blocks[0].self_attn.o.row_parallel
    assert not model.blocks[0].self_attn.q.row_parallel
    assert isinstance(model.text_embedding[0], torch.nn.Linear) and not isinstance(model.text_embedding[0], QuantLinear)
    n = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n == 4 * 10 + 3 * 5
    with pytest.raises(ConfigError, match="need calibration plans"):
        quantize_(build_model("tiny"), QuantConfig("int8", smooth_alpha=0.5))
