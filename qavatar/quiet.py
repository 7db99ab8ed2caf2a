"""Keeping third-party import-time chatter off the console.

bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." as a warning the
moment it is imported, and diffusers imports it for its quantizer registry, so without this every command
that touches the VAE (and the CPU int8 kernel) printed it first. qavatar never uses 4-bit: the line is noise.
bitsandbytes is imported only where it is used, inside `quiet_bitsandbytes()`; its later warnings, once
imported, are shown as usual.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator


@contextlib.contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """While active, bitsandbytes' loggers pass only errors and its Python warnings are dropped."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"bitsandbytes(\.|$)")
            yield
    finally:
        logger.setLevel(level)
