"""The rank group behind `qavatar serve`: ranks start once, load once, then loop on jobs.

Every rank runs serve_rank(): join the group, load its DiT slice (the host also keeps its encoders), then
loop. The host (the last TP rank, of the first stage with --pp: the one that encodes, decodes and writes)
takes a job from the server's queue, encodes its inputs (a bad input fails here, before any other rank is
involved, and the group stays ready), then broadcasts the job so every rank runs generate() in lockstep. While
idle the host broadcasts a heartbeat every HEARTBEAT_S, so an idle rank never sits in a collective longer than
the group timeout, and a dead peer is noticed within a heartbeat. After every block the host broadcasts the
cancel flag to its TP group: cancel stops all ranks at the same block boundary and they go back to waiting.
With --pp the first stage asks before each new block and passes the answer down the stages
(parallel/pipeline.py), so every stage drops the same blocks.

The server side (RankGroup) owns the processes: it submits jobs, reads the host's events (frames per block,
done, error), and watches the processes: when one dies, the group is marked dead with a message naming the
first failed rank (launch.first_failure), every live rank is stopped, and the page says to restart the server.
Nothing waits without a bound.
"""
from __future__ import annotations

import dataclasses
import itertools
import queue as queue_mod
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ..errors import QavatarError

HEARTBEAT_S = 1.0
STOP = "stop"


class GroupDead(QavatarError):
    """A rank died; the group cannot run jobs any more."""


@dataclass
class Job:
    id: int
    prep: Any  # pipeline.infer.Prepared, with the request's out in the server's temp dir


def _share(state, obj: Any, world: bool = False) -> Any:
    """The host's object on every rank of its TP group (the first stage's), or of the whole group with world=True
    (every stage: the jobs). The identity with one rank."""
    import torch.distributed as dist

    if world and dist.is_initialized() and dist.get_world_size() > 1:
        group = None
    elif state.tp.size > 1:
        group = state.tp.process_group
    else:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=state.tp.size - 1, group=group)  # the host: stage 0's last TP rank
    return box[0]


def serve_rank(rank: int, prep, jobs, events, cancel) -> None:
    """One rank's life: load once, then run jobs until the server sends STOP. prep: the server's Prepared for
    the load (checkpoint, precision, layout); each job brings its own Prepared (media, size, clips, steps)."""
    from ..pipeline.infer import Cancelled, _Host, generate, join_rank, load_state

    state = join_rank(rank, prep)
    enc = None
    if state.host:
        from ..pipeline.encoders import PipelineEncoders

        req = prep.request
        enc = PipelineEncoders(prep.parts.encoders, prep.cfg, state.device, state.dtype,
                               prompt_cache=req.prompt_cache, t5_precision=req.t5_precision)
    load_state(state, prep)
    if state.host:
        events.put(("ready", None, {"load_seconds": state.load_seconds, "held_bytes": state.held_bytes}))
    while True:
        job = side = None
        if state.host:
            try:
                job = jobs.get(timeout=HEARTBEAT_S)
            except queue_mod.Empty:
                job = None
            if isinstance(job, Job):
                cancel.clear()
                try:  # the inputs are this job's: a failure here is the job's, the ranks stay ready
                    side = _Host(job.prep, state.device, state.dtype, enc)
                except Exception as e:
                    events.put(("error", job.id, _message(e)))
                    job = None
        job = _share(state, job, world=True)
        if job == STOP:
            return
        if job is None:
            continue
        t0 = time.perf_counter()

        def on_frames(frames, job=job):
            events.put(("frames", job.id, frames.numpy()))

        def stop(b: int) -> bool:  # asked on the TP group that holds the host (with --pp: the first stage)
            return bool(_share(state, cancel.is_set() if state.host else None))

        try:
            res = generate(state, job.prep, side, on_frames if state.host else None, stop=stop)
        except Cancelled as e:
            if state.host:
                events.put(("cancelled", job.id, str(e)))
            continue
        if state.host:
            events.put(("done", job.id, {"out": res.out, "frames": res.frames, "seconds": time.perf_counter() - t0,
                                         "clip_seconds": res.clip_seconds}))


def _message(e: BaseException) -> str:
    if isinstance(e, QavatarError):
        return str(e)
    return f"{e.__class__.__name__}: {e}"


def _entry(rank: int, world: int, port: int, prep, jobs, events, failures, cancel) -> None:
    from ..leftovers import Terminated
    from ..parallel.launch import become_rank

    become_rank(rank, world, port)

    try:
        serve_rank(rank, prep, jobs, events, cancel)
    except Terminated:  # the server stopping us: not a failure to report
        raise SystemExit(143) from None
    except BaseException as e:
        failures.put((rank, "error", _message(e) if isinstance(e, QavatarError) else
                      traceback.format_exc(limit=6)))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class RankGroup:
    """The server's handle on the ranks: start(), submit() a job and iterate its events, cancel(), close()."""

    def __init__(self, prep):
        self.prep = prep
        self.world = prep.world
        self.dead: Optional[str] = None
        self.ready = False
        self.load_info: dict = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # one job at a time per rank group
        self._procs: list = []

    def start(self, timeout_s: Optional[float] = None) -> "RankGroup":
        """Start the ranks and wait (bounded) until they have loaded."""
        import multiprocessing

        from ..parallel.launch import free_port

        # spawn, never fork: the server has run torch ops (prepare) and started threads (OpenMP's pool, the web
        # server's); a forked rank can deadlock on a lock one of them held
        ctx = multiprocessing.get_context("spawn")
        self._jobs, self._events, self._failures = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self._cancel = ctx.Event()
        port = free_port()
        for r in range(self.world):
            p = ctx.Process(target=_entry, args=(r, self.world, port, self.prep, self._jobs, self._events,
                                                 self._failures, self._cancel), daemon=True, name=f"qavatar-rank{r}")
            p.start()
            self._procs.append(p)
        threading.Thread(target=self._watch, daemon=True, name="qavatar-watch").start()
        deadline = time.monotonic() + (timeout_s or self.prep.request.timeout_s)
        while not self.ready:
            if self.dead:
                raise GroupDead(self.dead)
            if time.monotonic() > deadline:
                self.close()
                raise GroupDead(f"the ranks did not load within {timeout_s or self.prep.request.timeout_s:g} s")
            try:
                kind, _, info = self._events.get(timeout=0.2)
            except queue_mod.Empty:
                continue
            if kind == "ready":
                self.ready, self.load_info = True, info
        return self

    def _watch(self) -> None:
        """Notice a dead rank: name the first failure, stop the others (they would wait out the timeout)."""
        import multiprocessing.connection

        from ..parallel.launch import _stop, first_failure

        exits: dict[int, int] = {}
        while not exits:
            multiprocessing.connection.wait([p.sentinel for p in self._procs], timeout=1.0)
            exits = {r: p.exitcode for r, p in enumerate(self._procs) if p.exitcode is not None}
        reports = []
        time.sleep(0.2)  # a rank that raised puts its report before it exits; let it arrive
        while True:
            try:
                reports.append(self._failures.get_nowait())
            except queue_mod.Empty:
                break
        if self._closing:
            return
        why = first_failure(reports, exits) if any(c != 0 for c in exits.values()) or reports else \
            f"rank {next(iter(exits))} exited"
        self.dead = f"{why}; the rank group is down: restart `qavatar serve`"
        print(f"qavatar serve: {self.dead}", flush=True)
        _stop(self._procs, grace_s=5.0)
        self._events.put(("dead", None, self.dead))

    _closing = False

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def run(self, prep) -> Iterator[tuple[str, Any]]:
        """Run one job (waits for the group while another runs); yields ("frames", uint8 [T, H, W, 3]) per
        block, then one of ("done", info) / ("cancelled", msg) / ("error", msg). Raises GroupDead."""
        with self._lock:
            if self.dead:
                raise GroupDead(self.dead)
            job = Job(next(self._ids), prep)  # the host clears the cancel flag when it takes the job
            self._jobs.put(job)
            wait = max(60.0, prep.request.timeout_s)  # every event comes within the group timeout, or a rank died
            finished = False
            try:
                yield from self._events_of(job, wait)
                finished = True
            finally:
                if not finished and not self.dead:
                    self._cancel.set()  # the page went away: stop the job at its next block

    def _events_of(self, job: Job, wait: float) -> Iterator[tuple[str, Any]]:
        while True:
            try:
                kind, jid, payload = self._events.get(timeout=wait)
            except queue_mod.Empty:
                self.dead = f"no word from the host rank for {wait:g} s; restart `qavatar serve`"
                raise GroupDead(self.dead) from None
            if kind == "dead":
                raise GroupDead(payload)
            if jid != job.id:
                continue  # a late event of an earlier job
            yield kind, payload
            if kind in ("done", "cancelled", "error"):
                return

    def cancel(self) -> None:
        """Stop the running job at its next block boundary."""
        self._cancel.set()

    def close(self) -> None:
        from ..parallel.launch import _stop

        self._closing = True
        if self._procs and not self.dead:
            self._jobs.put(STOP)
            for p in self._procs:
                p.join(5.0)
        _stop(self._procs, grace_s=2.0)


def job_request(base, **kw):
    """The server's request with one job's fields replaced (image, audio, prompt, out, size, ...)."""
    return dataclasses.replace(base, **kw)
