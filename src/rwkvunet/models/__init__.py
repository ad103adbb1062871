"""Model families: the timm encoders (registered on import)."""
from .encoder import ENCODER_VARIANTS, RWKVUNetEncoder, checkpoint_filter_fn

__all__ = ["ENCODER_VARIANTS", "RWKVUNetEncoder", "checkpoint_filter_fn"]
