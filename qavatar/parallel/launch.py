"""Starting tensor-parallel ranks: under torchrun (env://), or spawned by qavatar itself.

Every wait is bounded: process-group init and every collective time out (gloo and NCCL honour the group
timeout; NCCL's watchdog aborts the communicator), and the spawner stops all ranks when one fails, so a
crashed rank or one that never arrives ends the run with a message naming it instead of a hang.
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..errors import QavatarError
from .group import TPGroup

DEFAULT_TIMEOUT_S = 300


class RankError(QavatarError):
    pass


def backend_for(device: "str | torch.device") -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_tp(tp: int, device: "str | torch.device" = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
            exact_int8_reduce: bool = True, backend: Optional[str] = None) -> TPGroup:
    """Join the process group torchrun (or spawn_ranks) described in the environment; check the world size."""
    if tp == 1 and os.environ.get("WORLD_SIZE") in (None, "1"):
        return TPGroup()
    rank, world = init_world(tp, f"--tp {tp}", device, timeout_s, backend)
    return TPGroup(rank, world, dist.group.WORLD, exact_int8_reduce)


def launcher_rank() -> Optional[int]:
    """This process's rank when a launcher (torchrun) started it, else None. WORLD_SIZE alone (some job
    schedulers export it) is an error naming what is missing, not a KeyError."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RankError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not: launch with "
                        f"torchrun, or unset WORLD_SIZE to let qavatar start the ranks itself")
    try:
        return int(os.environ["RANK"])
    except ValueError:
        raise RankError(f"RANK={os.environ['RANK']!r} is not a rank number") from None


def init_world(world: int, what: str, device: "str | torch.device" = "cpu",
               timeout_s: float = DEFAULT_TIMEOUT_S, backend: Optional[str] = None) -> tuple[int, int]:
    """Join the `world`-rank process group described in the environment (what: the flags that asked for it,
    for the messages); returns (rank, world). Sets this rank's GPU first on CUDA. backend: default nccl on CUDA,
    gloo on the CPU (scripts/gpu_check.py runs several ranks on one GPU over gloo)."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    missing = [k for k, v in env.items() if v is None]
    if missing:
        raise RankError(f"{what} needs {world} ranks: launch with `torchrun --nproc-per-node {world} ...` or let "
                        f"qavatar start them (missing {', '.join(missing)})")
    started, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    if started != world:
        raise RankError(f"{what} but the launcher started {started} ranks (WORLD_SIZE={started}); it needs "
                        f"{world}")
    if torch.device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise RankError(f"rank {rank} wants cuda:{local} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend or backend_for(device), rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # DistStoreError / RuntimeError on timeout or refused connection
            raise RankError(f"rank {rank}: could not form the {world}-rank group at {env['MASTER_ADDR']}:"
                            f"{env['MASTER_PORT']} within {timeout_s:g} s (did every rank start?): "
                            f"{str(e).splitlines()[0][:200]}") from None
    return rank, world


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Boxed:
    """A tensor crossing the result pipe as plain bytes (torch's fd-sharing pickles die with the rank)."""

    def __init__(self, t: torch.Tensor):
        self.array = t.detach().cpu().numpy()
        self.dtype = t.dtype

    def unbox(self) -> torch.Tensor:
        return torch.from_numpy(self.array).to(self.dtype)


def _box(x: Any) -> Any:
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda v: _Boxed(v) if isinstance(v, torch.Tensor) else v, x)


def _unbox(x: Any) -> Any:
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda v: v.unbox() if isinstance(v, _Boxed) else v, x)


def become_rank(rank: int, world: int, port: int) -> None:
    """In a started process: torchrun's environment for this rank, and its share of the CPU cores."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the CPU cores, as torchrun's OMP=1


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    become_rank(rank, world, port)
    try:
        result = fn(rank, *args)
        queue.put((rank, "ok", _box(result)))
    except BaseException as e:  # report, then let the process die with an error
        queue.put((rank, "error", f"{e.__class__.__name__}: {e}" if isinstance(e, QavatarError) else
                   traceback.format_exc(limit=6)))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], world: int, args: tuple = (), start_method: Optional[str] = None,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run fn(rank, *args) in `world` processes; return their results in rank order.

    If any rank fails or dies, the others are stopped and a RankError names the rank that failed first.
    """
    import multiprocessing
    import multiprocessing.connection

    import torch.multiprocessing as mp

    method = start_method or ("fork" if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
                              else "spawn")
    queue = multiprocessing.get_context(method).SimpleQueue()  # plain pickling: results outlive the ranks
    port = free_port()
    context = mp.start_processes(_entry, args=(world, port, fn, args, queue), nprocs=world, join=False,
                                 start_method=method)
    procs = context.processes
    reports: list = []
    exits: dict[int, int] = {}  # rank -> exit code, in the order the exits were seen
    try:
        while len(exits) < world and all(c == 0 for c in exits.values()):
            waiting = [p.sentinel for r, p in enumerate(procs) if r not in exits]
            multiprocessing.connection.wait(waiting, timeout=0.2)
            reports += _drain(queue)  # drain while waiting: a rank blocks on a full result pipe
            for r, p in enumerate(procs):
                if r not in exits and p.exitcode is not None:
                    exits[r] = p.exitcode
    finally:
        failed = any(c != 0 for c in exits.values()) or len(exits) < world
        if failed:
            _stop(procs)  # the exits seen so far are the ranks' own; from here on we stop them
        reports += _drain(queue)
        for f in context.error_files:  # torch's per-rank traceback files: ours come through the queue
            if os.path.exists(f):
                os.unlink(f)
    if failed:
        raise RankError(f"{first_failure(reports, exits)}; all {world} ranks were stopped")
    return [_unbox(r[2]) for r in sorted((r for r in reports if r[1] == "ok"), key=lambda r: r[0])]


def first_failure(reports: list, exits: dict[int, int]) -> str:
    """Which rank failed first, and how. reports: (rank, "ok"|"error", detail) in arrival order; exits: rank ->
    exit code in the order the launcher saw them exit (before it stopped anyone).

    A rank killed by a signal (kill -9, the OOM killer, a segfault) is the cause: a peer's failure never sends
    one, it only makes the survivors' collectives fail ("Connection closed by peer"), and those survivors may
    report before the launcher has noticed the dead rank. Otherwise the first reported error, then the first
    exit without a report.
    """
    import signal

    for r, code in exits.items():
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown signal"
            why = ": out of memory, or kill -9?" if -code == signal.SIGKILL else ""
            return f"rank {r} was killed by signal {-code} ({name}{why})"
    errors = [x for x in reports if x[1] == "error"]
    if errors:
        return f"rank {errors[0][0]} failed: {errors[0][2].strip().splitlines()[-1]}"
    for r, code in exits.items():
        if code != 0:
            return f"rank {r} failed: exited with code {code} without a report"
    return "a rank failed without a report"


def _stop(procs: list, grace_s: float = 10.0) -> None:
    """SIGTERM every live rank, then SIGKILL what is still there after grace_s."""
    import time

    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()


def _drain(queue) -> list:
    out = []
    while not queue.empty():
        out.append(queue.get())
    return out
