"""Model families: the timm encoders (registered on import)."""
from .encoder import ENCODER_VARIANTS, RWKVUNetEncoder, checkpoint_filter_fn, register_variant, unregister_variant

__all__ = ["ENCODER_VARIANTS", "RWKVUNetEncoder", "checkpoint_filter_fn", "register_variant", "unregister_variant"]
