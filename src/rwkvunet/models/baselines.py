"""Reference segmenters trained and scored by the same loop as RWKV-UNet, so a run can be compared with a plain
CNN U-Net on the same data, loss, augmentation, schedule and metrics.

``smp-unet-r34`` is segmentation_models_pytorch's ``Unet("resnet34")`` from scratch, wrapped as a transformers
model: it takes ``pixel_values`` and ``labels`` like RWKV-UNet, returns a ``SemanticSegmenterOutput`` whose loss is
:func:`segmentation_loss` with the config's weights, and saves a ``save_pretrained`` folder (safetensors) that
``load_segmentation_model``, ``training/evaluate.py`` and ``rwkvunet predict`` read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from ..errors import UserError
from ..file_modes import give_default_mode

#: ``--model`` names of the reference segmenters: the smp encoder each one wraps.
BASELINES = {"smp-unet-r34": "resnet34"}

SMP_SIZE_DIVISOR = 32  # total stride of smp's ResNet encoders


def import_smp():
    """segmentation_models_pytorch, or a one-line error naming the extra that installs it."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError as err:
        raise UserError('the smp baseline needs segmentation_models_pytorch: pip install "rwkvunet[baselines]"'
                        f" ({err})") from err
    return smp


class SMPUNetConfig(PreTrainedConfig):
    r"""Configuration of [`SMPUNetForSemanticSegmentation`]: the smp encoder, the channels and classes, and the
    loss weights (the fields of :class:`RWKVUNetConfig` that :func:`segmentation_loss` reads), and the start of a
    binary head's bias (``head_bias``, as RWKV-UNet's; 0: smp's own start)."""

    model_type = "rwkvunet_smp_unet"

    def __init__(self, encoder_name: str = "resnet34", in_channels: int = 3, ce_weight: float = 0.5,
                 dice_weight: float = 0.5, semantic_loss_ignore_index: int = 255, image_size: int = 224,
                 head_bias: float = 0.0, **kwargs):
        self.encoder_name = encoder_name
        self.in_channels = int(in_channels)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.semantic_loss_ignore_index = int(semantic_loss_ignore_index)
        self.image_size = int(image_size)
        self.head_bias = float(head_bias)
        super().__init__(**kwargs)


class SMPUNetForSemanticSegmentation(PreTrainedModel):
    """smp ``Unet(encoder_name, encoder_weights=None)`` with RWKV-UNet's inputs, outputs and loss.

    Inputs of any size are zero-padded at the bottom and right to a multiple of 32 and the logits cropped back.
    """

    config_class = SMPUNetConfig
    config: SMPUNetConfig
    base_model_prefix = "unet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = []

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As RWKV-UNet's: the weights get the mode of the files beside them (see :mod:`rwkvunet.file_modes`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        give_default_mode(Path(save_directory).glob("*.safetensors"))

    def __init__(self, config: SMPUNetConfig):
        super().__init__(config)
        smp = import_smp()
        self.unet = smp.Unet(config.encoder_name, encoder_weights=None, in_channels=config.in_channels,
                             classes=config.num_labels)
        if config.num_labels == 1 and config.head_bias:  # the foreground prior, as RWKV-UNet's binary head
            with torch.no_grad():
                self.unet.segmentation_head[0].bias.fill_(config.head_bias)
        self.post_init()

    def _init_weights(self, module) -> None:
        """smp's own initialisation (run when the modules are built) is the baseline's; loading fills the rest."""

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, **kwargs):
        from .rwkv_unet.modeling_rwkv_unet import segmentation_loss

        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(f"pixel_values must be (batch, {self.config.in_channels}, height, width), got "
                             f"{tuple(pixel_values.shape)}")
        pixel_values = pixel_values.to(next(self.parameters()).dtype)
        height, width = pixel_values.shape[-2:]
        pad_h, pad_w = (-height) % SMP_SIZE_DIVISOR, (-width) % SMP_SIZE_DIVISOR
        x = F.pad(pixel_values, (0, pad_w, 0, pad_h)) if (pad_h or pad_w) else pixel_values
        logits = self.unet(x)[..., :height, :width].contiguous()
        loss = None
        if labels is not None:
            if labels.ndim == 4 and labels.shape[1] == 1:
                labels = labels[:, 0]
            loss = segmentation_loss(logits, labels, self.config)
        if not return_dict:
            return (loss, logits) if loss is not None else (logits,)
        return SemanticSegmenterOutput(loss=loss, logits=logits)


#: model_type of every segmenter ``load_segmentation_model`` reads besides RWKV-UNet.
BASELINE_MODEL_TYPES = (SMPUNetConfig.model_type,)


def register_baselines() -> None:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

    from .rwkv_unet import RWKVUNetImageProcessor

    AutoConfig.register(SMPUNetConfig.model_type, SMPUNetConfig, exist_ok=True)
    AutoModelForSemanticSegmentation.register(SMPUNetConfig, SMPUNetForSemanticSegmentation, exist_ok=True)
    AutoImageProcessor.register(SMPUNetConfig, image_processor_classes={"torchvision": RWKVUNetImageProcessor},
                                exist_ok=True)


def build_baseline(name: str, **config_kwargs) -> SMPUNetForSemanticSegmentation:
    """A new reference segmenter by its ``--model`` name (keyword arguments go to its config)."""
    if name not in BASELINES:
        raise UserError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    import_smp()
    return SMPUNetForSemanticSegmentation(SMPUNetConfig(encoder_name=BASELINES[name], **config_kwargs))


__all__ = ["BASELINES", "BASELINE_MODEL_TYPES", "SMPUNetConfig", "SMPUNetForSemanticSegmentation", "build_baseline",
           "import_smp", "register_baselines"]
