"""The inference pipeline's parts against their libraries: sizing, umT5 and VAE key maps, streaming VAE
decode, wav2vec2 features per clip, the mp4 writer."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qavatar.errors import CheckpointError, ConfigError
from qavatar.pipeline.audio_encoder import AudioConditioning, AudioEncoder
from qavatar.pipeline.audio_features import bucket_features, interpolate_features
from qavatar.pipeline.keymaps import t5_hf_to_wan, t5_wan_to_hf, vae_diffusers_to_wan
from qavatar.pipeline.media import MediaError
from qavatar.pipeline.sizing import crop_plan, fit_image, parse_area, size_for_area, to_pixel_values
from qavatar.pipeline.text_encoder import TextEncoder, clean_prompt, umt5_from_wan
from qavatar.pipeline.vae import WanVAE, load_wan_vae, to_uint8_frames, vae_config
from qavatar.pipeline.video_writer import Mp4Writer, probe

DATA = Path(__file__).parent / "data"
SPEECH = Path(__file__).parents[1] / "calibration" / "bundled" / "audio" / "p00.wav"


# ------------------------------------------------------------------------------------------- sizing
def test_size_for_area_follows_the_reference_rule():
    # 1000x500 portrait into 704*384: the largest tried scale whose 64-padded size fits is 0.7017 -> 704x384
    assert size_for_area(1000, 500, parse_area("704*384")) == (704, 384)
    assert size_for_area(512, 512, parse_area("704*384")) == (512, 512)  # already small: only padded
    assert size_for_area(500, 1000, 704 * 384) == (384, 704)  # landscape keeps its aspect
    for h, w in [(1080, 1920), (720, 720), (333, 901), (4000, 3000)]:
        for area in (704 * 384, 1024 * 704, 480 * 832):
            oh, ow = size_for_area(h, w, area)
            assert oh % 64 == 0 and ow % 64 == 0 and 0 < oh * ow <= area
            assert abs(math.log((oh / ow) / (h / w))) < 0.45  # the image's aspect, up to the 64-rounding


def test_bad_sizes_are_one_clear_error():
    for bad in ("big", "704x", "-3*4"):
        with pytest.raises(ConfigError, match="expected an area"):
            parse_area(bad)
    with pytest.raises(ConfigError, match="below one 64x64 tile"):
        parse_area("32*32")
    with pytest.raises(ConfigError, match="no 64-multiple size fits"):
        size_for_area(100, 6400, 64 * 64)  # a 1:64 strip cannot fit 64x64 tiles in this area


def test_fit_image_resizes_the_short_side_then_center_crops():
    img = torch.zeros(3, 200, 400)
    img[:, :, :100] = -1  # left quarter black, right quarter white, middle grey
    img[:, :, 300:] = 1
    out = fit_image(img, 128, 128)  # short side 200 -> 128, width 256, crop the middle 128 columns
    assert out.shape == (3, 128, 128)
    assert out[:, :, 2:-2].abs().max() < 0.01 and out.abs().max() < 0.5  # only the grey middle survives
    tall = fit_image(torch.rand(3, 300, 100) * 2 - 1, 192, 64)
    assert tall.shape == (3, 192, 64)


def test_fit_image_pads_black_where_the_resized_image_is_too_small():
    # 400x720 into 384x704: short side 384 -> 384x691, 13 columns short: 6 left, 7 right, black (-1.0, not grey)
    img = torch.full((3, 400, 720), 255, dtype=torch.uint8)
    plan = crop_plan(400, 720, 384, 704)
    assert plan.resized_hw == (384, 691) and plan.pad_ltrb == (6, 0, 7, 0) and plan.padded_pixels == 13 * 384
    out = fit_image(img, 384, 704)
    assert torch.equal(out[:, :, :6], torch.full((3, 384, 6), -1.0)) and torch.equal(out[:, :, -7:], -torch.ones(3, 384, 7))
    assert torch.equal(out[:, :, 6:-7], torch.ones(3, 384, 691))
    # float input from media.load_image (v / 127.5 - 1) gives the same pixels as its uint8 source
    u8 = torch.randint(0, 256, (3, 90, 170), dtype=torch.uint8)
    assert torch.equal(fit_image(u8.float() / 127.5 - 1, 128, 192), fit_image(u8, 128, 192))
    # ToTensor's arithmetic (/255 * 2 - 1), which differs from /127.5 - 1 in the last bit for some levels
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
    assert torch.equal(to_pixel_values(levels.permute(1, 2, 0)), levels.float() / 255 * 2 - 1)
    # crop offsets use Python's round-half-even: 21 extra columns -> offset round(10.5) = 10
    assert crop_plan(64, 149, 64, 128).offset_tl == (0, 10)


def test_uint8_frames_truncate_as_the_reference():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0, -0.00196]).view(1, -1, 1, 1).expand(3, -1, 1, 1)
    got = to_uint8_frames(x)[:, 0, 0, 0].tolist()
    assert got == [0, 0, 127, 254, 255, 255, 127]  # (x + 1) / 2 * 255 truncated: 127.5 -> 127, 254.87 -> 254


# -------------------------------------------------------------------------------------------- umT5
def _wan_t5_reference(state, ids, heads, eps=1e-6, buckets=32, max_dist=128):
    """Wan's T5 encoder written from its equations, on Wan's own key names (not transformers' code)."""
    x = state["token_embedding.weight"][ids]
    n = x.shape[0]

    def norm(v, w):
        return w * (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps))

    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query
    half = buckets // 2
    exact = half // 2
    far = (exact + (torch.log(rel.abs().float().clamp(min=1) / exact) / math.log(max_dist / exact)
                    * (half - exact)).long()).clamp(max=half - 1)
    bucket = (rel > 0).long() * half + torch.where(rel.abs() < exact, rel.abs(), far)
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(layers):
        p = f"blocks.{i}."
        h = norm(x, state[p + "norm1.weight"])
        q, k, v = (h @ state[p + f"attn.{m}.weight"].T for m in "qkv")
        q, k, v = (t.view(n, heads, -1) for t in (q, k, v))
        bias = state[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)
        attn = torch.softmax(torch.einsum("inc,jnc->nij", q, k) + bias, dim=-1)
        x = x + torch.einsum("nij,jnc->inc", attn, v).reshape(n, -1) @ state[p + "attn.o.weight"].T
        h = norm(x, state[p + "norm2.weight"])
        gate = F.gelu(h @ state[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ state[p + "ffn.fc1.weight"].T) * gate) @ state[p + "ffn.fc2.weight"].T
    return norm(x, state["norm.weight"])


def test_t5_key_map_reproduces_transformers_umt5():
    g = torch.Generator().manual_seed(0)
    d, heads, dff, vocab, layers = 32, 4, 48, 50, 2
    state = {"token_embedding.weight": torch.randn(vocab, d, generator=g), "norm.weight": 1 + 0.1 * torch.randn(d, generator=g)}
    for i in range(layers):
        p = f"blocks.{i}."
        for m in "qkvo":
            state[p + f"attn.{m}.weight"] = torch.randn(d, d, generator=g) / d ** 0.5
        state[p + "norm1.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        state[p + "norm2.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        state[p + "pos_embedding.embedding.weight"] = torch.randn(32, heads, generator=g)
        state[p + "ffn.gate.0.weight"] = torch.randn(dff, d, generator=g) / d ** 0.5
        state[p + "ffn.fc1.weight"] = torch.randn(dff, d, generator=g) / d ** 0.5
        state[p + "ffn.fc2.weight"] = torch.randn(d, dff, generator=g) / dff ** 0.5
    ids = torch.randint(0, vocab, (140,), generator=g)  # long enough to reach the logarithmic buckets
    model = umt5_from_wan(state)
    assert (model.config.d_model, model.config.num_heads, model.config.d_ff, model.config.num_layers) == (d, heads, dff, layers)
    with torch.no_grad():
        got = model(input_ids=ids[None]).last_hidden_state[0]
    want = _wan_t5_reference(state, ids, heads)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    # the map is one-to-one (besides transformers' tied embedding copy)
    for k in state:
        assert all(t5_hf_to_wan(h) in (k, None) for h in t5_wan_to_hf(k))


def test_text_encoder_caches_prompts_on_disk(toy_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("QAVATAR_CACHE", str(tmp_path / "cache"))
    root = toy_ckpt / "Wan2.2-S2V-14B"
    enc = TextEncoder(root)
    a = enc.encode("A  woman\n talking &amp; smiling")
    assert a.shape[1] == 32 and torch.isfinite(a).all()
    cached = list((tmp_path / "cache" / "prompts").glob("*.safetensors"))
    assert len(cached) == 1
    enc2 = TextEncoder(root)
    enc2.model = lambda: (_ for _ in ()).throw(AssertionError("a cached prompt must not run the encoder"))
    assert torch.equal(enc2.encode("A  woman\n talking &amp; smiling"), a)
    assert torch.equal(TextEncoder(root, use_cache=False).encode("A woman talking & smiling"), a)  # cleaning
    assert clean_prompt(" a\t b &amp;amp; c ") == "a b & c"
    cached[0].write_bytes(b"garbage")  # a damaged entry is re-encoded, not trusted
    assert torch.equal(TextEncoder(root).encode("A  woman\n talking &amp; smiling"), a)


def test_int8_text_encoder_is_close_to_bf16_and_cached_apart(toy_ckpt, tmp_path, monkeypatch):
    from qavatar.quant.linear import QuantLinear
    from qavatar.quant.stats import sqnr_db

    monkeypatch.setenv("QAVATAR_CACHE", str(tmp_path / "cache"))
    root = toy_ckpt / "Wan2.2-S2V-14B"
    prompt = "A man reading the news, calm voice"
    ref = TextEncoder(root).encode(prompt)
    enc = TextEncoder(root, precision="int8")
    got = enc.encode(prompt)
    lins = [m for m in enc.model().modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
    assert lins and all(isinstance(m, QuantLinear) and m.weight.dtype == torch.int8 for m in lins)
    assert not torch.equal(got, ref)  # really another encoding, not the bf16 entry from the cache
    assert sqnr_db(ref.pow(2).sum().item(), (got - ref).pow(2).sum().item()) > 30
    assert len(list((tmp_path / "cache" / "prompts").glob("*.safetensors"))) == 2
    with pytest.raises(ConfigError, match="umT5 precision"):
        TextEncoder(root, precision="fp4")


def test_t5_file_is_loaded_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"token_embedding.weight": torch.zeros(2, 2), "x": Evil()}, tmp_path / "t5.pth")
    from qavatar.pipeline.text_encoder import load_wan_t5_state

    with pytest.raises(CheckpointError, match="not a loadable umT5 checkpoint"):
        load_wan_t5_state(tmp_path / "t5.pth")


# --------------------------------------------------------------------------------------------- VAE
def _tiny_diffusers_vae(**kw):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=16, **kw).eval()


@pytest.mark.parametrize("kw", [dict(dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
                                dict(dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, False])])
def test_vae_key_map_round_trips_a_wan_state_dict(tmp_path, kw):
    model = _tiny_diffusers_vae(**kw)
    wan = {vae_diffusers_to_wan(k, kw["num_res_blocks"]): v for k, v in model.state_dict().items()}
    assert len(wan) == len(model.state_dict())  # one-to-one
    assert {k: vae_config(wan)[k] for k in kw} == kw  # the config is read back off the shapes
    torch.save(wan, tmp_path / "Wan2.1_VAE.pth")
    loaded = load_wan_vae(tmp_path / "Wan2.1_VAE.pth")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).latent_dist.mode(), model.encode(x).latent_dist.mode())


def test_vae_key_map_covers_the_real_wan21_vae_keys():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan()  # the Wan 2.1 defaults
    mapped = {vae_diffusers_to_wan(k) for k in model.state_dict()}
    real = set((DATA / "wan21_vae_keys.txt").read_text().split())  # the 194 keys of Wan2.1_VAE.pth
    assert mapped == real


def test_vae_rejects_a_wrong_file(tmp_path):
    torch.save({"conv1.weight": torch.zeros(32, 32, 1, 1, 1)}, tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match="not a Wan 2.1 VAE"):
        load_wan_vae(tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match="VAE not found"):
        load_wan_vae(tmp_path / "missing.pth")


def test_streaming_decode_equals_decoding_everything_at_once(tmp_path):
    model = _tiny_diffusers_vae(dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    vae = WanVAE(model)
    lat = torch.randn(1, 16, 10, 8, 4)
    with torch.no_grad():
        whole = model.decode(vae.denormalize(lat)).sample
    stream = vae.stream()
    parts = [stream.decode(lat[:, :, :7]), stream.decode(lat[:, :, 7:8]), stream.decode(lat[:, :, 8:])]
    assert [p.shape[2] for p in parts] == [1 + 6 * 4, 4, 8]  # the first latent frame is 1 frame, later ones 4
    assert torch.equal(torch.cat(parts, dim=2), whole)


def test_vae_encode_normalises_with_the_wan_statistics():
    model = _tiny_diffusers_vae(dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    vae = WanVAE(model)
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        mu = model.encode(x).latent_dist.mode()
    z = vae.encode(x)
    assert z.shape == (1, 16, 3, 4, 4)
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.equal(z, (mu - mean) * (1.0 / std))  # the reference multiplies by the precomputed reciprocal
    assert torch.allclose(vae.denormalize(z), mu, atol=1e-6)


def test_vae_constants_follow_the_vae_dtype_as_in_the_reference():
    model = _tiny_diffusers_vae(dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    fp32, bf16 = WanVAE(model), WanVAE(model.to(torch.bfloat16))
    assert fp32.mean.dtype == torch.float32 and bf16.mean.dtype == bf16.inv_std.dtype == torch.bfloat16
    std = torch.tensor(model.config.latents_std)
    assert torch.equal(bf16.inv_std.flatten(), 1.0 / std.bfloat16())  # a bf16 division, as torch.tensor(std, bf16)
    # bf16 constants move latents by up to ~3.5e-3 (the fixture's ref_latents_bf16_constants); not more
    mu = torch.randn(1, 16, 1, 4, 4) * 3
    moved = (bf16.normalize(mu.bfloat16()).float() - fp32.normalize(mu)).abs().max()
    assert 0 < moved < 0.05


# ------------------------------------------------------------------------------------------- audio
@pytest.fixture(scope="module")
def toy_audio_encoder(toy_ckpt):
    return AudioEncoder(toy_ckpt / "Wan2.2-S2V-14B")


def _speech() -> np.ndarray:
    from qavatar.pipeline.media import load_audio

    return load_audio(SPEECH)


def test_audio_clips_equal_the_reference_whole_track_features(toy_audio_encoder):
    from transformers import Wav2Vec2FeatureExtractor

    enc, wave = toy_audio_encoder, _speech()
    ext = Wav2Vec2FeatureExtractor(do_normalize=True)
    want_norm = ext(wave, sampling_rate=16000, return_tensors="np").input_values[0]
    assert np.allclose(enc.normalize(wave), want_norm, atol=1e-5)  # the feature extractor's normalisation
    hidden = enc.hidden_states(enc.normalize(wave))
    assert hidden.shape[0] == 25 and hidden.shape[1] == enc.num_frames(len(wave))
    ref, clips = bucket_features(interpolate_features(hidden, 50, 30))  # the reference's whole-track path
    audio = AudioConditioning(enc, wave)
    assert audio.clips == clips
    got = torch.cat([audio.clip(r) for r in range(clips)], dim=-1)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5


def test_long_audio_is_encoded_in_windows(toy_audio_encoder):
    enc, wave = toy_audio_encoder, _speech()
    whole = AudioConditioning(enc, wave)
    windowed = AudioConditioning(enc, wave, window_s=2.0, context_s=1.0)  # forces 3+ windows on 5.8 s
    calls = []
    real = enc.hidden_states
    enc.hidden_states = lambda x: calls.append(len(x)) or real(x)
    try:
        parts = [windowed.clip(r) for r in range(windowed.clips)]
    finally:
        enc.hidden_states = real
    assert len(calls) >= 3 and max(calls) < len(wave)  # never the whole track at once
    ref = torch.cat([whole.clip(r) for r in range(whole.clips)], dim=-1)
    got = torch.cat(parts, dim=-1)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()  # wav2vec2 attention is global: close, not equal


# -------------------------------------------------------------------------------------------- mp4
def test_mp4_writer_streams_frames_and_muxes_trimmed_audio(tmp_path):
    out = tmp_path / "o.mp4"
    with Mp4Writer(out, 25, 64, 32, audio=SPEECH, audio_offset_s=0.12) as w:
        for i in range(4):
            w.write(torch.full((12, 64, 32, 3), 40 * i, dtype=torch.uint8))
            assert not out.exists()  # nothing at --out until the file is complete
        w.close()
    info = probe(out)
    assert (info["frames"], info["fps"], info["height"], info["width"]) == (48, 25.0, 64, 32)
    assert abs(info["audio_seconds"] - 48 / 25) < 1024 / info["audio_rate"] + 1e-6  # within one AAC frame
    assert not list(tmp_path.glob(".*partial*"))


def test_mp4_writer_failure_leaves_the_old_file(tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"previous video")
    with pytest.raises(RuntimeError):
        with Mp4Writer(out, 25, 64, 32, audio=SPEECH) as w:
            w.write(torch.zeros(5, 64, 32, 3, dtype=torch.uint8))
            raise RuntimeError("interrupted")
    assert out.read_bytes() == b"previous video" and not list(tmp_path.glob(".*partial*"))
    with pytest.raises(MediaError, match="does not exist"):
        Mp4Writer(tmp_path / "nope" / "o.mp4", 25, 64, 32)
    with pytest.raises(MediaError, match="is a directory"):
        Mp4Writer(tmp_path, 25, 64, 32)


# ---------------------------------------------------------------------------------------- progress
def test_progress_line_only_on_a_tty():
    import io

    from qavatar.pipeline.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    shown, hidden, quiet = Progress(2, 8, 4, 90, stream=tty), Progress(2, 8, 4, 90, stream=pipe), \
        Progress(2, 8, 4, 90, quiet=True, stream=Tty())
    for p in (shown, hidden, quiet):
        p.step(1, 2, 3)
        p.wrote(12)
        p.close()
    line = tty.getvalue().split("\r")[-1]
    assert "clip 2/2" in line and "block 3" in line and "step 4/4" in line and "frames 12/90" in line
    assert "frames/s" in line and "ETA" in line
    assert pipe.getvalue() == "" and quiet.stream.getvalue() == ""
