"""Loading one rank's slice of a checkpoint: every rank opens the same files and reads only its rows/columns.

No rank ever holds a whole sharded weight, not even while merging the LoRA (MergedWeights merges slices)
or casting. `bytes_read` of the returned report proves it: about total/N plus the replicated modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from ..checkpoint.integrity import screen_weight
from ..checkpoint.load import check_keys, find_dit_dir, model_shapes, open_weights
from ..checkpoint.reader import CheckpointReader
from ..errors import CheckpointError
from ..model import LiveAvatarDiT, build_model

if TYPE_CHECKING:
    from ..quant import QuantConfig
from .group import TPGroup
from .shard import shard_dim, shard_range
from .stages import stage_holds


@dataclass
class RankLoad:
    model: LiveAvatarDiT
    bytes_read: int
    param_bytes: int  # parameters and buffers held by this rank
    quantized: bool


def load_rank(path: "str | Path", tp: TPGroup, dtype: torch.dtype = torch.float32,
              device: "str | torch.device" = "cpu", lora: "str | Path | bool | None" = True,
              lora_alpha: Optional[float] = None, quantize: "Optional[QuantConfig]" = None,
              stage: Optional[tuple[range, bool, bool]] = None) -> RankLoad:
    """This rank's model: built at its local shapes on the meta device, then filled slice by slice.

    stage: (layers, first, last) of a pipeline stage: only its blocks (and injectors), the embeddings on the
    first stage and the head on the last are read; the rest of the model stays on the meta device.

    quantize: quantize a bf16 checkpoint while loading (dynamic activations, no calibration), one slice at
    a time, so the rank never holds its bf16 weights; row-parallel slices share the whole row's scale.
    """
    dit_dir = find_dit_dir(path)
    raw = CheckpointReader(dit_dir).config or {}
    qc = raw.get("quantization_config")
    if qc is not None and quantize is not None:
        raise CheckpointError(f"{dit_dir} is already quantized; it cannot be quantized again at load")
    weights, cfg, _ = open_weights(dit_dir, False if qc is not None else lora, lora_alpha)
    stored = {k: tuple(weights.shape(k)) for k in weights.keys()}
    check_keys(weights, model_shapes(cfg, quantization=qc, stored=stored), str(dit_dir))  # full shapes, all ranks
    with torch.device("meta"):
        model = build_model(cfg, tp)  # raises a clear error when tp does not divide the heads
    keep: set[str] = set()
    at_load: set[str] = set()  # Linears quantized here, from float weights
    if qc is not None or quantize is not None:
        from ..quant import QuantConfig, QuantLinear, quantized_skeleton
        from ..quant.api import linear_names

        skeleton = dict(stored)
        if quantize is not None:
            at_load = {n for n in linear_names(model) if quantize.targets(n)}
            skeleton.update({f"{n}.weight_scale": (stored[f"{n}.weight"][0], 1) for n in at_load})
        quantized_skeleton(model, quantize or QuantConfig.from_quantization_config(qc), skeleton, dtype)
        for name, mod in model.named_modules():
            if isinstance(mod, QuantLinear):
                keep |= {f"{name}.{b}" for b in ("weight", "weight_scale", "input_scale", "smooth_scale")}
    state = {}
    base = getattr(weights, "base", weights)
    # a whole read is checked against the manifest on the way (a TP slice or a pipeline stage reads only part)
    hashing = tp.size == 1 and stage is None and base.verify_while_reading()
    order = {k: i for i, k in enumerate(weights.keys())}  # file order, so the hash streams
    metas = model.state_dict()
    for key in sorted(metas, key=lambda k: order.get(k, -1)):
        meta = metas[key]
        if stage is not None and not stage_holds(cfg, key, *stage):
            continue  # another stage's
        if key.endswith(".weight_scale") and key[: -len(".weight_scale")] in at_load:
            continue  # made with its weight, below
        dim = shard_dim(key)
        if dim is None or tp.size == 1:
            t = weights.get(key)
        else:
            start, stop = shard_range(key, stored[key][dim], tp)
            t = weights.get_slice(key, dim, start, stop)
        screen_weight(weights, key, t)  # this rank's slice, as read: NaN/Inf or a corrupt magnitude stop here
        if key.endswith(".weight") and key[: -len(".weight")] in at_load:
            t, state[f"{key}_scale"] = _quantize_slice(t, quantize, tp if dim == 1 else None, device)
        if tuple(t.shape) != tuple(meta.shape):
            raise CheckpointError(f"{dit_dir}: {key} slice for rank {tp.rank}/{tp.size} is {list(t.shape)}, "
                                  f"the model expects {list(meta.shape)}")
        state[key] = t.to(device=device, dtype=None if key in keep else dtype)
    if hashing:
        base.finish_verification()
    missing, unexpected = model.load_state_dict(state, assign=True, strict=stage is None)
    if unexpected or any(stage_holds(cfg, k, *stage) for k in missing):
        raise CheckpointError(f"{dit_dir}: stage load left {missing[:3]} unfilled, {unexpected[:3]} unused")
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values() if not t.is_meta)
    return RankLoad(model.eval(), weights.bytes_read, held, qc is not None or quantize is not None)


def _quantize_slice(w: torch.Tensor, config: "QuantConfig", row_group: Optional[TPGroup],
                    device: "str | torch.device") -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's slice of a Linear weight -> (q, scale); a row-parallel slice (split along `in`) takes the
    max over the ranks of each row's absmax, so every rank scales a row as the unsharded layer does."""
    from ..quant.kernels import quantize_weight

    absmax = None
    if row_group is not None and row_group.size > 1:
        absmax = row_group.all_reduce(w.float().abs().amax(dim=1, keepdim=True).to(device), op="max").cpu()
    q, s = quantize_weight(w, config.weight_dtype, absmax=absmax)
    return q, s.to(device)
