"""RWKV-UNet segmenter for transformers (configuration / modeling / image processing)."""
from .configuration_rwkv_unet import RWKVUNetConfig
from .image_processing_rwkv_unet import RWKVUNetImageProcessor
from .modeling_rwkv_unet import RWKVUNetForSemanticSegmentation, RWKVUNetPreTrainedModel
from .remote_code import save_with_code

__all__ = ["RWKVUNetConfig", "RWKVUNetImageProcessor", "RWKVUNetForSemanticSegmentation", "RWKVUNetPreTrainedModel",
           "save_with_code"]
