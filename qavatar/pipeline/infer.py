"""`qavatar infer`: image + audio + prompt -> a talking-avatar mp4, streamed, at any precision and TP degree.

    prepare()   cheap checks in the launching process: parts present, media readable, size, clips, precision
    run_rank()  one tensor-parallel rank. Every rank loads its DiT slice and denoises in lockstep. The last
                rank (the host) also runs the encoders, broadcasts the condition (prompt states, reference and
                motion latents, each clip's audio features), decodes every block with the streaming VAE and
                writes frames and sound to the mp4 as they come
    infer()     prepare, then run the ranks (in this process for --tp 1, spawned ones otherwise, or the
                ranks torchrun started)

The flow is the reference's multi-GPU one: the reference frame and 73 motion frames (the image repeated)
are VAE-encoded and prefilled into the sink; each clip (48 frames = 12 latent frames) is 4 blocks of 3
latent frames x `--sample-steps` Euler steps, with clip r's noise drawn from seed + r; after the first clip
the sink is re-prefilled with the first generated latent frame (the rolling sink). The VAE warms its
causal cache on the first 7 motion latents; the stream's first 3 frames are dropped, and the audio with
them, so sound and picture stay in sync.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import ConfigError, QavatarError
from ..model import ModelConfig, from_wan_config
from .clips import DROP_FRAMES, VAE_WARMUP_LATENTS, plan_clips  # noqa: F401 (re-exported)
from .components import Components, locate
from .latents_out import check_latents_out
from .media import MediaError, load_audio, load_image
from .sizing import parse_area, size_for_area


@dataclass
class InferRequest:
    checkpoint: str
    image: str
    audio: str
    prompt: str
    out: str
    precision: Optional[str] = None  # bf16 | int8 | fp8; default: the checkpoint's own
    tp: int = 1  # tensor-parallel ranks (per pipeline stage)
    size: Optional[str] = None  # an area as H*W; default: the config's default size
    num_clip: Optional[int] = None
    sample_steps: int = 4
    seed: int = 0
    device: str = "auto"
    encoders: Optional[str] = None
    quiet: bool = False
    prompt_cache: bool = True
    timeout_s: float = 600.0
    t5_precision: str = "bf16"  # the umT5 encoder on the CPU: bf16 or int8 (weight-only)
    pp: int = 1  # pipeline stages (layer ranges of the DiT); pp * tp ranks in all
    gpus: Optional[int] = None  # ranks to use; with tp = pp = 1 the planner picks the layout (`--layout auto`)
    latents_out: Optional[str] = None  # also write the generated latents here (safetensors, host rank)
    no_lora: bool = False  # run a bf16 checkpoint without liveavatar.safetensors (else its absence is an error)
    noise: Optional[str] = None  # reference | cpu (pipeline/noise.py); default: reference on GPUs, cpu on the CPU
    overwrite: bool = False  # replace an existing --out and --latents-out
    kv_dtype: str = "bf16"  # KV caches: bf16 (the compute dtype) | fp8 | int8 with scales (model/kv_quant.py)
    compile: bool = False  # torch.compile every DiT block (model/compile.py); off by default, not yet measured on GPU


@dataclass
class Prepared:
    request: InferRequest
    parts: Components
    cfg: ModelConfig
    device: str  # cpu | cuda
    height: int
    width: int
    clips: int
    blocks: int  # blocks to generate over the whole run
    frames: int  # frames in the output
    audio_seconds: float
    runtime_quant: Optional[str]  # precision to quantize a bf16 checkpoint to while loading
    noise: str = "cpu"  # how each clip's noise is drawn (pipeline/noise.py)
    notes: list[str] = field(default_factory=list)

    @property
    def pp(self) -> int:
        return self.request.pp

    @property
    def world(self) -> int:
        return self.request.pp * self.request.tp

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8


OTHER_CONTAINERS = (".mkv", ".webm", ".avi", ".mov", ".gif", ".flv", ".wmv", ".ts", ".mpg", ".mpeg", ".ogv")


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"qavatar: {msg}", file=sys.stderr)


def _scheme_words(precision: str) -> str:
    return "weight-only" if precision.endswith("-wo") else "W8A8: weights and activations in 8 bits"


def _fp8_tensor_cores(device: str) -> bool:
    """This rank's GPU (under torchrun) has fp8 matmul, not a context on GPU 0 for every rank."""
    from ..quant.kernels import fp8_matmul_supported

    return device == "cuda" and fp8_matmul_supported(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))


def resolve_precision(requested: Optional[str], stored: str, device: str) -> tuple[Optional[str], list[str]]:
    """(precision to quantize to at load, or None; notes). Raises for combinations that cannot work."""
    notes = []
    family = stored.split("-")[0]
    want = requested or stored
    if want not in ("bf16", "int8", "fp8", "int8-wo", "fp8-wo"):
        raise ConfigError(f"--precision {want}: choose bf16, int8, fp8, int8-wo or fp8-wo")
    runtime = None
    if stored == "bf16":
        if want != "bf16":
            runtime = want
            notes.append(f"quantizing the bf16 checkpoint to {want} while loading (dynamic scales, no calibration); "
                         f"`qavatar quantize` makes a calibrated checkpoint with a quality report that loads faster")
    elif want == "bf16":
        raise ConfigError(f"the checkpoint is {stored}-quantized and holds no bf16 weights; point --checkpoint at the "
                          f"original Wan2.2-S2V-14B directory for bf16")
    elif want.split("-")[0] != family:
        raise ConfigError(f"--precision {want} but the checkpoint is {stored}; use --precision {family} or a "
                          f"{want} checkpoint")
    elif want != stored and not (want == "fp8-wo" and stored == "fp8" and not _fp8_tensor_cores(device)):
        # the scheme is fixed by what was stored (W8A8 vs weight-only): never run another one without a word
        raise ConfigError(f"--precision {want} but the checkpoint is {stored} ({_scheme_words(stored)}); use "
                          f"--precision {stored}, or `qavatar quantize --precision {want}` from the bf16 checkpoint")
    fp8 = (runtime or stored).startswith("fp8") and not (runtime or stored).endswith("-wo")
    if fp8 and device == "cuda" and not _fp8_tensor_cores(device):
        cap = torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", "0")))
        notes.append(f"this GPU (sm{cap[0]}{cap[1]}) has no FP8 tensor cores: running the fp8 weights "
                     f"weight-only (dequantized to bf16 per layer), with the same memory for weights")
        if runtime:
            runtime = "fp8-wo"
    return runtime, notes


def _wav2vec_conv(wav2vec_config: Path) -> tuple[list[int], list[int]]:
    from .audio_encoder import read_wav2vec_config

    c = read_wav2vec_config(wav2vec_config)
    return c.get("conv_kernel", [10, 3, 3, 3, 3, 2, 2]), c.get("conv_stride", [5, 2, 2, 2, 2, 2, 2])


def prepare(req: InferRequest) -> Prepared:
    """Everything that can be checked before loading a model. Each problem raises one clear error."""
    device = req.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: choose auto, cpu or cuda")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA GPU is visible")
        ranks = max(req.tp * req.pp, req.gpus or 0)
        if ranks > torch.cuda.device_count() and "WORLD_SIZE" not in os.environ:
            flags = f"--tp {req.tp}" + (f" --pp {req.pp}" if req.pp > 1 else "") + (f" --gpus {req.gpus}" if req.gpus else "")
            raise ConfigError(f"{flags} but only {torch.cuda.device_count()} GPU(s) are visible ({ranks} needed; "
                              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use fewer "
                              f"ranks, or multi-node torchrun")
    if req.tp < 1:
        raise ConfigError("--tp must be at least 1")
    if req.pp < 1:
        raise ConfigError("--pp must be at least 1")
    if req.sample_steps < 1:
        raise ConfigError("--sample-steps must be at least 1")
    from .text_encoder import T5_PRECISIONS

    if req.t5_precision not in T5_PRECISIONS:
        raise ConfigError(f"--t5-precision {req.t5_precision}: choose {' or '.join(T5_PRECISIONS)}")
    out = Path(req.out)
    if out.is_dir():
        raise MediaError(f"--out {out} is a directory; give a file name such as {out / 'out.mp4'}")
    if not out.parent.is_dir():
        raise MediaError(f"--out {out}: directory {out.parent} does not exist")
    if out.suffix.lower() in OTHER_CONTAINERS:  # an .mkv holding MP4 bytes confuses players and tools
        raise MediaError(f"--out {out.name}: qavatar writes MP4 (H.264 and AAC); name it {out.stem}.mp4 and "
                         f"convert it with ffmpeg if you need {out.suffix}")
    check_latents_out(req.latents_out, req.overwrite)
    from ..preflight import check_distinct

    check_distinct({"--out": req.out, "--latents-out": req.latents_out, "--image": req.image, "--audio": req.audio})
    if not 0 <= req.seed < 2 ** 63:  # clip k draws from seed + k: a torch generator takes at most 2**64 - 1
        raise ConfigError(f"--seed {req.seed}: use a seed from 0 to 2**63 - 1")

    parts = locate(req.checkpoint, req.encoders)
    from ..checkpoint.load import require_lora
    from ..checkpoint.reader import CheckpointReader
    from ..quant.config import check_sample_steps, static_scale_slots
    from .noise import resolve_noise

    require_lora(parts.dit, req.no_lora)
    noise = resolve_noise(req.noise, device)

    reader = CheckpointReader(parts.dit)
    cfg = from_wan_config(reader.config, name=parts.dit.name)
    check_sample_steps(static_scale_slots(reader), req.sample_steps)  # per-timestep scales fix the step count
    if req.pp > cfg.num_layers:
        raise ConfigError(f"--pp {req.pp}: the DiT has {cfg.num_layers} layers, so at most {cfg.num_layers} stages")
    if cfg.num_heads % req.tp:
        raise ConfigError(f"--tp {req.tp} does not divide the {cfg.num_heads} attention heads; use one of "
                          f"{[d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0 and d <= 8]}")
    image = load_image(req.image)
    area = parse_area(req.size or f"{cfg.default_size[0]}*{cfg.default_size[1]}")
    height, width = size_for_area(image.shape[1], image.shape[2], area)

    wave = load_audio(req.audio)
    seconds = len(wave) / 16000
    fps, clip_frames = cfg.sample_fps, 4 * cfg.clip_latent_frames
    block_frames = 4 * cfg.num_frames_per_block
    covered = int(seconds * fps)
    if covered < block_frames:
        raise MediaError(f"{req.audio}: {seconds:.2f} s of audio; one block of video needs at least "
                         f"{block_frames / fps:.2f} s ({block_frames} frames at {fps} fps)")
    if req.num_clip is not None and req.num_clip < 1:
        raise ConfigError("--num-clip must be at least 1")
    plan = plan_clips(len(wave), *_wav2vec_conv(parts.encoders / "wav2vec2-large-xlsr-53-english" / "config.json"),
                      fps=fps, clip_frames=clip_frames, block_frames=block_frames, num_clip=req.num_clip)
    notes = []
    if height * width < area / 2:
        notes.append(f"the video is {height}x{width}, under half the area of --size {req.size or 'default'}: the "
                     f"{image.shape[1]}x{image.shape[2]} image is not scaled up (as in the reference); give a "
                     f"larger image for a larger video")
    if req.num_clip is not None and req.num_clip > plan.audio_clips:
        notes.append(f"--num-clip {req.num_clip}: the audio covers {plan.audio_clips} clip(s); generating "
                     f"{plan.audio_clips}")
    runtime, pnotes = resolve_precision(req.precision, parts.precision, device)
    from ..preflight import check_output, check_weights

    check_weights(parts.dit)  # config, LoRA and manifest sizes, from headers: before minutes of encoders
    check_output(req.out, req.overwrite)  # exists without --overwrite, not writable; stale leftovers removed
    stored = None if runtime else reader.shapes()  # layers kept bf16 count
    req, lnotes = resolve_layout(req, cfg, runtime or parts.precision, (height, width), device, stored)
    return Prepared(req, parts, cfg, device, height, width, plan.clips, plan.blocks, plan.frames, seconds, runtime,
                    noise, notes + pnotes + lnotes)


def resolve_layout(req: InferRequest, cfg: ModelConfig, precision: str, size: tuple[int, int], device: str,
                   stored: Optional[dict] = None) -> tuple[InferRequest, list[str]]:
    """The (tp, pp) to run: as given, or, when more ranks are started (torchrun's WORLD_SIZE, or --gpus) than
    --tp/--pp ask for and neither was given, the planner's fastest layout that fits (`qavatar plan --gpu`)."""
    import dataclasses

    world = req.gpus or int(os.environ.get("WORLD_SIZE", "0")) or req.tp * req.pp
    if world == req.tp * req.pp:
        return req, []
    if (req.tp, req.pp) != (1, 1):
        raise ConfigError(f"--tp {req.tp} --pp {req.pp} needs {req.tp * req.pp} ranks but {world} are started; "
                          f"make them match, or give neither flag to let the planner choose")
    from ..parallel.plan import GiB, PlanRequest, choose_layout
    from ..parallel.speed import profile_for_device

    gpu, vram, why = "rtx4090", 10 ** 6 * GiB, "CPU ranks: ranked with the rtx4090 profile"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        name = torch.cuda.get_device_name(local)
        vram = torch.cuda.get_device_properties(local).total_memory
        gpu = profile_for_device(name) or "rtx4090"
        why = f"{name} as {gpu}" + ("" if profile_for_device(name) else " (unknown GPU: the rtx4090 profile)")
    plan_precision = precision if precision in ("bf16", "int8", "fp8", "int8-wo", "fp8-wo") else "bf16"
    if plan_precision == "fp8" and device == "cuda" and not _fp8_tensor_cores(device):
        plan_precision = "fp8-wo"  # no fp8 matmul on this GPU: the weights are dequantized per call
    tp, pp = choose_layout(PlanRequest(cfg, gpus=world, vram=vram, precision=plan_precision, size=size,
                                       steps=req.sample_steps, kv_dtype=req.kv_dtype,
                                       stored=stored if precision != "bf16" else None), gpu, world=world)
    return dataclasses.replace(req, tp=tp, pp=pp), [f"layout auto: --pp {pp} --tp {tp} on {world} ranks, the "
                                                     f"planner's fastest that fits ({why})"]


@dataclass
class RankResult:
    rank: int
    host: bool
    frames: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    encode_seconds: float = 0.0
    clip_seconds: list[float] = field(default_factory=list)  # DiT + decode + write, per clip
    bytes_read: int = 0
    held_bytes: int = 0
    cache_bytes: int = 0
    peak_gpu_bytes: int = 0
    out: Optional[str] = None
    compile_seconds: float = 0.0  # --compile: wall time of the block calls that compiled a graph


class _Host:
    """What the host rank runs besides the DiT: encoders, streaming VAE, mp4 writer."""

    def __init__(self, prep: Prepared, device: str, dtype: torch.dtype, enc=None):
        """enc: encoders already loaded (the server keeps them between jobs); None loads them here."""
        from .audio_encoder import AudioConditioning
        from .encoders import PipelineEncoders

        req = prep.request
        t = time.perf_counter()
        if enc is None:
            enc = PipelineEncoders(prep.parts.encoders, prep.cfg, device, dtype, prompt_cache=req.prompt_cache,
                                   t5_precision=req.t5_precision)
        self.context = enc.encode_text(req.prompt)
        enc.text.release()
        self.vae = enc.vae
        self.ref, self.motion = enc.condition(load_image(req.image), prep.latent_hw)
        self.audio = AudioConditioning(enc.audio, load_audio(req.audio), fps=prep.cfg.sample_fps,
                                       clip_frames=4 * prep.cfg.clip_latent_frames)
        self.encode_seconds = time.perf_counter() - t


def _join(prep: Prepared):
    """This rank's group: (TP group, pipeline group or None, whether it hosts the encoders/VAE/writer)."""
    from ..parallel.launch import init_tp
    from ..parallel.pipeline import init_pipeline
    from ..parallel.stages import stage_layers

    req = prep.request
    if prep.pp > 1:
        pipe = init_pipeline(prep.pp, req.tp, stage_layers(prep.cfg, prep.pp, prep.latent_hw), prep.device,
                             req.timeout_s)
        return pipe.tp, pipe, pipe.host
    tp = init_tp(req.tp, device=prep.device, timeout_s=req.timeout_s)
    return tp, None, tp.rank == tp.size - 1


class Cancelled(QavatarError):
    """generate() stopped at a block boundary because its `stop` callback said so (the server's cancel)."""


@dataclass
class RankState:
    """What a rank keeps between runs: its group and its DiT slice, loaded once (`qavatar serve` reuses it)."""
    rank: int
    tp: object
    pipe: object
    host: bool
    device: str
    dtype: torch.dtype
    model: object
    load_seconds: float = 0.0
    bytes_read: int = 0
    held_bytes: int = 0


def join_rank(rank: int, prep: Prepared) -> RankState:
    """Join the rank group; the model is loaded by load_state (the host runs its encoders in between)."""
    tp, pipe, host = _join(prep)
    device = f"cuda:{torch.cuda.current_device()}" if prep.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if prep.device == "cuda" else torch.float32
    return RankState(rank, tp, pipe, host, device, dtype, None)


def load_state(state: RankState, prep: Prepared) -> RankState:
    """Load this rank's DiT slice into state."""
    from ..parallel.load import load_rank
    from ..quant import QuantConfig

    t = time.perf_counter()
    pipe = state.pipe
    loaded = load_rank(prep.parts.dit, state.tp, dtype=state.dtype, device=state.device,
                       lora=not prep.request.no_lora,
                       quantize=QuantConfig(prep.runtime_quant) if prep.runtime_quant else None,
                       stage=(pipe.layers, pipe.first, pipe.last) if pipe else None)
    state.model = loaded.model
    state.load_seconds, state.bytes_read = time.perf_counter() - t, loaded.bytes_read
    state.held_bytes = loaded.param_bytes
    if prep.request.compile:  # once per load: the server's later jobs reuse the compiled graphs
        from ..model.compile import compile_blocks
        compile_blocks(state.model)
    return state


def run_rank(rank: int, prep: Prepared, on_frames: Optional[Callable[[torch.Tensor], None]] = None) -> RankResult:
    """One rank of the run. With --tp every rank denoises every block in lockstep; with --pp each stage runs its
    layers of every call (parallel/pipeline.py). The host (the last TP rank of the first stage) also encodes,
    decodes and writes. Returns this rank's timings."""
    t_start = time.perf_counter()
    state = join_rank(rank, prep)
    # encoders first: a broken input fails before the DiT load
    side = _Host(prep, state.device, state.dtype) if state.host else None
    return generate(load_state(state, prep), prep, side, on_frames, t_start=t_start)


def generate(state: RankState, prep: Prepared, side: Optional[_Host],
             on_frames: Optional[Callable[[torch.Tensor], None]] = None,
             stop: Optional[Callable[[int], bool]] = None, t_start: Optional[float] = None) -> RankResult:
    """One run on a loaded rank (side: the host's encoded inputs, None elsewhere). stop(b), when given (on every
    rank), is asked after block b is written, on every rank of a TP group, or, with layer stages, on the first
    stage's ranks before block b + 1 starts (the blocks in flight then finish, and the decision is passed down
    the stages). It must answer the same on every rank asked (the server broadcasts its cancel flag); True
    stops the run with Cancelled at that block boundary, the ranks left ready."""
    from ..model.kv_quant import kv_storage_dtype
    from ..model.streaming import StreamingSession, flow_match_schedule, stream_sequential
    from ..parallel.pipeline import PipelineStage, schedule_for
    from .latents_out import open_for_run
    from .clips import FrameStream, clip_inputs
    from .noise import clip_noise
    from .progress import Progress
    from .vae import to_uint8_frames
    from .video_writer import Mp4Writer

    req, cfg = prep.request, prep.cfg
    tp, pipe, host, device, model = state.tp, state.pipe, state.host, state.device, state.model
    res = RankResult(state.rank, host)
    res.load_seconds, res.bytes_read, res.held_bytes = state.load_seconds, state.bytes_read, state.held_bytes
    t_start = time.perf_counter() if t_start is None else t_start
    timesteps, sigmas = flow_match_schedule(req.sample_steps)
    per_clip = cfg.clip_latent_frames // cfg.num_frames_per_block
    src = tp.size - 1  # the host's rank in the (first stage's) TP group
    feeds = pipe is None or pipe.first  # ranks that embed: they need the condition, the noise and the audio
    inputs = context = None
    if feeds:
        context = tp.broadcast(side.context if host else None, src, device).float()[None]
        ref = tp.broadcast(side.ref if host else None, src, device).float()
        motion = tp.broadcast(side.motion if host else None, src, device).float()
        inputs = clip_inputs(cfg, lambda r: clip_noise(prep.noise, req.seed, r, cfg.in_dim, cfg.clip_latent_frames,
                                                       *prep.latent_hw, device),
                             lambda r: tp.broadcast(side.audio.clip(r) if host else None, src, device), ref, motion)

    progress = Progress(prep.clips, prep.blocks, req.sample_steps, prep.frames, quiet=req.quiet or not host)
    writer = stream = latents_file = None
    from ..leftovers import install_terminate_handler

    restore_signal = install_terminate_handler()  # SIGTERM raises, so the partial mp4 below is removed
    if host:
        res.encode_seconds = side.encode_seconds
        stream = FrameStream(side.vae, motion)  # warms the VAE's causal cache on the motion latents
        writer = Mp4Writer(req.out, cfg.sample_fps, prep.height, prep.width, audio=req.audio,
                           audio_offset_s=DROP_FRAMES / cfg.sample_fps)
    clock = {"clip": time.perf_counter()}

    def on_block(b: int, latents: torch.Tensor) -> None:
        r = b // per_clip
        if latents_file is not None:
            latents_file.write(latents)
        if host:
            frames = to_uint8_frames(stream.block(latents)[:, :prep.frames - res.frames])
            writer.write(frames)
            if on_frames is not None:
                on_frames(frames)
            res.frames += frames.shape[0]
            if pipe is not None:  # the sequential path reports every call as it happens
                for step in range(req.sample_steps):
                    progress.step(r, b % per_clip, step)
            progress.wrote(frames.shape[0])
        if b % per_clip == per_clip - 1 or b == prep.blocks - 1:
            now = time.perf_counter()
            res.clip_seconds.append(now - clock["clip"])
            clock["clip"] = now
            progress.clip_done(r)
        if pipe is None and stop is not None and b < prep.blocks - 1 and stop(b):
            raise Cancelled(f"cancelled after block {b + 1} of {prep.blocks}")

    try:
        latents_file = open_for_run(prep, tp.size) if host else None  # --latents-out
        if pipe is None:
            session = StreamingSession(model, context, *inputs.condition(0, None), timesteps, sigmas, seed=req.seed,
                                       kv_dtype=kv_storage_dtype(req.kv_dtype))
            res.cache_bytes = session.cache_bytes()
            stream_sequential(session, prep.blocks, inputs, on_block,
                              on_call=lambda info: progress.step(info.block // per_clip, info.block % per_clip,
                                                                 info.step) if host else None)
        else:
            stage = PipelineStage(model, pipe, prep.latent_hw, timesteps, sigmas, req.seed,
                                  kv_dtype=kv_storage_dtype(req.kv_dtype))
            res.cache_bytes = stage.cache_bytes()
            ctx = stage.share_context(context)
            # stop is asked on stage 0 only, before each new block; the answer travels down the stages
            halted = stage.run(schedule_for(cfg, prep.blocks, req.sample_steps, prep.pp, roll_sink=True), ctx, inputs,
                               on_block if pipe.first else None, cancellable=stop is not None,
                               stop_before=(lambda b: stop(b - 1)) if stop is not None and pipe.first else None)
            if halted is not None:
                raise Cancelled(f"cancelled after block {halted} of {prep.blocks}")
        if host:
            if latents_file is not None:
                latents_file.close()
            res.out = str(writer.close())
    except BaseException:
        if writer is not None:
            writer.abort()
        if latents_file is not None:
            latents_file.abort()
        raise
    finally:
        progress.close()
        restore_signal()
    res.seconds = time.perf_counter() - t_start
    if req.compile:
        res.compile_seconds = model.compile_stats.seconds
        _say(f"--compile: {model.compile_stats.summary()}")
    if prep.device == "cuda":
        res.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    return res


def infer(req: InferRequest, on_frames: Optional[Callable[[torch.Tensor], None]] = None) -> list[RankResult]:
    """Run a whole inference; returns every rank's result (the host's last)."""
    from ..parallel.launch import launcher_rank, spawn_ranks

    rank = launcher_rank()  # before minutes of checks: a broken launcher environment is the first error
    prep = prepare(req)
    for n in prep.notes:
        _say(n)
    if rank is not None:  # under torchrun: this process is one rank
        return [run_rank(rank, prep, on_frames)]
    if prep.world == 1:
        return [run_rank(0, prep, on_frames)]
    from ..leftovers import install_terminate_handler

    restore = install_terminate_handler()  # SIGTERM: the ranks are stopped (and clean up) before we exit
    try:
        return spawn_ranks(run_rank, prep.world, args=(prep,), timeout_s=req.timeout_s)
    finally:
        restore()
