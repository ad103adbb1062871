"""RWKV-UNet for medical image segmentation.

Importing the package registers the timm encoders ``rwkvunet_enc_<variant>`` (``ENCODER_VARIANTS``) and the
transformers Auto classes for ``model_type="rwkv_unet"``.
"""
from .hub import HUB_ORG
from .models import ENCODER_VARIANTS, RWKVUNetEncoder, register_variant, unregister_variant
from .models.rwkv_unet import (
    RWKVUNetConfig, RWKVUNetForSemanticSegmentation, RWKVUNetImageProcessor, RWKVUNetPreTrainedModel,
)
from .ops import bi_wkv
from .ops.cpu_memory import keep_freed_cpu_memory
from .inference import Segmenter, predict

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation

    AutoConfig.register(RWKVUNetConfig.model_type, RWKVUNetConfig, exist_ok=True)
    AutoModel.register(RWKVUNetConfig, RWKVUNetForSemanticSegmentation, exist_ok=True)
    AutoModelForSemanticSegmentation.register(RWKVUNetConfig, RWKVUNetForSemanticSegmentation, exist_ok=True)
    AutoImageProcessor.register(RWKVUNetConfig, image_processor_classes={"torchvision": RWKVUNetImageProcessor},
                                exist_ok=True)
    from .models.rwkv_unet.pipeline import register_pipeline

    register_pipeline()
    from .models.baselines import register_baselines

    register_baselines()


_register_auto_classes()

__all__ = [
    "HUB_ORG", "ENCODER_VARIANTS", "RWKVUNetEncoder", "RWKVUNetConfig", "RWKVUNetForSemanticSegmentation",
    "RWKVUNetImageProcessor", "RWKVUNetPreTrainedModel", "Segmenter", "bi_wkv", "keep_freed_cpu_memory", "predict",
    "register_variant", "unregister_variant", "__version__",
]
