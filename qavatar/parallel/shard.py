"""Which checkpoint tensors shard across tensor-parallel ranks, along which dim, by module name (Megatron).

    column-parallel  self/cross-attention q, k, v; ffn.0; the audio injector's q, k, v
                     weight, bias and weight_scale split by output rows, at head boundaries (q/k/v) or
                     evenly-as-possible (ffn.0); their full-width q/k RMSNorm weights split with the heads
    row-parallel     o (blocks and injector), ffn.2
                     weight split by input columns, smooth_scale with them; bias, weight_scale and
                     input_scale stay whole (added / applied once, after the all-reduce)
    replicated       everything else: embeddings, convs, time_projection, head, modulations, norm3, the
                     audio encoder, the injector's AdaLayerNorm projection
"""
from __future__ import annotations

import re
from typing import Optional

from .group import TPGroup

_COLUMN = re.compile(r"(blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v)|blocks\.\d+\.ffn\.0"
                     r"|audio_injector\.injector\.\d+\.(q|k|v))")
_ROW = re.compile(r"(blocks\.\d+\.(self_attn|cross_attn)\.o|blocks\.\d+\.ffn\.2|audio_injector\.injector\.\d+\.o)")
_NORM = re.compile(r"(blocks\.\d+\.(self_attn|cross_attn)|audio_injector\.injector\.\d+)\.norm_(q|k)")


def shard_dim(key: str) -> Optional[int]:
    """The dim `key` is split along across ranks, or None when every rank holds all of it."""
    module, _, leaf = key.rpartition(".")
    if _COLUMN.fullmatch(module):
        return 0 if leaf in ("weight", "bias", "weight_scale") else None
    if _ROW.fullmatch(module):
        return {"weight": 1, "smooth_scale": 0}.get(leaf)
    if _NORM.fullmatch(module) and leaf == "weight":
        return 0
    return None


def shard_range(key: str, full_size: int, tp: TPGroup) -> tuple[int, int]:
    """[start, stop) of this rank's slice along shard_dim(key): whole heads for attention, balanced for FFN."""
    module = key.rpartition(".")[0]
    if module.endswith((".ffn.0", ".ffn.2")):
        return tp.span(full_size)
    per = tp.shard(full_size, f"{key} rows")
    return tp.rank * per, (tp.rank + 1) * per
