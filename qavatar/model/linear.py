"""Row-parallel linear layer (Megatron): Y = X A + b with A split by rows across ranks.

Column-parallel layers need nothing special at run time (each rank computes its slice of the outputs),
so they stay plain nn.Linear. A row-parallel layer holds in_features/tp input columns of W, produces a
partial sum, all-reduces it, and adds the bias once, after the reduction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import SINGLE, TPGroup


class RowParallelLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, tp: TPGroup = SINGLE):
        # in_features is this rank's share of the input width (full width / tp)
        super().__init__(in_features, out_features)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tp={self.tp.size}"
