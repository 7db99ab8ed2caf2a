"""qavatar: Live Avatar (Wan2.2-S2V-14B + Live Avatar LoRA), quantized and tensor-parallel for 24 GB GPUs."""
__version__ = "0.1.0"
