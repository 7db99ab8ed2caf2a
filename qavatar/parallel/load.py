"""Loading one rank's slice of a checkpoint: every rank opens the same files and reads only its rows/columns.

No rank ever holds a whole sharded weight, not even while merging the LoRA (MergedWeights merges slices)
or casting. `bytes_read` of the returned report proves it: about total/N plus the replicated modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.load import check_keys, find_dit_dir, model_shapes, open_weights
from ..checkpoint.reader import CheckpointReader
from ..errors import CheckpointError
from ..model import LiveAvatarDiT, build_model
from .group import TPGroup
from .shard import shard_dim, shard_range


@dataclass
class RankLoad:
    model: LiveAvatarDiT
    bytes_read: int
    param_bytes: int  # parameters and buffers held by this rank
    quantized: bool


def load_rank(path: "str | Path", tp: TPGroup, dtype: torch.dtype = torch.float32,
              device: "str | torch.device" = "cpu", lora: "str | Path | bool | None" = True,
              lora_alpha: Optional[float] = None) -> RankLoad:
    """This rank's model: built at its local shapes on the meta device, then filled slice by slice."""
    dit_dir = find_dit_dir(path)
    raw = CheckpointReader(dit_dir).config or {}
    qc = raw.get("quantization_config")
    weights, cfg, _ = open_weights(dit_dir, False if qc is not None else lora, lora_alpha)
    stored = {k: tuple(weights.shape(k)) for k in weights.keys()}
    check_keys(weights, model_shapes(cfg, quantization=qc, stored=stored), str(dit_dir))  # full shapes, all ranks
    with torch.device("meta"):
        model = build_model(cfg, tp)  # raises a clear error when tp does not divide the heads
    keep: set[str] = set()
    if qc is not None:
        from ..quant import QuantConfig, QuantLinear, quantized_skeleton

        quantized_skeleton(model, QuantConfig.from_quantization_config(qc), stored, dtype)
        for name, mod in model.named_modules():
            if isinstance(mod, QuantLinear):
                keep |= {f"{name}.{b}" for b in ("weight", "weight_scale", "input_scale", "smooth_scale")}
    state = {}
    for key, meta in model.state_dict().items():
        dim = shard_dim(key)
        if dim is None or tp.size == 1:
            t = weights.get(key)
        else:
            start, stop = shard_range(key, stored[key][dim], tp)
            t = weights.get_slice(key, dim, start, stop)
        if tuple(t.shape) != tuple(meta.shape):
            raise CheckpointError(f"{dit_dir}: {key} slice for rank {tp.rank}/{tp.size} is {list(t.shape)}, "
                                  f"the model expects {list(meta.shape)}")
        state[key] = t.to(device=device, dtype=None if key in keep else dtype)
    model.load_state_dict(state, assign=True, strict=True)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return RankLoad(model.eval(), weights.bytes_read, held, qc is not None)
