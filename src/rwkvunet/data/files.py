"""Reading image and mask files, with errors that name the file and the fix.

Masks of the binary data sets are stored in many ways: 0/255 PNGs, anti-aliased JPEGs, RGB masks, several
masks for one image (BUSI), instance labels (GlaS). :func:`prepare_mask` turns any of them into a uint8 label
map, and refuses values that cannot be labels of the classes asked for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")

#: Grey levels at or above this value are foreground in a binary mask stored as 0-255 (anti-aliased edges
#: of BUSI, Kvasir and DSB masks are cut in the middle).
BINARY_THRESHOLD = 128


class DataError(UserError):
    """A data file that cannot be used as it is; the message names the file and the fix."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels; raises :class:`DataError`."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()  # checks PNG chunks and other structure cheaply
        return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}. Replace or remove the file.") from err


def read_grey(path: Path) -> np.ndarray:
    """Decode a mask file into a 2-D array (colour masks reduced to their brightest channel)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read mask {path}: {err}. Replace or remove the file.") from err
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    return arr


def prepare_mask(mask: np.ndarray, num_labels: Optional[int], source: str = "mask",
                 instances: bool = False) -> np.ndarray:
    """Turn a stored mask into a uint8 label map for ``num_labels`` classes.

    ``num_labels`` of ``None``, 1 or 2 means a binary set: masks already in {0, 1} are kept, 0-255 masks
    (anti-aliased ones included) are thresholded at :data:`BINARY_THRESHOLD`; other values are refused
    because they look like a multi-class label map. ``instances=True`` (GlaS, whose masks number each gland)
    makes every non-zero value foreground. With ``num_labels > 2`` the mask is a label map and every value
    must be below ``num_labels``.
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or not np.all(mask == np.round(mask)):
            raise DataError(f"{source} holds non-integer values; a mask must hold class indices.")
    top = int(mask.max()) if mask.size else 0
    low = int(mask.min()) if mask.size else 0
    if low < 0:
        raise DataError(f"{source} holds negative values ({low}); labels must be 0..num_labels-1.")
    if num_labels is None or num_labels <= 2:
        if instances:
            return (mask > 0).astype(np.uint8)
        if top <= 1:
            return mask.astype(np.uint8)
        if top >= BINARY_THRESHOLD:
            return (mask >= BINARY_THRESHOLD).astype(np.uint8)
        raise DataError(
            f"{source} holds values up to {top}, which is neither a binary 0/1 or 0/255 mask nor valid for "
            f"{num_labels or 2} classes; pass num_labels={top + 1} (--num-labels) if it is a label map.")
    if top >= num_labels:
        raise DataError(
            f"{source} holds label {top}, outside the {num_labels} classes 0..{num_labels - 1}; "
            f"check the mask or pass a larger num_labels.")
    return mask.astype(np.uint8)


def read_mask(paths: Sequence[Path], num_labels: Optional[int], size: Optional[tuple[int, int]] = None,
              image_path: Optional[Path] = None, instances: bool = False) -> np.ndarray:
    """Read one or more mask files of one image and join them (union, or maximum for label maps)."""
    joined = None
    for path in paths:
        arr = read_grey(path)
        if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
            raise DataError(
                f"mask {path} is {arr.shape[1]}x{arr.shape[0]} but its image {image_path} is "
                f"{size[0]}x{size[1]} (width x height); they must have the same size.")
        arr = prepare_mask(arr, num_labels, source=f"mask {path}", instances=instances)
        joined = arr if joined is None else np.maximum(joined, arr)
    return joined


def check_labels(label: np.ndarray, num_labels: int, source: str) -> np.ndarray:
    """Refuse label maps of volumes whose values fall outside ``0..num_labels-1``."""
    label = np.asarray(label)
    if label.size and (label.min() < 0 or label.max() >= num_labels):
        raise DataError(
            f"{source} holds labels {int(label.min())}..{int(label.max())}, outside the {num_labels} classes "
            f"0..{num_labels - 1}; check the file or pass num_labels.")
    if np.issubdtype(label.dtype, np.floating) and not np.all(label == np.round(label)):
        raise DataError(f"{source} holds non-integer labels.")
    return label.astype(np.uint8)


def file_stamp(paths: Iterable[Path]) -> list:
    """(path, size, mtime) of files, so that cached conversions are redone when a file changes."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return out
