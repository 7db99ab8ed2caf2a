"""Parity against golden tensors from the reference implementation (the ../shared/fixtures format).

A fixture directory holds config.json (the reference constructor kwargs and call conventions),
model.safetensors (a full reference state_dict), cases.safetensors and cases.json (per case: the call,
input/output tensor keys, scalars). Every case runs through qavatar's own code path, in fp32 on the CPU.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open

from .errors import QavatarError
from .model import build_model, from_wan_config
from .model.block import Segments
from .model.dit import LiveAvatarDiT
from .model.kv_cache import LayerKV, RollingKVCache, SinkCache
from .model.rope import rope_table, video_positions
from .model.streaming import StreamingSession
from .pipeline.audio_features import bucket_features, interpolate_features

# Absolute tolerances by case (the fixture README's suggestions); RoPE tables must match exactly, and so must
# the image preparation, the uint8 frames and every count and position (bookkeeping facts have tolerance 0).
TOLERANCES = {"causal_block": 1e-5, "wan_s2v_block": 1e-5, "audio_encoder": 1e-5, "audio_injector": 1e-5,
              "audio_bucketing": 1e-5, "wan_s2v_forward": 5e-5, "streaming": 5e-5,
              "image_prep": 0.0, "vae_stream": 1e-5, "clip_boundary": 5e-5, "output_frames": 0.0}
ROPE_TOL = 0.0


@dataclass
class Check:
    case: str
    key: str
    max_abs: float
    max_rel: float  # max |diff| / max |expected|
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tol


class Fixture:
    def __init__(self, root: Path):
        self.root = Path(root)
        missing = [n for n in ("config.json", "model.safetensors", "cases.safetensors", "cases.json")
                   if not (self.root / n).is_file()]
        if missing:
            raise QavatarError(f"{self.root}: not a parity fixture, missing {', '.join(missing)}")
        self.config = json.loads((self.root / "config.json").read_text())
        self.cases = json.loads((self.root / "cases.json").read_text())["cases"]
        self._tensors = safe_open(str(self.root / "cases.safetensors"), "pt")
        self.keys = set(self._tensors.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._tensors.get_tensor(key)
        except Exception:
            raise QavatarError(f"{self.root / 'cases.safetensors'}: no tensor {key!r}") from None

    def model(self) -> LiveAvatarDiT:
        model = build_model(from_wan_config(self.config, name=self.root.name)).float().eval()
        state = {}
        with safe_open(str(self.root / "model.safetensors"), "pt") as f:
            for k in f.keys():
                state[k] = f.get_tensor(k).float()
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise QavatarError(f"{self.root / 'model.safetensors'}: keys do not match the model "
                               f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
        return model


def _compare(case: str, key: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> Check:
    got, want = got.detach().double().cpu(), want.double()
    if got.shape != want.shape:
        raise QavatarError(f"{case}: {key} has shape {tuple(got.shape)}, the fixture {tuple(want.shape)}")
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    return Check(case, key, diff, diff / scale if scale else diff, tol)


def _fact(case: str, key: str, got, want) -> Check:
    """An exact fact (a count, a size, a position, a flag): numbers compare by value, anything else by equality."""
    try:
        g, w = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
        diff = float("inf") if g.shape != w.shape else (g - w).abs().max().item() if w.numel() else 0.0
        scale = w.abs().max().item() if w.numel() else 0.0
    except (TypeError, ValueError):
        diff, scale = (0.0 if got == want else float("inf")), 0.0
    return Check(case, key, diff, diff / scale if scale else diff, 0.0)


def _facts(case: str, prefix: str, got: dict, want: dict) -> Iterator[Check]:
    """One exact check per field; a field missing on either side fails."""
    for k in sorted(set(got) | set(want)):
        yield _fact(case, f"{prefix}.{k}", got.get(k, "<missing>"), want.get(k, "<missing>"))


def _inputs(case: dict) -> dict[str, str]:
    """Input tensor keys by their short name (the part after the last dot)."""
    return {item["key"].rsplit(".", 1)[-1]: item["key"] for item in case.get("inputs", [])}


# ---------------------------------------------------------------------------- per-case runners
def _causal_block(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    s, name, tol = case["scalars"], case["name"], TOLERANCES["causal_block"]
    inp = {k: fx[v] for k, v in _inputs(case).items()}
    x, e0 = inp["x"], inp["e0"]
    window, start, frame_len = s["kv_cache_size"], s["current_start"], s["frame_seqlen"]
    heads, head_dim = inp["kv_k_before"].shape[1:]
    rolling = RollingKVCache(1, 1, window, heads, head_dim, torch.float32)
    rolling.k[0, 0], rolling.v[0, 0] = inp["kv_k_before"], inp["kv_v_before"]
    sink = SinkCache(1)
    sink.k[0], sink.v[0] = inp["cond_k"][None, : s["cond_end"]], inp["cond_v"][None, : s["cond_end"]]
    kv = LayerKV("stream", 0, sink, rolling, start, inp["freqs_cond"])
    seg = Segments(e0.shape[1], frame_len)
    out = model.blocks[s["block_index"]](x, e0, seg, inp["freqs"], inp["context"], kv)
    slot = start % window if start >= window else start
    n = x.shape[1]
    yield _compare(name, f"{name}.out", out, fx[f"{name}.out"], tol)
    yield _compare(name, f"{name}.kv_k_written", rolling.k[0, 0, slot:slot + n], fx[f"{name}.kv_k_written"], tol)
    yield _compare(name, f"{name}.kv_v_written", rolling.v[0, 0, slot:slot + n], fx[f"{name}.kv_v_written"], tol)


def _wan_s2v_block(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    s, name = case["scalars"], case["name"]
    inp = {k: fx[v] for k, v in _inputs(case).items()}
    seg = Segments(1, s["seg_idx"])  # one timestep for all noisy tokens, then the condition tokens
    out = model.blocks[s["block_index"]](inp["x"], inp["e0"][:, None], seg, inp["freqs"], inp["context"])
    yield _compare(name, f"{name}.out", out, fx[f"{name}.out"], TOLERANCES[name])


def _audio_encoder(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    name = case["name"]
    glob, local = model.casual_audio_encoder(fx[_inputs(case)["features"]])
    yield _compare(name, f"{name}.global_tokens", glob, fx[f"{name}.global_tokens"], TOLERANCES[name])
    yield _compare(name, f"{name}.local_tokens", local, fx[f"{name}.local_tokens"], TOLERANCES[name])


def _audio_injector(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    s, name, tol = case["scalars"], case["name"], TOLERANCES["audio_injector"]
    inp = {k: fx[v] for k, v in _inputs(case).items()}
    idx = s["injector_index"]
    if model.inject_index.get(s["inject_layer"]) != idx:
        raise QavatarError(f"{name}: inject layer {s['inject_layer']} maps to injector "
                           f"{model.inject_index.get(s['inject_layer'])}, the fixture says {idx}")
    x, glob, local = inp["hidden_states"], inp["audio_emb_global"], inp["merged_audio_emb"]
    seg = Segments(glob.shape[1], s["original_seq_len"] // glob.shape[1])
    inj = model.audio_injector
    frames = x[:, :seg.num_noisy].unflatten(1, (seg.num_frames, seg.frame_len)).flatten(0, 1)
    adain = inj.injector_adain_layers[idx](frames, glob.flatten(0, 1)[:, 0])
    residual = inj.injector[idx](adain, local.flatten(0, 1))
    out = inj(idx, x, seg, glob, local)
    yield _compare(name, f"{name}.adain_out", adain, fx[f"{name}.adain_out"], tol)
    yield _compare(name, f"{name}.residual", residual, fx[f"{name}.residual"], tol)
    yield _compare(name, f"{name}.out", out, fx[f"{name}.out"], tol)


def _wan_s2v_forward(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    name, tol = case["name"], TOLERANCES["wan_s2v_forward"]
    inp = {k: fx[v] for k, v in _inputs(case).items()}
    x = inp["x"][None]
    out = model.forward_full(x, inp["t"], model.embed_text([inp["context"]]), inp["ref_latents"],
                             inp["motion_latents"], inp["cond_states"], model.encode_audio(inp["audio_input"]))
    yield _compare(name, f"{name}.out", out[0], fx[f"{name}.out"], tol)
    gh, gw = x.shape[-2] // model.cfg.patch_size[1], x.shape[-1] // model.cfg.patch_size[2]
    _, cond_pos, _ = model.embed_condition(inp["ref_latents"], inp["motion_latents"])
    positions = torch.cat([video_positions(0, x.shape[2], gh, gw), cond_pos])
    table = rope_table(positions, model.cfg.rope_split, model.cfg.rope_theta)
    yield _compare(name, f"{name}.rope_freqs", table, fx[f"{name}.rope_freqs"], ROPE_TOL)


def _streaming(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    name, tol, s = case["name"], TOLERANCES["streaming"], case["scalars"]
    inp = {k: fx[v] for k, v in _inputs(case).items()}
    calls = case["per_call"]
    draws = iter(c["sink_relative_dist"] for c in calls)
    session = StreamingSession(model, [inp["context"]], inp["ref_latents"], inp["motion_latents"],
                               inp["timesteps"], inp["sigmas"], sink_offset=lambda: next(draws))
    if session.frame_len != s["frame_seq_length_FS"] or session.caches[0].window != s["kv_cache_size"]:
        raise QavatarError(f"{name}: tokens per frame / KV window {session.frame_len}/{session.caches[0].window} "
                           f"differ from the fixture's {s['frame_seq_length_FS']}/{s['kv_cache_size']}")
    yield _compare(name, f"{name}.sink.rope_freqs", rope_table(session.sink.positions, model.cfg.rope_split,
                                                                model.cfg.rope_theta), fx[f"{name}.sink.rope_freqs"],
                   ROPE_TOL)
    yield _compare(name, f"{name}.sink.cond_k", torch.stack([k[0] for k in session.sink.k]), fx[f"{name}.sink.cond_k"],
                   tol)
    yield _compare(name, f"{name}.sink.cond_v", torch.stack([v[0] for v in session.sink.v]), fx[f"{name}.sink.cond_v"],
                   tol)

    got_calls = []
    blocks = sorted({c["block"] for c in calls})
    fpb = s["num_frames_per_block"]
    for b in blocks:
        first = next(c for c in calls if c["block"] == b)
        a0, a1 = first["audio_frames"]
        c0, c1 = first["cond_frames"]
        latents = session.denoise_block(inp["clip_noise"][None, :, b * fpb:(b + 1) * fpb], inp["audio_emb"][..., a0:a1],
                                        inp["cond_latents"][:, :, c0:c1], on_call=got_calls.append)
        yield _compare(name, f"{name}.block{b}.final_latents", latents[0], fx[f"{name}.block{b}.final_latents"], tol)
        for key in (k for k in _output_keys(case) if k.startswith(f"{name}.after_block{b}.")):
            cache_idx, kind = key.split(".")[-2:]
            cache = session.caches[int(cache_idx.removeprefix("cache"))]
            yield _compare(name, key, getattr(cache, kind)[:, 0], fx[key], tol)

    split, theta = model.cfg.rope_split, model.cfg.rope_theta
    gh, gw = (n // p for n, p in zip(session.latent_hw, model.cfg.patch_size[1:]))
    for want, got in zip(calls, got_calls):
        tag = f"b{want['block']}_s{want['step']}"
        if got.start_frame * session.frame_len != want["current_start"] or got.sink_shift != want["num_frames_cond_rollout"]:
            raise QavatarError(f"{name}: call {tag} ran at token {got.start_frame * session.frame_len} with sink shift "
                               f"{got.sink_shift}; the reference at {want['current_start']} / "
                               f"{want['num_frames_cond_rollout']}")
        yield _compare(name, want["out_key"], got.flow[0], fx[want["out_key"]], tol)
        table = rope_table(video_positions(got.start_frame, fpb, gh, gw), split, theta)
        yield _compare(name, want["rope_freqs_key"], table, fx[want["rope_freqs_key"]], ROPE_TOL)
        cond_table = rope_table(session.sink.shifted_positions(got.sink_shift), split, theta)
        yield _compare(name, want["cond_rope_freqs_key"], cond_table, fx[want["cond_rope_freqs_key"]], ROPE_TOL)
    if len(got_calls) != len(calls):
        raise QavatarError(f"{name}: ran {len(got_calls)} calls, the fixture recorded {len(calls)}")


def _audio_bucketing(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    name, s, tol = case["name"], case["scalars"], TOLERANCES["audio_bucketing"]
    hidden = fx[_inputs(case)["hidden_states"]]
    z = interpolate_features(hidden, 50, s["video_rate"])
    yield _compare(name, f"{name}.interpolated", z, fx[f"{name}.interpolated"], tol)
    emb, clips = bucket_features(z, fps=s["fps"], clip_frames=s["batch_frames"], video_rate=s["video_rate"], m=s["m"])
    if clips != s["num_repeat"]:
        raise QavatarError(f"{name}: {clips} clips, the fixture says {s['num_repeat']}")
    yield _compare(name, f"{name}.audio_emb", emb, fx[f"{name}.audio_emb"], tol)


# ------------------------------------------------------------------ pipeline cases (liveavatar-pipeline-*)
# Input images of image_prep are not stored; they are regenerated with this pure-integer formula (the fixture
# states it, and the sha256 of every image is checked).
IMAGE_FORMULA = ("y=arange(h)[:,None], x=arange(w)[None,:] (int64); R=(x*255)//max(w-1,1)+(x*y)%17; "
                 "G=(y*255)//max(h-1,1)+(x+3*y)%11; B=((x//16+y//16)%2)*128+(7*x+13*y)%61; "
                 "img=stack([R%256,G%256,B%256],-1).astype(uint8) -> [h,w,3]")


def formula_image(h: int, w: int) -> np.ndarray:
    y, x = np.arange(h, dtype=np.int64)[:, None], np.arange(w, dtype=np.int64)[None, :]
    r = (x * 255) // max(w - 1, 1) + (x * y) % 17
    g = (y * 255) // max(h - 1, 1) + (x + 3 * y) % 11
    b = ((x // 16 + y // 16) % 2) * 128 + (7 * x + 13 * y) % 61
    return np.stack(np.broadcast_arrays(r % 256, g % 256, b % 256), -1).astype(np.uint8)


def _image_prep(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    """Size rule, resize, padding and crop, pixel scaling: through media.load_image (a PNG, as the reference
    reads one) and sizing.fit_image, the functions `infer` uses."""
    import tempfile

    from PIL import Image

    from .pipeline.media import load_image
    from .pipeline.sizing import DIVISOR, crop_plan, fit_image, size_for_area

    name = case["name"]
    if " ".join(case["input_image_formula"].split()) != " ".join(IMAGE_FORMULA.split()):
        raise QavatarError(f"{name}: unknown input_image_formula {case['input_image_formula']!r}")
    if case["scalars"].get("divisor", DIVISOR) != DIVISOR:
        raise QavatarError(f"{name}: divisor {case['scalars']['divisor']}, qavatar's is {DIVISOR}")
    outputs = set(_output_keys(case))
    images = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in case["input_images"]:
            rgb = formula_image(spec["height"], spec["width"])
            yield _fact(name, f"{name}.{spec['name']}.sha256", hashlib.sha256(rgb.tobytes()).hexdigest(),
                        spec["sha256_uint8_hwc"])
            png = Path(tmp) / f"{spec['name']}.png"
            Image.fromarray(rgb).save(png, compress_level=0)  # lossless either way; 0 is fastest
            images[spec["name"]] = (rgb, load_image(png))
    for combo in case["per_combo"]:
        rgb, loaded = images[combo["image"]]
        tag = f"{name}.{combo['image']}@{combo['area_name']}"
        h, w = size_for_area(rgb.shape[0], rgb.shape[1], combo["max_area"])
        yield _fact(name, f"{tag}.chosen_HW", [h, w], combo["chosen_HW"])
        plan = crop_plan(rgb.shape[0], rgb.shape[1], h, w)
        yield _fact(name, f"{tag}.resize_to_short_side", min(plan.resized_hw), combo["resize_to_short_side"])
        yield _fact(name, f"{tag}.resized_HW", list(plan.resized_hw), combo["resized_HW"])
        yield _fact(name, f"{tag}.center_crop_pad_ltrb", list(plan.pad_ltrb), combo["center_crop_pad_ltrb"])
        yield _fact(name, f"{tag}.crop_offset_top_left", list(plan.offset_tl), combo["crop_offset_top_left_after_pad"])
        yield _fact(name, f"{tag}.padded_pixels", plan.padded_pixels, combo["padded_pixels"])
        pixels = fit_image(loaded, h, w)  # [3, H, W] float32, what the VAE encodes
        want_u8 = torch.from_numpy(rgb) if combo["crop_equals_input_image"] else fx[combo["crop_key"]]
        # The stored crop is the reference's uint8 picture; its ToTensor scaling is /255 * 2 - 1, asserted
        # bit for bit by the fixture, so the pixel values must equal that exactly.
        yield _compare(name, f"{tag}.ref_pixel_values(crop)", pixels,
                       want_u8.permute(2, 0, 1).float().div(255) * 2 - 1.0, 0.0)
        top, left, bottom, right = plan.image_box()
        pad = torch.ones(h, w, dtype=torch.bool)
        pad[top:bottom, left:right] = False
        got_pad = pixels[:, pad]
        yield _fact(name, f"{tag}.padded_value", got_pad.unique().tolist() if got_pad.numel() else [],
                    [combo["padded_value_ref_pixel_values"]] if combo["padded_pixels"] else [])
        yield _fact(name, f"{tag}.bf16_cast_changed_values", int((pixels.bfloat16().float() != pixels).sum()),
                    combo["bf16_cast_changed_values"])
        yield _fact(name, f"{tag}.bf16_cast_max_abs_change", (pixels.bfloat16().float() - pixels).abs().max().item(),
                    combo["bf16_cast_max_abs_change"])
        # stored pixel values are named by the image's HxW and the area (ref_pixel_values_100x180_704x384)
        for key in sorted(k for k in outputs if k.startswith(f"{name}.ref_pixel_values")):
            dims = re.findall(r"(\d+)x(\d+)", key.rsplit(".", 1)[-1])
            if dims == [(str(rgb.shape[0]), str(rgb.shape[1])), tuple(combo["area_name"].split("*"))]:
                outputs.discard(key)
                yield _compare(name, key, pixels[None, :, None], fx[key], 0.0)
    unused = sorted(k for k in outputs if k.split(".", 1)[1].startswith("ref_pixel_values"))
    if unused:
        raise QavatarError(f"{name}: outputs {unused} match no image/area combination")


def _vae_stream(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    """Reference and motion encoding (pipeline.encoders.encode_condition), warm-up, block-by-block streaming
    decode and dropped frames (pipeline.clips.FrameStream), the latent constants (pipeline.vae.WanVAE)."""
    from safetensors.torch import load_file

    from .pipeline.clips import DROP_FRAMES, VAE_WARMUP_LATENTS, FrameStream
    from .pipeline.encoders import encode_condition
    from .pipeline.vae import WanVAE, vae_config, vae_from_state_dict

    name, s, tol = case["name"], case["scalars"], TOLERANCES["vae_stream"]
    inp = {k: fx[v] for k, v in _inputs(case).items()}
    vae_cfg = json.loads((fx.root / "vae_config.json").read_text())
    state = load_file(str(fx.root / s.get("weights_file", "vae.safetensors")))
    got_cfg, want_cfg = vae_config(state), dict(vae_cfg["constructor_kwargs"])
    want_cfg["base_dim"] = want_cfg.pop("dim")
    for k, v in want_cfg.items():
        yield _fact(name, f"{name}.config.{k}", got_cfg.get(k), v)
    dtype = getattr(torch, vae_cfg.get("param_dtype", "float32"))
    vae = WanVAE(vae_from_state_dict(state, dtype=dtype, name=str(fx.root / "vae.safetensors")))
    yield _fact(name, f"{name}.config.latents_mean", vae.model.config.latents_mean, vae_cfg["latents_mean"])
    yield _fact(name, f"{name}.config.latents_std", vae.model.config.latents_std, vae_cfg["latents_std"])
    # The constants as held: in the VAE's dtype here, and bf16 as in production on a GPU.
    yield _compare(name, f"{name}.latents_mean", vae.mean.flatten(), inp["latents_mean"], 0.0)
    yield _compare(name, f"{name}.latents_inv_std", vae.inv_std.flatten(), inp["latents_inv_std"], 0.0)
    bf16 = WanVAE(vae.model, constants_dtype=torch.bfloat16)
    yield _compare(name, f"{name}.latents_mean_bf16", bf16.mean.flatten(), inp["latents_mean_bf16"], 0.0)
    yield _compare(name, f"{name}.latents_inv_std_bf16", bf16.inv_std.flatten(), inp["latents_inv_std_bf16"], 0.0)

    pixels = inp["ref_pixel_values"]
    motion_frames = (s["motion_frames"], s["motion_latent_frames"])
    ref, motion = encode_condition(vae, pixels, motion_frames)
    yield _compare(name, f"{name}.ref_mu_raw", vae.encode_mu(pixels), fx[f"{name}.ref_mu_raw"], tol)
    yield _compare(name, f"{name}.ref_latents", ref, fx[f"{name}.ref_latents"], tol)
    # (the 73-frame encode is the slow part: its raw mean is checked through the inverse normalisation)
    yield _compare(name, f"{name}.motion_mu_raw", vae.denormalize(motion), fx[f"{name}.motion_mu_raw"], tol)
    yield _compare(name, f"{name}.motion_latents", motion, fx[f"{name}.motion_latents"], tol)

    yield _fact(name, f"{name}.warmup_latent_frames", VAE_WARMUP_LATENTS, s["warmup_latent_frames"])
    yield _fact(name, f"{name}.drop_first_frames", DROP_FRAMES, s["drop_first_frames"])
    stream = FrameStream(vae, motion, keep_decoded=True)
    yield _compare(name, f"{name}.call0_warmup.out", stream.warmup_frames, fx[f"{name}.call0_warmup.out"], tol)
    calls = sorted((int(m.group(1)), int(m.group(2)), k) for k in _output_keys(case)
                   if (m := re.fullmatch(rf"{name}\.call(\d+)_block(\d+)\.out", k)))
    blocks = sorted(int(m.group(1)) for k in _inputs(case) if (m := re.fullmatch(r"block(\d+)_latents", k)))
    if [b for _, b, _ in calls] != blocks or len(blocks) != s["num_block_calls"]:
        raise QavatarError(f"{name}: block inputs {blocks} and decode outputs {[c[2] for c in calls]} disagree")
    frames = []
    for _, b, key in calls:
        lat = inp[f"block{b}_latents"][None]
        denorm = f"{name}.call{_}_block{b}.z_denorm"
        if denorm in fx.keys:
            yield _compare(name, denorm, vae.denormalize(lat), fx[denorm], tol)
        frames.append(stream.block(lat))
        yield _compare(name, key, stream.decoded[None], fx[key], tol)
    yield _compare(name, f"{name}.frames", torch.cat(frames, dim=1), fx[f"{name}.frames"], tol)


def _clip_boundary(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    """The tpp orchestration over a clip boundary, run by the functions `infer` runs (pipeline.clips.clip_inputs,
    model.streaming.stream_sequential over a StreamingSession): sink prefill, 4 blocks x 4 steps, rolling-sink
    re-prefill, the next clip."""
    from .model.streaming import flow_match_schedule, stream_sequential
    from .pipeline.clips import clip_inputs

    name, s, tol = case["name"], case["scalars"], TOLERANCES["clip_boundary"]
    inp = {k: fx[v] for k, v in _inputs(case).items()}
    cfg, calls = model.cfg, case["per_call"]
    for key, ours in (("num_frames_per_block", cfg.num_frames_per_block),
                      ("clip_latent_frames", cfg.clip_latent_frames),
                      ("num_blocks_per_clip", cfg.clip_latent_frames // cfg.num_frames_per_block),
                      ("infer_frames", 4 * cfg.clip_latent_frames), ("motion_frames", list(cfg.motion_frames)),
                      ("num_steps", len(inp["timesteps"]))):
        yield _fact(name, f"{name}.{key}", ours, s[key])
    timesteps, sigmas = flow_match_schedule(len(inp["timesteps"]))
    yield _compare(name, f"{name}.timesteps", timesteps, inp["timesteps"], tol)
    yield _compare(name, f"{name}.sigmas", sigmas, inp["sigmas"], tol)

    # The default sink offsets: random.Random(seed), drawn in call order, as the fixture's seeded stream.
    session = StreamingSession(model, [inp["context"]], inp["ref_latents"], inp["motion_latents"],
                               inp["timesteps"], inp["sigmas"], seed=s["python_random_seed"])
    yield _fact(name, f"{name}.frame_seq_length_FS", session.frame_len, s["frame_seq_length_FS"])
    yield _fact(name, f"{name}.kv_cache_size", session.caches[0].window, s["kv_cache_size"])
    yield _fact(name, f"{name}.cond_len", session.sink.k[0].shape[1], s["cond_len"])

    def sink_checks(tag: str) -> Iterator[Check]:
        split, theta = cfg.rope_split, cfg.rope_theta
        yield _compare(name, f"{tag}.rope_freqs", rope_table(session.sink.positions, split, theta),
                       fx[f"{tag}.rope_freqs"], ROPE_TOL)
        yield _compare(name, f"{tag}.cond_k", torch.stack([k[0] for k in session.sink.k]), fx[f"{tag}.cond_k"], tol)
        yield _compare(name, f"{tag}.cond_v", torch.stack([v[0] for v in session.sink.v]), fx[f"{tag}.cond_v"], tol)

    outputs = set(_output_keys(case))
    yield from sink_checks(f"{name}.sink_clip0")
    clip_frames = 4 * cfg.clip_latent_frames
    per_clip, fpb = cfg.clip_latent_frames // cfg.num_frames_per_block, cfg.num_frames_per_block
    blocks = sum(s["blocks_run"].values())
    got_calls: list = []
    rolled: list = []  # what the session's sink was re-prefilled with
    roll_sink = session.roll_sink
    session.roll_sink = lambda ref, motion: (rolled.append((ref, motion)), roll_sink(ref, motion))[1]
    inputs = clip_inputs(cfg, lambda r: inp[f"clip{r}_noise"][None],
                         lambda r: inp["audio_emb"][..., r * clip_frames:(r + 1) * clip_frames],
                         inp["ref_latents"], inp["motion_latents"])
    ran: dict[str, int] = {}
    block_audio = {}
    checks: list[Check] = []  # taken as each block finishes (the caches move on with the next one)

    def on_block(g: int, latents: torch.Tensor) -> None:
        r, b = divmod(g, per_clip)
        ran[f"clip{r}"] = ran.get(f"clip{r}", 0) + 1
        block_audio[r, b] = [r * clip_frames + 4 * b * fpb, r * clip_frames + 4 * (b + 1) * fpb]
        if b == 0 and r > 0 and f"{name}.sink_clip{r}.cond_k" in outputs:
            checks.extend(sink_checks(f"{name}.sink_clip{r}"))
        key = f"{name}.c{r}_b{b}.final_latents"
        checks.append(_compare(name, key, latents[0], fx[key], tol))
        clip_done = b == per_clip - 1 or g == blocks - 1
        tags = [f"after_clip{r}_block{b}"] + ([f"after_clip{r}"] if clip_done else [])
        for key in sorted(outputs):
            m = re.fullmatch(rf"{re.escape(name)}\.(after_clip\d+(?:_block\d+)?)\.cache(\d+)\.layer(\d+)\.(k|v)", key)
            if m and m.group(1) in tags:
                cache = getattr(session.caches[int(m.group(2))], m.group(4))
                checks.append(_compare(name, key, cache[int(m.group(3)), 0], fx[key], tol))

    try:
        stream_sequential(session, blocks, inputs, on_block,
                          on_call=lambda info: got_calls.append((*divmod(info.block, per_clip), info)))
    finally:
        session.roll_sink = roll_sink
    yield from checks
    yield from _facts(name, f"{name}.blocks_run", ran, s["blocks_run"])
    yield _fact(name, f"{name}.sink_rolls", len(rolled), 1 if blocks > per_clip else 0)
    if rolled:
        yield _compare(name, f"{name}.new_ref_latents", rolled[0][0], fx[f"{name}.new_ref_latents"], tol)
        yield _compare(name, f"{name}.motion_latents (rolled sink)", rolled[0][1], inp["motion_latents"], 0.0)

    yield _fact(name, f"{name}.call_order", [(r, b, info.step) for r, b, info in got_calls],
                [(c["clip"], c["block"], c["step"]) for c in calls])
    yield _fact(name, f"{name}.sink_relative_dist_draws", [info.sink_offset for _, _, info in got_calls],
                s["sink_relative_dist_draws_in_call_order"])
    split, theta = cfg.rope_split, cfg.rope_theta
    gh, gw = (n // p for n, p in zip(session.latent_hw, cfg.patch_size[1:]))
    fs, fpb = session.frame_len, cfg.num_frames_per_block
    for want, (r, b, got) in zip(calls, got_calls):
        tag = f"{name}.call_c{r}_b{b}_s{got.step}"
        start, n = got.start_frame * fs, fpb * fs
        slot, active = session.caches[got.step].slots(start, n)
        facts = {"kv_cache_index": got.step, "current_start": start, "current_end": start + n,
                 "current_frame": got.start_frame, "sink_relative_dist": got.sink_offset,
                 "num_frames_cond_rollout": got.sink_shift,
                 "ref_token_t_position": int(session.sink.shifted_positions(got.sink_shift)[0, 0]),
                 "kv_write_slot": [slot, slot + n], "kv_active_range": [0, active],
                 "kv_rolling": start >= session.caches[got.step].window, "audio_frames_global": block_audio[r, b],
                 "sigma": float(session.sigmas[got.step]), "sigma_next": float(session.sigmas[got.step + 1])}
        yield from _facts(name, tag, {k: v for k, v in facts.items() if k in want}, {k: want[k] for k in facts if k in want})
        yield _compare(name, want["x_key"], got.latents_in[0], fx[want["x_key"]], tol)
        yield _compare(name, want["timestep_key"], got.timestep, fx[want["timestep_key"]], 0.0)
        yield _compare(name, want["out_key"], got.flow[0], fx[want["out_key"]], tol)
        table = rope_table(video_positions(got.start_frame, fpb, gh, gw), split, theta)
        yield _compare(name, want["rope_freqs_key"], table, fx[want["rope_freqs_key"]], ROPE_TOL)
        cond_table = rope_table(session.sink.shifted_positions(got.sink_shift), split, theta)
        yield _compare(name, want["cond_rope_freqs_key"], cond_table, fx[want["cond_rope_freqs_key"]], ROPE_TOL)


def _output_frames(fx: Fixture, model: LiveAvatarDiT, case: dict) -> Iterator[Check]:
    """Frames to uint8 (pipeline.vae.to_uint8_frames) and the clip/frame bookkeeping (pipeline.clips.plan_clips,
    the audio bucketing's clip count)."""
    from transformers import Wav2Vec2Config

    from .pipeline.clips import DROP_FRAMES, plan_clips
    from .pipeline.vae import to_uint8_frames

    name, s = case["name"], case["scalars"]
    video = fx[_inputs(case)["video"]]
    yield _compare(name, f"{name}.frames_uint8", to_uint8_frames(video), fx[f"{name}.frames_uint8"], 0.0)
    yield _fact(name, f"{name}.dropped_frames", DROP_FRAMES, s["dropped_frames"])
    w2v = Wav2Vec2Config()  # the conv stack of every wav2vec2 (kernels 10,3,3,3,3,2,2; strides 5,2,...)
    fpb = s["frames_per_block"]
    for row in case["bookkeeping"]:
        n = row["audio_samples_16k"]
        plan = plan_clips(n, w2v.conv_kernel, w2v.conv_stride, fps=s["fps"], clip_frames=s["frames_per_clip"],
                          block_frames=fpb, num_clip=row["num_clip_arg"])
        emb, clips = bucket_features(torch.zeros(1, plan.audio_frames, 1), fps=s["fps"],
                                     clip_frames=s["frames_per_clip"])
        got = {"wav2vec_frames_50hz": plan.t50, "interpolated_frames_30fps": plan.audio_frames,
               "nr": plan.audio_clips, "audio_emb_frames": emb.shape[-1], "clips_generated": plan.clips,
               "frames_generated": plan.reference_frames_generated, "frames_kept": plan.reference_frames_kept,
               "video_seconds_at_25fps": plan.reference_frames_kept / s["fps"]}
        yield from _facts(name, f"{name}.bookkeeping[{n}]", got, {k: row[k] for k in got})
        yield _fact(name, f"{name}.bookkeeping[{n}].bucket_clips", clips, row["nr"])


def _output_keys(case: dict) -> list[str]:
    return [o["key"] for o in case.get("outputs", [])]


RUNNERS: dict[str, Callable[[Fixture, LiveAvatarDiT, dict], Iterator[Check]]] = {
    "causal_block": _causal_block, "wan_s2v_block": _wan_s2v_block, "audio_encoder": _audio_encoder,
    "audio_injector": _audio_injector, "wan_s2v_forward": _wan_s2v_forward, "streaming": _streaming,
    "audio_bucketing": _audio_bucketing, "image_prep": _image_prep, "vae_stream": _vae_stream,
    "clip_boundary": _clip_boundary, "output_frames": _output_frames,
}


def run_fixture(root: "str | Path", print_fn: Callable[[str], None] = print) -> list[Check]:
    """Run every case of the fixture; raises QavatarError for a fixture we cannot run (unknown case, bad keys)."""
    fx = Fixture(Path(root))
    unknown = [c["name"] for c in fx.cases if c["name"] not in RUNNERS]
    if unknown:
        raise QavatarError(f"{fx.root}: unknown case kinds {unknown}; known: {sorted(RUNNERS)}")
    model = fx.model()
    checks: list[Check] = []
    print_fn(f"fixture {fx.root} ({len(fx.cases)} cases); rel = max|diff| / max|expected|")
    threads = torch.get_num_threads()
    # One thread, as the fixtures were made: tiny tensors gain nothing from more, and on a busy machine
    # several threads spinning on two cores make the pipeline cases 10-40x slower.
    torch.set_num_threads(1)
    try:
        _run_cases(fx, model, checks, print_fn)
    finally:
        torch.set_num_threads(threads)
    return checks


def _run_cases(fx: Fixture, model: LiveAvatarDiT, checks: list, print_fn: Callable[[str], None]) -> None:
    with torch.no_grad():
        for case in fx.cases:
            case_checks = list(RUNNERS[case["name"]](fx, model, case))
            worst = max(case_checks, key=lambda c: c.max_abs)
            status = "ok" if all(c.ok for c in case_checks) else "FAIL"
            print_fn(f"{status:4} {case['name']:16} max abs {worst.max_abs:.2e} rel {worst.max_rel:.2e} "
                     f"(tol {TOLERANCES[case['name']]:.0e}, {len(case_checks)} tensors, worst {worst.key})")
            for c in case_checks:
                if not c.ok:
                    print_fn(f"     {c.key}: max abs {c.max_abs:.3e} > tol {c.tol:.1e}")
            checks += case_checks
