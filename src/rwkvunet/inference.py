"""Segmenting users' images and volumes with a trained model.

:class:`Segmenter` wraps a saved segmenter (a folder written by ``save_pretrained`` or a Hub id) with the
intensity preparation it was trained with, and predicts label maps for 2-D images (whole, resized to the
training size, or in overlapping tiles blended together so memory depends on the tile size only) and for
3-D volumes (slice by slice along an axis, batched across slices). Flip test-time augmentation averages the
class probabilities of the flipped inputs. :func:`predict` is the one-call version.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .inference_io import InputError

#: Abdominal CT window of the Synapse preprocessing (Hounsfield units).
CT_WINDOW = (-125.0, 275.0)
#: Volumes whose darkest voxels lie below this are taken for CT in Hounsfield units by ``intensity="auto"``.
CT_AIR_THRESHOLD = -500.0
#: Flips averaged by test-time augmentation: none, left-right, up-down (dims of a (B, C, H, W) tensor).
TTA_FLIPS: Tuple[Tuple[int, ...], ...] = ((), (3,), (2,))

ImageLike = Union[np.ndarray, "PIL.Image.Image", torch.Tensor]  # noqa: F821


class InputConversionWarning(UserWarning):
    """An input was converted to fit the model (e.g. RGB to grey)."""


# --- intensity preparation -----------------------------------------------------------------------------------
def ct_window(volume: np.ndarray, window: Tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """Clip to ``[low, high]`` (e.g. Hounsfield units) and scale to [0, 1], as the Synapse slices were made."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise ValueError(f"the intensity window must have low < high, got {window}")
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
    return "ct" if volume.size and float(volume.min()) < CT_AIR_THRESHOLD else "minmax"


def prepare_volume(volume: np.ndarray, intensity: Union[str, Tuple[float, float], None] = "auto"
                   ) -> Tuple[np.ndarray, str]:
    """``(scaled volume in [0, 1], description)`` for ``intensity`` = ``"ct"`` (window -125..275),
    ``(low, high)`` (another window), ``"minmax"``, ``"auto"`` (see :func:`choose_intensity`) or ``None``
    (left as it is)."""
    if intensity is None or intensity == "none":
        return np.asarray(volume, dtype=np.float32), "intensities used as stored"
    if isinstance(intensity, str) and intensity == "auto":
        intensity = choose_intensity(volume)
    if isinstance(intensity, str):
        if intensity == "ct":
            return ct_window(volume, CT_WINDOW), f"CT window [{CT_WINDOW[0]:g}, {CT_WINDOW[1]:g}] scaled to [0, 1]"
        if intensity == "minmax":
            return minmax_scale(volume), "per-volume min-max scaled to [0, 1]"
        raise ValueError(f"intensity must be 'auto', 'ct', 'minmax', None or a (low, high) window, got {intensity!r}")
    low, high = intensity
    return ct_window(volume, (low, high)), f"window [{low:g}, {high:g}] scaled to [0, 1]"


# --- channels ------------------------------------------------------------------------------------------------
def match_channels(image: np.ndarray, in_channels: int) -> Tuple[np.ndarray, Optional[str]]:
    """``(image as (H, W, in_channels), note)``: grey is repeated for an RGB model and RGB reduced to luma
    (ITU-R 601, as Pillow's ``"L"``) for a grey one, with a note saying so; other mismatches raise."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise InputError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    notes = []
    if arr.shape[-1] == 4 and in_channels in (1, 3):
        arr, notes = arr[..., :3], ["alpha channel dropped"]
    channels = arr.shape[-1]
    if channels == in_channels:
        return arr, (notes[0] if notes else None)
    if channels == 1 and in_channels == 3:
        return np.repeat(arr, 3, axis=-1), "; ".join(
            notes + ["grey image repeated to 3 channels because the model takes RGB"])
    if channels == 3 and in_channels == 1:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float64)
        grey = (arr.astype(np.float64) * weights).sum(-1, keepdims=True)
        if np.issubdtype(arr.dtype, np.integer):
            grey = np.clip(np.round(grey), np.iinfo(arr.dtype).min, np.iinfo(arr.dtype).max)
        equal = bool((arr == arr[..., :1]).all())
        how = "its channels are equal, so nothing is lost" if equal else "luma 0.299 R + 0.587 G + 0.114 B"
        return grey.astype(arr.dtype), "; ".join(
            notes + [f"RGB image converted to grey because the model takes 1 channel ({how})"])
    raise InputError(f"the image has {channels} channel{'s' if channels != 1 else ''} but the model takes "
                     f"{in_channels} "
                     f"(config.in_channels) and there is no unambiguous conversion; give {in_channels}-channel "
                     "images or use a model trained on this kind of image")


# --- preprocessing settings ----------------------------------------------------------------------------------
@dataclass
class Preprocessing:
    """How pixels become model inputs, as ``RWKVUNetImageProcessor`` does it: optional resize to the training
    size, rescale, normalisation. Read from the model's ``preprocessor_config.json``; without one, the
    defaults: no resize (the model takes any size), integer images divided by their type's maximum (8-bit by
    255, 16-bit by 65535), floats kept, no normalisation.

    ``rescale``: ``"uint8"`` (8-bit inputs times ``rescale_factor``, the processor's ``do_rescale=None``),
    ``"all"`` (every input times ``rescale_factor``), ``"none"`` or ``"dtype-max"`` (the default above).
    """

    size: Optional[Tuple[int, int]] = None
    rescale: str = "dtype-max"
    rescale_factor: float = 1 / 255
    image_mean: Optional[Tuple[float, ...]] = None
    image_std: Optional[Tuple[float, ...]] = None
    source: str = "defaults"

    @classmethod
    def from_dict(cls, settings: dict, in_channels: int, source: str = "preprocessor_config.json"
                  ) -> "Preprocessing":
        size = None
        if settings.get("do_resize", False) and settings.get("size") is not None:
            raw = settings["size"]
            if isinstance(raw, int):
                size = (raw, raw)
            elif isinstance(raw, dict) and raw.get("height") and raw.get("width"):
                size = (int(raw["height"]), int(raw["width"]))
            elif isinstance(raw, (list, tuple)) and len(raw) == 2:
                size = (int(raw[0]), int(raw[1]))
            else:
                raise ValueError(f"{source}: size {raw!r} is not a height and width; set size to "
                                 '{"height": H, "width": W}')
        mean = std = None
        if settings.get("do_normalize", False):
            mean = _per_channel(settings.get("image_mean", 0.0), in_channels, "image_mean", source)
            std = _per_channel(settings.get("image_std", 1.0), in_channels, "image_std", source)
        do_rescale = settings.get("do_rescale")
        rescale = "uint8" if do_rescale is None else ("all" if do_rescale else "none")
        return cls(size=size, rescale=rescale, rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
                   image_mean=mean, image_std=std, source=source)

    def scale(self, image: np.ndarray) -> np.ndarray:
        """Pixels to float32 as the model was trained."""
        arr = np.asarray(image)
        out = arr.astype(np.float32)
        if self.rescale == "all" or (self.rescale == "uint8" and arr.dtype == np.uint8):
            return out * np.float32(self.rescale_factor)
        if self.rescale == "dtype-max" and (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
            top = 1.0 if arr.dtype == np.bool_ else float(np.iinfo(arr.dtype).max)
            return out / np.float32(top)
        return out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float pixels minus mean over std, when the model was trained so."""
        if self.image_mean is None:
            return pixels
        mean = torch.tensor(self.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std


def _per_channel(value, channels: int, name: str, source: str) -> Tuple[float, ...]:
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(values) == 1:
        return tuple(values * channels)
    if len(values) == channels:
        return tuple(values)
    if channels == 1:
        return (float(np.mean(values)),)
    raise ValueError(f"{source}: {name} has {len(values)} values but the model takes {channels} channels")


def load_preprocessing(model_id: Union[str, os.PathLike], in_channels: int, **hub_kwargs) -> Preprocessing:
    """The model's image processor settings (through ``AutoImageProcessor``), or the defaults without one."""
    folder = Path(model_id)
    if folder.is_dir() and not (folder / "preprocessor_config.json").is_file():
        return Preprocessing(source="defaults (no preprocessor_config.json)")
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(model_id), **hub_kwargs)
        return Preprocessing.from_dict(processor.to_dict(), in_channels)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        if folder.is_dir():  # a processor class this version of transformers does not know: read its settings
            with open(folder / "preprocessor_config.json") as f:
                return Preprocessing.from_dict(json.load(f), in_channels)
        if isinstance(err, OSError):  # a Hub repo without a processor
            return Preprocessing(source="defaults (no preprocessor_config.json)")
        raise


# --- tiling --------------------------------------------------------------------------------------------------
def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_ramp(length: int, overlap: int) -> torch.Tensor:
    """Weights along one tile axis: rising linearly over ``overlap`` pixels at each end, so the seams of
    overlapping tiles fade into each other; never zero so image edges covered once keep their value."""
    if overlap <= 0:
        return torch.ones(length)
    pos = torch.arange(length, dtype=torch.float32) + 0.5
    return torch.minimum(pos, length - pos).div(overlap).clamp(1e-3, 1.0)


# --- the segmenter -------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
        return names[dtype]
    return dtype


class Segmenter:
    """A trained segmenter ready for users' images and volumes.

    Args:
        model: a transformers semantic segmentation model returning ``logits`` at the input size
            (``RWKVUNetForSemanticSegmentation``); it is put in eval mode on ``device``.
        preprocessing: the intensity settings it was trained with (defaults: see :class:`Preprocessing`).
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available, else CPU.
        dtype: autocast precision (a torch dtype or ``"fp32"``, ``"bf16"``, ``"fp16"``); default bfloat16 on
            CUDA (float16 on GPUs without bfloat16), float32 elsewhere. Probabilities are always float32.
        tta: average the probabilities over left-right and up-down flips.
        batch_size: slices or tiles per forward pass.
    """

    def __init__(self, model: torch.nn.Module, preprocessing: Optional[Preprocessing] = None,
                 device: Union[str, torch.device, None] = None, dtype=None, tta: bool = False,
                 batch_size: int = 8):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = _resolve_dtype(dtype, self.device)
        self.model = model.to(self.device).eval()
        self.preprocessing = preprocessing or Preprocessing()
        self.tta = bool(tta)
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def from_pretrained(cls, model_id_or_folder: Union[str, os.PathLike], device=None, dtype=None,
                        tta: bool = False, batch_size: int = 8, **hub_kwargs) -> "Segmenter":
        """Load a model folder (``save_pretrained``) or Hub id, with its image processor settings if any."""
        from transformers import AutoModelForSemanticSegmentation

        source = os.path.expanduser(str(model_id_or_folder))
        if not os.path.exists(source) and (source.startswith(("/", ".", "~")) or source.count("/") > 1
                                           or "\\" in source):
            raise OSError(f"{source} does not exist (and is not a Hub id of the form 'org/name'); check the path")
        if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
            raise OSError(f"{source} has no config.json; give a folder written by save_pretrained or a Hub id")
        try:
            model = AutoModelForSemanticSegmentation.from_pretrained(source, **hub_kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise OSError(f"cannot load a segmentation model from {source!r}: {err}") from err
        preprocessing = load_preprocessing(source, _in_channels(model.config), **hub_kwargs)
        return cls(model, preprocessing, device=device, dtype=dtype, tta=tta, batch_size=batch_size)

    # --- model facts ---------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def in_channels(self) -> int:
        return _in_channels(self.config)

    @property
    def num_labels(self) -> int:
        return int(self.config.num_labels)

    @property
    def num_classes(self) -> int:
        """Classes in the label maps: 2 (background, foreground) for a one-logit binary model."""
        return max(self.num_labels, 2)

    @property
    def id2label(self) -> dict:
        return dict(getattr(self.config, "id2label", {}) or {})

    @property
    def label_names(self) -> dict:
        """Name of each value in the label maps (a one-logit model's foreground is 1)."""
        names = {int(k): str(v) for k, v in self.id2label.items()}
        if self.num_labels == 1:
            return {0: "background", 1: names.get(0, "foreground")}
        return {i: names.get(i, f"class {i}") for i in range(self.num_labels)}

    # --- pixels --------------------------------------------------------------------------------------------
    def to_pixels(self, image: ImageLike) -> Tuple[torch.Tensor, Optional[str]]:
        """``((1, C, H, W) float model input, channel note)`` for an image array / PIL image / tensor."""
        arr = self.preprocessing.scale(_as_array(image))  # scaled before any luma, as the image processor does
        arr, note = match_channels(arr, self.in_channels)
        pixels = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None]
        return self.preprocessing.normalize(pixels), note

    # --- probabilities -------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def forward_probs(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, K, H, W) float32 of model inputs (B, C, H, W), at their size and on the
        model's device: softmax, or a sigmoid for a one-logit model; with TTA the mean over the flips."""
        pixels = pixels.to(self.device, torch.float32)
        flips = TTA_FLIPS if self.tta else ((),)
        total = None
        for dims in flips:
            x = pixels.flip(dims) if dims else pixels
            with self._autocast():
                logits = self.model(pixel_values=x).logits
            logits = logits.float()
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(dim=1)
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total + probs
        return total / len(flips)

    def _resized_probs(self, pixels: torch.Tensor, size: Optional[Tuple[int, int]]) -> torch.Tensor:
        """Probabilities at the input size, the model run at ``size`` (None: at the input size)."""
        height, width = pixels.shape[-2:]
        if size is None or tuple(size) == (height, width):
            return self.forward_probs(pixels)
        x = F.interpolate(pixels.to(self.device, torch.float32), size=tuple(size), mode="bilinear",
                          align_corners=False, antialias=True)
        probs = self.forward_probs(x)
        return F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False, antialias=True)

    @torch.inference_mode()
    def tiled_probs(self, pixels: torch.Tensor, tile: int = 512, overlap: int = 64) -> torch.Tensor:
        """Probabilities (1, K, H, W) on the CPU of one large input predicted in ``tile`` x ``tile`` windows that
        overlap by ``overlap`` pixels and are blended with linear ramps; the device holds at most
        ``batch_size`` tiles."""
        if pixels.shape[0] != 1:
            raise ValueError("tiled prediction takes one image at a time")
        if tile < 16 or not 0 <= overlap < tile:
            raise ValueError(f"need tile >= 16 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        height, width = pixels.shape[-2:]
        th, tw = min(tile, height), min(tile, width)
        windows = [(y, x) for y in tile_starts(height, th, overlap) for x in tile_starts(width, tw, overlap)]
        weight = (blend_ramp(th, min(overlap, th // 2))[:, None] * blend_ramp(tw, min(overlap, tw // 2))[None])
        acc = None
        weight_sum = torch.zeros(height, width)
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start:start + self.batch_size]
            crops = torch.cat([pixels[..., y:y + th, x:x + tw] for y, x in batch])
            probs = self.forward_probs(crops).cpu()
            if acc is None:
                acc = torch.zeros(probs.shape[1], height, width)
            for (y, x), p in zip(batch, probs):
                acc[:, y:y + th, x:x + tw] += p * weight
                weight_sum[y:y + th, x:x + tw] += weight
        return (acc / weight_sum)[None]

    def predict_proba(self, image: ImageLike, tile: Optional[int] = None, overlap: int = 64,
                      native: bool = False) -> np.ndarray:
        """Class probabilities (K, H, W) float32 at the image's size (K = 1 for a one-logit binary model).

        By default the image is resized to the training size when the processor says so (probabilities
        resized back bilinearly), else run whole. ``native`` runs it whole at its own size; ``tile`` runs it
        at its own size in overlapping tiles.
        """
        pixels, note = self.to_pixels(image)
        if note:
            warnings.warn(note, InputConversionWarning, stacklevel=2)
        return self._pixels_proba(pixels, tile, overlap, native)[0].numpy()

    def _pixels_proba(self, pixels: torch.Tensor, tile: Optional[int], overlap: int, native: bool) -> torch.Tensor:
        if tile:
            return self.tiled_probs(pixels, tile, overlap)
        size = None if native else self.preprocessing.size
        return self._resized_probs(pixels, size).cpu()

    def predict_image(self, image: ImageLike, tile: Optional[int] = None, overlap: int = 64,
                      native: bool = False) -> np.ndarray:
        """Label map (H, W) uint8 of one image (array (H, W) / (H, W, C), PIL image or (C, H, W) tensor)."""
        return labels_from_probs(self.predict_proba(image, tile=tile, overlap=overlap, native=native))

    def predict_volume(self, volume: np.ndarray, axis: int = 2, batch_size: Optional[int] = None,
                       intensity: Union[str, Tuple[float, float], None] = "auto", native: bool = False,
                       tile: Optional[int] = None, overlap: int = 64, progress: bool = False) -> np.ndarray:
        """Label volume (uint8, the volume's shape) predicted slice by slice along ``axis``.

        ``intensity`` prepares the voxels as the training slices were: ``"ct"`` (window -125..275 HU to
        [0, 1]), ``(low, high)``, ``"minmax"`` (per volume), ``"auto"`` (CT when the volume holds air in HU,
        else min-max) or ``None`` (already prepared). Slices are resized to the training size when the
        processor says so (probabilities resized back bilinearly, then argmax) unless ``native``.
        """
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise InputError(f"expected a 3-D volume, got shape {volume.shape}")
        axis = _check_axis(axis, volume.ndim)
        prepared, _ = prepare_volume(volume, intensity)
        slices = np.moveaxis(prepared, axis, 0)
        labels = np.zeros(slices.shape, dtype=np.uint8)
        step = max(1, int(batch_size or self.batch_size))
        bar = _progress(progress, total=slices.shape[0], unit="slice")
        for start in range(0, slices.shape[0], step):
            chunk = slices[start:start + step]
            pixels = torch.from_numpy(np.ascontiguousarray(chunk))[:, None]
            if self.in_channels != 1:
                arr, note = match_channels(chunk[0], self.in_channels)  # raises when ambiguous
                pixels = pixels.expand(-1, arr.shape[-1], -1, -1)
                if start == 0:
                    warnings.warn(f"volume slices: {note}", InputConversionWarning, stacklevel=2)
            pixels = self.preprocessing.normalize(pixels.float())
            if tile:
                probs = torch.cat([self.tiled_probs(p[None], tile, overlap) for p in pixels])
            else:
                probs = self._resized_probs(pixels, None if native else self.preprocessing.size).cpu()
            labels[start:start + len(chunk)] = labels_from_probs(probs.numpy(), axis=1)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return np.moveaxis(labels, 0, axis)


def labels_from_probs(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """uint8 labels: argmax over classes, or foreground where the one-logit probability exceeds 0.5."""
    probs = np.asarray(probs)
    if probs.shape[axis] == 1:
        return (np.take(probs, 0, axis=axis) > 0.5).astype(np.uint8)
    labels = probs.argmax(axis=axis)
    return labels.astype(np.uint8 if probs.shape[axis] <= 256 else np.uint16)


def _in_channels(config) -> int:
    return int(getattr(config, "in_channels", getattr(config, "num_channels", 3)))


def _check_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be between {-ndim} and {ndim - 1} for a {ndim}-D volume, got {axis}")
    return axis % ndim


def _as_array(image: ImageLike) -> np.ndarray:
    if torch.is_tensor(image):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        return t.numpy()
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        if image.mode in ("P", "PA", "RGBA", "CMYK"):
            image = image.convert("RGB")
        elif image.mode in ("LA", "1"):
            image = image.convert("L")
        return np.asarray(image)
    return np.asarray(image)


def _progress(enabled: bool, total: int, unit: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, leave=False)


def predict(model: Union[str, os.PathLike, Segmenter], inputs, *, device=None, dtype=None, tta: bool = False,
            axis: int = 2, intensity: Union[str, Tuple[float, float], None] = "auto", tile: Optional[int] = None,
            overlap: int = 64, native: bool = False, batch_size: int = 8):
    """Label maps in one call.

    ``model`` is a folder, Hub id or :class:`Segmenter`; ``inputs`` an image array / PIL image, a path to an
    image or NIfTI file, or a list of these (then a list comes back). Volumes (3-D arrays are images only
    when their last axis has 1, 3 or 4 channels) are predicted slice by slice along ``axis``.
    """
    seg = model if isinstance(model, Segmenter) else Segmenter.from_pretrained(
        model, device=device, dtype=dtype, tta=tta, batch_size=batch_size)
    many = isinstance(inputs, (list, tuple))
    results = [_predict_one(seg, item, axis, intensity, tile, overlap, native, batch_size)
               for item in (inputs if many else [inputs])]
    return results if many else results[0]


def _predict_one(seg: Segmenter, item, axis, intensity, tile, overlap, native, batch_size) -> np.ndarray:
    from . import inference_io

    if isinstance(item, (str, os.PathLike)):
        kind = inference_io.file_kind(item)
        if not Path(item).is_file():
            raise InputError(f"{item}: no such file; check the path")
        if kind == "volume":
            data, _ = inference_io.read_volume(item)
            return seg.predict_volume(data, axis=axis, batch_size=batch_size, intensity=intensity,
                                      native=native, tile=tile, overlap=overlap)
        if kind is None:
            raise InputError(f"{item}: unsupported format; use one of {inference_io.supported_formats()}")
        item = inference_io.read_image(item)
    arr = _as_array(item)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4):
        return seg.predict_volume(arr, axis=axis, batch_size=batch_size, intensity=intensity, native=native,
                                  tile=tile, overlap=overlap)
    return seg.predict_image(arr, tile=tile, overlap=overlap, native=native)


__all__ = [
    "CT_WINDOW", "TTA_FLIPS", "InputConversionWarning", "Preprocessing", "Segmenter", "blend_ramp",
    "choose_intensity", "ct_window", "labels_from_probs", "load_preprocessing", "match_channels",
    "minmax_scale", "predict", "prepare_volume", "tile_starts",
]
