"""The one path from a user's image to model pixels, shared by training, evaluation, the image processor and
``Segmenter``/``predict``, so a saved model predicts exactly as it trained.

Steps, in order (each a function here, all driven by :class:`PixelConfig`):

1. :func:`read_pixels` - PIL image, numpy array or torch tensor -> (C, H, W) tensor in its stored dtype.
   PIL modes: ``L``/``I;16*``/``I``/``F`` as stored, ``1`` as bool, ``LA``/``La`` grey (alpha dropped),
   ``RGBA``/``RGBa``/``RGBX`` RGB (alpha dropped), anything else (palette, CMYK, YCbCr, LAB, HSV) converted to
   RGB. Arrays and tensors: 2-D is grey; 3-D is channels-last when its last axis has 1-4 entries and its first
   does not, channels-first when its first axis does, and otherwise the container's convention (numpy last,
   torch first); ``channel_axis`` overrides.
2. :func:`scale_intensity` - to float32. With ``rescale=None`` (the default) integers are scaled by their bit
   depth, a fixed rule of the dtype and never of the values: 8-bit (uint8, int8) / 255, 16-bit and wider
   (uint16, int16, and int32/int64 that hold 16-bit data, as Pillow reads 16-bit and signed TIFFs) / 65535,
   bool as 0/1, floats (CT, MRI) as stored. Integers beyond 16 bits are refused rather than scaled another
   way. ``rescale=True`` multiplies every input by ``rescale_factor``; ``False`` keeps values as stored.
3. :func:`check_finite` - NaN or infinite pixels are refused with the count (one NaN would make every logit
   NaN); volumes are cleaned instead (NaN -> 0, with a note) by :func:`prepare_volume`.
4. :func:`convert_channels` - for a model that takes another number of channels: RGBA (4 channels) loses its
   alpha for a model that takes fewer (a 2-channel array is refused: it may be two modalities rather than
   grey+alpha, which PIL's ``LA`` mode marks and step 1 makes grey), grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma (Pillow's ``L`` weights), applied
   to the scaled floats; other mismatches are refused.
5. :func:`resize_image` - bilinear with antialiasing (masks: nearest, in the training transforms).
6. :func:`normalize` - minus mean over std per channel, when the model was trained so.

Volumes (CT, MRI) are prepared before slicing by :func:`prepare_volume`: the Synapse CT window, another
window, or per-volume min-max.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .inference_io import InputError

#: ITU-R 601-2 luma, the weights of Pillow's ``"L"`` conversion.
LUMA = (0.299, 0.587, 0.114)
#: Divisors of integer pixels by bit depth (``rescale=None``).
EIGHT_BIT_MAX = 255.0
SIXTEEN_BIT_MAX = 65535.0
#: Pillow modes kept as their stored values; ``"1"`` becomes bool, the grey+alpha ones grey.
PIL_STORED_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGB")
PIL_GREY_MODES = ("LA", "La", "1")
PIL_RGB_WITH_EXTRA = ("RGBA", "RGBa", "RGBX")
#: Abdominal CT window of the Synapse preprocessing (Hounsfield units).
CT_WINDOW = (-125.0, 275.0)
#: Volumes whose darkest voxels lie below this are taken for CT in Hounsfield units by ``intensity="auto"``.
CT_AIR_THRESHOLD = -500.0

#: The image processor's defaults (``RWKVUNetImageProcessor`` takes them from here), which also fill in
#: settings missing from a ``preprocessor_config.json``.
PROCESSOR_DEFAULTS = dict(do_resize=True, size={"height": 224, "width": 224}, do_rescale=None, rescale_factor=1 / 255,
                          do_normalize=False, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                          num_channels=1)

ImageLike = Union[np.ndarray, torch.Tensor, "PIL.Image.Image"]  # noqa: F821


class PixelError(InputError):
    """An image whose pixels cannot become model input as they are; the message says why and what to do."""


# --- 1. reading ----------------------------------------------------------------------------------------------
def _is_pil(image) -> bool:
    return hasattr(image, "mode") and hasattr(image, "convert") and hasattr(image, "getbands")


def pil_to_array(image) -> np.ndarray:
    """A PIL image as an (H, W) or (H, W, C) array in its stored dtype (16-bit as uint16, ``1`` as bool)."""
    mode = image.mode
    if mode in PIL_GREY_MODES:
        image = image.convert("L") if mode != "1" else image
    elif mode in PIL_RGB_WITH_EXTRA:
        image = image.convert("RGB")
    elif mode not in PIL_STORED_MODES:
        image = image.convert("RGB")  # palettes, CMYK, YCbCr, LAB, HSV
    arr = np.asarray(image)
    if image.mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    return np.array(arr)


def _channels_last(shape: Sequence[int], default_last: bool) -> bool:
    first, last = shape[0] in (1, 2, 3, 4), shape[-1] in (1, 2, 3, 4)
    if last and not first:
        return True
    if first and not last:
        return False
    return default_last


def read_pixels(image: ImageLike, channel_axis: Optional[int] = None) -> torch.Tensor:
    """(C, H, W) tensor of an image in its stored dtype, alpha dropped (see the module docstring for the rules)."""
    default_last = True
    if _is_pil(image):
        arr = pil_to_array(image)
        channel_axis = -1 if arr.ndim == 3 else channel_axis
        tensor = torch.from_numpy(arr)
    elif isinstance(image, torch.Tensor):
        tensor, default_last = image.detach().cpu(), False
    elif isinstance(image, (np.ndarray, np.generic, list, tuple)):
        arr = np.asarray(image)
        if arr.dtype.byteorder == ">":  # big-endian TIFF data
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise PixelError(f"cannot read an image array of dtype {arr.dtype}; give numbers (uint8, uint16, "
                             "float32, ...)")
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        raise PixelError(f"unsupported image type {type(image).__name__}; give a PIL image, a numpy array or a "
                         "torch tensor")
    if tensor.is_complex():  # e.g. raw MRI k-space reconstructions: casting would drop the imaginary part
        raise PixelError(f"the image is complex ({str(tensor.dtype).replace('torch.', '')}); give real pixels, e.g. "
                         "the magnitude (np.abs(image))")
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3:
        if channel_axis is None:
            last = _channels_last(tuple(tensor.shape), default_last)
        else:
            last = channel_axis in (-1, 2)
        tensor = tensor.permute(2, 0, 1) if last else tensor
    else:
        raise PixelError(f"an image must be (H, W), (H, W, C) or (C, H, W), got shape {tuple(tensor.shape)}; "
                         "give one image at a time (a volume: use predict_volume)")
    if tensor.shape[-2] == 0 or tensor.shape[-1] == 0:
        raise PixelError(f"the image is empty (shape {tuple(tensor.shape)})")
    return tensor.contiguous()


# --- 2. intensity ----------------------------------------------------------------------------------------------
def integer_divisor(dtype: torch.dtype) -> Optional[float]:
    """What integer pixels of ``dtype`` are divided by with ``rescale=None`` (None: not an integer type)."""
    if dtype == torch.bool:
        return 1.0
    if dtype in (torch.uint8, torch.int8):
        return EIGHT_BIT_MAX
    if dtype in (torch.uint16, torch.int16, torch.int32, torch.int64, torch.uint32, torch.uint64):
        return SIXTEEN_BIT_MAX
    return None


def scale_intensity(pixels: torch.Tensor, rescale: Optional[bool] = None, rescale_factor: float = 1 / 255
                    ) -> torch.Tensor:
    """Pixels to float32 as the model was trained: by bit depth (None), times ``rescale_factor`` (True), or as
    stored (False)."""
    if pixels.dtype in (torch.uint32, torch.uint64):
        pixels = pixels.to(torch.int64)
    if rescale is True:
        return pixels.to(torch.float32) * float(rescale_factor)
    if rescale is False:
        return pixels.to(torch.float32)
    divisor = integer_divisor(pixels.dtype)
    if divisor is None:
        return pixels.to(torch.float32)
    if pixels.dtype in (torch.int32, torch.int64) and pixels.numel():
        low, high = int(pixels.min()), int(pixels.max())
        if low < -SIXTEEN_BIT_MAX or high > SIXTEEN_BIT_MAX:
            raise PixelError(f"the {str(pixels.dtype).replace('torch.', '')} image holds values from {low} to "
                             f"{high}, beyond 16 bits, so there is no fixed scale for it; convert it to float32 "
                             "in the range the model was trained on (e.g. [0, 1]), or save it as 8 or 16 bits")
    return pixels.to(torch.float32) / divisor


def check_finite(pixels: torch.Tensor, what: str = "the image") -> torch.Tensor:
    """Refuse NaN or infinite pixels: one of them makes every logit of the image NaN."""
    if pixels.is_floating_point():
        bad = int((~torch.isfinite(pixels)).sum())
        if bad:
            raise PixelError(f"{what} holds {bad} NaN or infinite value{'s' if bad != 1 else ''} (of "
                             f"{pixels.numel()}); they would make every prediction NaN. Replace them, e.g. "
                             "numpy.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)")
    return pixels


# --- 4. channels -----------------------------------------------------------------------------------------------
def convert_channels(pixels: torch.Tensor, num_channels: int) -> Tuple[torch.Tensor, Optional[str]]:
    """``(pixels with num_channels channels, note)``: grey repeated for an RGB model, RGB to luma for a grey
    one (the note says which); other mismatches raise :class:`PixelError`."""
    channels = pixels.shape[0]
    if channels == num_channels:
        return pixels, None
    notes = []
    if channels == 4 and num_channels < channels:  # RGBA (PIL's grey+alpha was made grey when read)
        pixels, channels = pixels[:3], 3
        notes.append("alpha channel dropped")
    if channels == num_channels:
        return pixels, notes[0]
    if channels == 1 and num_channels == 3:
        notes.append("grey image repeated to 3 channels because the model takes RGB")
        return pixels.expand(3, -1, -1).contiguous(), "; ".join(notes)
    if channels == 3 and num_channels == 1:
        equal = bool((pixels == pixels[:1]).all())
        weights = torch.tensor(LUMA, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
        grey = (pixels * weights).sum(0, keepdim=True)
        how = "its channels are equal, so nothing is lost" if equal else "luma 0.299 R + 0.587 G + 0.114 B"
        notes.append(f"RGB image converted to grey because the model takes 1 channel ({how})")
        return grey, "; ".join(notes)
    channels = pixels.shape[0] + len(notes)
    stack = ("; a 3-D array is read as one image, (H, W, C) or (C, H, W): a stack of slices is a volume, "
             "for predict_volume" if channels > 4 else "")
    raise PixelError(f"the image has {channels} channel{'s' if channels != 1 else ''} but the model takes "
                     f"{num_channels} (config.in_channels) and there is no unambiguous conversion; give "
                     f"{num_channels}-channel images or use a model trained on this kind of image{stack}")


# --- 5-6. geometry and normalisation -------------------------------------------------------------------------
def resize_image(pixels: torch.Tensor, size: Optional[Sequence[int]]) -> torch.Tensor:
    """Bilinear, antialiased resize of float (C, H, W) or (B, C, H, W) pixels to ``size`` (None: unchanged)."""
    if size is None or tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    batch = pixels[None] if pixels.ndim == 3 else pixels
    out = F.interpolate(batch, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0] if pixels.ndim == 3 else out


def normalize(pixels: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
              ) -> torch.Tensor:
    """(pixels - mean) / std per channel of (C, H, W) or (B, C, H, W) pixels; unchanged without a mean."""
    if mean is None:
        return pixels
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).reshape(-1, 1, 1)
    channels = pixels.shape[-3]
    if mean_t.shape[0] not in (1, channels) or std_t.shape[0] not in (1, channels):
        raise PixelError(f"image_mean / image_std have {mean_t.shape[0]} / {std_t.shape[0]} values for an image "
                         f"with {channels} channels; give one value or one per channel")
    return (pixels - mean_t) / std_t


# --- the settings ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixelConfig:
    """Every setting of the pixel path, as a model's ``preprocessor_config.json`` records it.

    ``size``: (height, width) to resize to, or None for the image's own size. ``rescale``/``rescale_factor``:
    see :func:`scale_intensity`. ``image_mean``/``image_std``: per-channel normalisation, or None.
    """

    num_channels: int = 1
    size: Optional[Tuple[int, int]] = None
    rescale: Optional[bool] = None
    rescale_factor: float = 1 / 255
    image_mean: Optional[Tuple[float, ...]] = None
    image_std: Optional[Tuple[float, ...]] = None
    source: str = field(default="defaults", compare=False)

    @property
    def rescale_mode(self) -> str:
        """How integer pixels are scaled, in words (for logs and model cards)."""
        if self.rescale is None:
            return "integers by bit depth (8-bit / 255, 16-bit / 65535), floats as stored"
        return f"every input times {self.rescale_factor:g}" if self.rescale else "values as stored"

    def __post_init__(self):
        if int(self.num_channels) < 1:
            raise PixelError(f"num_channels must be positive, got {self.num_channels}")
        if self.size is not None and (len(self.size) != 2 or min(int(s) for s in self.size) < 1):
            raise PixelError(f"size must be a positive (height, width), got {self.size}")

    @classmethod
    def from_processor_dict(cls, settings: dict, num_channels: Optional[int] = None,
                            source: str = "preprocessor_config.json") -> "PixelConfig":
        """From an image processor's settings (``processor.to_dict()`` or the JSON file); ``num_channels``
        (the model's ``in_channels``) wins over the file's. Settings it lacks take the processor's defaults."""
        settings = {**PROCESSOR_DEFAULTS, **{k: v for k, v in settings.items() if v is not None or k == "do_rescale"}}
        channels = int(num_channels if num_channels is not None else settings.get("num_channels", 1))
        size = None
        if settings["do_resize"] and settings.get("size") is not None:
            size = _parse_size(settings["size"], source)
        mean = std = None
        if settings.get("do_normalize", False):
            mean = _per_channel(settings.get("image_mean", 0.0), channels, "image_mean", source)
            std = _per_channel(settings.get("image_std", 1.0), channels, "image_std", source)
        rescale = settings.get("do_rescale")
        return cls(num_channels=channels, size=size, rescale=None if rescale is None else bool(rescale),
                   rescale_factor=float(settings.get("rescale_factor", 1 / 255)), image_mean=mean, image_std=std,
                   source=source)

    from_dict = from_processor_dict

    def to_processor_kwargs(self) -> dict:
        """Keyword arguments of ``RWKVUNetImageProcessor`` that reproduce these settings."""
        kwargs = dict(num_channels=self.num_channels, do_rescale=self.rescale, rescale_factor=self.rescale_factor,
                      do_resize=self.size is not None, do_normalize=self.image_mean is not None)
        if self.size is not None:
            kwargs["size"] = {"height": int(self.size[0]), "width": int(self.size[1])}
        if self.image_mean is not None:
            kwargs.update(image_mean=list(self.image_mean), image_std=list(self.image_std))
        return kwargs

    # the path, step by step -----------------------------------------------------------------------------
    def to_float(self, image: ImageLike, channel_axis: Optional[int] = None, what: str = "the image"
                 ) -> Tuple[torch.Tensor, Optional[str]]:
        """Steps 1-4: ``((num_channels, H, W) float32 at the image's size, channel note)``."""
        pixels = scale_intensity(read_pixels(image, channel_axis), self.rescale, self.rescale_factor)
        check_finite(pixels, what)
        return convert_channels(pixels, self.num_channels)

    def finish(self, pixels: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """Steps 5-6 on float pixels: resize to ``size`` (when ``resize``) and normalise."""
        if resize:
            pixels = resize_image(pixels, self.size)
        return normalize(pixels, self.image_mean, self.image_std)

    def __call__(self, image: ImageLike, resize: bool = True, channel_axis: Optional[int] = None) -> torch.Tensor:
        """The whole path: (num_channels, h, w) float32 model input of one image."""
        return self.finish(self.to_float(image, channel_axis)[0], resize=resize)


def _parse_size(raw, source: str) -> Optional[Tuple[int, int]]:
    if isinstance(raw, (int, np.integer)):
        return int(raw), int(raw)
    if isinstance(raw, dict):
        if raw.get("height") and raw.get("width"):
            return int(raw["height"]), int(raw["width"])
        if raw.get("shortest_edge") or raw.get("longest_edge"):
            raise PixelError(f"{source}: size {raw!r} keeps the aspect ratio, which this model's processor does "
                             'not do; set size to {"height": H, "width": W}')
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        return int(raw[0]), int(raw[1])
    raise PixelError(f'{source}: size {raw!r} is not a height and width; set size to {{"height": H, "width": W}}')


def _per_channel(value, channels: int, name: str, source: str) -> Tuple[float, ...]:
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(values) == 1:
        return tuple(values * channels)
    if len(values) == channels:
        return tuple(values)
    raise PixelError(f"{source}: {name} has {len(values)} values but the model takes {channels} channel"
                     f"{'s' if channels != 1 else ''}; give one value or one per channel")


# --- volumes ---------------------------------------------------------------------------------------------------
def ct_window(volume: np.ndarray, window: Tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """Clip to ``[low, high]`` (e.g. Hounsfield units) and scale to [0, 1], as the Synapse slices were made."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise PixelError(f"the intensity window must have low < high, got {tuple(window)}")
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def minmax_scale(volume: np.ndarray) -> np.ndarray:
    """Per-volume min-max scaling to [0, 1] (MRI, whose intensities have no absolute unit)."""
    volume = np.asarray(volume, dtype=np.float32)
    lo, hi = (float(volume.min()), float(volume.max())) if volume.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros_like(volume)
    return (volume - lo) / (hi - lo)


def choose_intensity(volume: np.ndarray) -> str:
    """``"ct"`` when the volume holds air in Hounsfield units (values below -500), else ``"minmax"``."""
    volume = np.asarray(volume)
    return "ct" if volume.size and float(np.nanmin(volume)) < CT_AIR_THRESHOLD else "minmax"


def clean_volume(volume: np.ndarray) -> Tuple[np.ndarray, Optional[str]]:
    """``(volume with NaN and infinite voxels set to 0, note or None)``: scanners write NaN outside the field
    of view, and a NaN voxel would make its whole slice NaN."""
    volume = np.asarray(volume)
    if not np.issubdtype(volume.dtype, np.floating):
        return volume, None
    bad = ~np.isfinite(volume)
    count = int(bad.sum())
    if not count:
        return volume, None
    volume = np.where(bad, 0.0, volume).astype(volume.dtype)
    return volume, f"{count} NaN or infinite voxel{'s' if count != 1 else ''} set to 0"


def prepare_volume(volume: np.ndarray, intensity: Union[str, Tuple[float, float], None] = "auto"
                   ) -> Tuple[np.ndarray, str]:
    """``(volume scaled to [0, 1] as float32, description)`` for ``intensity`` = ``"ct"`` (window -125..275),
    ``(low, high)`` (another window), ``"minmax"``, ``"auto"`` (see :func:`choose_intensity`) or ``None``
    (left as it is). NaN and infinite voxels become 0 first, and the description says so."""
    volume, note = clean_volume(volume)
    suffix = f"; {note}" if note else ""
    if intensity is None or intensity == "none":
        return np.asarray(volume, dtype=np.float32), "intensities used as stored" + suffix
    if isinstance(intensity, str) and intensity == "auto":
        intensity = choose_intensity(volume)
    if isinstance(intensity, str):
        if intensity == "ct":
            return ct_window(volume, CT_WINDOW), f"CT window [{CT_WINDOW[0]:g}, {CT_WINDOW[1]:g}] scaled to " \
                                                 f"[0, 1]{suffix}"
        if intensity == "minmax":
            return minmax_scale(volume), "per-volume min-max scaled to [0, 1]" + suffix
        raise PixelError(f"intensity must be 'auto', 'ct', 'minmax', None or a (low, high) window, got "
                         f"{intensity!r}")
    low, high = intensity
    return ct_window(volume, (low, high)), f"window [{low:g}, {high:g}] scaled to [0, 1]{suffix}"


__all__ = [
    "CT_AIR_THRESHOLD", "CT_WINDOW", "LUMA", "PROCESSOR_DEFAULTS", "PixelConfig", "PixelError", "check_finite", "choose_intensity",
    "clean_volume", "convert_channels", "ct_window", "integer_divisor", "minmax_scale", "normalize",
    "pil_to_array", "prepare_volume", "read_pixels", "resize_image", "scale_intensity",
]
