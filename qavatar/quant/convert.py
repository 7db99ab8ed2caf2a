"""`qavatar quantize`: LoRA-merged DiT -> calibrated 8-bit checkpoint, written tensor by tensor.

Output (compressed-tensors style; what compressed-tensors itself can load, per scheme, is in docs/quantization.md):
    config.json                    the source config + quantization_config
    diffusion_pytorch_model*.safetensors (+ index)
        <m>.weight        int8 / float8_e4m3fn [out, in]     (quantized Linears)
        <m>.weight_scale  fp32 [out, 1]
        <m>.input_scale   fp32 [1] or [slots]                 (static activations only)
        <m>.smooth_scale  fp32 [in]                           (SmoothQuant, when it could not be folded)
        everything else   bf16
    quantization_report.json       per-layer SQNR, decisions, end-to-end SQNR
    calibration_stats.safetensors  the activation statistics (a record for analysis; nothing reads it back yet)
    qavatar-manifest.json          sha256 of every file, written last
SmoothQuant folds where the algebra allows: o's scale into the rows of v (attention is linear in V), the text
cross-attention q's scale into norm3 (its only consumer); elsewhere it stays a runtime smooth_scale.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import __version__
from ..checkpoint import TensorSpec, atomic_directory, check_keys, open_weights, write_manifest
from ..checkpoint.load import find_dit_dir, missing_lora_error, model_shapes
from ..checkpoint.lora import MergedWeights
from ..checkpoint.integrity import screen
from ..checkpoint.writer import ShardedWriter, sha256_file
from ..errors import CalibrationError, ConfigError, writing_to
from ..model import ModelConfig
from .calibrate import CalibrationResult, Calibrator, LayerPlan, check_finite
from .config import QuantConfig
from .kernels import quantize_weight

REPORT = "quantization_report.json"
STATS = "calibration_stats.safetensors"


@dataclass
class QuantizeSummary:
    out: Path
    layers_quantized: int
    layers_kept: int
    bytes_written: int
    write_seconds: float
    sqnr_min_db: Optional[float]
    sqnr_median_db: Optional[float]
    end_to_end_db: Optional[list[float]]

    @property
    def write_mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.write_seconds, 1e-9)


def parse_size(size: str) -> tuple[int, int]:
    """'704*384' -> (704, 384) pixel H, W; both multiples of 64 (the reference's rule)."""
    from ..parallel.plan import parse_hw

    h, w = parse_hw(size)
    if h <= 0 or w <= 0 or h % 64 or w % 64:
        raise ConfigError(f"--size {size}: sides must be positive multiples of 64")
    return h, w


def _linear_names(cfg: ModelConfig) -> list[str]:
    from ..model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def default_plans(cfg: ModelConfig, config: QuantConfig) -> dict[str, LayerPlan]:
    """Plans without calibration (dynamic or weight-only schemes): every target Linear quantized."""
    if config.activations == "static" or config.smooth_alpha is not None or config.auto_skip_db is not None:
        raise CalibrationError("static scales, --smooth and --auto-skip need calibration data; drop --calibration none")
    return {n: LayerPlan(n, True, "quantized (no calibration)") for n in _linear_names(cfg) if config.targets(n)}


def _fold_targets(plans: dict[str, LayerPlan]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """(rows to divide per module, norm3 divisors, modules whose smoothing is folded away)."""
    rows, norms, folded = {}, {}, set()
    for name, p in plans.items():
        if not p.quantized or p.smooth is None:
            continue
        if name.endswith(".o"):
            rows[name[:-2] + ".v"] = p.smooth
            folded.add(name)
        elif name.endswith("cross_attn.q"):
            norms[name[: -len("cross_attn.q")] + "norm3"] = p.smooth
            folded.add(name)
    return rows, norms, folded


class _Source:
    """Source tensors as stored (bf16), hashed on the way, and the row-block edits each one needs:
    the LoRA merge (in fp32), v rows divided by o's folded smoothing, norm3 by cross q's."""

    def __init__(self, weights, rows: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]):
        self.merged = weights if isinstance(weights, MergedWeights) else None
        self.base = weights.base if self.merged else weights
        self.rows, self.norms = rows, norms
        self.sha256 = hashlib.sha256()

    def raw(self, key: str) -> torch.Tensor:
        t = self.merged.raw(key) if self.merged else self.base.get(key)  # a LoRA-file replacement, if any
        self.sha256.update(key.encode())
        if t.numel():
            self.sha256.update(t.reshape(-1).view(torch.uint8).numpy())
        screen(key, t, self.base.file_of(key))  # NaN/Inf, or a magnitude no trained weight has
        return t

    def edit(self, key: str) -> Optional[Callable[[torch.Tensor, int, int], torch.Tensor]]:
        """fp32 rows [r0, r1) -> edited rows, or None when the stored tensor is used as it is."""
        module = key.rpartition(".")[0]
        lora = self.merged is not None and key in self.merged._targets
        div = self.rows.get(module)
        if module in self.norms:
            div = self.norms[module]
        if not lora and div is None:
            return None
        a = self.merged.lora.lora_a(self.merged._targets[key]) if lora else None

        def apply(rows: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
            if lora:
                rows += self.merged.lora.delta(self.merged._targets[key], 0, r0, r1, a=a)
                # the merged rows get the screen the stored ones had: a damaged LoRA value would otherwise set
                # these rows' int8/fp8 scales, and round the rest of each row to zero
                screen(f"{key} (rows {r0}-{r1 - 1})", rows, self.base.file_of(key), self.merged.lora.path)
            if div is not None:  # per output row (v's rows and bias; norm3 per channel)
                rows /= div[r0:r1].reshape(-1, *([1] * (rows.dim() - 1)))
            check_finite(key, rows)
            return rows

        return apply


def write_quantized(weights, raw_config: dict, cfg: ModelConfig, config: QuantConfig, plans: dict[str, LayerPlan],
                    out: Path, calibration: Optional[CalibrationResult], info: dict, max_shard_bytes: int,
                    overwrite: bool = False, log: Callable[[str], None] = lambda s: None) -> QuantizeSummary:
    """Phase 2: stream every source tensor through its transform into the output shards."""
    rows, norms, folded = _fold_targets(plans)
    quant = {n: p for n, p in plans.items() if p.quantized}
    specs: list[TensorSpec] = []
    for key in weights.keys():
        module, _, leaf = key.rpartition(".")
        shape = tuple(weights.shape(key))
        if module in quant and leaf == "weight":
            p = quant[module]
            specs += [TensorSpec(key, config.weight_dtype, shape), TensorSpec(f"{module}.weight_scale", torch.float32,
                                                                             (shape[0], 1))]
            if p.input_scale is not None:
                specs.append(TensorSpec(f"{module}.input_scale", torch.float32, (p.input_scale.numel(),)))
            if p.smooth is not None and module not in folded:
                specs.append(TensorSpec(f"{module}.smooth_scale", torch.float32, (shape[1],)))
        else:
            specs.append(TensorSpec(key, torch.bfloat16, shape))

    ignore = sorted(n for n in _linear_names(cfg) if n not in quant)
    src = _Source(weights, rows, norms)
    t0 = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        hashing = src.base.verify_while_reading()  # the write reads every source file in order: hash on the way
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        for i, key in enumerate(weights.keys()):
            module, _, leaf = key.rpartition(".")
            raw, edit = src.raw(key), src.edit(key)
            if module in quant and leaf == "weight":
                p = quant[module]

                def transform(rows_, r0, r1, edit=edit, smooth=p.smooth):
                    rows_ = edit(rows_, r0, r1) if edit else rows_
                    return rows_.mul_(smooth[None, :]) if smooth is not None else rows_

                wq, sw = quantize_weight(raw, config.weight_dtype, transform)
                writer.write(key, wq)
                writer.write(f"{module}.weight_scale", sw)
                if p.input_scale is not None:
                    writer.write(f"{module}.input_scale", p.input_scale.float().reshape(-1))
                if p.smooth is not None and module not in folded:
                    writer.write(f"{module}.smooth_scale", p.smooth.float())
            elif edit is not None:
                writer.write(key, edit(raw.to(torch.float32, copy=True), 0, raw.shape[0]).to(torch.bfloat16))
            else:
                writer.write(key, raw.to(torch.bfloat16))
            if (i + 1) % 200 == 0:
                log(f"  wrote {i + 1}/{len(weights.keys())} tensors")
        writer.finish()
        if hashing:
            src.base.finish_verification()  # corrupt source -> nothing is written
        write_seconds = time.perf_counter() - t0

        sqnrs = sorted(max(p.sqnr_db.values()) for p in quant.values() if p.sqnr_db)
        summary_db = None
        if sqnrs:
            summary_db = {"min": sqnrs[0], "median": sqnrs[len(sqnrs) // 2], "max": sqnrs[-1],
                          "worst_layers": sorted(((max(p.sqnr_db.values()), n) for n, p in quant.items()
                                                  if p.sqnr_db))[:5]}
        qavatar = {
            "qavatar_version": __version__,
            "source_sha256": src.sha256.hexdigest(),
            **info,
            "layers_quantized": len(quant),
            "smoothed_layers": sum(p.smooth is not None for p in quant.values()),
            "smooth_folded": sorted(folded),
            "static_slots": calibration.stats.slots if calibration and config.activations == "static" else None,
            "sqnr_db": summary_db,
            "end_to_end_sqnr_db": calibration.end_to_end_db if calibration else None,
        }
        conf = dict(raw_config)
        unfolded = [n for n, p in quant.items() if p.smooth is not None and n not in folded]
        conf["quantization_config"] = config.quantization_config(ignore, qavatar, smoothed=unfolded)
        (tmp / "config.json").write_text(strict_json(conf))
        report = build_report(config, plans, calibration, info)
        (tmp / REPORT).write_text(strict_json(report))
        if calibration is not None:
            calibration.stats.save(tmp / STATS, calibration_manifest_sha256=info.get("calibration_manifest_sha256", ""))
        write_manifest(tmp, writer.hashes, kind="quantized", precision=config.precision)
    bytes_written = sum(s.nbytes for s in specs)
    return QuantizeSummary(Path(out), len(quant), len(ignore), bytes_written, write_seconds,
                           summary_db["min"] if summary_db else None, summary_db["median"] if summary_db else None,
                           calibration.end_to_end_db if calibration else None)


def _finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def strict_json(obj) -> str:
    """JSON every parser reads: NaN/Inf (e.g. the SQNR of a slot a layer never ran in) become null."""
    return json.dumps(_finite_or_none(obj), indent=2, allow_nan=False)


def build_report(config: QuantConfig, plans: dict[str, LayerPlan], calibration: Optional[CalibrationResult],
                 info: dict) -> dict:
    layers = []
    for name, p in plans.items():
        entry = {"layer": name, "quantized": p.quantized, "decision": p.reason}
        if p.sqnr_db:
            entry["sqnr_db"] = p.sqnr_db
            entry["sqnr_db_by_slot"] = p.sqnr_by_slot
            if "smooth" in p.sqnr_db:
                entry["smoothing_gain_db"] = p.sqnr_db["smooth"] - p.sqnr_db["base"]
        layers.append(entry)
    return {"scheme": config.precision, "config": {k: v for k, v in vars(config).items()}, **info,
            "slots": calibration.stats.slots if calibration else None,
            "pairs": calibration.pairs if calibration else None,
            "end_to_end_sqnr_db": calibration.end_to_end_db if calibration else None,
            "layers": layers}


def format_report(report: dict) -> str:
    lines = [f"scheme {report['scheme']}; per-layer SQNR on calibration activations (dB)"]
    has_smooth = any("smoothing_gain_db" in l for l in report["layers"])
    lines.append(f"{'layer':48s} {'SQNR':>7s}" + ("  smoothing" if has_smooth else "") + "  decision")
    for l in report["layers"]:
        db = max(l["sqnr_db"].values()) if l.get("sqnr_db") else float("nan")
        sm = ""
        if has_smooth:
            g = l.get("smoothing_gain_db")
            sm = f"  {g:+8.2f}" if g is not None else " " * 10
        lines.append(f"{l['layer']:48s} {db:7.2f}{sm}  {l['decision']}")
    if report.get("end_to_end_sqnr_db"):
        steps = ", ".join(f"{v:.1f}" for v in report["end_to_end_sqnr_db"])
        lines.append(f"end-to-end flow SQNR per sampler step (dB): {steps}")
    return "\n".join(lines)


def calibration_encoders(dit_dir: Path, cfg: ModelConfig, log: Callable[[str], None], device: str = "cpu",
                         dtype: torch.dtype = torch.float32):
    """The checkpoint's own encoders (umT5, VAE, wav2vec2) when it has them, else the stand-ins.
    The VAE runs on `device` (73 motion frames per pair); umT5 and wav2vec2 on the CPU, as in infer."""
    from ..pipeline.components import missing_parts

    missing = missing_parts(dit_dir)
    if not missing:
        from ..pipeline.encoders import PipelineEncoders

        return PipelineEncoders(dit_dir, cfg, device=device, dtype=dtype)
    from ..pipeline.stand_in import StandInEncoders

    log(f"{dit_dir} lacks {', '.join(missing)}: calibrating with stand-in encoders (real shapes, not the real "
        f"models); put the encoders next to the DiT for calibration on real activations")
    return StandInEncoders(cfg)


def planned_bytes(weights, cfg: ModelConfig, config: QuantConfig) -> int:
    """About the size of the output: target Linears at 1 byte per weight plus fp32 row scales, the rest bf16."""
    targets = {n for n in _linear_names(cfg) if config.targets(n)}
    total = 0
    for key in weights.keys():
        shape = tuple(weights.shape(key))
        n = math.prod(shape)
        module, _, leaf = key.rpartition(".")
        total += n + 4 * shape[0] if module in targets and leaf == "weight" else 2 * n
    return total


def preflight_quantize(weights, cfg: ModelConfig, config: QuantConfig, out: "str | Path", overwrite: bool) -> Path:
    """--out (exists, writable, free space for the planned output) and the source manifest's sizes."""
    from ..preflight import check_manifest_sizes, check_output

    out = check_output(out, overwrite, "--out", planned_bytes(weights, cfg, config), kind="directory")
    check_manifest_sizes(weights.base if isinstance(weights, MergedWeights) else weights)
    return out


def source_record(dit_dir: Path) -> dict:
    """Where the source was, so that readers of the report can find its encoders again and only them: the
    resolved absolute path, how the source was checked, and a fingerprint of each encoder file."""
    from ..checkpoint.writer import MANIFEST
    from ..pipeline.components import encoder_fingerprint

    import os

    root = Path(dit_dir).resolve()
    if (root / MANIFEST).is_file():
        check = "sha256 against its " + MANIFEST
    elif os.environ.get("QAVATAR_NO_PLAUSIBILITY") == "1":
        check = "finite only (no manifest; plausibility check skipped by QAVATAR_NO_PLAUSIBILITY=1)"
    else:
        check = "plausibility (no manifest): finite, no weight beyond the magnitude limit"
    return {"source": str(root), "source_check": check, "source_encoders": encoder_fingerprint(root)}


def check_device(device: str) -> None:
    """--device before anything is read: cpu, cuda or cuda:N, and a GPU this torch can use."""
    if not (device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device)):
        raise ConfigError(f"--device {device}: choose cpu, cuda or cuda:N")
    if device != "cpu":
        if not torch.cuda.is_available():
            built = "a CPU-only build" if not torch.backends.cuda.is_built() else "a CUDA build that sees no GPU"
            raise ConfigError(f"--device {device} but torch {torch.__version__} is {built}; use --device cpu, or "
                              f"install torch for your CUDA version")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")


def quantize_checkpoint(src: "str | Path", out: "str | Path", config: QuantConfig,
                        calibration: "str | Path | None" = None, lora: "str | Path | bool | None" = True,
                        lora_alpha: Optional[float] = None, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                        size: Optional[str] = None, max_pairs: Optional[int] = None,
                        max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                        log: Callable[[str], None] = print) -> QuantizeSummary:
    """Merge the LoRA, calibrate (block-streamed), decide per layer, and write the quantized checkpoint."""
    from .dataset import BUNDLED, CalibrationSet

    check_device(device)
    if max_pairs is not None and max_pairs < 1:
        raise ConfigError(f"--max-pairs {max_pairs}: calibrate on at least 1 pair (or --calibration none)")
    dit_dir = find_dit_dir(src)
    weights, cfg, lora_path = open_weights(dit_dir, lora, lora_alpha)
    raw_config = (weights.base if isinstance(weights, MergedWeights) else weights).config
    if raw_config and "quantization_config" in raw_config:
        raise ConfigError(f"{dit_dir} is already quantized; quantize the bf16 checkpoint")
    if lora is True and lora_path is None:
        raise missing_lora_error(dit_dir)  # lora=False quantizes the base weights alone, on purpose
    check_keys(weights, model_shapes(cfg), str(dit_dir))
    config.check_ignore(_linear_names(cfg))
    from ..preflight import check_not_a_source

    # --overwrite replaces OUT whole: never when that would delete what this run reads
    check_not_a_source(out, {"the source checkpoint": Path(src), "the source DiT": dit_dir, "the LoRA": lora_path,
                             "the calibration set": Path(calibration) if calibration not in (None, "none") else None})
    preflight_quantize(weights, cfg, config, out, overwrite)  # cheap checks before hours of calibration
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    info: dict = {**source_record(dit_dir), "lora": str(lora_path.resolve()) if lora_path else None,
                  "lora_sha256": sha256_file(lora_path) if lora_path else None,
                  "lora_merged": lora_path is not None}  # infer needs no LoRA for it (checkpoint.load.require_lora)
    log(f"source {dit_dir}" + (f" + LoRA {lora_path} (merged in fp32)" if lora_path else " (no LoRA)"))
    result: Optional[CalibrationResult] = None
    if calibration == "none":
        plans = default_plans(cfg, config)
        log("no calibration: every target Linear quantized, no SQNR report")
    else:
        calib = CalibrationSet(calibration or BUNDLED)
        h, w = parse_size(size) if size else cfg.default_size
        latent_hw = (h // 8, w // 8)
        encoders = calibration_encoders(dit_dir, cfg, log, device, dtype)
        inputs = calib.inputs(encoders, cfg, latent_hw, limit=max_pairs)
        log(f"calibrating on {len(inputs)} pairs of {calib.name} at {h}x{w} ({device}, "
            f"{str(dtype).removeprefix('torch.')}; encoders: {encoders.name}), one block at a time")
        result = Calibrator(weights, cfg, config, device, dtype, log=log).run(inputs)
        plans = result.plans
        info.update(calibration_set=calib.name, calibration_manifest_sha256=calib.sha256(),
                    calibration_pairs=len(inputs), calibration_size=[h, w], calibration_encoders=encoders.name)
    log(f"writing {out}")
    with writing_to(out):  # a full or read-only disk: one line, and atomic_directory has removed the partial
        return write_quantized(weights, raw_config or cfg.to_wan_config(), cfg, config, plans, Path(out), result, info,
                               max_shard_bytes, overwrite, log)
