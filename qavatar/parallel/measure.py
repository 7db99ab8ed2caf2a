"""Measuring what a rank allocates, on any device: a dispatch mode that counts tensor storages.

Every storage an op creates is counted until Python frees it (storages keep their Python object, so a
weakref finalizer fires on free). Outputs that alias an input (views, in-place writes into a KV cache) are
not new memory. Allocations inside fused kernels are not seen; on CPU these are small per-thread buffers.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class AllocationTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ptrs: set[int] = set()

    def _free(self, ptr: int, n: int) -> None:
        if ptr in self._ptrs:
            self._ptrs.discard(ptr)
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr == 0 or ptr in inputs or ptr in self._ptrs:
                continue
            n = st.nbytes()
            self._ptrs.add(ptr)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, ptr, n)
        return out


def steady_block_peak(session, noise: torch.Tensor, audio: torch.Tensor, blocks: int = 6,
                      window_full_from: int = 4) -> int:
    """A streaming session's steady-state activation peak per block: `blocks` blocks, each under its own
    tracker; the least of the peaks once the rolling window is full. gloo's worker thread drops its hold on a
    collective's tensors a moment after the collective returns; on a busy machine those frees come late and
    inflate one block's peak by a few tensors, so the least full-window peak is the figure without that noise."""
    peaks = []
    for _ in range(blocks):
        tracker = AllocationTracker()
        with tracker:
            session.denoise_block(noise, audio)
        peaks.append(tracker.peak)
    return min(peaks[window_full_from:])


def held_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers of a (rank's) model."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
