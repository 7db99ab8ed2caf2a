"""Every scheme qavatar writes, read by an independent reader: compressed-tensors' own decompressors.

Two readers, both compressed-tensors 0.20 code, never qavatar's:
  - the model path, as transformers' CompressedTensorsHfQuantizer drives it: parse the config, put the scheme
    on each targeted Linear (apply_quantization_config), build the compressed layout (compress_model), load
    the file's tensors into the module's parameters the way a model loader does (a shape mismatch is an
    error; a tensor the reader has no parameter for is skipped), then ModelCompressor.decompress_model;
  - the model-free converter (CompressedTensorsDequantizer), which dequantizes the state dict with no model.
What the format can express must decompress bit-equal to qavatar's own dequantization; what it cannot
express (an unfolded SmoothQuant divisor, per-timestep input scales) must fail loudly, never load wrong.
Also here: `infer` refuses a step count that per-timestep scales were not calibrated for.
compressed-tensors is imported inside the tests: it pulls in transformers (seconds).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qavatar.checkpoint import load_dit
from qavatar.checkpoint.load import open_weights
from qavatar.checkpoint.lora import MergedWeights
from qavatar.quant import QuantConfig, QuantLinear
from qavatar.quant.calibrate import LayerPlan
from qavatar.quant.config import SMOOTH_FORMAT
from qavatar.quant.convert import default_plans, quantize_checkpoint, write_quantized
from qavatar.quant.kernels import dequantize_weight


def _quiet(*a, **k):
    pass


def _write(toy, out: Path, config: QuantConfig, smooth: bool = False, slots: int = 0) -> Path:
    """The writer with made-up calibration results (no calibration run): every target Linear quantized, each
    with a random smoothing divisor (smooth) and `slots` static input scales. Seconds, not minutes."""
    weights, cfg, _ = open_weights(toy)
    raw = (weights.base if isinstance(weights, MergedWeights) else weights).config
    g = torch.Generator().manual_seed(1)
    plans = {}
    for name in default_plans(cfg, QuantConfig(config.precision)):
        cols = weights.shape(f"{name}.weight")[1]
        plans[name] = LayerPlan(name, True, "test plan",
                                smooth=torch.exp(0.5 * torch.randn(cols, generator=g)) if smooth else None,
                                input_scale=torch.rand(slots, generator=g) * 0.05 + 0.01 if slots else None)
    return write_quantized(weights, raw, cfg, config, plans, out, None, {}, 5 * 10**9).out


@pytest.fixture(scope="module")
def ckpts(toy_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("interop")
    out = {p: quantize_checkpoint(toy_ckpt, d / p, QuantConfig(p), calibration="none", log=_quiet).out
           for p in ("int8", "int8-wo", "fp8", "fp8-wo")}
    out["int8-static"] = _write(toy_ckpt, d / "int8-static", QuantConfig("int8", activations="static"), slots=1)
    out["fp8-static"] = _write(toy_ckpt, d / "fp8-static", QuantConfig("fp8", activations="static"), slots=1)
    out["per-timestep"] = _write(toy_ckpt, d / "pt", QuantConfig("int8", activations="static", per_timestep=True),
                                 slots=5)
    out["smooth"] = _write(toy_ckpt, d / "smooth", QuantConfig("int8", smooth_alpha=0.5), smooth=True)
    return out


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _qc(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "config.json").read_text())["quantization_config"]


def _skeleton(tensors: dict[str, torch.Tensor], qc: dict) -> nn.Module:
    """Plain nn.Linears named like the checkpoint's Linears (the quantized ones and the ones it ignores): the
    module tree a reader holding the Wan model class would have, without any qavatar code."""
    root = nn.Module()
    names = {k.rpartition(".")[0] for k in tensors if k.endswith(".weight_scale")} | set(qc["ignore"])
    for name in sorted(names):
        w = tensors[f"{name}.weight"]
        parent, *path, leaf = [root, *name.split(".")]
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(leaf, nn.Linear(w.shape[1], w.shape[0], bias=f"{name}.bias" in tensors))
    return root


def ct_model_read(ckpt: Path, qc: dict | None = None, activations: bool = True) -> tuple[nn.Module, dict]:
    """compressed-tensors' model path; activations=False loads only the weights (a dequantizing reader)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers.utils.quantization_config import CompressedTensorsConfig

    tensors = _tensors(ckpt)
    qc = qc or _qc(ckpt)
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    model = _skeleton(tensors, qc)
    apply_quantization_config(model, compressor.quantization_config, show_progress=False)
    compressor.compress_model(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            own = {k: tensors[f"{name}.{k}"] for k in m.state_dict()
                   if f"{name}.{k}" in tensors and (activations or not k.startswith("input_"))}
            m.load_state_dict(own, strict=False)  # shapes are checked; unknown tensors are not the reader's
    compressor.decompress_model(model)
    return model, tensors


def ct_model_free_read(ckpt: Path) -> dict[str, torch.Tensor]:
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer

    return CompressedTensorsDequantizer(str(ckpt), dtype=torch.float32).validate(_tensors(ckpt))


def qavatar_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """qavatar's own reading of each quantized Linear: the fp32 weight the layer computes with (a stored
    SmoothQuant divisor of the input moved onto the weight's columns)."""
    out = {}
    for name, m in load_dit(ckpt).named_modules():
        if isinstance(m, QuantLinear):
            w = dequantize_weight(m.weight, m.weight_scale)
            out[name] = w / m.smooth_scale[None, :] if m.smooth_scale is not None else w
    return out


EXACT = ["int8", "int8-wo", "fp8", "fp8-wo", "int8-static", "fp8-static"]


@pytest.mark.parametrize("scheme", EXACT)
def test_compressed_tensors_decompresses_bit_equal(ckpts, scheme):
    model, tensors = ct_model_read(ckpts[scheme])
    ours = qavatar_weights(ckpts[scheme])
    assert len(ours) == 55
    for name, w in ours.items():
        m = model.get_submodule(name)
        assert m.quantization_scheme.format == _qc(ckpts[scheme])["format"], name  # the declared format was used
        assert m.weight.dtype == torch.float32 and torch.equal(m.weight, w), name
        if f"{name}.input_scale" in tensors:  # static: the reader's activation scale is the calibrated one
            assert torch.equal(m.input_scale.data, tensors[f"{name}.input_scale"]), name
    for name in _qc(ckpts[scheme])["ignore"]:  # the layers kept in bf16 are untouched
        m = model.get_submodule(name)
        assert not hasattr(m, "quantization_scheme") and torch.equal(m.weight, tensors[f"{name}.weight"].float())


@pytest.mark.parametrize("scheme", ["int8", "fp8", "fp8-wo"])
def test_the_model_free_converter_decompresses_bit_equal(ckpts, scheme):
    out = ct_model_free_read(ckpts[scheme])
    for name, w in qavatar_weights(ckpts[scheme]).items():
        assert torch.equal(out[f"{name}.weight"], w), name
    assert not any(k.endswith("_scale") for k in out)


def test_int8_weight_only_declares_its_format_per_group(ckpts):
    qc = _qc(ckpts["int8-wo"])
    assert qc["format"] == qc["config_groups"]["group_0"]["format"] == "naive-quantized"
    # Without the group's format compressed-tensors infers pack-quantized (int8 packed into int32 words) and
    # never finds those tensors (issue 10 item 13): the declaration is what makes the model path exact.
    legacy = copy.deepcopy(qc)
    del legacy["config_groups"]["group_0"]["format"]
    model, _ = ct_model_read(ckpts["int8-wo"], legacy)
    m = model.get_submodule("blocks.0.ffn.0")
    assert m.quantization_scheme.format == "pack-quantized"
    assert not torch.equal(m.weight, qavatar_weights(ckpts["int8-wo"])["blocks.0.ffn.0"])
    # compressed-tensors' model-free converter ignores the declared format and infers pack-quantized: it
    # refuses the checkpoint, loudly (a compressed-tensors limitation, docs/quantization.md)
    with pytest.raises(ValueError, match="residual quantization param"):
        ct_model_free_read(ckpts["int8-wo"])


def test_unfolded_smoothquant_is_refused_never_read_as_plain_w8a8(ckpts):
    import pydantic

    ckpt = ckpts["smooth"]
    qc, tensors = _qc(ckpt), _tensors(ckpt)
    unfolded = sorted(k.rpartition(".")[0] for k in tensors if k.endswith(".smooth_scale"))
    folded = json.loads((ckpt / "config.json").read_text())["quantization_config"]["qavatar"]["smooth_folded"]
    assert unfolded and folded and not set(unfolded) & set(folded)
    assert qc["config_groups"]["group_1"]["targets"] == unfolded
    assert qc["config_groups"]["group_1"]["format"] == SMOOTH_FORMAT and qc["format"] == "mixed-precision"
    with pytest.raises(pydantic.ValidationError, match=SMOOTH_FORMAT):  # the divisor it cannot apply
        ct_model_read(ckpt)
    with pytest.raises(ValueError, match="does not match expected compressed-tensors"):
        ct_model_free_read(ckpt)

    ours = qavatar_weights(ckpt)
    # The declaration before the fix (one plain W8A8 group) loaded without a word and gave W * s:
    legacy = copy.deepcopy(qc)
    del legacy["config_groups"]["group_1"]
    model, _ = ct_model_read(ckpt, legacy)
    for name in unfolded:
        w = model.get_submodule(name).weight
        assert torch.allclose(w, ours[name] * tensors[f"{name}.smooth_scale"], rtol=1e-5, atol=1e-6), name
        assert not torch.allclose(w, ours[name], rtol=0.1), name
    # A reader that skips the qavatar group reads every other layer exactly, the folded ones included: o with
    # its smoothing carried by v's rows, the text cross-attention q by norm3. The model stays exact there.
    skipping = copy.deepcopy(qc)
    skipping["ignore"] += skipping["config_groups"].pop("group_1")["targets"]
    skipping["format"] = skipping["config_groups"]["group_0"]["format"]
    model, _ = ct_model_read(ckpt, skipping)
    for name in set(ours) - set(unfolded):
        assert torch.equal(model.get_submodule(name).weight, ours[name]), name
    assert {n for n in folded} <= set(ours) - set(unfolded)


def test_per_timestep_scales_fail_loudly_and_the_weights_stay_exact(ckpts):
    ckpt = ckpts["per-timestep"]
    acts = _qc(ckpt)["config_groups"]["group_0"]["input_activations"]
    assert acts["strategy"] == "tensor" and not acts["dynamic"]
    assert _tensors(ckpt)["blocks.0.ffn.0.input_scale"].shape == (5,)
    # a W8A8 reader holds one input scale per layer and refuses five, naming the tensor
    with pytest.raises(RuntimeError, match=r"size mismatch for input_scale.*\[5\].*\[1\]"):
        ct_model_read(ckpt)
    # the model-free converter refuses any static input scale it is left holding
    with pytest.raises(ValueError, match="residual quantization param"):
        ct_model_free_read(ckpt)
    # a reader that dequantizes the weights and runs the activations unquantized is right: weights are standard
    model, _ = ct_model_read(ckpt, activations=False)
    for name, w in qavatar_weights(ckpt).items():
        assert torch.equal(model.get_submodule(name).weight, w), name


BUNDLED = Path(__file__).parents[1] / "calibration" / "bundled"


def test_infer_refuses_a_step_count_the_per_timestep_scales_do_not_fit(ckpts, toy_ckpt, tmp_path):
    """Per-timestep scales are 4 sampler steps + the sink prefill. 5 steps used to raise IndexError mid-run,
    3 ran the sink prefill on step 3's scale without a word: both are now one line before anything loads."""
    from qavatar.errors import ConfigError
    from qavatar.model.step_context import sampler_slot
    from qavatar.pipeline.infer import InferRequest, prepare

    def request(ckpt, steps):
        return InferRequest(str(ckpt), str(BUNDLED / "images" / "p00.png"), str(BUNDLED / "audio" / "p00.wav"), "",
                            str(tmp_path / "o.mp4"), sample_steps=steps, encoders=str(toy_ckpt))

    for steps in (3, 5, 1):
        with pytest.raises(ConfigError, match=rf"--sample-steps {steps}: .*calibrated per sampler step for 4 steps; "
                                              r"run --sample-steps 4, or quantize without --per-timestep"):
            prepare(request(ckpts["per-timestep"], steps))
    assert prepare(request(ckpts["per-timestep"], 4)).clips == 4
    for name in ("int8-static", "int8"):  # one per-tensor scale, or none: any step count
        assert prepare(request(ckpts[name], 5)).request.sample_steps == 5
    # the layer itself names the problem to a Python caller that drives another schedule
    layer = next(m for m in load_dit(ckpts["per-timestep"]).modules() if isinstance(m, QuantLinear))
    with sampler_slot(5), pytest.raises(ConfigError, match="for 4 sampler steps, but this is sampler slot 5"):
        layer(torch.randn(2, layer.in_features))
