"""RWKV-UNet for medical image segmentation.

Importing the package registers the timm encoders ``rwkvunet_enc_{t,s,b}``.
"""
from .hub import HUB_ORG
from .models import ENCODER_VARIANTS, RWKVUNetEncoder
from .ops import bi_wkv

__version__ = "0.1.0"
__all__ = ["HUB_ORG", "ENCODER_VARIANTS", "RWKVUNetEncoder", "bi_wkv", "__version__"]
