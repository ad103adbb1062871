"""What the demo page does when a file arrives or a control moves, as plain functions of numpy arrays and paths.

:class:`DemoModel` segments a file by the calls ``rwkvunet predict`` makes (``inference_io`` reads and writes,
``pixels`` prepares volumes, :class:`rwkvunet.inference.Segmenter` predicts), so a page shows and offers for
download exactly the labels the command writes. Nothing here imports Gradio: :mod:`rwkvunet.demo.app` wires
these functions to the page.
"""
from __future__ import annotations

import copy
import html
import logging
import math
import shutil
import tempfile
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import inference_io as io
from ..errors import UserError
from ..inference import CT_AIR_THRESHOLD, CT_WINDOW, InputConversionWarning, Segmenter, choose_intensity
from ..pixels import clean_volume, prepare_volume

logger = logging.getLogger(__name__)

#: Image size modes, as (label on the page, value); the values mirror ``rwkvunet predict``'s options.
SIZE_MODES = (("the model's training size (default)", "default"), ("native size (--native)", "native"),
              ("tiles at native size (--tile)", "tiles"))
#: Volume intensity choices, as (label on the page, value); the values mirror ``rwkvunet predict``'s options.
INTENSITY_MODES = (("automatic (CT when it holds air in HU)", "auto"),
                   (f"CT window [{CT_WINDOW[0]:g}, {CT_WINDOW[1]:g}] HU (--ct)", "ct"),
                   ("MRI min-max (--mri-minmax)", "minmax"), ("custom window (--window)", "window"))
#: Images with more pixels than this are predicted in tiles when they would otherwise run whole, so one upload
#: cannot exhaust the server's memory (a 2048 x 2048 forward pass of RWKV-UNet-B takes about 8 GiB).
MAX_WHOLE_PIXELS = 2048 * 2048
#: Views on the page are subsampled to at most MAX_VIEW_SIDE pixels on their long side (downloads keep full
#: size), and small ones enlarged by whole pixels to at least MIN_VIEW_SIDE so their labels can be seen.
MAX_VIEW_SIDE = 1024
MIN_VIEW_SIDE = 320
#: Seconds a download stays on the server's disk.
RESULT_LIFETIME = 3600
#: Millimetres per unit of a NIfTI header's spatial units.
MM_PER_UNIT = {"mm": 1.0, "meter": 1000.0, "micron": 0.001}


@dataclass
class Options:
    """The page's controls; each mirrors an option of ``rwkvunet predict``."""

    tta: bool = False
    size: str = "default"
    tile: int = 512
    overlap: int = 64
    intensity: str = "auto"
    window: Tuple[float, float] = CT_WINDOW
    axis: int = 2

    def check(self) -> None:
        """Raise :class:`UserError` for settings ``rwkvunet predict`` would refuse."""
        if self.size not in {value for _, value in SIZE_MODES}:
            raise UserError(f"unknown size mode {self.size!r}")
        if self.intensity not in {value for _, value in INTENSITY_MODES}:
            raise UserError(f"unknown intensity choice {self.intensity!r}")
        if self.size == "tiles" and (int(self.tile) < 16 or not 0 <= int(self.overlap) < int(self.tile)):
            raise UserError(f"tiles need a size of at least 16 pixels and an overlap between 0 and the size "
                            f"minus 1, got {self.tile} and {self.overlap}")
        if self.intensity == "window" and not float(self.window[0]) < float(self.window[1]):
            raise UserError(f"the window needs low < high, got {self.window[0]:g} {self.window[1]:g}")
        if int(self.axis) not in (0, 1, 2):
            raise UserError(f"the slice axis must be 0, 1 or 2, got {self.axis}")


@dataclass
class Result:
    """One segmented file: what the views are drawn from, and what the page reports."""

    kind: str                      # "image" or "volume"
    name: str                      # the uploaded file's name
    pixels: np.ndarray             # the image as read, or the volume's intensities prepared to [0, 1]
    labels: np.ndarray             # uint8 class indices, the image's size or the volume's shape
    download: Path                 # labels PNG (images) or labels NIfTI (volumes, the input's affine kept)
    seconds: float
    summary: str                   # shape, options, time and device, notes
    counts: dict = field(default_factory=dict)   # label value -> pixels or voxels
    voxel_ml: Optional[float] = None             # millilitres per voxel (volumes with a known spacing)
    axis: int = 2

    @property
    def num_slices(self) -> int:
        return int(self.labels.shape[self.axis]) if self.kind == "volume" else 1

    def default_slice(self) -> int:
        """The slice with the most foreground (the middle one when there is none)."""
        if self.kind != "volume":
            return 0
        other = tuple(a for a in range(3) if a != self.axis)
        fg = np.count_nonzero(self.labels, axis=other)
        return int(fg.argmax()) if fg.any() else self.num_slices // 2


class DemoModel:
    """A :class:`Segmenter` with what the page needs around it: legend, options, outputs folder."""

    def __init__(self, segmenter: Segmenter, name: str, workdir: Union[str, Path, None] = None,
                 max_whole_pixels: int = MAX_WHOLE_PIXELS):
        self.segmenter = segmenter
        self.name = name
        if workdir is None:  # a folder of our own: removed with this object, or when the process exits
            workdir = tempfile.mkdtemp(prefix="rwkvunet-demo-")
            self._remove_workdir = weakref.finalize(self, shutil.rmtree, workdir, ignore_errors=True)
        self.workdir = Path(workdir)
        self.max_whole_pixels = int(max_whole_pixels)

    @classmethod
    def from_pretrained(cls, model: Union[str, Path], device=None, dtype=None, batch_size: int = 8,
                        **kwargs) -> "DemoModel":
        """Load a model folder or Hub id as ``rwkvunet predict`` does (one-line :class:`UserError` otherwise)."""
        try:
            seg = Segmenter.from_pretrained(model, device=device, dtype=dtype, batch_size=batch_size)
        except UserError:
            raise
        except (OSError, ValueError) as err:  # e.g. a preprocessor_config.json that does not fit the model
            raise UserError(f"cannot load the model {model}: {err}") from err
        return cls(seg, name=str(model), **kwargs)

    # --- facts shown on the page ---------------------------------------------------------------------------
    @property
    def legend(self) -> dict:
        """Label value -> ``{"name", "color"}``: the ``labels.json`` that ``rwkvunet predict`` writes."""
        return io.legend(self.segmenter.label_names)

    def description(self) -> str:
        seg = self.segmenter
        pre = seg.preprocessing
        size = f"resized to {pre.size[0]}x{pre.size[1]}" if pre.size else "run at their own size"
        return (f"{seg.num_classes} classes, {seg.in_channels} input channel(s); images are {size} by default; "
                f"running on {device_name(seg)}")

    # --- segmenting ------------------------------------------------------------------------------------------
    def segment(self, path: Union[str, Path], options: Options) -> Result:
        """Segment one uploaded file; a file or setting the user can fix raises :class:`UserError`."""
        options.check()
        path = Path(path)
        kind = io.file_kind(path)
        if kind is None:
            raise io.InputError(f"{path.name}: unsupported file type; upload one of {io.supported_formats()}")
        seg = copy.copy(self.segmenter)  # shares the model; TTA is this request's choice only
        seg.tta = bool(options.tta)
        self._forget_old_results()
        out = Path(tempfile.mkdtemp(prefix="result-", dir=self.workdir))
        start = time.perf_counter()
        if kind == "volume":
            return self._segment_volume(seg, path, options, out, start)
        return self._segment_image(seg, path, options, out, start)

    def _forget_old_results(self) -> None:
        """Delete downloads older than RESULT_LIFETIME seconds (the page has long served them), so a page that
        runs for weeks does not fill the disk."""
        now = time.time()
        for folder in self.workdir.glob("result-*"):
            if now - folder.stat().st_mtime > RESULT_LIFETIME:
                shutil.rmtree(folder, ignore_errors=True)

    def _size_args(self, options: Options, shape: Sequence[int]) -> Tuple[dict, str, List[str]]:
        """``Segmenter`` keywords for the size mode, its description, and notes."""
        pre = self.segmenter.preprocessing
        notes = []
        mode = options.size
        whole = mode == "native" or (mode == "default" and pre.size is None)
        if whole and int(np.prod(shape[:2])) > self.max_whole_pixels:
            mode = "tiles"
            notes.append(f"{shape[0]}x{shape[1]} pixels are too many to run whole here: predicted in "
                         f"{options.tile} px tiles")
        if mode == "tiles":
            return (dict(tile=int(options.tile), overlap=int(options.overlap)),
                    f"tiles of {int(options.tile)} px overlapping by {int(options.overlap)}", notes)
        if mode == "native" or pre.size is None:
            return dict(native=True), "native size", notes
        return dict(native=False), f"resized to {pre.size[0]}x{pre.size[1]}", notes

    def _segment_image(self, seg: Segmenter, path: Path, options: Options, out: Path, start: float) -> Result:
        image = io.read_image(path)
        size_args, mode, notes = self._size_args(options, image.shape)
        with warnings.catch_warnings(record=True) as caught:  # the pixel path's channel note, shown on the page
            warnings.simplefilter("always", InputConversionWarning)
            labels = seg.predict_image(image, **size_args)
        notes += sorted({str(w.message) for w in caught if issubclass(w.category, InputConversionWarning)})
        seconds = time.perf_counter() - start
        download = io.save_png(out / f"{io.strip_extension(path)}_labels.png", labels)
        shape = "x".join(map(str, image.shape))
        summary = _summary(f"image {shape} ({image.dtype})", mode, seg, seconds, notes)
        return Result("image", path.name, image, labels, download, seconds, summary, counts=_counts(labels))

    def _segment_volume(self, seg: Segmenter, path: Path, options: Options, out: Path, start: float) -> Result:
        data, nifti = io.read_volume(path)
        data, cleaned = clean_volume(data)
        intensity, why = _intensity(options, data)
        prepared, how = prepare_volume(data, intensity)
        axis = int(options.axis)
        size_args, mode, notes = self._size_args(options, np.take(data, 0, axis=axis).shape)
        notes = ([cleaned] if cleaned else []) + notes
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InputConversionWarning)
            labels = seg.predict_volume(prepared, axis=axis, batch_size=seg.batch_size, intensity=None, **size_args)
        notes += sorted({str(w.message) for w in caught if issubclass(w.category, InputConversionWarning)})
        seconds = time.perf_counter() - start
        download = io.save_nifti_labels(out / f"{io.strip_extension(path)}_labels.nii.gz", labels, nifti)
        voxel_ml, spacing_note = _voxel_ml(nifti)
        if spacing_note:
            notes.append(spacing_note)
        shape = "x".join(map(str, data.shape))
        what = f"volume {shape}, {data.shape[axis]} slices along axis {axis}; intensity: {how} ({why})"
        summary = _summary(what, mode, seg, seconds, notes)
        return Result("volume", path.name, prepared, labels, download, seconds, summary, counts=_counts(labels),
                      voxel_ml=voxel_ml, axis=axis)

    def handle(self, path: Union[str, Path], options: Options) -> Tuple[Optional[Result], str]:
        """``(result, None)``, or ``(None, message)`` for a file that cannot be segmented, whatever the reason:
        the page shows the message and keeps serving. Messages name the uploaded file, not its temporary path."""
        name = Path(path).name
        try:
            return self.segment(path, options), None
        except UserError as err:
            return None, str(err).replace(str(path), name)
        except MemoryError:
            return None, f"{name}: out of memory; choose tiles, or upload a smaller file"
        except Exception as err:  # noqa: BLE001 - one upload must not stop the page for everyone
            logger.error("segmenting %s failed:\n%s", name, traceback.format_exc())
            return None, f"{name}: could not be segmented ({type(err).__name__}: {str(err).replace(str(path), name)})"

    # --- views -----------------------------------------------------------------------------------------------
    def views(self, result: Result, index: int = 0, alpha: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
        """``(input, overlay)`` RGB uint8 views of an image, or of one slice of a volume, drawn by
        ``inference_io.overlay`` (the overlay ``rwkvunet predict`` writes)."""
        if result.kind == "volume":
            index = int(np.clip(int(index), 0, result.num_slices - 1))
            pixels = np.take(result.pixels, index, axis=result.axis)
            labels = np.take(result.labels, index, axis=result.axis)
        else:
            pixels, labels = result.pixels, result.labels
        step = max(1, math.ceil(max(labels.shape) / MAX_VIEW_SIDE))
        if step > 1:
            pixels, labels = pixels[::step, ::step], labels[::step, ::step]
        alpha = float(np.clip(float(alpha), 0.0, 1.0))
        views = io.to_display(pixels), io.overlay(pixels, labels, alpha)
        zoom = max(1, MIN_VIEW_SIDE // max(labels.shape))
        return tuple(v.repeat(zoom, axis=0).repeat(zoom, axis=1) for v in views) if zoom > 1 else views

    def legend_html(self, result: Optional[Result] = None) -> str:
        """A table of label colours and names; with a result, each label's pixels, or voxels and mL."""
        volume = result is not None and result.kind == "volume"
        head = ["", "value", "label"]
        if result is not None:
            head.append("voxels" if volume else "pixels")
            if volume and result.voxel_ml is not None:
                head.append("volume (mL)")
        rows = []
        cell = 'style="padding:2px 10px;border:none;text-align:left"'
        for value, entry in self.legend.items():
            colour = "rgb({},{},{})".format(*entry["color"])
            swatch = (f'<span class="swatch" style="display:inline-block;width:1em;height:1em;'
                      f'background:{colour};border:1px solid #888;vertical-align:middle"></span>')
            cells = [swatch, value, html.escape(entry["name"])]
            if result is not None:
                count = int(result.counts.get(int(value), 0))
                cells.append(f"{count:,}")
                if volume and result.voxel_ml is not None:
                    cells.append(f"{count * result.voxel_ml:.2f}")
            rows.append("<tr>" + "".join(f"<td {cell}>{c}</td>" for c in cells) + "</tr>")
        header = "<tr>" + "".join(f"<th {cell}>{h}</th>" for h in head) + "</tr>"
        return (f'<table class="rwkvunet-legend" style="border-collapse:collapse;width:auto;font-size:90%">'
                f'{header}{"".join(rows)}</table>')


def device_name(seg: Segmenter) -> str:
    return f"{seg.device.type} ({str(seg.dtype).replace('torch.', '')})"


def _summary(what: str, mode: str, seg: Segmenter, seconds: float, notes: List[str]) -> str:
    text = (f"{what}; {mode}; TTA {'on' if seg.tta else 'off'}. Segmented in {seconds:.2f} s on "
            f"{device_name(seg)}.")
    return text + "".join(f"\nNote: {note}." for note in notes)


def _counts(labels: np.ndarray) -> dict:
    values, counts = np.unique(labels, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def _intensity(options: Options, data: np.ndarray) -> Tuple[object, str]:
    """The intensity preparation ``prepare_volume`` gets, and why, as ``rwkvunet predict`` chooses it."""
    if options.intensity == "window":
        return (float(options.window[0]), float(options.window[1])), "custom window"
    if options.intensity in ("ct", "minmax"):
        return options.intensity, "chosen on the page"
    if choose_intensity(data) == "ct":
        return "ct", f"automatic: it holds values below {CT_AIR_THRESHOLD:g}, so it is taken for CT in HU"
    return "minmax", f"automatic: it holds no values below {CT_AIR_THRESHOLD:g}, so it is not taken for CT in HU"


def _voxel_ml(nifti) -> Tuple[Optional[float], Optional[str]]:
    """Millilitres per voxel from the NIfTI spacing and units, with a note when the units are not stated."""
    zooms = [float(z) for z in nifti.header.get_zooms()[:3]]
    if len(zooms) < 3 or not all(z > 0 and math.isfinite(z) for z in zooms):
        return None, "the file states no voxel spacing, so volumes in mL are not shown"
    unit = nifti.header.get_xyzt_units()[0]
    note = None
    if unit not in MM_PER_UNIT:
        note = "the file does not state its spatial unit: millimetres assumed for the volumes in mL"
    mm = MM_PER_UNIT.get(unit, 1.0)
    return float(np.prod(zooms)) * mm ** 3 / 1000.0, note


__all__ = ["DemoModel", "INTENSITY_MODES", "MAX_VIEW_SIDE", "MAX_WHOLE_PIXELS", "Options", "Result", "SIZE_MODES"]
