"""The timestep-forcing schedule of the pipeline layout: the order in which work items enter the layer stages.

A work item is one DiT call: sampler step `step` of block `block`, or a sink prefill. Items enter stage 0 one
per slot and move one stage per slot (the unit-time model), and every stage runs them in the same order, so
the order alone fixes the result. Two rules make that order equal to the sequential one at every layer:
  * (b, s) needs the whole output of (b, s-1): it enters S slots after (b, s-1) entered.
  * (b-1, s) enters before (b, s): it has written its rows of rolling cache s at a layer before (b, s) reads
    them there (and the window wraps in the same order as in the sequential run).
The rolled sink (after the first clip) is a prefill item: every item of clip 0 enters before it and every
later item after it, so each stage's old-sink readers finish before its layers' sink is overwritten. It
also needs clip 0's first block finished, whose first latent frame becomes the new reference.
Within those rules the list scheduler below fills each slot with the first ready item in the order
(group of blocks, step, block), a group being max(S, blocks per clip) blocks: S blocks in flight keep S
stages busy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PREFILL = -1  # the `step` of a sink prefill item


@dataclass(frozen=True)
class WorkItem:
    block: int  # global block index; for a prefill, the clip whose sink it prepares
    step: int  # sampler step, or PREFILL
    slot: int  # the slot it enters stage 0 in the unit-time model

    @property
    def prefill(self) -> bool:
        return self.step == PREFILL

    def name(self) -> str:
        return f"prefill(clip {self.block})" if self.prefill else f"(block {self.block}, step {self.step})"


def pipeline_schedule(blocks: int, steps: int, stages: int, blocks_per_clip: int,
                      roll_sink: bool) -> list[WorkItem]:
    """Every work item of a run (the first sink prefill, each block's steps, the rolled sink) in entry order."""
    if blocks < 1 or steps < 1 or stages < 1 or blocks_per_clip < 1:
        raise ValueError("blocks, steps, stages and blocks_per_clip must be positive")
    roll = roll_sink and blocks > blocks_per_clip
    first_clip = min(blocks, blocks_per_clip)
    group = max(stages, blocks_per_clip)
    entered: dict[tuple[int, int], int] = {}
    next_step = [0] * blocks
    items = [WorkItem(0, PREFILL, 0)]
    rolled: Optional[int] = None  # slot of the rolled sink's prefill
    slot = 1
    remaining = blocks * steps
    while remaining:
        candidates = []
        for b in range(blocks):
            s = next_step[b]
            if s == steps:
                continue
            if b > 0 and next_step[b - 1] <= s:  # (b-1, s) first
                continue
            if roll and b >= blocks_per_clip and rolled is None:
                break  # every later block waits for the rolled sink too
            if s > 0 and entered[(b, s - 1)] + stages > slot:
                continue
            candidates.append((b // group, s, b))
        if roll and rolled is None and all(next_step[b] == steps for b in range(first_clip)) \
                and entered[(0, steps - 1)] + stages <= slot:
            items.append(WorkItem(1, PREFILL, slot))
            rolled = slot
        elif candidates:
            _, s, b = min(candidates)
            items.append(WorkItem(b, s, slot))
            entered[(b, s)] = slot
            next_step[b] += 1
            remaining -= 1
        slot += 1
    return items


@dataclass(frozen=True)
class Occupancy:
    stages: int
    items: int
    slots: int  # from the first item entering stage 0 to the last leaving stage S-1
    steady: float  # busy fraction of every stage between the pipeline filling and draining
    startup_bubble: int  # idle stage-slots while the pipeline fills (and drains at the end)
    gap_slots: list[int]  # slots where no item entered stage 0 (clip boundaries, dependency waits)

    def to_json(self) -> dict:
        return {"stages": self.stages, "items": self.items, "slots": self.slots, "steady_occupancy": self.steady,
                "startup_bubble_stage_slots": self.startup_bubble, "gap_slots": self.gap_slots}


def occupancy(items: list[WorkItem], stages: int) -> Occupancy:
    """Stage occupancy counted in work-item slots (independent of timings).

    Steady state: from the slot the last stage receives its first item to the slot stage 0 runs its last
    one; in that span every stage is busy in each slot where an item entered S-1 slots before or after.
    """
    entry = sorted(i.slot for i in items)
    first, last = entry[0], entry[-1]
    span = last + stages - first
    taken = set(entry)
    gaps = [t for t in range(first, last + 1) if t not in taken]
    lo, hi = first + stages - 1, last
    if hi >= lo:
        busy = sum(1 for k in range(stages) for t in range(lo, hi + 1) if (t - k) in taken)
        steady = busy / (stages * (hi - lo + 1))
    else:
        steady = 0.0
    startup = stages * span - stages * len(entry) - stages * len(gaps)
    return Occupancy(stages, len(entry), span, steady, startup, gaps)
