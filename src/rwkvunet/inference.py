"""Segmenting users' images and volumes with a trained model.

:class:`Segmenter` wraps a saved segmenter (a folder written by ``save_pretrained`` or a Hub id) with the
intensity preparation it was trained with, and predicts label maps for 2-D images (whole, resized to the
training size, or in overlapping tiles blended together so memory depends on the tile size only) and for
3-D volumes (slice by slice along an axis, batched across slices). Flip test-time augmentation averages the
class probabilities of the flipped inputs. :func:`predict` is the one-call version.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from .backends import OnnxRuntimeSegmenter, check_backend, inference_model, is_onnx_file
from .errors import UserError
from .inference_io import InputError
from .pixels import (CT_AIR_THRESHOLD, CT_WINDOW, PixelConfig, PixelError, choose_intensity, convert_channels,  # noqa: F401
                     ct_window, minmax_scale, prepare_volume, resize_image)

#: Flips averaged by test-time augmentation: none, left-right, up-down (dims of a (B, C, H, W) tensor).
TTA_FLIPS: Tuple[Tuple[int, ...], ...] = ((), (3,), (2,))

ImageLike = Union[np.ndarray, "PIL.Image.Image", torch.Tensor]  # noqa: F821

#: The settings a Segmenter applies to pixels (kept under this name for existing code).
Preprocessing = PixelConfig


class InputConversionWarning(UserWarning):
    """An input was converted to fit the model (e.g. RGB to grey, NaN voxels set to 0)."""


# --- channels ------------------------------------------------------------------------------------------------
def match_channels(image: np.ndarray, in_channels: int) -> Tuple[np.ndarray, Optional[str]]:
    """``(image as (H, W, in_channels), note)`` by the rules of :func:`rwkvunet.pixels.convert_channels` (alpha
    dropped, grey repeated, RGB to luma), in the image's dtype (integers rounded); other mismatches raise."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise InputError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    pixels = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).permute(2, 0, 1)
    try:
        converted, note = convert_channels(pixels, in_channels)
    except PixelError as err:
        raise InputError(str(err)) from err
    out = converted.permute(1, 2, 0).numpy()
    if np.issubdtype(arr.dtype, np.integer):
        out = np.clip(np.round(out), np.iinfo(arr.dtype).min, np.iinfo(arr.dtype).max)
    return out.astype(arr.dtype), note


# --- preprocessing settings ----------------------------------------------------------------------------------
def load_preprocessing(model_id: Union[str, os.PathLike], in_channels: int, **hub_kwargs) -> PixelConfig:
    """The model's image processor settings (``preprocessor_config.json``), or the defaults without one (no
    resize, integers by bit depth, floats as stored, no normalisation). ``in_channels`` is the model's."""
    folder = Path(model_id)
    if folder.is_dir():
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return PixelConfig(num_channels=in_channels, source="defaults (no preprocessor_config.json)")
        return PixelConfig.from_processor_dict(_read_json(path), in_channels, source=str(path))
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(str(model_id), "preprocessor_config.json", **_hub_download_kwargs(hub_kwargs))
    except OSError:  # a Hub repo without a processor (EntryNotFoundError is an OSError)
        return PixelConfig(num_channels=in_channels, source="defaults (no preprocessor_config.json)")
    return PixelConfig.from_processor_dict(_read_json(Path(path)), in_channels,
                                           source=f"{model_id}/preprocessor_config.json")


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the image processor settings ({err}); fix or delete the file "
                         "(without it the model gets unresized, bit-depth-scaled pixels)") from err
    if not isinstance(settings, dict):
        raise InputError(f"{path}: expected a JSON object of image processor settings")
    return settings


def _hub_download_kwargs(kwargs: dict) -> dict:
    keys = ("revision", "cache_dir", "token", "local_files_only", "force_download")
    return {k: v for k, v in kwargs.items() if k in keys}


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


def _onnxruntime_device(device, dtype) -> torch.device:
    """ONNX Runtime runs here on the CPU in float32: the device to use, or a UserError for anything else."""
    if device is not None and torch.device(device).type != "cpu":
        raise UserError(f"the onnxruntime backend runs on the CPU; use device 'cpu' (not {device}) or the eager "
                        "backend")
    if dtype is not None and _resolve_dtype(dtype, torch.device("cpu")) != torch.float32:
        raise UserError(f"the onnxruntime backend runs in float32; use dtype fp32 (not {dtype}) or the eager backend")
    return torch.device("cpu")


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


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")


def _device(device) -> torch.device:
    """``torch.device(device)``, with a message that names the choices instead of torch's list of every type."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N' (or another torch device, "
                         "e.g. 'mps')") from err


def default_overlap(tile: int) -> int:
    """Pixels neighbouring tiles share when none is given: 64, or a quarter of a smaller tile."""
    return min(64, tile // 4)


class Segmenter:
    """A trained segmenter ready for users' images and volumes.

    Args:
        model: a transformers semantic segmentation model returning ``logits`` at the input size
            (``RWKVUNetForSemanticSegmentation``); it is put in eval mode on ``device`` and kept unchanged as
            :attr:`model` (its ``state_dict`` saves and loads as usual). Predictions run a copy of it made here
            with ``timm.utils.reparameterize_model`` (BatchNorm folded into the convolutions, same outputs to
            float rounding), :attr:`inference_model` (the backend's module, see ``backend``); later changes to :attr:`model`'s weights are not seen by
            it, so build a new ``Segmenter`` after editing them.
        preprocessing: the pixel settings it was trained with, a :class:`rwkvunet.pixels.PixelConfig`
            (default: no resize, integers by bit depth, floats as stored, no normalisation); its channel
            count is the model's ``config.in_channels``.
        device: ``"cuda"``, ``"cpu"``, ...; default CUDA when available, else CPU.
        dtype: autocast precision (a torch dtype or ``"fp32"``, ``"bf16"``, ``"fp16"``); default bfloat16 on
            CUDA (float16 on GPUs without bfloat16), float32 elsewhere. Probabilities are always float32.
        tta: average the probabilities over left-right and up-down flips.
        batch_size: slices or tiles per forward pass.
        backend: where predictions run (:data:`rwkvunet.backends.BACKENDS`): ``"eager"`` (default), ``"compile"``
            (``torch.compile``) or ``"onnxruntime"`` (the model exported to ONNX, checked against PyTorch, and
            run by ONNX Runtime on the CPU in float32; ``model`` may also be an
            :class:`rwkvunet.backends.OnnxRuntimeSegmenter`).
    """

    def __init__(self, model: torch.nn.Module, preprocessing: Optional[Preprocessing] = None,
                 device: Union[str, torch.device, None] = None, dtype=None, tta: bool = False,
                 batch_size: int = 8, backend: str = "eager"):
        self.backend = check_backend(backend)
        _check_batch_size(batch_size)  # 0 and negatives were taken as 1
        if backend == "onnxruntime":
            device = _onnxruntime_device(device, dtype)
        self.device = _device(device) if device is not None else default_device()
        self.dtype = _resolve_dtype(dtype, self.device)
        self.model = model.to(self.device).eval()
        self.inference_model = inference_model(self.model, backend)  # self.model stays loadable
        channels = _in_channels(model.config) if hasattr(model, "config") else None
        preprocessing = preprocessing or PixelConfig(num_channels=channels or 1)
        if channels is not None and preprocessing.num_channels != channels:
            preprocessing = dataclasses.replace(preprocessing, num_channels=channels)
        self.preprocessing = preprocessing
        self.tta = bool(tta)
        self.batch_size = int(batch_size)

    @classmethod
    def from_pretrained(cls, model_id_or_folder: Union[str, os.PathLike], device=None, dtype=None,
                        tta: bool = False, batch_size: int = 8, backend: Optional[str] = None,
                        **hub_kwargs) -> "Segmenter":
        """Load a model folder (``save_pretrained``) or Hub id, with its image processor settings if any, or an
        ``.onnx`` file written by ``rwkvunet export`` (run by ONNX Runtime); a path, config or weights file the
        user can fix raises :class:`rwkvunet.errors.UserError`. ``backend`` defaults to ``"eager"``, and to
        ``"onnxruntime"`` for an ``.onnx`` file."""
        from .hub import load_segmentation_model

        source = os.path.expanduser(str(model_id_or_folder))
        if is_onnx_file(source):
            if backend not in (None, "onnxruntime"):
                raise UserError(f"{source} is an exported ONNX model: it runs with the onnxruntime backend, not "
                                f"{backend}")
            model = OnnxRuntimeSegmenter.from_file(source)
            return cls(model, model.pixels, device=device, dtype=dtype, tta=tta, batch_size=batch_size,
                       backend="onnxruntime")
        backend = backend or "eager"
        model = load_segmentation_model(source, **hub_kwargs)
        preprocessing = load_preprocessing(source, _in_channels(model.config), **hub_kwargs)
        return cls(model, preprocessing, device=device, dtype=dtype, tta=tta, batch_size=batch_size,
                   backend=backend)

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
        """``((1, C, H, W) float32 pixels at the image's size, channel note)``: scaled and channel-converted
        by :class:`rwkvunet.pixels.PixelConfig`, not yet resized or normalised (see :meth:`model_input`)."""
        pixels, note = self.preprocessing.to_float(image)
        return pixels[None], note

    def model_input(self, image: ImageLike, native: bool = False) -> torch.Tensor:
        """(1, C, h, w): exactly what the model sees for ``image`` (resized unless ``native``, normalised), the
        same pixels as the image processor and the evaluation transform give."""
        return self.preprocessing.finish(self.to_pixels(image)[0], resize=not native)

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
                logits = self.inference_model(pixel_values=x).logits
            logits = logits.float()
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(dim=1)
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total + probs
        return total / len(flips)

    def _resized_probs(self, pixels: torch.Tensor, size: Optional[Tuple[int, int]]) -> torch.Tensor:
        """Probabilities at the input size of float pixels (scaled, not normalised), the model run on them
        resized to ``size`` (None: at the input size) and normalised."""
        height, width = pixels.shape[-2:]
        x = self.preprocessing.finish(pixels.to(self.device, torch.float32), resize=False) if size is None else \
            self.preprocessing.finish(resize_image(pixels.to(self.device, torch.float32), size))
        probs = self.forward_probs(x)
        if tuple(probs.shape[-2:]) == (height, width):
            return probs
        return F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False, antialias=True)

    @torch.inference_mode()
    def tiled_probs(self, pixels: torch.Tensor, tile: int = 512, overlap: Optional[int] = None) -> torch.Tensor:
        """Probabilities (1, K, H, W) on the CPU of one large input predicted in ``tile`` x ``tile`` windows that
        overlap by ``overlap`` pixels (default :func:`default_overlap`) and are blended with linear ramps; the
        device holds at most ``batch_size`` tiles."""
        if pixels.shape[0] != 1:
            raise ValueError("tiled prediction takes one image at a time")
        if overlap is None:
            overlap = default_overlap(tile)
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

    def predict_proba(self, image: ImageLike, tile: Optional[int] = None, overlap: Optional[int] = None,
                      native: bool = False) -> np.ndarray:
        """Class probabilities (K, H, W) float32 at the image's size (K = 1 for a one-logit binary model).

        By default the image is resized to the training size when the processor says so (probabilities
        resized back bilinearly), else run whole. ``native`` runs it whole at its own size; ``tile`` runs it
        at its own size in overlapping tiles.
        """
        if isinstance(image, (str, os.PathLike)):
            image = _read_image_file(image)
        pixels, note = self.to_pixels(image)
        if note:
            warnings.warn(note, InputConversionWarning, stacklevel=2)
        return self._pixels_proba(pixels, tile, overlap, native)[0].numpy()

    def _pixels_proba(self, pixels: torch.Tensor, tile: Optional[int], overlap: int, native: bool) -> torch.Tensor:
        if tile:
            return self.tiled_probs(self.preprocessing.finish(pixels, resize=False), tile, overlap)
        size = None if native else self.preprocessing.size
        return self._resized_probs(pixels, size).cpu()

    def predict_image(self, image: ImageLike, tile: Optional[int] = None, overlap: Optional[int] = None,
                      native: bool = False) -> np.ndarray:
        """Label map (H, W) uint8 of one image (array (H, W) / (H, W, C), PIL image, (C, H, W) tensor or the path
        of an image file)."""
        return labels_from_probs(self.predict_proba(image, tile=tile, overlap=overlap, native=native))

    def predict_volume(self, volume: np.ndarray, axis: int = 2, batch_size: Optional[int] = None,
                       intensity: Union[str, Tuple[float, float], None] = "auto", native: bool = False,
                       tile: Optional[int] = None, overlap: Optional[int] = None, progress: bool = False) -> np.ndarray:
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
        prepared, how = prepare_volume(volume, intensity)
        if "NaN" in how:
            warnings.warn(f"volume: {how.rsplit('; ', 1)[-1]}", InputConversionWarning, stacklevel=2)
        slices = np.moveaxis(prepared, axis, 0)
        labels = np.zeros(slices.shape, dtype=np.uint8)
        if batch_size is not None:
            _check_batch_size(batch_size)  # 0 fell back to the segmenter's own
        step = int(batch_size or self.batch_size)
        bar = _progress(progress, total=slices.shape[0], unit="slice")
        for start in range(0, slices.shape[0], step):
            chunk = slices[start:start + step]
            pixels = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))[:, None]
            if self.in_channels != 1:
                converted, note = convert_channels(pixels[0], self.in_channels)  # raises when ambiguous
                pixels = pixels.expand(-1, converted.shape[0], -1, -1)
                if start == 0:
                    warnings.warn(f"volume slices: {note}", InputConversionWarning, stacklevel=2)
            if tile:
                pixels = self.preprocessing.finish(pixels, resize=False)
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


def _is_volume_array(item, in_channels: int) -> bool:
    """A 3-D array (or tensor) that is a volume rather than one image: an array whose last axis, or a tensor
    whose first axis, does not hold 1, 3, 4 or the model's number of channels."""
    if not hasattr(item, "shape") or hasattr(item, "mode") or len(item.shape) != 3:
        return False
    channel_axis = 0 if torch.is_tensor(item) else -1
    return int(item.shape[channel_axis]) not in (1, 3, 4, in_channels)


def _progress(enabled: bool, total: int, unit: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, leave=False)


def predict(model: Union[str, os.PathLike, Segmenter], inputs, *, device=None, dtype=None, tta: bool = False,
            axis: int = 2, intensity: Union[str, Tuple[float, float], None] = "auto", tile: Optional[int] = None,
            overlap: Optional[int] = None, native: bool = False, batch_size: int = 8):
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


def _read_image_file(path: Union[str, os.PathLike]) -> np.ndarray:
    """The pixels of an image file given to :meth:`Segmenter.predict_image` (read as ``predict`` reads it)."""
    from . import inference_io

    if Path(path).is_dir():
        raise InputError(f"{path} is a folder; predict_image takes one image (for a folder: rwkvunet predict "
                         "FOLDER --out DIR, or rwkvunet.predict(model, list_of_files))")
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file; check the path")
    kind = inference_io.file_kind(path)
    if kind == "volume":
        raise InputError(f"{path} is a volume; segment it with predict_volume(rwkvunet.inference_io.read_volume(path)"
                         "[0]) or rwkvunet.predict(model, path)")
    if kind is None:
        raise InputError(f"{path}: unsupported format; use one of {inference_io.supported_formats()}")
    return inference_io.read_image(path)


def _predict_one(seg: Segmenter, item, axis, intensity, tile, overlap, native, batch_size) -> np.ndarray:
    from . import inference_io

    if isinstance(item, (str, os.PathLike)):
        kind = inference_io.file_kind(item)
        if Path(item).is_dir():
            raise InputError(f"{item} is a folder; give image or volume files (a list of them for many), or run "
                             "rwkvunet predict FOLDER --out DIR")
        if not Path(item).is_file():
            raise InputError(f"{item}: no such file; check the path")
        if kind == "volume":
            data, _ = inference_io.read_volume(item)
            return seg.predict_volume(data, axis=axis, batch_size=batch_size, intensity=intensity,
                                      native=native, tile=tile, overlap=overlap)
        if kind is None:
            raise InputError(f"{item}: unsupported format; use one of {inference_io.supported_formats()}")
        item = inference_io.read_image(item)
    if _is_volume_array(item, seg.in_channels):
        volume = item.detach().cpu().numpy() if torch.is_tensor(item) else np.asarray(item)
        return seg.predict_volume(volume, axis=axis, batch_size=batch_size, intensity=intensity, native=native,
                                  tile=tile, overlap=overlap)
    return seg.predict_image(item, tile=tile, overlap=overlap, native=native)


__all__ = [
    "CT_WINDOW", "TTA_FLIPS", "InputConversionWarning", "Preprocessing", "Segmenter", "blend_ramp",
    "choose_intensity", "ct_window", "labels_from_probs", "load_preprocessing", "match_channels",
    "minmax_scale", "predict", "prepare_volume", "tile_starts",
]
