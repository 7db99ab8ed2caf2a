"""The `qavatar` command line: each command is a thin wrapper around one library function."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import QavatarError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Live Avatar on the GPUs people have: quantize, shard, plan, infer.")


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command("toy-checkpoint")
def toy_checkpoint(out: Path = typer.Argument(..., help="Output directory (created atomically)."),
                   config: str = typer.Option("tiny", help="Model preset or path to a config.json."),
                   seed: int = typer.Option(0, help="Seed of the random weights."),
                   lora_rank: int = typer.Option(8, help="Rank of the toy LoRA."),
                   overwrite: bool = typer.Option(False, help="Replace OUT if it exists.")) -> None:
    """Write a complete, deterministic checkpoint in the real layout, with random weights and a LoRA."""
    from .checkpoint.toy import make_toy_checkpoint

    try:
        path = make_toy_checkpoint(out, config=config, seed=seed, lora_rank=lora_rank, overwrite=overwrite)
    except QavatarError as e:
        _fail(e)
    typer.echo(f"wrote {path} (config {config}, seed {seed}); weights are random")


@app.command()
def inspect(path: str = typer.Argument(..., help="Checkpoint directory (or the ckpt/ root above it), or "
                                                 "ORG/NAME[@REVISION] on the Hugging Face Hub."),
            config: Optional[str] = typer.Option(None, help="Check keys against this preset instead of config.json."),
            verify: bool = typer.Option(False, help="Hash every file against the manifest."),
            as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Parameters, bytes per dtype, shards, key check against the config, quantization and LoRA status."""
    from .checkpoint.inspect import format_report, inspect_checkpoint
    from .hub import resolve_checkpoint

    try:
        report = inspect_checkpoint(resolve_checkpoint(path), config=config, verify=verify)
    except QavatarError as e:
        _fail(e)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("check-parity")
def check_parity(fixture: Path = typer.Argument(..., help="Fixture directory (config.json, model.safetensors, "
                                                           "cases.safetensors, cases.json).")) -> None:
    """Run every case of a reference fixture; exit 1 if any output exceeds its tolerance."""
    from .parity import run_fixture

    try:
        checks = run_fixture(fixture, print_fn=typer.echo)
    except QavatarError as e:
        _fail(e)
    bad = [c for c in checks if not c.ok]
    typer.echo(f"{len(checks) - len(bad)}/{len(checks)} tensors within tolerance")
    if bad:
        raise typer.Exit(1)


def parse_bytes(text: str) -> int:
    """'5GB', '512MiB', '1000000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise QavatarError(f"cannot read size {text!r}; use e.g. 24GiB, 5GB or 512MB") from None


@app.command()
def quantize(ckpt: Path = typer.Argument(..., help="bf16 checkpoint (Wan2.2-S2V-14B dir or the ckpt/ root)."),
             out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
             precision: str = typer.Option("int8", help="int8 | fp8 | int8-wo | fp8-wo"),
             calibration: Optional[str] = typer.Option(None, help="Calibration set dir or manifest; 'none' skips "
                                                                   "calibration (dynamic schemes only). Default: "
                                                                   "the bundled set."),
             activations: str = typer.Option("dynamic", help="dynamic (per-token) | static (per-tensor)"),
             per_timestep: bool = typer.Option(False, "--per-timestep", help="Static: one scale per sampler step."),
             smooth: Optional[float] = typer.Option(None, help="SmoothQuant alpha (int8), e.g. 0.5."),
             ignore: list[str] = typer.Option([], help="Glob of Linear names to keep in bf16 (repeatable)."),
             auto_skip: Optional[float] = typer.Option(None, help="Keep layers below this SQNR (dB) in bf16."),
             lora: Optional[Path] = typer.Option(None, help="LoRA file (default: LiveAvatar/liveavatar.safetensors "
                                                              "next to the checkpoint)."),
             no_lora: bool = typer.Option(False, "--no-lora", help="Quantize the base weights without the LoRA."),
             lora_alpha: Optional[float] = typer.Option(None, help="Override the LoRA alpha."),
             device: str = typer.Option("cpu", help="Calibration device: cpu or cuda[:N]."),
             size: Optional[str] = typer.Option(None, help="Calibration video size H*W (default: the model's)."),
             max_pairs: Optional[int] = typer.Option(None, help="Use only the first N calibration pairs."),
             max_shard_size: str = typer.Option("5GB", help="Largest output shard."),
             overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
             report: bool = typer.Option(False, "--report", help="Print the per-layer SQNR table.")) -> None:
    """Merge the LoRA, calibrate on audio+image pairs, and write an int8 or fp8 checkpoint."""
    from .quant import QuantConfig
    from .quant.convert import REPORT, format_report, quantize_checkpoint

    try:
        config = QuantConfig(precision, activations, per_timestep, smooth, tuple(ignore), auto_skip)
        summary = quantize_checkpoint(ckpt, out, config, calibration=calibration,
                                      lora=False if no_lora else (lora or True), lora_alpha=lora_alpha, device=device,
                                      size=size, max_pairs=max_pairs, max_shard_bytes=parse_bytes(max_shard_size),
                                      overwrite=overwrite, log=typer.echo)
    except QavatarError as e:
        _fail(e)
    if report:
        typer.echo(format_report(json.loads((summary.out / REPORT).read_text())))
    line = f"wrote {summary.out}: {summary.layers_quantized} Linears {precision}, {summary.layers_kept} kept bf16, " \
           f"{summary.bytes_written / 1e9:.3f} GB at {summary.write_mb_per_s:.0f} MB/s"
    if summary.sqnr_min_db is not None:
        line += f"; layer SQNR min {summary.sqnr_min_db:.1f} dB, median {summary.sqnr_median_db:.1f} dB; " \
                f"end-to-end {', '.join(f'{v:.1f}' for v in summary.end_to_end_db)} dB per step"
    typer.echo(line)


@app.command()
def plan(gpus: int = typer.Option(4, help="GPUs (the tensor-parallel degree)."),
         vram: str = typer.Option("24GiB", help="Memory per GPU, e.g. 24GiB, 48GB."),
         precision: Optional[str] = typer.Option(None, help="bf16 | int8 | fp8 | int8-wo | fp8-wo (default: the "
                                                             "checkpoint's, else fp8)"),
         size: str = typer.Option("704*384", help="Video size H*W in pixels."),
         config: str = typer.Option("liveavatar-14b", help="Model preset or path to a config.json / checkpoint."),
         checkpoint: Optional[str] = typer.Option(None, help="Plan for this checkpoint (directory or ORG/NAME[@REV]"
                                                             "; only its config.json is read or downloaded)."),
         kv_dtype: str = typer.Option("bf16", help="KV cache dtype: bf16 | fp8 | int8 (8-bit: with fp32 scales per "
                                                   "token and head, counted)."),
         t5: str = typer.Option("cpu", help="Where umT5 runs: cpu | gpu."),
         vae: str = typer.Option("gpu", help="Where the VAE decodes: gpu (the host rank: the last TP rank of the first stage) | cpu."),
         wav2vec2: str = typer.Option("cpu", help="Where wav2vec2 runs: cpu | gpu."),
         replicated: bool = typer.Option(False, "--replicated", help="The reference layout: a whole DiT per GPU."),
         pipeline: int = typer.Option(1, help="Sampler-step pipeline stages, each TP over gpus/pipeline ranks "
                                              "(sizing only)."),
         recipe: Optional[str] = typer.Option(None, help="Find the cheapest setup that fits, up to --gpus: "
                                                          "fewest-gpus | quality."),
         pp: int = typer.Option(1, "--pp", help="Layer stages of the pipeline layout (each TP over gpus/pp ranks)."),
         vae_rank: bool = typer.Option(False, "--vae-rank", help="The VAE decodes on a GPU of its own."),
         bf16_reduce: bool = typer.Option(False, "--bf16-reduce", help="int8: all-reduce bf16 partials, not int32."),
         gpu: Optional[str] = typer.Option(None, help="Speed model for every layout on this GPU: rtx4090 | rtx3090 | "
                                                      "l40s | a100-pcie | a100-sxm | h100-pcie | h100-sxm | h200."),
         link_gbps: Optional[float] = typer.Option(None, help="Override the GPU-to-GPU GB/s per direction."),
         tflops: Optional[float] = typer.Option(None, help="Override the dense bf16 TFLOPS (8-bit rates scale)."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Will it fit, and how fast? Per-rank peak memory broken down with a verdict; with --gpu, every layout's
    predicted seconds per block, fps, bytes between ranks and bottleneck, the fastest that fits marked."""
    from .model import resolve_config
    from .parallel.plan import KV_DTYPES, PlanRequest, find_recipe, format_plan, make_plan, parse_hw, stored_layers

    stored = None
    try:
        cfg = resolve_config(config)
        if checkpoint:
            from .checkpoint.load import find_dit_dir
            from .hub import looks_like_repo, resolve_checkpoint
            from .model import from_wan_config

            where = resolve_checkpoint(checkpoint, files="config")
            hub = looks_like_repo(checkpoint)
            raw = json.loads(((where if hub else find_dit_dir(where)) / "config.json").read_text())
            cfg = from_wan_config(raw, name=checkpoint)
            stored = stored_layers(cfg, raw, None if hub else find_dit_dir(where))
            qscheme = (raw.get("quantization_config") or {}).get("qavatar", {}).get("scheme", {})
            precision = precision or qscheme.get("precision", "bf16")
            stored_family = qscheme.get("precision", "bf16").split("-")[0]  # its layers, if planned at its bits
        precision = precision or "fp8"
        h, w = parse_hw(size)
        profile = None
        if gpu or link_gbps is not None or tflops is not None:
            from .parallel.speed import get_profile

            profile = get_profile(gpu or "rtx4090", link_gbps, tflops)
            if precision == "fp8" and not profile.fp8_tflops:  # no fp8 matmul: every Linear dequantizes its weight
                typer.echo(f"note: {profile.name} has no fp8 tensor cores; fp8 weights run weight-only there, "
                           f"planned as fp8-wo (the same weight bytes, a dequantized weight per call)", err=True)
                precision = "fp8-wo"
        if kv_dtype not in KV_DTYPES:
            raise QavatarError(f"--kv-dtype {kv_dtype}: choose {', '.join(KV_DTYPES)}")
        if parse_bytes(vram) <= 0:
            raise QavatarError(f"--vram {vram}: give the memory of one GPU, e.g. 24GiB")
        if recipe and pp > 1:
            raise QavatarError("--recipe searches GPU counts, precisions and KV dtypes of the tensor-parallel "
                               "layout; drop --pp (with --gpu, the layouts table ranks the layer stages)")
        req = PlanRequest(cfg, gpus=gpus, vram=parse_bytes(vram), precision=precision, size=(h, w),
                          kv_dtype=kv_dtype, t5=t5, vae=vae, wav2vec2=wav2vec2, replicated_dit=replicated,
                          pipeline=pipeline, pp=pp, vae_rank=vae_rank, exact_int8_reduce=not bf16_reduce,
                          stored=stored if stored and precision.split("-")[0] == stored_family else None)
        if recipe:
            if recipe not in ("fewest-gpus", "quality"):
                raise QavatarError("--recipe is fewest-gpus or quality")
            result = find_recipe(req, gpus, recipe)
            if result is None:
                raise QavatarError(f"nothing fits in up to {gpus} x {vram} at {size}; try more GPUs or a smaller size")
        else:
            result = make_plan(req)
        speed = None
        if profile is not None:
            from .parallel.speed import layouts, recommended

            options = layouts(result.request, profile)  # the recipe's settings when one was searched
            speed = (profile, options, recommended(options))
    except (QavatarError, ValueError) as e:
        _fail(e)
    if as_json:
        out = result.to_json()
        if speed:
            out.update(gpu=speed[0].name, layouts=[o.to_json() for o in speed[1]], recommended=speed[2])
        typer.echo(json.dumps(out, indent=2))
    else:
        if recipe:
            typer.echo(f"cheapest recipe ({recipe}): --gpus {result.request.gpus} --precision "
                       f"{result.request.precision} --kv-dtype {result.request.kv_dtype}")
        typer.echo(format_plan(result))
        if speed:
            from .parallel.speed import format_layouts

            typer.echo(format_layouts(result.request, *speed))
    if not result.fits:
        raise typer.Exit(1)


@app.command()
def infer(checkpoint: str = typer.Option(..., help="Checkpoint directory (bf16 or quantized), the ckpt/ root, or "
                                                   "ORG/NAME[@REVISION] on the Hub."),
          image: Path = typer.Option(..., help="Reference portrait (any format Pillow reads)."),
          audio: Path = typer.Option(..., help="Speech track (any format FFmpeg decodes)."),
          prompt: str = typer.Option("A person talking to the camera, natural expression.", help="Text prompt."),
          out: Path = typer.Option(..., help="Output .mp4 (written to a temporary file, then renamed)."),
          precision: Optional[str] = typer.Option(None, help="bf16, int8, fp8, int8-wo or fp8-wo (default: the "
                                                             "checkpoint's own; a bf16 checkpoint is quantized "
                                                             "while loading)."),
          tp: int = typer.Option(1, help="Tensor-parallel degree (ranks are started for you, or use torchrun)."),
          pp: int = typer.Option(1, help="Pipeline stages: the DiT's layers split over PP ranks (x TP each), "
                                         "blocks streamed through them in timestep-forcing order."),
          gpus: Optional[int] = typer.Option(None, help="Ranks to start (default: --tp x --pp, or torchrun's); "
                                                        "without --tp/--pp the planner picks the fastest layout "
                                                        "that fits (layout auto)."),
          size: Optional[str] = typer.Option(None, help="Largest output area as H*W, e.g. 704*384; the aspect "
                                                        "ratio follows the image, sides are multiples of 64, "
                                                        "and a smaller image is not scaled up."),
          num_clip: Optional[int] = typer.Option(None, help="Clips of 48 frames (default: what the audio covers)."),
          sample_steps: int = typer.Option(4, help="Euler steps per block (the distilled model uses 4)."),
          seed: int = typer.Option(0, help="Seed of the noise and the sink offsets."),
          device: str = typer.Option("auto", help="auto, cuda or cpu."),
          encoders: Optional[str] = typer.Option(None, help="Directory (or ORG/NAME) holding umT5, the tokenizer, "
                                                           "the VAE and wav2vec2, when the checkpoint lacks them."),
          quiet: bool = typer.Option(False, "--quiet", help="No progress line."),
          no_prompt_cache: bool = typer.Option(False, "--no-prompt-cache", help="Encode the prompt even if cached."),
          t5_precision: str = typer.Option("bf16", help="umT5 encoder weights: bf16 (11.4 GB of RAM) or int8 "
                                                        "(weight-only, 6.7 GB)."),
          timeout: float = typer.Option(600, help="Seconds a rank may wait on the others."),
          latents_out: Optional[Path] = typer.Option(None, "--latents-out", help="Also write the generated latents "
                                                     "(every block, float32) to this safetensors file."),
          no_lora: bool = typer.Option(False, "--no-lora", help="Run a bf16 checkpoint without the Live Avatar LoRA "
                                                                "(the undistilled base model)."),
          noise: Optional[str] = typer.Option(None, help="reference (the reference's bf16 CUDA draws; default on "
                                                         "GPUs) | cpu (fp32 CPU generator; default on the CPU)."),
          overwrite: bool = typer.Option(False, help="Replace --out (and --latents-out) if it exists."),
          kv_dtype: str = typer.Option("bf16", help="KV caches: bf16 (the compute dtype) | fp8 | int8, 8-bit with "
                                                    "per-(token, head) scales (docs/kv_cache.md)."),
          compile: bool = typer.Option(False, "--compile", help="torch.compile the DiT blocks (inductor; slow "
                                                                "first calls, docs/gpu.md). Off by default.")) -> None:
    """Image + audio + prompt -> a talking-avatar mp4 with the sound in it, streamed clip by clip."""
    from .model.kv_quant import kv_storage_dtype
    from .pipeline.infer import InferRequest, infer as run_infer

    try:
        kv_storage_dtype(kv_dtype)
    except QavatarError as e:
        _fail(e)

    req = InferRequest(checkpoint, str(image), str(audio), prompt, str(out), precision, tp, size, num_clip,
                       sample_steps, seed, device, encoders, quiet, not no_prompt_cache, timeout,
                       t5_precision=t5_precision, latents_out=str(latents_out) if latents_out else None, pp=pp,
                       gpus=gpus, no_lora=no_lora, noise=noise, overwrite=overwrite, kv_dtype=kv_dtype,
                       compile=compile)
    try:
        results = run_infer(req)
    except QavatarError as e:
        _fail(e)
    host = next(r for r in results if r.host) if any(r.host for r in results) else None
    if host is not None:
        clips = ", ".join(f"{s:.1f}" for s in host.clip_seconds)
        typer.echo(f"wrote {host.out}: {host.frames} frames at 25 fps in {host.seconds:.1f} s "
                   f"(load {host.load_seconds:.1f} s, encoders {host.encode_seconds:.1f} s, per clip {clips} s)")


@app.command()
def serve(checkpoint: str = typer.Option(..., help="Checkpoint directory (bf16 or quantized), the ckpt/ root, or "
                                                   "ORG/NAME[@REVISION] on the Hub."),
          tp: int = typer.Option(1, help="Tensor-parallel ranks, started once and kept loaded."),
          pp: int = typer.Option(1, help="Pipeline stages: the DiT's layers split over PP ranks (x TP each), "
                                         "balanced for the model's default size; every job size runs on them."),
          precision: Optional[str] = typer.Option(None, help="bf16, int8, fp8, int8-wo or fp8-wo (default: the "
                                                             "checkpoint's own)."),
          host: str = typer.Option("127.0.0.1", help="Address to bind (localhost by default)."),
          port: int = typer.Option(7860, help="Port of the page and the API."),
          device: str = typer.Option("auto", help="auto, cuda or cpu."),
          encoders: Optional[str] = typer.Option(None, help="Directory holding umT5, tokenizer, VAE and wav2vec2."),
          num_clip: Optional[int] = typer.Option(None, help="Default clips per job (default: what the audio covers)."),
          timeout: float = typer.Option(600, help="Seconds a rank may wait on the others."),
          max_upload_mb: float = typer.Option(50, help="Largest upload accepted, in MB."),
          compile: bool = typer.Option(False, "--compile", help="torch.compile every DiT block once at load "
                                       "(docs/gpu.md); the first job pays the compile time.")) -> None:
    """A web page (and a gradio_client API) that streams the avatar while it is generated (docs/serve.md)."""
    try:
        import gradio  # noqa: F401 (the optional extra)

        from .serve.app import serve as run_server
    except ImportError as e:
        _fail(QavatarError(f"qavatar serve needs the web extra: pip install 'qavatar[serve]' ({e.name} is missing)"))
    from .demo import PORTRAIT, PROMPT, SPEECH
    from .pipeline.infer import InferRequest

    req = InferRequest(checkpoint, str(PORTRAIT), str(SPEECH), PROMPT, "", precision, tp, num_clip=num_clip,
                       device=device, encoders=encoders, quiet=True, timeout_s=timeout, pp=pp, compile=compile)
    try:
        run_server(req, host=host, port=port, max_upload_mb=max_upload_mb, say=lambda m: print(m, flush=True))
    except QavatarError as e:
        _fail(e)


@app.command()
def push(ckpt: Path = typer.Argument(..., help="A complete qavatar checkpoint directory."),
         repo_id: str = typer.Option(..., "--repo-id", help="ORG/NAME on the Hugging Face Hub."),
         private: bool = typer.Option(False, "--private", help="Create the repo private."),
         revision: Optional[str] = typer.Option(None, help="Branch to commit to (created if needed)."),
         message: Optional[str] = typer.Option(None, help="Commit message.")) -> None:
    """Publish a checkpoint with a generated model card, in one commit (token: HF_TOKEN or `hf auth login`)."""
    from .hub import push as push_checkpoint

    try:
        result = push_checkpoint(ckpt, repo_id, private=private, revision=revision, message=message, log=typer.echo)
    except QavatarError as e:
        _fail(e)
    typer.echo(f"pushed {len(result.files)} files to {result.repo_id}@{result.revision}: {result.commit_url}"
               + (" (model card generated)" if result.card_generated else ""))


@app.command()
def demo(out: Path = typer.Option(Path("qavatar-demo/demo.mp4"), help="The demo video; the toy checkpoints are "
                                                                       "written next to it."),
         seed: int = typer.Option(0, help="Seed for weights, noise and sink offsets."),
         quiet: bool = typer.Option(False, "--quiet", help="No progress line."),
         overwrite: bool = typer.Option(False, help="Replace an --out (and toy-checkpoint*/ next to it) that an "
                                                    "earlier demo did not write.")) -> None:
    """Run the embedded demo end to end on a toy checkpoint (no downloads): a talking-avatar mp4. A rerun
    replaces what the earlier demo wrote, and nothing else."""
    from .demo import run_demo

    try:
        run_demo(out, seed=seed, print_fn=typer.echo, quiet=quiet, overwrite=overwrite)
    except QavatarError as e:
        _fail(e)


def main() -> None:
    from .leftovers import Terminated

    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Terminated:
        typer.echo("terminated (SIGTERM); partial outputs were removed", err=True)
        sys.exit(143)


if __name__ == "__main__":
    main()
