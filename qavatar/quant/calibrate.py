"""Block-streamed calibration: statistics, per-layer decisions and quality, one DiT block in memory at a time.

What runs is the first streaming block of every calibration pair, as inference runs it: the sink prefill at
t=0, then the sampler steps. The noisy input of step i is the flow-matching interpolation
x_i = (1 - sigma_i) x0 + sigma_i eps with x0 the reference latent (step 0 is pure noise, exactly inference's
input), so every (pair, step) input is known up front and the DiT can run layer-major: block b's weights are
read once, every pair and step goes through it, and it is dropped before block b+1 is read.

Two hidden-state streams go through the blocks side by side: `ref` (full precision) and `quant` (each
block quantized as decided). Per block:
  1. the ref stream runs with hooks that record per-Linear input statistics per slot (steps + sink);
  2. if decisions need the statistics (static scales, SmoothQuant), the block's inputs run again and every
     candidate quantization of every Linear is scored by SQNR against the full-precision output;
  3. each Linear gets its plan (quantize or keep bf16, smoothing, input scales) and the quant stream runs
     through the quantized block.
Per-layer SQNR is measured on full-precision inputs; the end-to-end SQNR compares the two streams' flow
predictions after the head.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import CalibrationError, CheckpointError
from ..model import LiveAvatarDiT, ModelConfig
from ..model.block import Segments
from ..model.kv_cache import LayerKV, RollingKVCache, SinkCache
from ..model.rope import rope_table, video_positions
from ..model.step_context import sampler_slot
from ..model.streaming import flow_match_schedule
from .config import QuantConfig
from .dataset import CalibrationInputs
from .kernels import fp8_matmul_supported
from .linear import QuantLinear
from .stats import ActivationStats, SqnrMeter, sqnr_db

REPLICATED = ("patch_embedding", "cond_encoder", "text_embedding", "time_embedding", "time_projection",
              "trainable_cond_mask", "head", "casual_audio_encoder", "frame_packer")


@dataclass
class LayerPlan:
    name: str
    quantized: bool
    reason: str
    smooth: Optional[torch.Tensor] = None  # divisor of the input, per channel [in]
    input_scale: Optional[torch.Tensor] = None  # static activations: [1] or [slots]
    sqnr_db: dict[str, float] = field(default_factory=dict)  # candidate -> overall dB
    sqnr_by_slot: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class CalibrationResult:
    stats: ActivationStats
    plans: dict[str, LayerPlan]
    end_to_end_db: list[float]  # per sampler step, flow prediction of the quantized DiT vs full precision
    pairs: list[str]
    timesteps: list[float]

    @property
    def end_to_end_overall_db(self) -> float:
        return min(self.end_to_end_db)


def smooth_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_:j|^(1-alpha); X/s and W*s give the same product."""
    a = act_absmax.float().clamp(min=1e-5)
    w = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5).to(a.device)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def static_input_scale(stats: ActivationStats, name: str, config: QuantConfig,
                       smooth: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-tensor scale(s) from the calibration absmax: one per slot with per_timestep, else one."""
    a = stats.absmax[name]  # [slots, in]
    if smooth is not None:
        a = a / smooth.cpu()[None]
    per_slot = a.amax(dim=1).clamp(min=1e-8) / config.qmax
    return per_slot if config.per_timestep else per_slot.max().reshape(1)


def _linears(module: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {f"{prefix}{n}": m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def _load(module: nn.Module, prefix: str, weights, dtype: torch.dtype, device: torch.device) -> None:
    """Assign module's tensors from a reader-like source (LoRA merged on read), refusing damaged weights."""
    from ..checkpoint.integrity import screen_weight

    sd = {}
    for name in module.state_dict():
        t = weights.get(prefix + name, dtype=torch.float32) if _takes_dtype(weights) else weights.get(prefix + name)
        screen_weight(weights, prefix + name, t)  # NaN/Inf or a corrupt magnitude, named with its file
        sd[name] = t.to(device=device, dtype=dtype)
    module.load_state_dict(sd, assign=True, strict=True)


def check_finite(key: str, t: torch.Tensor) -> None:
    """A finite fp32 sum proves every element finite (NaN and Inf propagate); only a failing sum pays for the
    exact element-wise check (which also rules out a sum that merely overflowed). 4M-element chunks keep the
    upcast temporaries small."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    chunks = t.reshape(-1).split(1 << 22)
    if all(torch.isfinite(c.sum(dtype=torch.float32)) for c in chunks):
        return
    if not all(torch.isfinite(c).all() for c in chunks):
        raise CheckpointError(f"{key} holds NaN or Inf (after the LoRA merge); the checkpoint is damaged")


def _takes_dtype(weights) -> bool:
    from ..checkpoint.lora import MergedWeights

    return isinstance(weights, MergedWeights)


class _Item:
    """One calibration pair's prepared inputs and its two hidden-state streams."""

    def __init__(self, model: LiveAvatarDiT, inp: CalibrationInputs, timesteps, sigmas, seed: int):
        cfg = model.cfg
        fpb = cfg.num_frames_per_block
        self.name = inp.name
        h, w = inp.ref_latents.shape[-2:]
        gh, gw = h // cfg.patch_size[1], w // cfg.patch_size[2]
        self.frames = Segments(fpb, gh * gw)
        self.context = model.embed_text([inp.context])
        sink_tokens, sink_pos, _ = model.embed_condition(inp.ref_latents, inp.motion_latents)
        self.sink_rope = rope_table(sink_pos, cfg.rope_split, cfg.rope_theta)
        _, self.sink_e0 = model.embed_time(torch.zeros(1, fpb, device=model.device))
        self.audio = model.encode_audio(inp.audio)
        self.rope = rope_table(video_positions(0, fpb, gh, gw), cfg.rope_split, cfg.rope_theta)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, cfg.in_dim, fpb, h, w, generator=g)
        x0 = inp.ref_latents.expand(-1, -1, fpb, -1, -1).float()
        self.e, self.e0, tokens = [], [], []
        for t, sigma in zip(timesteps, sigmas[:-1]):
            xt = (1 - sigma) * x0 + sigma * noise
            tokens.append(model.embed_video(xt, None) + model.trainable_cond_mask.weight[0].to(model.dtype))
            e, e0 = model.embed_time(torch.full((1, fpb), float(t), device=model.device))
            self.e.append(e)
            self.e0.append(e0)
        self.h = {"ref": tokens, "quant": [t.clone() for t in tokens]}
        self.h_sink = {"ref": sink_tokens, "quant": sink_tokens.clone()}


class Calibrator:
    def __init__(self, weights, cfg: ModelConfig, config: QuantConfig, device: "str | torch.device" = "cpu",
                 dtype: torch.dtype = torch.float32, steps: int = 4, shift: float = 3.0, seed: int = 0,
                 log: Callable[[str], None] = lambda s: None):
        self.weights, self.cfg, self.config = weights, cfg, config
        self.device, self.dtype, self.seed, self.log = torch.device(device), dtype, seed, log
        with torch.device("meta"):
            self.model = LiveAvatarDiT(cfg)
        for name in REPLICATED:
            _load(getattr(self.model, name), f"{name}.", weights, dtype, self.device)
        self.model.eval()
        self.timesteps, self.sigmas = flow_match_schedule(steps, shift)
        self.slots = [f"step{i}@t={t:.1f}" for i, t in enumerate(self.timesteps.tolist())] + ["sink"]
        self.stats = ActivationStats(self.slots)
        self.meter = SqnrMeter()
        self._slot, self._pair = 0, ""

    # ------------------------------------------------------------------ running one block over all items
    def _run_block(self, block: nn.Module, inject: Optional[int], items: list[_Item], stream: str,
                   store: bool = True) -> None:
        heads, hd = block.self_attn.num_heads, block.self_attn.head_dim
        sink_slot = len(self.timesteps)
        for it in items:
            self._pair = it.name
            sink = SinkCache(1)
            self._slot = sink_slot
            with sampler_slot(sink_slot):
                hs = block(it.h_sink[stream], it.sink_e0, Segments(0, 1), it.sink_rope, it.context,
                           LayerKV("sink", 0, sink))
            outs = []
            for s in range(len(self.timesteps)):
                self._slot = s
                rolling = RollingKVCache(1, 1, it.frames.num_noisy, heads, hd, self.dtype, self.device)
                with sampler_slot(s):
                    h = block(it.h[stream][s], it.e0[s], it.frames, it.rope, it.context,
                              LayerKV("stream", 0, sink, rolling, 0, it.sink_rope))
                    if inject is not None:
                        h = self.model.audio_injector(inject, h, it.frames, *it.audio)
                outs.append(h)
            if store:
                it.h_sink[stream], it.h[stream] = hs, outs

    def _hook_all(self, linears: dict[str, nn.Linear], *fns) -> list:
        """Forward hooks calling fn(name, module, input, output) for each fn; they never change outputs."""
        def hook(m, inp, out, name):
            for fn in fns:
                fn(name, m, inp[0], out)

        return [lin.register_forward_hook(lambda m, inp, out, name=name: hook(m, inp, out, name))
                for name, lin in linears.items()]

    # ------------------------------------------------------------------ decisions
    def _candidates(self, name: str, lin: nn.Linear) -> dict[str, QuantLinear]:
        cfg = self.config
        smooth_opts: dict[str, Optional[torch.Tensor]] = {"base": None}
        if cfg.smooth_alpha is not None:
            smooth_opts["smooth"] = smooth_scales(self.stats.channel_absmax(name), lin.weight, cfg.smooth_alpha)
        out = {}
        for cand, smooth in smooth_opts.items():
            scale = static_input_scale(self.stats, name, cfg, smooth) if cfg.activations == "static" else None
            out[cand] = self._qlinear(lin, smooth, scale)
        return out

    def _qlinear(self, lin: nn.Linear, smooth: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> QuantLinear:
        q = QuantLinear.from_float(lin, self.config, smooth=smooth, input_scale=scale)
        if self.config.precision == "fp8" and not fp8_matmul_supported(self.device):
            q.kernel_override = "emulate"  # score the sm89 W8A8 numerics, not this device's weight-only fallback
        return q

    def _needs_stats_first(self) -> bool:
        return self.config.activations == "static" or self.config.smooth_alpha is not None

    def _decide(self, name: str, candidates: dict[str, QuantLinear]) -> LayerPlan:
        cfg, nslots = self.config, len(self.slots)
        scores = {c: self.meter.db(name, c) for c in candidates}
        by_slot = {c: [self.meter.db(name, c, s) for s in range(nslots)] for c in candidates}
        best = max(scores, key=lambda c: scores[c])
        q = candidates[best]
        plan = LayerPlan(name, True, "quantized" + (" (smoothed)" if best == "smooth" else ""),
                         smooth=None if q.smooth_scale is None else q.smooth_scale.detach().cpu().clone(),
                         input_scale=None if q.input_scale is None else q.input_scale.detach().cpu().clone(),
                         sqnr_db=scores, sqnr_by_slot=by_slot)
        if cfg.auto_skip_db is not None and scores[best] < cfg.auto_skip_db:
            plan.quantized, plan.reason = False, f"kept bf16: {scores[best]:.1f} dB < --auto-skip {cfg.auto_skip_db:g} dB"
            plan.smooth = plan.input_scale = None
        return plan

    # ------------------------------------------------------------------ the whole pass
    @torch.no_grad()
    def run(self, inputs: list[CalibrationInputs]) -> CalibrationResult:
        if not inputs:
            raise CalibrationError("the calibration set is empty")
        model, cfg = self.model, self.cfg
        items = [_Item(model, inp, self.timesteps, self.sigmas.tolist(), self.seed + i) for i, inp in enumerate(inputs)]
        plans: dict[str, LayerPlan] = {}
        for b in range(cfg.num_layers):
            block = model.blocks[b]
            _load(block, f"blocks.{b}.", self.weights, self.dtype, self.device)
            inject = model.inject_index.get(b)
            linears = _linears(block, f"blocks.{b}.")
            if inject is not None:
                for sub in ("injector", "injector_adain_layers"):
                    mod = getattr(model.audio_injector, sub)[inject]
                    _load(mod, f"audio_injector.{sub}.{inject}.", self.weights, self.dtype, self.device)
                    linears.update(_linears(mod, f"audio_injector.{sub}.{inject}."))
            targets = {n: lin for n, lin in linears.items() if self.config.targets(n)}

            def observe(name, mod, x, out):
                self.stats.observe(name, self._slot, x, self._pair)

            cands: dict[str, dict[str, QuantLinear]] = {}

            def score(name, mod, x, out):
                if name in targets:
                    if name not in cands:
                        cands[name] = self._candidates(name, mod)
                    for c, q in cands[name].items():
                        with sampler_slot(self._slot):
                            self.meter.add(name, c, self._slot, out, q(x))

            inputs_snapshot = [(it.h_sink["ref"], list(it.h["ref"])) for it in items]
            if self._needs_stats_first():
                handles = self._hook_all(linears, observe)
                self._run_block(block, inject, items, "ref")
                for h in handles:
                    h.remove()
                saved = [(it.h_sink["ref"], it.h["ref"]) for it in items]
                for it, (hs, h) in zip(items, inputs_snapshot):
                    it.h_sink["ref"], it.h["ref"] = hs, h
                handles = self._hook_all(linears, score)
                self._run_block(block, inject, items, "ref", store=False)
                for h in handles:
                    h.remove()
                for it, (hs, h) in zip(items, saved):
                    it.h_sink["ref"], it.h["ref"] = hs, h
            else:
                handles = self._hook_all(linears, observe, score)
                self._run_block(block, inject, items, "ref")
                for h in handles:
                    h.remove()
            del inputs_snapshot

            for name in linears:
                if name in targets:
                    plans[name] = self._decide(name, cands[name])
                else:
                    plans[name] = LayerPlan(name, False, "kept bf16: --ignore")
            self._run_quantized(block, inject, items, plans, cands)
            block.to("meta")
            if inject is not None:
                model.audio_injector.injector[inject].to("meta")
                model.audio_injector.injector_adain_layers[inject].to("meta")
            worst = min((p.sqnr_db[max(p.sqnr_db, key=p.sqnr_db.get)] for n, p in plans.items()
                         if n in targets and p.quantized), default=float("nan"))
            self.log(f"block {b + 1}/{cfg.num_layers}: worst layer {worst:.1f} dB")

        e2e = []
        for s in range(len(self.timesteps)):
            sig = noise = 0.0
            for it in items:
                ref = model.head(it.h["ref"][s], it.e[s])
                q = model.head(it.h["quant"][s], it.e[s])
                sig += ref.pow(2).sum().item()
                noise += (ref - q).pow(2).sum().item()
            e2e.append(sqnr_db(sig, noise))
        return CalibrationResult(self.stats, plans, e2e, [it.name for it in items], self.timesteps.tolist())

    def _run_quantized(self, block: nn.Module, inject: Optional[int], items: list[_Item],
                       plans: dict[str, LayerPlan], cands: dict[str, dict[str, QuantLinear]]) -> None:
        """Run the quant stream through a copy of the block with every planned Linear swapped."""
        qblock = copy.deepcopy(block)
        qinj = None
        saved = None
        if inject is not None:
            saved = (self.model.audio_injector.injector[inject], self.model.audio_injector.injector_adain_layers[inject])
            qinj = (copy.deepcopy(saved[0]), copy.deepcopy(saved[1]))
            self.model.audio_injector.injector[inject], self.model.audio_injector.injector_adain_layers[inject] = qinj
        roots = [(qblock, f"blocks.{_index(block, self.model)}.")]
        if qinj is not None:
            roots += [(qinj[0], f"audio_injector.injector.{inject}."), (qinj[1], f"audio_injector.injector_adain_layers.{inject}.")]
        for root, prefix in roots:
            for name, lin in list(_linears(root, "").items()):
                plan = plans.get(prefix + name)
                if plan is not None and plan.quantized:
                    _set_submodule(root, name, self._qlinear(lin, plan.smooth, plan.input_scale))
        try:
            self._run_block(qblock, inject, items, "quant")
        finally:
            if saved is not None:
                self.model.audio_injector.injector[inject], self.model.audio_injector.injector_adain_layers[inject] = saved


def _index(block: nn.Module, model: LiveAvatarDiT) -> int:
    for i, b in enumerate(model.blocks):
        if b is block:
            return i
    raise ValueError("block not in model")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
