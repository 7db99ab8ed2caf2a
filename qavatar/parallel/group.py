"""The tensor-parallel group seen by the model.

Modules take a TPGroup and call `tp.all_reduce(...)` on the line where a collective happens. With one rank
(SINGLE) every collective is the identity, so the single-GPU model is the same code.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import ConfigError


class ByteCounter:
    """Bytes this rank sends, by kind ("all_reduce", "all_gather", "broadcast", "p2p").

    Convention: the payload of the calls the rank makes (all_reduce: the tensor; all_gather: the local part;
    broadcast: the tensor, on the source rank only), not the wire bytes of the collective's algorithm (a ring
    all-reduce moves 2(T-1)/T of it each way); the planner's speed model applies that factor separately.
    """

    def __init__(self) -> None:
        self.totals: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        self.totals[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, int]:
        """A copy of the totals (kinds never used are absent)."""
        return dict(self.totals)

    @property
    def total(self) -> int:
        return sum(self.totals.values())


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    process_group: Any = None  # a torch.distributed ProcessGroup when size > 1
    # int8 row-parallel layers all-reduce their exact int32 accumulators (bit-identical to one GPU); False
    # reduces the dequantized partials in the compute dtype instead: half the bytes on bf16 GPUs
    exact_int8_reduce: bool = True
    # counts the bytes this rank sends (tests check them against plan.comm_bytes_per_block); None: not counted
    counter: Optional[ByteCounter] = field(default=None, compare=False)

    def _count(self, kind: str, x: torch.Tensor) -> None:
        if self.counter is not None:
            self.counter.add(kind, x.numel() * x.element_size())

    def shard(self, n: int, what: str) -> int:
        """Size of this rank's slice of n (attention heads and the widths tied to them); must divide evenly."""
        if n % self.size:
            raise ConfigError(f"{what}={n} is not divisible by the tensor-parallel degree {self.size}; "
                              f"use a degree that divides {what}")
        return n // self.size

    def span(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of n when it need not divide evenly (the FFN width:
        13824 over 5 ranks is 2765, 2765, 2765, 2765, 2764)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce x over the ranks of the group (in place, "sum" or "max"), returning it."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        self._count("all_reduce", x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.process_group)
        return x

    def broadcast(self, x: "torch.Tensor | None", src: int, device: "str | torch.device" = "cpu") -> torch.Tensor:
        """Rank src's tensor on every rank (the others pass None): a small shape/dtype header goes first."""
        if self.size == 1:
            return x.to(device)
        import torch.distributed as dist

        codes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
        header = torch.zeros(10, dtype=torch.int64, device=device)
        if self.rank == src:
            header[0], header[1] = x.ndim, codes.index(x.dtype)
            header[2:2 + x.ndim] = torch.tensor(x.shape)
            self._count("broadcast", header)
        dist.broadcast(header, src, group=self.process_group)
        ndim, code = int(header[0]), int(header[1])
        shape = [int(v) for v in header[2:2 + ndim]]
        buf = x.to(device).contiguous() if self.rank == src else torch.empty(shape, dtype=codes[code], device=device)
        if self.rank == src:
            self._count("broadcast", buf)
        dist.broadcast(buf, src, group=self.process_group)
        return buf

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's x along dim, in rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._count("all_gather", x)
        dist.all_gather(parts, x.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=dim)


SINGLE = TPGroup()
