"""Pipeline traces: every stage's work items with their times, the occupancy they show, and a timeline.

An event is (stage, block, step, slot, start, end): step -1 is a sink prefill; slot is the item's entry slot
in the unit-time schedule; start/end are seconds since the ranks' common start. Occupancy is counted in
slots (stage k runs the item of slot t in slot t + k), so it does not depend on timings; the measured busy
fraction of each stage (time inside items / wall time) is reported beside it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from .schedule import PREFILL, WorkItem, occupancy

FIELDS = ("stage", "block", "step", "slot", "start", "end")


def summarize(events: Iterable[tuple], stages: int) -> dict:
    """Occupancy (slots), bubbles and the measured busy fraction per stage, from a trace."""
    ev = [dict(zip(FIELDS, e)) for e in events]
    stage0 = sorted((e for e in ev if e["stage"] == 0), key=lambda e: e["slot"])
    occ = occupancy([WorkItem(e["block"], e["step"], e["slot"]) for e in stage0], stages)
    # the order check: every stage ran the same items in the same order
    orders = {s: [(e["block"], e["step"]) for e in sorted((e for e in ev if e["stage"] == s), key=lambda e: e["start"])]
              for s in range(stages)}
    same = all(o == orders[0] for o in orders.values())
    t0, t1 = min(e["start"] for e in ev), max(e["end"] for e in ev)
    busy = {s: sum(e["end"] - e["start"] for e in ev if e["stage"] == s) / max(t1 - t0, 1e-12) for s in range(stages)}
    rolls = [e["slot"] for e in stage0 if e["step"] == PREFILL and e["block"] > 0]
    return {**occ.to_json(), "overall_occupancy": occ.items / occ.slots,
            "clip_boundary_gap_slots": [g for g in occ.gap_slots if any(abs(g - r) <= stages for r in rolls)],
            "same_order_on_every_stage": same, "measured_busy_fraction": busy, "wall_seconds": t1 - t0}


def timeline(events: Iterable[tuple], stages: int, max_slots: int = 40) -> str:
    """A text picture: one row per stage, one column per slot, each cell the item's block.step ('P' = prefill)."""
    ev = [dict(zip(FIELDS, e)) for e in events]
    width = 5
    last = min(max(e["slot"] for e in ev) + stages, max_slots)
    lines = ["slot    " + "".join(f"{t:<{width}}" for t in range(last))]
    for s in range(stages):
        cells = ["." * 1] * last
        for e in ev:
            t = e["slot"] + s
            if e["stage"] == s and t < last:
                cells[t] = f"P{e['block']}" if e["step"] == PREFILL else f"{e['block']}.{e['step']}"
        lines.append(f"stage {s} " + "".join(f"{c:<{width}}" for c in cells))
    return "\n".join(lines)


def write_trace(path: "str | Path", events: list[tuple], stages: int, tp: int, blocks: int) -> dict:
    """Write the trace (events, summary, timeline) as JSON, atomically; return the summary."""
    summary = summarize(events, stages)
    doc = {"stages": stages, "tp": tp, "blocks": blocks, "fields": list(FIELDS), "events": [list(e) for e in events],
           "summary": summary, "timeline": timeline(events, stages)}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return summary
