"""Parity against golden tensors from the reference implementation (the ../shared/fixtures format).

A fixture directory holds config.json (the reference constructor kwargs and call conventions),
model.safetensors (a full reference state_dict), cases.safetensors and cases.json (per case: the call,
input/output tensor keys, scalars). Every case runs through qavatar's own code path, in fp32 on the CPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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

# Absolute tolerances by case (the fixture README's suggestions); RoPE tables must match exactly.
TOLERANCES = {"causal_block": 1e-5, "wan_s2v_block": 1e-5, "audio_encoder": 1e-5, "audio_injector": 1e-5,
              "audio_bucketing": 1e-5, "wan_s2v_forward": 5e-5, "streaming": 5e-5}
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
    got, want = got.detach().float().cpu(), want.float()
    if got.shape != want.shape:
        raise QavatarError(f"{case}: {key} has shape {tuple(got.shape)}, the fixture {tuple(want.shape)}")
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    return Check(case, key, diff, diff / scale if scale else diff, tol)


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


def _output_keys(case: dict) -> list[str]:
    return [o["key"] for o in case.get("outputs", [])]


RUNNERS: dict[str, Callable[[Fixture, LiveAvatarDiT, dict], Iterator[Check]]] = {
    "causal_block": _causal_block, "wan_s2v_block": _wan_s2v_block, "audio_encoder": _audio_encoder,
    "audio_injector": _audio_injector, "wan_s2v_forward": _wan_s2v_forward, "streaming": _streaming,
    "audio_bucketing": _audio_bucketing,
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
    return checks
