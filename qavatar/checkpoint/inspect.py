"""`qavatar inspect`: what a checkpoint holds, read from the headers alone (seconds, even for 32 GB)."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

from ..errors import QavatarError
from ..model import ModelConfig, from_wan_config, resolve_config
from .load import find_dit_dir, find_lora, lora_merged, model_shapes
from .lora import LoraAdapter
from .reader import CheckpointReader
from .writer import MANIFEST, verify_manifest

QUANT_AUX = (".weight_scale", ".input_scale", ".smooth_scale")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def inspect_checkpoint(path: "str | Path", config: Optional[str] = None, verify: bool = False) -> dict[str, Any]:
    dit_dir = find_dit_dir(path)
    reader = CheckpointReader(dit_dir)
    raw = reader.config
    cfg: Optional[ModelConfig] = resolve_config(config) if config else (
        from_wan_config(raw, name=dit_dir.name) if raw is not None else None)

    by_dtype: Counter = Counter()
    shards: dict[str, dict[str, int]] = defaultdict(lambda: {"bytes": 0, "tensors": 0})
    params = 0
    for key in reader.keys():
        numel = 1
        for s in reader.shape(key):
            numel *= s
        if not key.endswith(QUANT_AUX):  # scales are not parameters of the model
            params += numel
        by_dtype[str(reader.dtype(key)).removeprefix("torch.")] += reader.nbytes(key)
        f = reader.file_of(key).name
        shards[f]["bytes"] += reader.nbytes(key)
        shards[f]["tensors"] += 1

    report: dict[str, Any] = {
        "path": str(dit_dir),
        "config": cfg.name if cfg else None,
        "params": params,
        "bytes_by_dtype": dict(by_dtype),
        "shards": {k: dict(v) for k, v in shards.items()},
        "index": reader.index_path.name if reader.index_path else None,
        "quantization": (raw or {}).get("quantization_config"),
    }
    if cfg is not None:
        expected = model_shapes(cfg, quantization=report["quantization"],
                                stored=reader.shapes())
        have = set(reader.keys())
        report["missing_keys"] = sorted(set(expected) - have)
        report["unexpected_keys"] = sorted(have - set(expected))
        report["shape_mismatches"] = {k: {"checkpoint": list(reader.shape(k)), "config": list(expected[k])}
                                      for k in sorted(have & set(expected))
                                      if tuple(reader.shape(k)) != expected[k]}
    lora_path = None if report["quantization"] else find_lora(dit_dir)  # quantized: LoRA already merged
    if lora_path is not None:
        try:
            lora = LoraAdapter(lora_path, default_alpha=cfg.lora_alpha if cfg else None)
            lora.validate({k: reader.shape(k) for k in reader.keys()})
            report["lora"] = {"path": str(lora_path), "targets": len(lora.targets), "rank": lora.rank,
                              "alpha": next(iter(lora.targets.values())).alpha if lora.targets else None,
                              "replaces": len(lora.replacements), "valid": True}
        except QavatarError as e:
            report["lora"] = {"path": str(lora_path), "valid": False, "error": str(e)}
    report["manifest"] = {"present": reader.has_manifest, "verify_requested": verify}
    if reader.has_manifest:
        from .integrity import manifest_hashes

        listed = set(manifest_hashes(dit_dir))  # a damaged manifest: one CheckpointError line
        here = {p.relative_to(dit_dir).as_posix() for p in dit_dir.rglob("*") if p.is_file()}
        weights = {f.name for f in reader.files} | {"config.json"}
        # side files (report, statistics) may be left out of a download; weights and config may not
        report["manifest"]["absent"] = sorted(listed - here)
        report["manifest"]["problems"] = verify_manifest(dit_dir, hashes=verify, only=sorted(listed & here)) + [
            f"{dit_dir / f}: missing (listed in {MANIFEST})" for f in sorted((listed - here) & weights)]
        report["manifest"]["hashes_checked"] = verify
    report["ok"] = not (report.get("missing_keys") or report.get("unexpected_keys") or report.get("shape_mismatches")
                        or (report.get("lora") and not report["lora"]["valid"])
                        or report["manifest"].get("problems"))
    return report


def format_report(r: dict[str, Any]) -> str:
    lines = [f"checkpoint  {r['path']}",
             f"config      {r['config'] or '(none: no config.json)'}",
             f"parameters  {r['params']:,}",
             "bytes       " + ", ".join(f"{k} {_human(v)}" for k, v in sorted(r["bytes_by_dtype"].items())),
             f"shards      {len(r['shards'])}" + (f" (index {r['index']})" if r["index"] else "")]
    for name, s in r["shards"].items():
        lines.append(f"  {name}  {_human(s['bytes'])}, {s['tensors']} tensors")
    if "missing_keys" in r:
        n_bad = len(r["missing_keys"]) + len(r["unexpected_keys"]) + len(r["shape_mismatches"])
        lines.append("keys        " + ("match the config" if not n_bad else
                                       f"{len(r['missing_keys'])} missing, {len(r['unexpected_keys'])} unexpected, "
                                       f"{len(r['shape_mismatches'])} wrong shape"))
        shown = 10
        for label, items in (("missing   ", r["missing_keys"]), ("unexpected", r["unexpected_keys"]),
                             ("shape     ", [f"{k}: checkpoint {v['checkpoint']} vs config {v['config']}"
                                             for k, v in r["shape_mismatches"].items()])):
            lines += [f"  {label}  {k}" for k in items[:shown]]
            if len(items) > shown:
                lines.append(f"  {label}  ... and {len(items) - shown} more (--json lists all)")
    q = r.get("quantization")
    if not q:
        lines.append("quantized   no (full precision weights)")
    else:
        lines += _quant_lines(q)
    lora = r.get("lora")
    if lora is None and q and not lora_merged(q):
        lines.append("lora        none: quantized without the LoRA (infer needs --no-lora)")
    elif lora is None and q:
        lines.append("lora        merged before quantization" + (f" ({q.get('qavatar', {}).get('lora')})"
                                                                 if q.get("qavatar", {}).get("lora") else ""))
    elif lora is None:
        lines.append("lora        none found next to the checkpoint")
    elif lora["valid"]:
        alpha = f", alpha {lora['alpha']:g}" if lora["alpha"] is not None else ""
        extra = f"; replaces {lora['replaces']} parameter(s) whole" if lora.get("replaces") else ""
        lines.append(f"lora        {lora['path']}: {lora['targets']} targets, rank {lora['rank']}{alpha}{extra}")
    else:
        lines.append(f"lora        INVALID: {lora['error']}")
    m = r["manifest"]
    if not m["present"]:
        lines.append("manifest    none (not written by qavatar)" + (
            ": no sha256 to verify against, only the headers were checked" if m.get("verify_requested") else ""))
    else:
        state = "; ".join(m["problems"]) if m["problems"] else (
            "sha256 verified" if m["hashes_checked"] else "sizes match (use --verify to hash)")
        if m.get("absent"):
            state += f"; not here (side files): {', '.join(m['absent'])}"
        lines.append(f"manifest    {state}")
    return "\n".join(lines)


def _quant_lines(q: dict[str, Any]) -> list[str]:
    qa = q.get("qavatar", {})
    scheme = qa.get("scheme", {})
    group = next(iter(q.get("config_groups", {}).values()), {})
    acts = group.get("input_activations")
    act_text = "weight-only" if not acts else (
        f"{acts['type']}{acts['num_bits']} activations, per-{acts['strategy']} "
        f"{'dynamic' if acts.get('dynamic') else 'static'}")
    extra = []
    if scheme.get("per_timestep"):
        extra.append("per-timestep scales")
    if scheme.get("smooth_alpha") is not None:
        extra.append(f"SmoothQuant alpha {scheme['smooth_alpha']} on {qa.get('smoothed_layers', 0)} layers "
                     f"({len(qa.get('smooth_folded', []))} folded)")
    fmt = group.get("format", q.get("format"))  # the plain layers' format (unfolded SmoothQuant: its own group)
    lines = [f"quantized   {scheme.get('precision', '?')} ({q.get('quant_method')} {fmt}): "
             f"{qa.get('layers_quantized', '?')} Linears, {len(q.get('ignore', []))} kept bf16; {act_text}"
             + "".join(f"; {e}" for e in extra)]
    db = qa.get("sqnr_db")
    if db:
        lines.append(f"  SQNR      layers min {db['min']:.1f} dB, median {db['median']:.1f} dB"
                     + (f"; end-to-end per step {', '.join(f'{v:.1f}' for v in qa['end_to_end_sqnr_db'])} dB"
                        if qa.get("end_to_end_sqnr_db") else ""))
    if qa.get("calibration_set"):
        lines.append(f"  calib     {qa['calibration_set']} ({qa.get('calibration_pairs')} pairs at "
                     f"{'x'.join(map(str, qa.get('calibration_size', [])))}, encoders {qa.get('calibration_encoders')},"
                     f" sha256 {qa.get('calibration_manifest_sha256', '')[:12]})")
    else:
        lines.append("  calib     none (dynamic scheme converted without calibration)")
    lines.append(f"  source    sha256 {qa.get('source_sha256', '')[:12]}, qavatar {qa.get('qavatar_version')}"
                 + (f"; source checked: {qa['source_check']}" if qa.get("source_check") else
                    "; source not checked (written by an older qavatar)"))
    return lines
