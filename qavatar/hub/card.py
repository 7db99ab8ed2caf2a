"""The model card (README.md) of a published qavatar checkpoint: Hub metadata, scheme, calibration, quality
and memory, and copy-paste usage, generated from the checkpoint's own config, report and the planner."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..model import from_wan_config
from ..parallel.plan import GiB, PlanRequest, make_plan

BASE_MODELS = ["Wan-AI/Wan2.2-S2V-14B", "Quark-Vision/Live-Avatar"]
LICENSE = "apache-2.0"  # Wan2.2-S2V-14B's license (and Live Avatar's)
# (GPUs, GiB each) people have: one to five 24 GB cards, a 48 GB card, an 80 GB card
SETUPS = [(1, 24), (2, 24), (4, 24), (5, 24), (1, 48), (2, 48), (1, 80)]
FULL_PARAMS = 16_295_755_609


def card_metadata(precision: str) -> dict[str, Any]:
    from huggingface_hub import ModelCardData

    tags = ["quantized", precision.removesuffix("-wo"), "live-avatar", "audio-driven", "talking-head", "wan2.2",
            "qavatar"]
    return ModelCardData(base_model=BASE_MODELS, library_name="qavatar", license=LICENSE, pipeline_tag="image-to-video",
                         tags=tags).to_dict()


def _memory_table(config: dict, precision: str, size: tuple[int, int]) -> list[str]:
    cfg = from_wan_config(config)
    rows = [f"| GPUs | KV cache | peak per GPU (largest rank) | fits |", "|---|---|---|---|"]
    for gpus, gib in SETUPS:
        if cfg.num_heads % gpus:
            continue
        for kv in ("bf16", "fp8"):
            p = make_plan(PlanRequest(cfg, gpus=gpus, vram=gib * GiB, precision=precision, size=size, kv_dtype=kv))
            rows.append(f"| {gpus} x {gib} GB | {kv} | {p.peak_bytes_per_rank / GiB:.1f} GiB | "
                        f"{'yes' if p.fits else 'no'} |")
    return rows


def model_card(ckpt: "str | Path", repo_id: str) -> str:
    ckpt = Path(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    qa = qc.get("qavatar", {})
    scheme = qa.get("scheme", {})
    precision = scheme.get("precision", "bf16")
    report: Optional[dict] = None
    if (ckpt / "quantization_report.json").is_file():
        report = json.loads((ckpt / "quantization_report.json").read_text())
    cfg = from_wan_config(config)
    size = tuple(qa.get("calibration_size") or cfg.default_size)
    params = make_plan(PlanRequest(cfg, gpus=1, size=size)).params

    from huggingface_hub import ModelCardData

    meta = ModelCardData(**card_metadata(precision)).to_yaml()
    group = next(iter(qc.get("config_groups", {}).values()), {})
    acts = group.get("input_activations")
    act_text = ("none (weight-only: activations stay in the compute dtype)" if not acts else
                f"{acts['type']}{acts['num_bits']}, per-{acts['strategy']}, "
                f"{'dynamic' if acts.get('dynamic') else 'static (calibrated)'}"
                + (", one scale per sampler step" if scheme.get("per_timestep") else ""))
    lora_words = ("the Wan2.2-S2V-14B DiT with the Live Avatar LoRA merged" if qa.get("lora_merged", True) else
                  "the Wan2.2-S2V-14B DiT **without** the Live Avatar LoRA (quantized with --no-lora: the base "
                  "model, not the distilled 4-step one)")
    lines = [
        "---", meta.strip(), "---", "",
        f"# {repo_id}",
        "",
        f"[Live Avatar](https://huggingface.co/Quark-Vision/Live-Avatar) ({lora_words}) quantized to "
        f"**{precision}** with [qavatar](https://github.com/qavatar/qavatar) "
        f"{qa.get('qavatar_version', __version__)}, to run on the GPUs people have: the DiT shards tensor-parallel, "
        f"so each rank holds only its slice.",
        "",
        f"Model: `{cfg.name}` config, {params:,} parameters (dim {cfg.dim}, {cfg.num_layers} blocks, {cfg.num_heads} "
        f"heads)." + ("" if params == FULL_PARAMS else " **This is not the full 14B model**: the figures below are "
                      "for this configuration."),
        "",
        "## Scheme",
        "",
        "| | |", "|---|---|",
        f"| weights | {precision.removesuffix('-wo')}, symmetric, per output channel (`weight` + fp32 `weight_scale [out, 1]`) |",
        f"| activations | {act_text} |",
        f"| quantized | {qa.get('layers_quantized', '?')} Linears: every Linear of the {cfg.num_layers} blocks and of the "
        f"audio injector |",
        f"| kept in bf16 | {', '.join(f'`{n}`' for n in qc.get('ignore', [])) or 'none'} |",
    ]
    if scheme.get("smooth_alpha") is not None:
        lines.append(f"| SmoothQuant | alpha {scheme['smooth_alpha']} on {qa.get('smoothed_layers', 0)} layers "
                     f"({len(qa.get('smooth_folded', []))} folded into the previous layer) |")
    lines += ["| format | compressed-tensors `quantization_config` in config.json, Wan key names, safetensors |", ""]

    lines += ["## Calibration", ""]
    if qa.get("calibration_set"):
        lines.append(f"{qa.get('calibration_pairs')} image+audio pairs of `{qa['calibration_set']}` at "
                     f"{'x'.join(map(str, qa.get('calibration_size', [])))}, encoders: {qa.get('calibration_encoders')}; "
                     f"calibration manifest sha256 `{qa.get('calibration_manifest_sha256', '')}`.")
    else:
        lines.append("None: a dynamic scheme converted without calibration data.")
    lines.append("")

    lines += ["## Quality", ""]
    if qa.get("sqnr_db"):
        db = qa["sqnr_db"]
        lines += ["SQNR against the full-precision model on the calibration data (higher is better; 40 dB is a 1% "
                  "error):", "",
                  "| measure | dB |", "|---|---|",
                  f"| per-layer output, min / median / max | {db['min']:.1f} / {db['median']:.1f} / {db['max']:.1f} |"]
        if qa.get("end_to_end_sqnr_db"):
            for i, v in enumerate(qa["end_to_end_sqnr_db"]):
                lines.append(f"| end-to-end flow prediction, sampler step {i} | {v:.1f} |")
        worst = ", ".join(f"`{n}` ({d:.1f})" for d, n in db.get("worst_layers", [])[:3])
        lines += ["", f"Weakest layers: {worst}. Per-layer figures are in `quantization_report.json`."]
    else:
        lines.append("No calibration figures (converted without calibration).")
    lines.append("")

    lines += ["## Memory", "",
              f"`qavatar plan` for this checkpoint at {size[0]}x{size[1]}, tensor parallel over the GPUs, T5 and "
              f"wav2vec2 on the CPU, the VAE on the last GPU, 1.5 GiB per GPU reserved for CUDA:", ""]
    lines += _memory_table(config, precision, size)
    lines += ["", "Run `qavatar plan --checkpoint " + repo_id + " --gpus N --vram 24GiB` for your setup (it reads "
              "only config.json).", ""]

    lines += ["## Usage", "", "```bash",
              "pip install qavatar",
              f"qavatar plan --checkpoint {repo_id} --gpus 4 --vram 24GiB     # will it fit? (reads config.json only)",
              f"qavatar inspect {repo_id}                                    # downloads, verifies the sha256 manifest",
              f"qavatar infer --checkpoint {repo_id} --encoders Wan-AI/Wan2.2-S2V-14B --tp 4 \\",
              "    --image face.jpg --audio speech.wav --prompt \"A person talking\" --out out.mp4",
              f"torchrun --nproc-per-node 4 -m qavatar.cli infer --checkpoint {repo_id} --encoders "
              f"Wan-AI/Wan2.2-S2V-14B --tp 4 --image face.jpg --audio speech.wav --out out.mp4   # same, via torchrun",
              "```", "",
              "`--encoders` downloads only the text encoder (umT5-XXL), its tokenizer, the VAE and wav2vec2 from "
              "[Wan-AI/Wan2.2-S2V-14B](https://huggingface.co/Wan-AI/Wan2.2-S2V-14B) (about 12 GB, not the bf16 "
              "DiT); umT5 runs on the CPU and prompt embeddings are cached on disk.", "",
              "## Provenance", "",
              f"- source weights digest `{qa.get('source_sha256', '')}` (sha256 over every source tensor's key "
              f"and bytes in read order, LoRA not applied; not a file hash)" + (
                  f", LoRA `{Path(qa['lora']).name}` sha256 `{qa.get('lora_sha256', '')}`" if qa.get("lora") else ""),
              "- every file's sha256 is in `qavatar-manifest.json`; qavatar verifies it after download.",
              f"- license: {LICENSE}, as the base model.", ""]
    return "\n".join(lines)
