"""The module tree: exact parameter and Linear counts, reference key names and shapes, config mapping."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import fixture_dirs, fixture_with_case
from qavatar.errors import ConfigError
from qavatar.model import PRESETS, build_model, from_wan_config, resolve_config
from qavatar.parallel import TPGroup

# From ../shared/reference/liveavatar.md (14B shapes).
REFERENCE_SHAPES = {
    "blocks.0.self_attn.q.weight": (5120, 5120), "blocks.39.self_attn.o.bias": (5120,),
    "blocks.7.self_attn.norm_q.weight": (5120,), "blocks.7.cross_attn.norm_k.weight": (5120,),
    "blocks.3.norm3.weight": (5120,), "blocks.3.norm3.bias": (5120,),
    "blocks.0.ffn.0.weight": (13824, 5120), "blocks.0.ffn.2.weight": (5120, 13824),
    "blocks.0.modulation": (1, 6, 5120),
    "patch_embedding.weight": (5120, 16, 1, 2, 2), "cond_encoder.weight": (5120, 16, 1, 2, 2),
    "frame_packer.proj.weight": (5120, 16, 1, 2, 2), "frame_packer.proj_2x.weight": (5120, 16, 2, 4, 4),
    "frame_packer.proj_4x.weight": (5120, 16, 4, 8, 8),
    "text_embedding.0.weight": (5120, 4096), "text_embedding.2.weight": (5120, 5120),
    "time_embedding.0.weight": (5120, 256), "time_embedding.2.weight": (5120, 5120),
    "time_projection.1.weight": (30720, 5120),
    "head.head.weight": (64, 5120), "head.modulation": (1, 2, 5120),
    "trainable_cond_mask.weight": (3, 5120), "casual_audio_encoder.weights": (1, 25, 1, 1),
    "casual_audio_encoder.encoder.conv1_local.conv.weight": (5120, 1024, 3),
    "casual_audio_encoder.encoder.conv1_global.conv.weight": (1280, 1024, 3),
    "casual_audio_encoder.encoder.conv2.conv.weight": (2560, 1280, 3),
    "casual_audio_encoder.encoder.conv3.conv.weight": (5120, 2560, 3),
    "casual_audio_encoder.encoder.final_linear.weight": (5120, 5120),
    "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, 5120),
    "audio_injector.injector.11.q.weight": (5120, 5120), "audio_injector.injector.0.norm_k.weight": (5120,),
    "audio_injector.injector_adain_layers.11.linear.weight": (10240, 5120),
}


@pytest.fixture(scope="module")
def meta_14b():
    with torch.device("meta"):
        return build_model("liveavatar-14b")


def test_14b_counts_on_meta(meta_14b):
    assert sum(p.numel() for p in meta_14b.parameters()) == 16_295_755_609
    assert sum(isinstance(m, torch.nn.Linear) for m in meta_14b.modules()) == 467
    assert all(p.is_meta for p in meta_14b.parameters())
    assert len(meta_14b.state_dict()) == 1260  # the released S2V-14B weight map


def test_14b_reference_keys_and_shapes(meta_14b):
    sd = meta_14b.state_dict()
    for key, shape in REFERENCE_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert "audio_injector.injector.12.q.weight" not in sd
    blocks = sum(p.numel() for n, p in meta_14b.named_parameters() if n.startswith("blocks."))
    assert blocks == 40 * 351_394_304  # 351.4M per block
    linear = sum(m.weight.numel() + m.bias.numel() for m in meta_14b.modules() if isinstance(m, torch.nn.Linear))
    assert linear / 16_295_755_609 > 0.994  # Linears hold 99.4% of the parameters


@pytest.mark.parametrize("fixture", fixture_dirs(), ids=lambda p: p.name)
def test_fixture_config_builds_the_fixture_state_dict(fixture):
    cfg = from_wan_config(json.loads((fixture / "config.json").read_text()))
    with torch.device("meta"):
        model = build_model(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(fixture / "model.safetensors"), "pt") as f:
        theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert ours == theirs


def test_tiny_preset_is_the_fixture_config():
    fixture = fixture_with_case("streaming")  # the model fixture (the pipeline one shares its config)
    cfg = from_wan_config(json.loads((fixture / "config.json").read_text()))
    tiny = PRESETS["tiny"]
    assert cfg.replace(name="tiny", lora_alpha=tiny.lora_alpha, default_size=tiny.default_size) == tiny


def test_wan_config_round_trip():
    for cfg in PRESETS.values():
        assert from_wan_config(cfg.to_wan_config()) == cfg


def test_config_errors():
    raw = PRESETS["tiny"].to_wan_config()
    with pytest.raises(ConfigError, match="enable_framepack"):
        from_wan_config({**raw, "enable_framepack": False})
    with pytest.raises(ConfigError, match="unknown keys"):
        from_wan_config({**raw, "num_experts": 2})
    with pytest.raises(ConfigError, match="num_heads"):
        from_wan_config({**raw, "num_heads": 5})
    with pytest.raises(ConfigError, match="outside"):
        from_wan_config({**raw, "audio_inject_layers": [0, 9]})
    with pytest.raises(ConfigError, match="unknown config"):
        resolve_config("liveavatar-15b")


def test_tp_degree_must_divide_heads():
    with pytest.raises(ConfigError, match="num_heads=40 is not divisible by the tensor-parallel degree 3"):
        with torch.device("meta"):
            build_model("liveavatar-14b", tp=TPGroup(rank=0, size=3))


def test_meta_build_of_a_tp_rank_has_sharded_shapes():
    with torch.device("meta"):
        rank = build_model("liveavatar-14b", tp=TPGroup(rank=1, size=4))
    sd = rank.state_dict()
    assert tuple(sd["blocks.0.self_attn.q.weight"].shape) == (1280, 5120)
    assert tuple(sd["blocks.0.self_attn.o.weight"].shape) == (5120, 1280)
    assert tuple(sd["blocks.0.self_attn.o.bias"].shape) == (5120,)
    assert tuple(sd["blocks.0.self_attn.norm_q.weight"].shape) == (1280,)
    assert tuple(sd["blocks.0.ffn.0.weight"].shape) == (3456, 5120)
    assert tuple(sd["head.head.weight"].shape) == (64, 5120)  # replicated
