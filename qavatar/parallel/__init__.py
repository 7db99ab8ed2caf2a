"""Tensor parallelism: which rank we are, which slices it holds, and the collectives the model calls."""
from .group import SINGLE, ByteCounter, TPGroup

__all__ = ["TPGroup", "SINGLE", "ByteCounter"]
