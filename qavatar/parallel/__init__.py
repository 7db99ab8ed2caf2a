"""Tensor parallelism: which rank we are, and the collectives the model calls explicitly."""
from .group import TPGroup, SINGLE

__all__ = ["TPGroup", "SINGLE"]
