"""Reading the files users segment and writing what they get back.

Images (PNG, JPEG, TIFF, BMP) go through Pillow. NIfTI volumes go through nibabel, an optional extra that is
imported only when a volume is met. Outputs are uint8 label maps that keep the input's size (PNG) or its
shape, affine and header geometry (NIfTI), plus overlays that blend a fixed palette over the image.
"""
from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")

#: Distinct colours for labels 1, 2, ...; label 0 (background) is left uncoloured in overlays.
PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
], dtype=np.uint8)


class InputError(UserError):
    """A file that cannot be segmented as it is; the message names the file and the fix."""


# --- finding inputs ----------------------------------------------------------------------------------------
def file_kind(path: os.PathLike | str) -> Optional[str]:
    """``"image"``, ``"volume"`` or ``None`` (unsupported) from the file name."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_EXTENSIONS):
        return "volume"
    if name.endswith(IMAGE_EXTENSIONS):
        return "image"
    return None


def supported_formats() -> str:
    return ", ".join(IMAGE_EXTENSIONS + NIFTI_EXTENSIONS)


LEGEND = "labels.json"  # what predict writes beside its outputs: label value -> name and colour


def is_legend(path: Path) -> bool:
    """True for a labels.json written by ``rwkvunet predict`` (label values -> name and colour)."""
    import json

    try:
        legend = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(legend, dict) and bool(legend) and all(
        key.isdigit() and isinstance(value, dict) and set(value) == {"name", "color"}
        for key, value in legend.items())


def find_inputs(paths: Iterable[os.PathLike | str], exclude: Optional[os.PathLike | str] = None,
                skipped: Optional[List[Path]] = None) -> List[Tuple[Path, Path]]:
    """Files to segment as ``(file, root)`` pairs; folders are searched recursively (sorted, hidden files and
    files under ``exclude`` skipped, other formats ignored). Subfolders that hold predict's ``labels.json`` are
    earlier outputs, not inputs: they are skipped and listed in ``skipped``. A named file that is missing or of an
    unsupported format raises :class:`InputError`, before any work starts."""
    exclude_dir = Path(exclude).resolve() if exclude is not None else None
    found: List[Tuple[Path, Path]] = []
    seen: set = set()

    def add(file: Path, root: Path) -> None:
        key = file.resolve()
        if key not in seen:  # a file named and also inside a named folder is segmented once
            seen.add(key)
            found.append((file, root))

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            outputs = sorted(legend.parent for legend in path.rglob(LEGEND)
                             if legend.parent != path and is_legend(legend))
            if skipped is not None:  # --out itself is excluded anyway: not worth a note
                skipped.extend(f for f in outputs if exclude_dir is None or
                               not (f.resolve() == exclude_dir or exclude_dir in f.resolve().parents))
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                rel = file.relative_to(path)
                if any(part.startswith(".") for part in rel.parts) or file_kind(file) is None:
                    continue
                if exclude_dir is not None and exclude_dir in file.resolve().parents:
                    continue
                if any(folder in file.parents for folder in outputs):
                    continue
                add(file, path)
        elif path.is_file():
            if file_kind(path) is None:
                raise InputError(f"{path}: unsupported format {''.join(path.suffixes) or '(no extension)'}; "
                                 f"use one of {supported_formats()}")
            add(path, path.parent)
        else:
            raise InputError(f"{path}: no such file or folder; check the path")
    return found


# --- output folders ----------------------------------------------------------------------------------------
def _writable_folder(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def check_output_folder(path: os.PathLike | str, option: str = "--out") -> None:
    """Raise :class:`UserError` unless ``path`` is a writable folder or one that can be created; called before
    any work starts, so a bad output folder is not found only after the inputs were processed."""
    path = Path(path)
    fix = "give a folder you can write to (it is created if missing)"
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{option} {path} is a file; {fix}")
        if not _writable_folder(path):
            raise UserError(f"{option} {path} is not writable; {fix}")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path} cannot be created: {parent} is a file; {fix}")
    if not _writable_folder(parent):
        raise UserError(f"{option} {path} cannot be created: {parent} is not writable; {fix}")


# --- images ------------------------------------------------------------------------------------------------
def read_image(path: os.PathLike | str) -> np.ndarray:
    """Pixels of an image file as (H, W) or (H, W, C) with C in 3 (RGB); alpha and palettes are dropped.

    8-bit images come back as uint8, 16-bit ones as uint16, 32-bit integer or float TIFFs as they are stored.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                raise InputError(f"{path}: has {img.n_frames} frames; save the image to segment as a "
                                 "single-frame file (or a stack as NIfTI)")
            if img.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
                img = img.convert("RGB")
            elif img.mode in ("LA", "La", "1"):
                img = img.convert("L")
            elif img.mode.startswith("I;16"):
                return np.asarray(img).astype(np.uint16)
            arr = np.asarray(img)
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(f"{path}: {err} Pillow refuses images this large; split it into smaller images") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: cannot read the image ({err}); check that the file is a complete "
                         f"{path.suffix.lstrip('.').upper()} image, or replace it") from err
    return np.array(arr)


def to_display(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 view of an image for overlays (grey repeated; 16-bit and float min-max scaled)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
        arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    elif arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours of a label map (the palette repeats after its last colour)."""
    labels = np.asarray(labels).astype(np.int64)
    idx = np.where(labels == 0, 0, (labels - 1) % (len(PALETTE) - 1) + 1)
    return PALETTE[idx]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with each foreground label blended in its palette colour."""
    base = to_display(image).astype(np.float32)
    if base.shape[:2] != labels.shape:
        raise ValueError(f"image {base.shape[:2]} and labels {labels.shape} differ in size")
    colour = colorize(labels).astype(np.float32)
    mask = (np.asarray(labels) > 0)[..., None]
    out = np.where(mask, (1 - alpha) * base + alpha * colour, base)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _label_image(labels: np.ndarray) -> Image.Image:
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError("label maps must hold class indices in [0, 65535]")
    if labels.max(initial=0) <= 255:
        return Image.fromarray(labels.astype(np.uint8), mode="L")
    return Image.fromarray(labels.astype(np.uint16))


def save_png(path: os.PathLike | str, array: np.ndarray) -> Path:
    """Write a label map (2-D integer array: class indices) or an RGB uint8 image as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _label_image(array) if np.asarray(array).ndim == 2 else Image.fromarray(np.asarray(array, np.uint8))
    img.save(path, format="PNG")
    return path


# --- volumes -----------------------------------------------------------------------------------------------
def require_nibabel():
    """nibabel, or an error telling how to get it."""
    try:
        import nibabel
    except ImportError as err:
        raise ImportError('reading and writing NIfTI volumes needs nibabel: pip install "rwkvunet[nifti]"') from err
    return nibabel


def read_volume(path: os.PathLike | str):
    """``(data, image)``: the voxels of a NIfTI file as float32 (3-D; a trailing singleton 4th axis is dropped)
    and the nibabel image whose affine and header the labels will keep."""
    nib = require_nibabel()
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, ValueError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        raise InputError(f"{path}: cannot read the NIfTI volume ({err}); check that the file is complete "
                         "(a .nii.gz must be gzip-compressed .nii)") from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3-D volume, got shape {data.shape}; split 4-D series into 3-D "
                         "files (e.g. one time point or modality per file)")
    return data, img  # NaN voxels are kept: rwkvunet.pixels.prepare_volume sets them to 0 and says how many


def save_nifti_labels(path: os.PathLike | str, labels: np.ndarray, reference) -> Path:
    """Write a uint8 label volume with the reference image's affine and header geometry (voxel sizes,
    qform/sform and their codes, units); intensity scaling is reset so the stored values are the labels."""
    nib = require_nibabel()
    labels = np.asarray(labels)
    if labels.size == int(np.prod(reference.shape)) and labels.ndim < len(reference.shape):
        labels = labels.reshape(reference.shape)  # e.g. (X, Y, Z) labels of an (X, Y, Z, 1) file
    if tuple(labels.shape) != tuple(reference.shape):
        raise ValueError(f"labels {labels.shape} do not match the volume {reference.shape}")
    header = reference.header.copy()
    header.set_data_shape(labels.shape)
    header.set_data_dtype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16)
    out = type(reference)(labels.astype(header.get_data_dtype()), reference.affine, header=header)
    out.header.set_slope_inter(1.0, 0.0)
    if "cal_min" in out.header:
        out.header["cal_min"], out.header["cal_max"] = 0, float(labels.max(initial=0))
    if "descrip" in out.header:
        out.header["descrip"] = b"rwkvunet labels"
    sform, sform_code = reference.header.get_sform(coded=True)
    qform, qform_code = reference.header.get_qform(coded=True)
    if sform is not None:
        out.set_sform(sform, int(sform_code))
    if qform is not None:
        out.set_qform(qform, int(qform_code))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(path))
    return path


def montage(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], cols: Optional[int] = None,
            alpha: float = 0.5, pad: int = 2) -> np.ndarray:
    """Overlays of several slices on one RGB grid (row-major, near-square)."""
    if not images:
        raise ValueError("montage needs at least one slice")
    tiles = [overlay(img, lab, alpha) for img, lab in zip(images, labels)]
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return grid


def montage_slices(labels: np.ndarray, axis: int, max_slices: int = 16) -> List[int]:
    """Up to ``max_slices`` evenly spaced slice indices along ``axis``, taken among slices with foreground
    when there are any."""
    n = labels.shape[axis]
    other = tuple(a for a in range(labels.ndim) if a != axis)
    candidates = np.flatnonzero(np.asarray(labels > 0).any(axis=other)) if labels.size else np.arange(0)
    if candidates.size == 0:
        candidates = np.arange(n)
    if candidates.size <= max_slices:
        return candidates.tolist()
    pick = np.linspace(0, candidates.size - 1, max_slices).round().astype(int)
    return candidates[pick].tolist()


def legend(names: dict) -> dict:
    """For each label value (as a string, as in JSON), its name and overlay colour."""
    return {str(int(i)): {"name": str(name), "color": [int(c) for c in colorize(np.array([int(i)]))[0]]}
            for i, name in sorted(names.items())}


def save_legend(path: os.PathLike | str, names: dict) -> Path:
    """A JSON legend: for each label value, its name and overlay colour."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(legend(names), indent=2) + "\n")
    return path


def strip_extension(path: os.PathLike | str) -> str:
    """The file name without its image or NIfTI extension (``case1.nii.gz`` -> ``case1``)."""
    name = Path(path).name
    lower = name.lower()
    for ext in NIFTI_EXTENSIONS[::-1] + IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


__all__ = [
    "IMAGE_EXTENSIONS", "NIFTI_EXTENSIONS", "PALETTE", "InputError", "check_output_folder", "file_kind",
    "find_inputs", "read_image",
    "to_display", "colorize", "overlay", "save_png", "require_nibabel", "read_volume", "save_nifti_labels",
    "legend", "save_legend",
    "montage", "montage_slices", "strip_extension",
]
