"""Checkpoint I/O: read sharded safetensors lazily (whole tensors or slices), merge the LoRA, write atomically."""
from .load import check_keys, find_dit_dir, find_lora, load_dit, open_weights
from .lora import LoraAdapter, MergedWeights
from .reader import CheckpointReader
from .safetensors_format import TensorSpec, read_header
from .writer import MANIFEST, ShardedWriter, atomic_directory, verify_manifest, write_manifest

__all__ = ["check_keys", "find_dit_dir", "find_lora", "load_dit", "open_weights", "LoraAdapter", "MergedWeights",
           "CheckpointReader", "TensorSpec", "read_header", "MANIFEST", "ShardedWriter", "atomic_directory",
           "verify_manifest", "write_manifest"]
