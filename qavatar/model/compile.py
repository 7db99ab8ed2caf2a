"""Compiled DiT blocks: torch.compile (inductor) on each block's forward and on the audio injector, QuantLinear
included.

Eagerly every per-token absmax, scale, cast, norm, modulation and RoPE of a block is its own kernel and its own
trip through memory; compiled, inductor fuses them with their neighbours. What this module guarantees:

- One graph per block call, no graph breaks, at every precision (fp32/bf16, int8, fp8, int8-wo, fp8-wo) and in
  every mode (non-causal, sink prefill, streaming): tests/test_compile.py proves it with torch._dynamo.explain.
- Shapes are static (`dynamic=False`). The block sees no layer number (LayerKV.one_layer hands it one-layer
  views of the caches), so every layer of the DiT shares the same graphs. What does recompile, once per run
  and size: the sink prefill (one graph), the 4 streaming calls of the first clip while the rolling window
  fills (the attended length grows), then the full window once per write slot (4 slots, one already seen).
  The audio injector is compiled the same way: its layers are passed as arguments (model/audio.py inject), so
  one graph serves all its injection points (one per block size).
- Compile time is counted (CompileStats) and inductor's FX graph cache (on by default, TORCHINDUCTOR_CACHE_DIR,
  default /tmp/torchinductor_$USER) makes the next process's compile mostly cache hits.

CUDA graphs ("reduce-overhead") can only capture graphs that do not mutate their inputs: the streaming calls write
the KV cache, which inductor's CUDA-graph trees skip (it logs the reason), so they help the non-causal forward and
the per-call overhead of nothing else yet. Not measured on a GPU.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Graphs one block call may need per run (sink + window filling + write slots + a non-causal forward), with room.
RECOMPILE_LIMIT = 16


@dataclass
class CompileStats:
    """What compiling cost this process: graphs compiled and the wall time of the calls that compiled them."""
    graphs: int = 0
    seconds: float = 0.0
    calls: int = 0

    def summary(self) -> str:
        return f"{self.graphs} graphs compiled in {self.seconds:.1f} s over {self.calls} block calls"


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _call(compiled, block: nn.Module, stats: CompileStats, x, e0, seg, rope, context, kv=None):
    local, put_back = kv.one_layer() if kv is not None else (None, None)
    before, t = _graphs(), time.perf_counter()
    out = compiled(block, x, e0, seg, rope, context, local)
    stats.calls += 1
    if _graphs() != before:  # this call compiled (includes running it once)
        stats.graphs += _graphs() - before
        stats.seconds += time.perf_counter() - t
    if put_back is not None:
        put_back()
    return out


def _call_injector(compiled, injector: nn.Module, stats: CompileStats, index: int, x, seg, audio_global, audio_local):
    before, t = _graphs(), time.perf_counter()
    out = compiled(injector.injector_adain_layers[index], injector.injector[index], x, seg, audio_global, audio_local)
    if _graphs() != before:
        stats.graphs += _graphs() - before
        stats.seconds += time.perf_counter() - t
    return out


def block_forward(block: nn.Module, x, e0, seg, rope, context, kv=None):
    """The block's own (eager) forward, as a plain function: what gets compiled."""
    return type(block).forward(block, x, e0, seg, rope, context, kv)


def prepare_tracing() -> None:
    """What dynamo must not trace into: one-time lookups done eagerly, fallback notices replayed after the graph."""
    from ..quant import kernels

    kernels._bnb()  # the bitsandbytes import (CPU int8 kernel) happens here, not inside a graph
    torch._dynamo.config.reorderable_logging_functions.add(kernels.notice_once)
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)


def compile_blocks(model: nn.Module, mode: Optional[str] = None, backend: str = "inductor") -> CompileStats:
    """Compile every block of `model` in place (`model.blocks[i].forward`); returns the shared CompileStats.

    backend="aot_eager" traces the same graphs without inductor's code generation (plumbing checks on slow
    machines). The parameters stay where they are (state_dict, TP shards and forward hooks are unchanged).
    """
    from ..errors import ConfigError

    if mode is not None and mode not in MODES:
        raise ConfigError(f"compile mode {mode!r}: choose one of {', '.join(MODES)}")
    prepare_tracing()
    mode = None if mode == "default" else mode
    compiled = torch.compile(block_forward, dynamic=False, mode=mode, backend=backend)
    stats = CompileStats()
    for block in model.blocks:
        block.forward = functools.partial(_call, compiled, block, stats)
    injector = getattr(model, "audio_injector", None)
    if injector is not None:
        from .audio import inject

        injector.forward = functools.partial(_call_injector, torch.compile(inject, dynamic=False, mode=mode, backend=backend),
                                             injector, stats)
    model.compile_stats = stats
    return stats


def is_compiled(model: nn.Module) -> bool:
    return any("forward" in vars(b) for b in getattr(model, "blocks", []))

