"""Image processor for RWKV-UNet: medical slices and photos in, ``pixel_values`` out, label maps back.

Medical images are not 8-bit photos: CT and MRI slices come as float arrays in any range (often already in
[0, 1]), microscopy and ultrasound as 16-bit files. Every pixel rule (reading PIL modes and arrays, scaling
integers by bit depth, channel conversion, resize, normalisation) is :mod:`rwkvunet.pixels`, the same code the
training transforms and ``Segmenter`` run, so a saved model sees the same pixels in every place.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    ChannelDimension,
    ImageInput,
    ImageType,
    PILImageResampling,
    SizeDict,
    get_image_type,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

from ...pixels import PROCESSOR_DEFAULTS, PixelConfig, read_pixels


class RWKVUNetImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    num_channels (`int`, *optional*, defaults to `self.num_channels`):
        Channels the model takes (`config.in_channels`). Grey images are repeated to 3 channels for a
        3-channel model, RGB images become grey (ITU-R 601-2 luma) for a 1-channel model, and RGBA images
        lose their alpha channel. Any other mismatch is an error.
    """

    num_channels: int


class RWKVUNetImageProcessor(TorchvisionBackend):
    r"""Resize, optionally rescale and normalise images for [`RWKVUNetForSemanticSegmentation`].

    Accepts PIL images, numpy arrays `(H, W)`, `(H, W, C)` or `(C, H, W)` and torch tensors, of any dtype;
    the rules are those of [`rwkvunet.pixels`]. Everything is converted to float32 before resizing, so float
    CT/MRI intensities keep their values.

    Args:
        do_resize (`bool`, defaults to True): resize to `size` (bilinear for images, nearest for label maps).
        size (`dict`, defaults to `{"height": 224, "width": 224}`): the model's training resolution.
        do_rescale (`bool`, *optional*): `None` (default) scales integer images by their bit depth (8-bit by
            255, 16-bit by 65535, bool as 0/1), as training does, and keeps floats as they are; `True`
            multiplies every input by `rescale_factor`; `False` keeps every value as stored.
        rescale_factor (`float`, defaults to 1/255).
        do_normalize (`bool`, defaults to False): subtract `image_mean` and divide by `image_std` (True with
            the ImageNet statistics for RGB checkpoints).
        num_channels (`int`, defaults to 1): the model's input channels; see
            [`RWKVUNetImageProcessorKwargs`].
    """

    valid_kwargs = RWKVUNetImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    size = dict(PROCESSOR_DEFAULTS["size"])
    default_to_square = True
    do_resize = PROCESSOR_DEFAULTS["do_resize"]
    do_center_crop = None
    crop_size = None
    do_rescale = PROCESSOR_DEFAULTS["do_rescale"]
    rescale_factor = PROCESSOR_DEFAULTS["rescale_factor"]
    do_normalize = PROCESSOR_DEFAULTS["do_normalize"]
    image_mean = list(PROCESSOR_DEFAULTS["image_mean"])
    image_std = list(PROCESSOR_DEFAULTS["image_std"])
    do_convert_rgb = None
    num_channels = PROCESSOR_DEFAULTS["num_channels"]

    def __init__(self, **kwargs: Unpack[RWKVUNetImageProcessorKwargs]):
        super().__init__(**kwargs)
        if int(self.num_channels) < 1:
            raise ValueError(f"num_channels must be positive, got {self.num_channels}")

    def preprocess(
            self,
            images: ImageInput,
            segmentation_maps: Optional[ImageInput] = None,
            **kwargs: Unpack[RWKVUNetImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        images (`ImageInput`): one image or a list (a 4-D array or tensor is a batch).
        segmentation_maps (`ImageInput`, *optional*): label maps `(H, W)` of class indices; returned as
            int64 `labels` resized with nearest neighbour.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> list:
        """A flat list of single images; unlike the default, a lone 2-D array is one grey image."""
        images = self.fetch_images(images)
        if isinstance(images, (list, tuple)):
            return [image for item in images for image in self._prepare_images_structure(item, expected_ndims)]
        if get_image_type(images) == ImageType.PIL:
            return [images]
        if not isinstance(images, (np.ndarray, torch.Tensor)):
            raise ValueError(f"unsupported image type {type(images).__name__}; pass PIL images, numpy arrays or "
                             "torch tensors (or lists of them)")
        if images.ndim in (expected_ndims - 1, expected_ndims):
            return [images] if images.ndim >= 2 else self._bad_shape(images)
        if images.ndim == expected_ndims + 1:
            return list(images)
        return self._bad_shape(images)

    @staticmethod
    def _bad_shape(images):
        raise ValueError(f"cannot read images of shape {tuple(images.shape)}: give (H, W), (H, W, C) or (C, H, W) "
                         "images, a list of them, or a 4-D batch")

    # --- one image to a (C, H, W) tensor ---------------------------------------------------------------
    def process_image(
            self,
            image: ImageInput,
            do_convert_rgb: Optional[bool] = None,
            input_data_format: Optional[Union[str, ChannelDimension]] = None,
            device: Optional[torch.device] = None,
            **kwargs,
    ) -> torch.Tensor:
        """PIL / numpy / torch -> channels-first tensor in its own dtype, by :func:`rwkvunet.pixels.read_pixels`."""
        if get_image_type(image) not in (ImageType.PIL, ImageType.NUMPY, ImageType.TORCH):
            raise ValueError(f"unsupported image type {type(image).__name__}; pass PIL images, numpy arrays "
                             "or torch tensors")
        axis = {ChannelDimension.FIRST: 0, ChannelDimension.LAST: -1}.get(
            ChannelDimension(input_data_format) if input_data_format is not None else None)
        image = read_pixels(image, channel_axis=axis)
        return image.to(device) if device is not None else image

    def pixel_config(self, **overrides) -> PixelConfig:
        """These settings (with ``overrides`` as given to ``preprocess``) as a :class:`rwkvunet.pixels.PixelConfig`."""
        settings = {key: getattr(self, key) for key in PROCESSOR_DEFAULTS}
        settings.update({k: v for k, v in overrides.items() if k in PROCESSOR_DEFAULTS and v is not None})
        if "do_rescale" in overrides:
            settings["do_rescale"] = overrides["do_rescale"]
        if isinstance(settings.get("size"), SizeDict):
            settings["size"] = {"height": settings["size"].height, "width": settings["size"].width}
        return PixelConfig.from_processor_dict(settings, source=type(self).__name__)

    # --- batch ------------------------------------------------------------------------------------------
    def _preprocess_image_like_inputs(
            self,
            images: ImageInput,
            segmentation_maps: Optional[ImageInput],
            do_convert_rgb: Optional[bool],
            input_data_format: Optional[ChannelDimension],
            return_tensors: Optional[Union[str, TensorType]],
            device: Optional[torch.device] = None,
            **kwargs,
    ) -> BatchFeature:
        config = self.pixel_config(
            num_channels=kwargs.pop("num_channels"), do_resize=kwargs["do_resize"], size=kwargs["size"],
            do_rescale=kwargs["do_rescale"], rescale_factor=kwargs["rescale_factor"],
            do_normalize=kwargs["do_normalize"], image_mean=kwargs["image_mean"], image_std=kwargs["image_std"])
        prepared = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=False, input_data_format=input_data_format, device=device)
        data = {"pixel_values": [config.finish(config.to_float(image)[0]) for image in prepared]}

        if segmentation_maps is not None:
            maps = self._prepare_image_like_inputs(
                images=segmentation_maps, expected_ndims=2, do_convert_rgb=False,
                input_data_format=ChannelDimension.FIRST, device=device,
            )
            maps = [m if m.ndim == 3 and m.shape[0] == 1 else m.reshape(1, *m.shape[-2:]) for m in maps]
            map_kwargs = {**kwargs, "do_rescale": False, "do_normalize": False,
                          "resample": tvF.InterpolationMode.NEAREST_EXACT}
            # nearest resizing copies values, so an int64 -> float32 -> int64 round trip is exact below 2**24
            maps = self._preprocess([m.to(torch.float32) for m in maps], **map_kwargs)
            data["labels"] = [m.squeeze(0).round().to(torch.int64) for m in maps]

        return BatchFeature(data=data, tensor_type=return_tensors)

    def _preprocess(
            self,
            images: list,
            do_resize: bool,
            size: SizeDict,
            resample,
            do_rescale: bool,
            rescale_factor: float,
            do_normalize: bool,
            image_mean,
            image_std,
            **kwargs,
    ) -> list:
        """Label maps only (images go through :mod:`rwkvunet.pixels`): nearest-neighbour resize."""
        if not do_resize:
            return list(images)
        return [image if tuple(image.shape[-2:]) == (size.height, size.width) else
                self.resize(image, size=size, resample=resample, antialias=False) for image in images]

    # --- model output back to label maps ----------------------------------------------------------------
    def post_process_semantic_segmentation(self, outputs, target_sizes=None, return_segmentation_scores: bool = False):
        """Label maps `(H, W)` (int64) from the model's logits, resized bilinearly to `target_sizes`.

        Args:
            outputs: the model output (anything with `.logits`), or the logits `(B, num_labels, h, w)`.
            target_sizes (list of `(height, width)` or a `(B, 2)` tensor, *optional*): the original image
                sizes; without it the maps keep the logits' size.
            return_segmentation_scores (`bool`): also return the resized logits, as
                `{"segmentation": ..., "segmentation_scores": ...}` dicts.

        Returns:
            one map per image: argmax over classes, or `sigmoid(logit) > 0.5` for a single-label model.
        """
        logits = outputs if torch.is_tensor(outputs) else outputs["logits"]
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {len(logits)}; give one "
                             "(height, width) per image")
        results = []
        for i in range(len(logits)):
            scores = logits[i:i + 1].float()
            if target_sizes is not None:
                size = tuple(int(s) for s in target_sizes[i])
                if tuple(scores.shape[-2:]) != size:
                    scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
            scores = scores[0]
            segmentation = (scores[0] > 0).long() if scores.shape[0] == 1 else scores.argmax(dim=0)
            results.append({"segmentation": segmentation, "segmentation_scores": scores}
                           if return_segmentation_scores else segmentation)
        return results


__all__ = ["RWKVUNetImageProcessor"]
