"""The Live Avatar S2V DiT in plain PyTorch (attention through scaled_dot_product_attention)."""
from .config import PRESETS, ModelConfig, from_wan_config, resolve_config
from .dit import LiveAvatarDiT, build_model
from .kv_cache import RollingKVCache, SinkCache

__all__ = ["PRESETS", "ModelConfig", "from_wan_config", "resolve_config", "LiveAvatarDiT", "build_model",
           "RollingKVCache", "SinkCache"]
