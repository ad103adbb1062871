"""RWKV-UNet segmenter for transformers (configuration / modeling / image processing)."""
from .configuration_rwkv_unet import RWKVUNetConfig
from .image_processing_rwkv_unet import RWKVUNetImageProcessor
from .modeling_rwkv_unet import RWKVUNetForSemanticSegmentation, RWKVUNetPreTrainedModel

__all__ = ["RWKVUNetConfig", "RWKVUNetImageProcessor", "RWKVUNetForSemanticSegmentation", "RWKVUNetPreTrainedModel"]
