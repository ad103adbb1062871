"""Joint image/mask transforms (torchvision.transforms.v2 with tv_tensors) and batching.

Images become float tensors (C, H, W) by the rules of :mod:`rwkvunet.pixels` (the same code the image
processor and ``Segmenter`` run, so a saved model predicts as it trained): integers scaled by bit depth (8-bit
by 255, 16-bit by 65535), floats (CT, MRI) kept, channels converted to the model's, bilinear resize, optional
normalisation. Masks become long tensors (H, W) and are always resampled with nearest neighbour. Randomness comes from torch's global generator, so ``torch.manual_seed``
and the RNG state saved by Accelerate reproduce the augmentation of a resumed run.

    train_tf = TrainTransform(224)
    sample = train_tf(row["image"], row["mask"])     # {"pixel_values": (C,224,224), "labels": (224,224)}
    loader = DataLoader(SegmentationDataset(ds["train"], train_tf), batch_size=24, collate_fn=collate_fn)
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image as PILImage
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..pixels import PixelConfig, PixelError, check_finite, read_pixels, scale_intensity
from .files import DataError, prepare_mask

Size = Union[int, Sequence[int]]


def _size(size: Size) -> list[int]:
    return [int(size), int(size)] if isinstance(size, (int, np.integer)) else [int(s) for s in size]


def image_hw(image) -> tuple[int, int]:
    """Height and width of a PIL image, an array (H, W), (H, W, C) or (C, H, W), or a tensor (C, H, W)."""
    if isinstance(image, PILImage.Image):
        return image.height, image.width
    return tuple(read_pixels(image).shape[-2:])


def to_image_tensor(image, num_channels: Optional[int] = None, rescale: Optional[bool] = None,
                    rescale_factor: float = 1 / 255) -> torch.Tensor:
    """A PIL image, array (H, W), (H, W, C) or (C, H, W), or tensor as float32 (C, H, W), by the rules of
    :mod:`rwkvunet.pixels` (integers by bit depth by default); ``num_channels`` converts grey to RGB (repeat)
    or RGB to grey (luma) to match a model, otherwise the channels stay as stored."""
    try:
        if num_channels:
            config = PixelConfig(num_channels=num_channels, rescale=rescale, rescale_factor=rescale_factor)
            return config.to_float(image)[0]
        return _scaled(image, rescale, rescale_factor)
    except PixelError as err:
        raise DataError(str(err)) from err


def _scaled(image, rescale: Optional[bool], rescale_factor: float) -> torch.Tensor:
    """Read and scaled, channels as stored."""
    return check_finite(scale_intensity(read_pixels(image), rescale, rescale_factor))


def to_mask_tensor(mask, num_labels: Optional[int] = None) -> torch.Tensor:
    """A mask (PIL, array, tensor) as long (H, W); with ``num_labels`` it is checked (and 0-255 binary masks
    thresholded) by :func:`rwkvunet.data.prepare_mask`."""
    if isinstance(mask, PILImage.Image):
        mask = mask.convert("L") if mask.mode not in ("L", "I", "I;16", "1") else mask
    arr = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] in (1, 3, 4) else arr[0]
    if num_labels is not None:
        arr = prepare_mask(arr, num_labels)
    return torch.from_numpy(np.array(arr, dtype=np.int64))


class _JointTransform:
    """Shared conversion and the final resize of :class:`TrainTransform` and :class:`EvalTransform`.

    ``pixels`` (a :class:`rwkvunet.pixels.PixelConfig`, e.g. from the model's image processor) sets every
    pixel rule at once; otherwise it is built from ``img_size``, ``num_channels``, ``mean``/``std`` and
    ``rescale``.
    """

    def __init__(self, img_size: Optional[Size] = None, num_channels: Optional[int] = None,
                 num_labels: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, rescale: Optional[bool] = None,
                 pixels: Optional[PixelConfig] = None):
        if pixels is None:
            if img_size is None:
                raise ValueError("give img_size or a PixelConfig")
            pixels = PixelConfig(num_channels=num_channels or 1, size=tuple(_size(img_size)), rescale=rescale,
                                 image_mean=None if mean is None else tuple(mean),
                                 image_std=None if std is None else tuple(std))
            self.convert_channels = num_channels is not None
        else:
            self.convert_channels = True
        if pixels.size is None:
            raise ValueError("training and evaluation transforms need a size to batch images; set img_size")
        self.pixels = pixels
        self.size = list(pixels.size)
        self.num_channels = pixels.num_channels if self.convert_channels else None
        self.num_labels = num_labels
        self.mean, self.std = pixels.image_mean, pixels.image_std

    def _to_float(self, image) -> torch.Tensor:
        try:
            if self.convert_channels:
                return self.pixels.to_float(image)[0]
            return _scaled(image, self.pixels.rescale, self.pixels.rescale_factor)
        except PixelError as err:
            raise DataError(str(err)) from err

    def _augment(self, image: tv_tensors.Image, mask: Optional[tv_tensors.Mask]):
        return image, mask

    def __call__(self, image, mask=None) -> dict:
        img = tv_tensors.Image(self._to_float(image))
        msk = None
        if mask is not None:
            m = to_mask_tensor(mask, self.num_labels)
            if tuple(m.shape) != tuple(img.shape[-2:]):
                raise DataError(f"image {tuple(img.shape[-2:])} and mask {tuple(m.shape)} differ in size")
            msk = tv_tensors.Mask(m[None])
        img, msk = self._augment(img, msk)
        out = {"pixel_values": self.pixels.finish(img.as_subclass(torch.Tensor))}
        if msk is not None:
            labels = F.resize(msk, self.size, interpolation=v2.InterpolationMode.NEAREST)
            out["labels"] = labels[0].as_subclass(torch.Tensor)
        return out


class EvalTransform(_JointTransform):
    """Resize only (image bilinear, mask nearest): validation and test."""


class TrainTransform(_JointTransform):
    """The authors' augmentation (TransUNet's ``RandomGenerator``), then resize to ``img_size``.

    With probability ``p_rot_flip`` a random multiple of 90 degrees and a flip along a random axis;
    otherwise, with probability ``p_rotate``, a rotation by a random angle in ``[-degrees, degrees]``
    (image bilinear, mask nearest, zeros filled in).
    """

    def __init__(self, img_size: Optional[Size] = None, num_channels: Optional[int] = None,
                 num_labels: Optional[int] = None, mean=None, std=None, degrees: float = 20.0,
                 p_rot_flip: float = 0.5, p_rotate: float = 0.5, rescale: Optional[bool] = None,
                 pixels: Optional[PixelConfig] = None):
        super().__init__(img_size, num_channels, num_labels, mean, std, rescale=rescale, pixels=pixels)
        self.degrees, self.p_rot_flip, self.p_rotate = degrees, p_rot_flip, p_rotate

    def _augment(self, image, mask):
        if torch.rand(()) < self.p_rot_flip:
            k = int(torch.randint(0, 4, ()))
            flip = F.horizontal_flip if int(torch.randint(0, 2, ())) else F.vertical_flip
            image = flip(tv_tensors.wrap(torch.rot90(image, k, dims=(-2, -1)), like=image))
            mask = None if mask is None else flip(tv_tensors.wrap(torch.rot90(mask, k, dims=(-2, -1)), like=mask))
        elif torch.rand(()) < self.p_rotate:
            angle = float(torch.empty(()).uniform_(-self.degrees, self.degrees))
            image = F.rotate(image, angle, interpolation=v2.InterpolationMode.BILINEAR)
            mask = None if mask is None else F.rotate(mask, angle, interpolation=v2.InterpolationMode.NEAREST)
        return image, mask


class SegmentationDataset(torch.utils.data.Dataset):
    """A ``datasets`` split as a torch dataset of transformed samples (for ``torch.utils.data.DataLoader``).

    Image files stay PIL images until transformed (palette GIFs need their palette); arrays are read in
    numpy format, which avoids Python lists. Items: ``pixel_values``, ``labels``, ``case_id``.
    """

    def __init__(self, split, transform, image_column: str = "image", mask_column: str = "mask"):
        from datasets import Image

        self.columns = (image_column, mask_column)
        self.transform = transform
        arrays = not isinstance(split.features[image_column], Image)
        self.rows = split.with_format("numpy") if arrays else split

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[int(index)]
        case_id = str(row.get("case_id", index))
        try:
            sample = self.transform(row[self.columns[0]], row[self.columns[1]])
        except DataError as err:
            raise DataError(f"case {case_id!r}: {err}") from err
        sample["case_id"] = case_id
        return sample


def collate_fn(samples: Sequence[dict]) -> dict:
    """Stack ``pixel_values`` and ``labels``; other keys (``case_id``) become lists."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def batch_transform(transform, image_column: str = "image", mask_column: str = "mask"):
    """A function for ``Dataset.set_transform``/``with_transform`` applying ``transform`` to each row."""

    def apply(batch: dict) -> dict:
        samples = [transform(i, m) for i, m in zip(batch[image_column], batch[mask_column])]
        return {"pixel_values": [s["pixel_values"] for s in samples], "labels": [s["labels"] for s in samples]}

    return apply
