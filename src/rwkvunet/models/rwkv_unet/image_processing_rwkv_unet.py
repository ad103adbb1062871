"""Image processor for RWKV-UNet: medical slices and photos in, ``pixel_values`` out, label maps back.

Medical images are not 8-bit photos: CT and MRI slices come as float arrays in any range (often already in
[0, 1]). So values are rescaled only when asked, or by default for 8-bit inputs; normalisation is a
per-checkpoint choice (ImageNet statistics for RGB models, none for 1-channel slices); and the number of
channels the model takes (``num_channels``) makes grey <-> RGB conversion explicit.
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
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    ImageType,
    PILImageResampling,
    SizeDict,
    get_image_type,
    infer_channel_dimension_format,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

# ITU-R 601-2 luma, the weights of PIL's "L" conversion
_LUMA = (0.299, 0.587, 0.114)
# PIL modes that become an array of channels as they are; any other mode is converted to RGB first
_PIL_ARRAY_MODES = ("L", "RGB", "I", "I;16", "F")


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

    Accepts PIL images, numpy arrays `(H, W)`, `(H, W, C)` or `(C, H, W)` and torch tensors, of any dtype.
    Everything is converted to float32 before resizing, so float CT/MRI intensities keep their values.

    Args:
        do_resize (`bool`, defaults to True): resize to `size` (bilinear for images, nearest for label maps).
        size (`dict`, defaults to `{"height": 224, "width": 224}`): the model's training resolution.
        do_rescale (`bool`, *optional*): multiply by `rescale_factor`. `None` (default) rescales 8-bit
            (uint8) inputs only, so PNG/JPEG photos land in [0, 1] and float arrays stay as they are.
        rescale_factor (`float`, defaults to 1/255).
        do_normalize (`bool`, defaults to False): subtract `image_mean` and divide by `image_std` (True with
            the ImageNet statistics for RGB checkpoints).
        num_channels (`int`, defaults to 1): the model's input channels; see
            [`RWKVUNetImageProcessorKwargs`].
    """

    valid_kwargs = RWKVUNetImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    size = {"height": 224, "width": 224}
    default_to_square = True
    do_resize = True
    do_center_crop = None
    crop_size = None
    do_rescale = None
    rescale_factor = 1 / 255
    do_normalize = False
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_convert_rgb = None
    num_channels = 1

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

    # --- one image to a float (C, H, W) tensor ----------------------------------------------------------
    def process_image(
            self,
            image: ImageInput,
            do_convert_rgb: Optional[bool] = None,
            input_data_format: Optional[Union[str, ChannelDimension]] = None,
            device: Optional[torch.device] = None,
            num_channels: Optional[int] = None,
            **kwargs,
    ) -> torch.Tensor:
        """PIL / numpy / torch -> channels-first tensor in its own dtype (uint8 stays uint8 here)."""
        image_type = get_image_type(image)
        if image_type == ImageType.PIL:
            if image.mode not in _PIL_ARRAY_MODES:
                image = image.convert("RGB")
            image = torch.from_numpy(np.array(image))
            input_data_format = ChannelDimension.LAST if image.ndim == 3 else input_data_format
        elif image_type == ImageType.NUMPY:
            image = torch.from_numpy(np.ascontiguousarray(image))
        elif image_type != ImageType.TORCH:
            raise ValueError(f"unsupported image type {type(image).__name__}; pass PIL images, numpy arrays "
                             "or torch tensors")
        if image.ndim == 2:
            image = image.unsqueeze(0)
            input_data_format = ChannelDimension.FIRST
        elif image.ndim != 3:
            raise ValueError(f"an image must be (H, W), (H, W, C) or (C, H, W), got shape {tuple(image.shape)}; "
                             "pass a batch as a list or a 4-D array")
        if input_data_format is None:
            counts = tuple(sorted({1, 3, 4, int(num_channels or self.num_channels)}))
            try:
                input_data_format = infer_channel_dimension_format(image, num_channels=counts)
            except ValueError:
                raise ValueError(f"cannot tell which axis of an image of shape {tuple(image.shape)} holds the "
                                 f"channels (expected {counts}); pass input_data_format='channels_first' or "
                                 "'channels_last'") from None
        if input_data_format == ChannelDimension.LAST:
            image = image.permute(2, 0, 1)
        image = image.contiguous()
        return image.to(device) if device is not None else image

    @staticmethod
    def to_float(image: torch.Tensor, do_rescale: Optional[bool], rescale_factor: float) -> torch.Tensor:
        """float32 copy; rescaled when ``do_rescale`` is True, or when it is None and the image is 8-bit."""
        scale = do_rescale if do_rescale is not None else image.dtype == torch.uint8
        image = image.to(torch.float32)
        return image * rescale_factor if scale else image

    @staticmethod
    def convert_channels(image: torch.Tensor, num_channels: int) -> torch.Tensor:
        """Make a (C, H, W) image have ``num_channels`` channels: grey -> RGB by repetition, RGB -> grey by
        luma, RGBA -> RGB by dropping alpha."""
        channels = image.shape[0]
        if channels == num_channels:
            return image
        if channels == 4 and num_channels in (1, 3):
            image, channels = image[:3], 3
            if num_channels == 3:
                return image
        if channels == 1 and num_channels == 3:
            return image.expand(3, -1, -1).contiguous()
        if channels == 3 and num_channels == 1:
            weights = torch.tensor(_LUMA, dtype=image.dtype, device=image.device).view(3, 1, 1)
            return (image * weights).sum(0, keepdim=True)
        raise ValueError(f"the image has {channels} channels but the model takes {num_channels} "
                         "(num_channels); only grey <-> RGB(A) are converted, so convert the image yourself "
                         "or set num_channels to the model's config.in_channels")

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
        num_channels = int(kwargs.pop("num_channels") or self.num_channels)
        prepared = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=False, input_data_format=input_data_format, device=device,
            num_channels=num_channels,
        )
        prepared = [self.convert_channels(self.to_float(image, kwargs["do_rescale"], kwargs["rescale_factor"]),
                                          num_channels) for image in prepared]
        data = {"pixel_values": self._preprocess(prepared, **{**kwargs, "do_rescale": False})}

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
        processed = []
        for image in images:  # images of one batch may differ in size and are usually few: no grouping
            if do_resize and tuple(image.shape[-2:]) != (size.height, size.width):
                image = self.resize(image, size=size, resample=resample, antialias=True)
            if do_rescale:
                image = image * rescale_factor
            if do_normalize:
                image = self._normalize_channels(image, image_mean, image_std)
            processed.append(image)
        return processed

    @staticmethod
    def _normalize_channels(image: torch.Tensor, mean, std) -> torch.Tensor:
        mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        if mean.shape[0] not in (1, image.shape[0]) or std.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"image_mean / image_std have {mean.shape[0]} / {std.shape[0]} values for an image "
                             f"with {image.shape[0]} channels; give one value or one per channel")
        return (image - mean) / std

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
