"""Which sampler call is running, for layers that keep per-step state (static per-timestep input scales).

Slots: 0..S-1 are the sampler steps, S is the sink prefill. None (the default) means "not inside a sampler
call"; such layers then use their most conservative state.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

_SLOT: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("qavatar_sampler_slot", default=None)


def current_slot() -> Optional[int]:
    return _SLOT.get()


@contextlib.contextmanager
def sampler_slot(slot: Optional[int]) -> Iterator[None]:
    token = _SLOT.set(slot)
    try:
        yield
    finally:
        _SLOT.reset(token)
