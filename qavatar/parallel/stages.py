"""Layer stages of the pipeline layout: which contiguous DiT layers each stage holds.

Stage boundaries fall between layers and balance the FLOPs of a streaming call (parallel/flops.py): the
audio-injector layers are heavier, the first stage also embeds (patch, time, text, audio) and the last one
runs the head. The partition minimises the busiest stage (exact, by dynamic programming over the layers).
"""
from __future__ import annotations

from functools import lru_cache

from ..errors import ConfigError
from ..model import ModelConfig
from .flops import embed_flops, head_flops, layer_flops


def balance(costs: list[int], stages: int, first_extra: int = 0, last_extra: int = 0) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of `costs` for each stage, minimising the largest stage sum."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ConfigError(f"--pp {stages}: the pipeline needs between 1 and {n} stages (one layer each at most)")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @lru_cache(maxsize=None)
    def best(start: int, k: int) -> tuple[int, tuple[int, ...]]:
        """(max stage cost, stop of each stage) for layers start.. split into k stages."""
        first = start == 0
        if k == 1:
            return prefix[n] - prefix[start] + last_extra + (first_extra if first else 0), (n,)
        options = []
        for stop in range(start + 1, n - k + 2):
            here = prefix[stop] - prefix[start] + (first_extra if first else 0)
            rest, stops = best(stop, k - 1)
            options.append((max(here, rest), stop, stops))
        cost, stop, stops = min(options, key=lambda o: (o[0], o[1]))
        return cost, (stop,) + stops

    stops = best(0, stages)[1]
    return [(a, b) for a, b in zip((0,) + stops[:-1], stops)]


def stage_layers(cfg: ModelConfig, stages: int, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Layer ranges [start, stop) of each pipeline stage for streaming at this latent size."""
    return balance(layer_flops(cfg, latent_hw), stages, embed_flops(cfg, latent_hw), head_flops(cfg, latent_hw))


_FIRST_STAGE = ("patch_embedding.", "cond_encoder.", "text_embedding.", "time_embedding.", "time_projection.",
                "trainable_cond_mask.", "casual_audio_encoder.", "frame_packer.")


def stage_holds(cfg: ModelConfig, key: str, layers: range, first: bool, last: bool) -> bool:
    """Whether the stage running `layers` (first and/or last of the pipeline) holds checkpoint key `key`:
    its blocks and their audio injectors; the embeddings on the first stage, the head on the last."""
    if key.startswith("blocks."):
        return int(key.split(".")[1]) in layers
    if key.startswith(("audio_injector.injector.", "audio_injector.injector_adain_layers.")):
        index = int(key.split(".")[2])
        return any(cfg.inject_index.get(i) == index for i in layers)
    if key.startswith("head."):
        return last
    if key.startswith(_FIRST_STAGE):
        return first
    raise ValueError(f"no pipeline stage rule for {key}")
