"""Stopping a stream whose latents went NaN/Inf, and saying where it happened.

One `isfinite(flow).all()` per DiT call decides (one sync). While the call runs, a forward hook on every block
and on the audio injector records a lazy isfinite(output).all() (no sync, one small reduction per layer);
they are looked at only when the call's flow is non-finite, to name the first layer that went bad.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import QavatarError


class NonFiniteError(QavatarError):
    pass


class _Watch:
    def __init__(self) -> None:
        self.seen: list[tuple[str, torch.Tensor]] = []

    def check(self, flow: torch.Tensor, block: int, step: int) -> None:
        if bool(torch.isfinite(flow).all()):
            return
        first = next((name for name, ok in self.seen if not bool(ok)), None)
        where = f"first at the output of {first}" if first else "after the last block (in the head)"
        raise NonFiniteError(f"the DiT produced NaN or Inf latents in block {block}, sampler step {step}, {where}; "
                             f"the weights or the inputs are damaged (qavatar inspect --verify checks a checkpoint)")


@contextlib.contextmanager
def watch_layers(model: nn.Module) -> Iterator[_Watch]:
    """Record per-layer finiteness during one call; `check(flow, block, step)` raises NonFiniteError."""
    w = _Watch()

    def hook(name: str):
        def fn(mod, args, out):
            if isinstance(out, torch.Tensor):
                w.seen.append((name, torch.isfinite(out).all()))
        return fn

    handles = [blk.register_forward_hook(hook(f"blocks.{i}")) for i, blk in enumerate(getattr(model, "blocks", []))]
    inj = getattr(model, "audio_injector", None)
    if inj is not None:
        handles.append(inj.register_forward_hook(lambda mod, args, out: w.seen.append(
            (f"audio_injector (injection {args[0]})", torch.isfinite(out).all()))))
    try:
        yield w
    finally:
        for h in handles:
            h.remove()
