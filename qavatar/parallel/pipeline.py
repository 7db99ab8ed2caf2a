"""Pipeline-parallel streaming: the DiT's layers split into S stages, work items in timestep-forcing order.

World = S stages x T tensor-parallel ranks (rank = stage * T + tp_rank). Each stage holds only its layers (the
first also the embeddings, the last the head) and only its layers' share of every KV cache: the sink and the
per-step rolling caches. Work items (parallel/schedule.py) flow stage to stage; between stages only the hidden
state of one call moves (with its time modulation and audio tokens), each TP rank to its peer in the next
stage. The last stage's flow goes back to stage 0, which owns the sampler state (the Euler update) and hands
finished blocks to the caller. Every stage runs the items in the same order, so the latents are bit-identical to
the sequential StreamingSession's.

Messages (all shapes known to both sides, so no headers):
  stage k -> k+1, a call:     hidden [1, L, dim] (compute dtype), e0 [1, F, 6, 2, dim] and e [1, F, dim] (fp32),
                              audio global [1, F, 1, dim] and local [1, F, n+1, dim] (compute dtype)
  stage k -> k+1, a prefill:  condition tokens [1, Lc, dim] (compute dtype), e0 [1, F, 6, 2, dim] (fp32)
  stage S-1 -> 0, a call:     the flow [1, C, F, h, w] (fp32)
  stage 0 -> k, once:         the embedded text context [1, text_len, dim] (compute dtype)
"""
from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..model.kv_cache import RollingKVCache, SinkCache
from ..model.finite import watch_layers
from ..model.kv_quant import is_quantized
from ..model.step_context import sampler_slot
from ..model.streaming import BlockInputs
from .group import TPGroup
from .launch import RankError
from .schedule import WorkItem, pipeline_schedule


@dataclass(frozen=True)
class PipeGroup:
    """This rank's place in a pipeline of `stages` stages, each a TP group of `tp.size` ranks."""
    stage: int
    stages: int
    tp: TPGroup  # the stage's tensor-parallel group (this rank's slice of the stage's layers)
    layers: range  # the DiT layers this stage holds
    counter: Any = field(default=None, compare=False)  # a ByteCounter: p2p bytes this rank sends

    @property
    def rank(self) -> int:
        return self.stage * self.tp.size + self.tp.rank

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def peer(self, stage: int) -> int:
        """Global rank of this rank's peer (same TP rank) in another stage."""
        return stage * self.tp.size + self.tp.rank

    @property
    def host(self) -> bool:
        """The rank that runs the encoders, the VAE and the writer: stage 0's last TP rank."""
        return self.stage == 0 and self.tp.rank == self.tp.size - 1


def check_layout(pp: int, tp: int, num_layers: int, num_heads: int) -> None:
    if pp < 1 or tp < 1:
        raise ConfigError(f"--pp {pp} --tp {tp}: both must be at least 1")
    if pp > num_layers:
        raise ConfigError(f"--pp {pp}: the DiT has {num_layers} layers, so at most {num_layers} stages")
    if num_heads % tp:
        raise ConfigError(f"--tp {tp} does not divide the {num_heads} attention heads")


def init_pipeline(pp: int, tp: int, layers: list[tuple[int, int]], device: "str | torch.device" = "cpu",
                  timeout_s: float = 300, exact_int8_reduce: bool = True, counter: Any = None,
                  backend: Optional[str] = None) -> PipeGroup:
    """Join the pp*tp-rank world (torchrun or spawn_ranks) and form every stage's TP group."""
    from .launch import init_world

    rank, world = init_world(pp * tp, f"--pp {pp} --tp {tp}", device, timeout_s, backend)
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) if tp > 1 else None for s in range(pp)]
    stage = rank // tp
    group = TPGroup(rank % tp, tp, groups[stage], exact_int8_reduce, counter) if tp > 1 else TPGroup(counter=counter)
    return PipeGroup(stage, pp, group, range(*layers[stage]), counter)


class _Link:
    """Point-to-point messages to and from the neighbouring stages; sends are asynchronous (a stage never waits
    for its receiver), receives block. Every send is counted."""

    def __init__(self, group: PipeGroup, device: torch.device):
        self.group, self.device = group, device
        self.pending: collections.deque = collections.deque()
        # gloo sends CPU tensors only: GPU ranks on gloo (several ranks on one GPU) go through host memory
        self.via_host = torch.device(device).type == "cuda" and dist.is_initialized() and dist.get_backend() == "gloo"

    def send(self, tensors: list[torch.Tensor], stage: int) -> None:
        dst = self.group.peer(stage)
        for t in tensors:
            t = t.contiguous().cpu() if self.via_host else t.contiguous()
            self.pending.append((dist.isend(t, dst), t, stage))  # the tensor stays alive until the send completes
            if self.group.counter is not None:
                self.group.counter.add("p2p", t.numel() * t.element_size())
        while len(self.pending) > 64:
            self._wait(*self.pending.popleft())

    def recv(self, specs: list[tuple[tuple[int, ...], torch.dtype]], stage: int) -> list[torch.Tensor]:
        src = self.group.peer(stage)
        out = []
        for shape, dtype in specs:
            t = torch.empty(shape, dtype=dtype, device="cpu" if self.via_host else self.device)
            try:
                dist.recv(t, src)
            except (RuntimeError, dist.DistBackendError) as e:  # the group timeout, or the peer's socket closed
                raise RankError(f"stage {self.group.stage} (rank {self.group.rank}): no message from stage {stage} "
                                f"(rank {src}): it died or hangs ({str(e).splitlines()[0][:120]})") from None
            out.append(t.to(self.device))
        return out

    def flush(self) -> None:
        while self.pending:
            self._wait(*self.pending.popleft())

    def _wait(self, work, tensor: torch.Tensor, stage: int) -> None:
        try:
            work.wait()
        except (RuntimeError, dist.DistBackendError) as e:
            raise RankError(f"stage {self.group.stage} (rank {self.group.rank}): a send to stage {stage} did not "
                            f"complete: "
                            f"it died or hangs ({str(e).splitlines()[0][:120]})") from None


@dataclass
class TraceEvent:
    stage: int
    block: int
    step: int  # -1: a sink prefill
    slot: int
    start: float
    end: float


class PipelineStage:
    """One rank of a pipeline: its stage's layers, caches and share of the schedule."""

    def __init__(self, model, group: PipeGroup, latent_hw: tuple[int, int], timesteps: torch.Tensor,
                 sigmas: torch.Tensor, seed: int, kv_dtype: Optional[torch.dtype] = None):
        cfg = model.cfg
        self.model, self.cfg, self.group = model, cfg, group
        block = model.blocks[group.layers.start]
        self.device, self.dtype = block.norm3.weight.device, block.norm3.weight.dtype  # the compute dtype
        self.timesteps, self.sigmas = timesteps.float().cpu(), sigmas.float().cpu()
        self.latent_hw = latent_hw
        _, ph, pw = cfg.patch_size
        self.grid = (cfg.num_frames_per_block, latent_hw[0] // ph, latent_hw[1] // pw)
        self.frame_len = self.grid[1] * self.grid[2]
        self.seed = seed
        layers = group.layers
        attn = block.self_attn
        window = cfg.clip_latent_frames * self.frame_len
        self.sink = SinkCache(len(layers), first_layer=layers.start, dtype=kv_dtype if is_quantized(kv_dtype) else None)
        self.caches = [RollingKVCache(len(layers), 1, window, attn.num_heads, attn.head_dim, kv_dtype or self.dtype,
                                      self.device, first_layer=layers.start) for _ in range(len(self.timesteps))]
        self.link = _Link(group, self.device)
        self.trace: list[TraceEvent] = []

    # ------------------------------------------------------------------ message shapes
    def _call_specs(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        cfg, (f, _, _) = self.cfg, self.grid
        d, c = cfg.dim, self.dtype
        return [((1, f * self.frame_len, d), c), ((1, f, 6, 2, d), torch.float32), ((1, f, d), torch.float32),
                ((1, f, 1, d), c), ((1, f, cfg.num_audio_token + 1, d), c)]

    def _prefill_specs(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        positions, _ = self.model.condition_positions(self.latent_hw)
        return [((1, positions.shape[0], self.cfg.dim), self.dtype),
                ((1, self.cfg.num_frames_per_block, 6, 2, self.cfg.dim), torch.float32)]

    def _flow_spec(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((1, self.cfg.out_dim, self.grid[0], *self.latent_hw), torch.float32)]

    # ------------------------------------------------------------------ the run
    def share_context(self, context: Optional[torch.Tensor]) -> torch.Tensor:
        """Stage 0 embeds the text states and sends the embedding to every other stage once."""
        g = self.group
        if g.first:
            with torch.no_grad():
                emb = self.model.embed_text(context)
            for s in range(1, g.stages):
                self.link.send([emb], s)
            return emb
        return self.link.recv([((1, self.cfg.text_len, self.cfg.dim), self.dtype)], 0)[0]

    @torch.no_grad()
    def run(self, items: list[WorkItem], context: torch.Tensor, inputs: Optional[BlockInputs],
            on_block: Optional[Callable[[int, torch.Tensor], None]] = None, t0: Optional[float] = None,
            cancellable: bool = False, stop_before: Optional[Callable[[int], bool]] = None) -> Optional[int]:
        """Run this stage's share of `items`. Stage 0 needs `inputs` and calls on_block(block, latents) for
        every finished block, in order.

        cancellable (the same on every rank): before the first item of each block b >= 1, stage 0 asks
        stop_before(b) and passes the answer down the stages in-band (one flag per block and link), so that every
        stage drops the same items: those of blocks b and later. The blocks already started finish (stage 0 still
        hands them to on_block). Returns the block it stopped before, or None when every item ran."""
        g, cfg, steps = self.group, self.cfg, len(self.timesteps)
        t0 = time.perf_counter() if t0 is None else t0
        num_blocks = 1 + max(i.block for i in items if not i.prefill)
        offsets = _sink_offsets(self.seed, cfg.sink_offset_range, num_blocks * steps)
        f = self.grid[0]
        x: dict[int, torch.Tensor] = {}  # stage 0: the sampler state of the blocks in flight
        audio_tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        unreturned = collections.deque(i for i in items if not i.prefill)  # stage 0: flows still to receive
        finished: dict[int, torch.Tensor] = {}

        def take_flows(until: tuple[int, int]) -> None:
            """Stage 0: receive flows in item order (the last stage sends them so) up to `until`."""
            while unreturned:
                item = unreturned.popleft()
                b, s = item.block, item.step
                if g.stages > 1:
                    (flow,) = self.link.recv(self._flow_spec(), g.stages - 1)
                else:
                    flow = self._pending_flow.pop((b, s))
                x[b] = x[b] + (self.sigmas[s + 1] - self.sigmas[s]).item() * flow
                if s == steps - 1:
                    finished[b] = x.pop(b)
                    audio_tokens.pop(b, None)
                    if b == 0:
                        self._first_block = finished[b]
                    if on_block is not None:
                        on_block(b, finished[b])
                    finished.pop(b)
                if (b, s) == until:
                    return

        self._pending_flow: dict[tuple[int, int], torch.Tensor] = {}
        self._first_block = None
        halted: Optional[int] = None
        asked: set[int] = {0}
        for item in items:
            if halted is not None and item.block >= halted:
                continue
            if cancellable and item.block not in asked:
                asked.add(item.block)
                if self._halt(item.block, stop_before):
                    halted = item.block
                    unreturned = collections.deque(i for i in unreturned if i.block < halted)
                    continue
            start = time.perf_counter() - t0
            if item.prefill:
                if g.first:
                    if item.block > 0 and self._first_block is None:
                        take_flows((0, steps - 1))
                    ref, motion = inputs.condition(item.block, self._first_block)
                    tokens, e0 = self.model.sink_embed(ref, motion)
                else:
                    tokens, e0 = self.link.recv(self._prefill_specs(), g.stage - 1)
                with sampler_slot(steps):
                    out = self.model.sink_layers(tokens, e0, self.latent_hw, context, self.sink, g.layers)
                if not g.last:
                    self.link.send([out, e0], g.stage + 1)
                self.trace.append(TraceEvent(g.stage, item.block, item.step, item.slot, start,
                                             time.perf_counter() - t0))
                continue
            b, s = item.block, item.step
            start_frame = b * f
            shift = max(0, start_frame - (cfg.ref_rope_frame - offsets[b * steps + s]))
            if g.first:
                if s == 0:
                    x[b] = inputs.noise(b).float().to(self.device)
                    audio_tokens[b] = self.model.encode_audio(inputs.audio(b))
                else:
                    take_flows((b, s - 1))
                t = self.timesteps[s].expand(1, f).to(self.device)
                h, e, e0 = self.model.stream_embed(x[b], t, None)
                ag, al = audio_tokens[b]
            else:
                h, e0, e, ag, al = self.link.recv(self._call_specs(), g.stage - 1)
            with sampler_slot(s), watch_layers(self.model) as watch:
                h = self.model.stream_layers(h, e0, context, (ag, al), self.caches[s], self.sink, start_frame, shift,
                                             self.grid, g.layers)
                if g.last:
                    flow = self.model.stream_head(h, e, self.grid)
            watch.check(flow if g.last else h, b, s)  # NaN/Inf stops the run, naming block, step and this stage's layer
            if g.last:
                if g.stages > 1:
                    self.link.send([flow], 0)
                else:
                    self._pending_flow[(b, s)] = flow
                    take_flows((b, s))
            else:
                self.link.send([h, e0, e, ag, al], g.stage + 1)
            del h
            self.trace.append(TraceEvent(g.stage, b, s, item.slot, start, time.perf_counter() - t0))
        if g.first:
            take_flows((-1, -1))  # the rest
        self.link.flush()
        return halted

    def _halt(self, block: int, stop_before: Optional[Callable[[int], bool]]) -> bool:
        """Stage 0 decides whether to stop before `block`; every later stage receives the decision from the one
        before it and passes it on."""
        g = self.group
        if g.first:
            flag = torch.tensor([int(bool(stop_before is not None and stop_before(block)))])
        else:
            (flag,) = self.link.recv([((1,), torch.int64)], g.stage - 1)
        if not g.last:
            self.link.send([flag.to(self.device)], g.stage + 1)
        return bool(flag.item())

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches) + self.sink.nbytes()


def _sink_offsets(seed: int, bounds: tuple[int, int], n: int) -> list[int]:
    """The sink offsets of the first n calls in the sequential order (StreamingSession's default draws)."""
    rng = random.Random(seed)
    return [rng.randint(*bounds) for _ in range(n)]


def schedule_for(cfg, blocks: int, steps: int, stages: int, roll_sink: bool) -> list[WorkItem]:
    return pipeline_schedule(blocks, steps, stages, cfg.clip_latent_frames // cfg.num_frames_per_block, roll_sink)
