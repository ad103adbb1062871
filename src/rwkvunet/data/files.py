"""Reading image and mask files, with errors that name the file and the fix.

Masks are stored in many ways: 0/1 or 0/255 PNGs, anti-aliased JPEGs, RGB masks, several masks for one image
(BUSI), instance labels (GlaS), label maps 0..K-1, grey levels such as 0/128/255, colour-coded RGB. How the
stored values become class indices is decided once per data set (:func:`decide_mask_coding`, from every mask
file), so that every file of a set is read with the same mapping:

* **Levels.** A grey value or an RGB colour is a *level* of a mask when it fills a region: at least
  :data:`LEVEL_MIN_PIXELS` pixels (and :data:`LEVEL_MIN_SHARE` of the mask) whose 3x3 neighbourhood holds only
  that value. Anti-aliasing, resizing and JPEG put intermediate values along edges, never in regions, so they
  are not levels; a class drawn as 128 fills its region with 128 and is one. Colours closer than
  :data:`COLOUR_MERGE` per channel are one level (JPEG colour noise). A mask is coloured when a pixel's channels
  differ by more than :data:`COLOUR_TOLERANCE`; a data set with one coloured mask is read in colour throughout.
* **Binary sets** (``num_labels`` ``None``, 1 or 2): masks in {0, 1} are kept and 0-255 masks are thresholded
  at :data:`BINARY_THRESHOLD` (brightest channel of RGB masks), as long as the set has at most one level
  besides black. Several levels (0/128/255, or red and green) are refused, naming files, levels and the fix
  (``--num-labels K``), instead of being merged into one class; so are masks whose largest value is below 128
  but above 1 (label maps). ``instances=True`` (GlaS, whose masks number each gland) makes every non-zero
  value foreground.
* **Multi-class sets** (``num_labels`` K > 2): grey masks whose values stay below 128 are label maps, kept as
  they are and refused when a value is K or more. 0-255 grey masks and colour masks must have exactly K
  levels; they become classes 0..K-1 in sorted order (black / 0 first, colours by (R, G, B)), every pixel
  taking the class of its nearest level (edge pixels go to one of their neighbours). Any other count of levels
  is refused, naming the levels found. The mapping is :meth:`MaskCoding.mapping`; ``rwkvunet data`` prints it
  and writes it into the output's ``rwkvunet_data.json``.

:func:`prepare_mask` applies the per-mask part of these rules to one array (sets loaded from the Hub or a
``save_to_disk`` folder): a single binary mask with several levels is refused as well.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")

#: Grey levels at or above this value are foreground in a binary mask stored as 0-255 (anti-aliased edges
#: of BUSI, Kvasir and DSB masks are cut in the middle).
BINARY_THRESHOLD = 128

#: A value is a level of a mask when it fills at least this many pixels with uniform 3x3 neighbourhoods ...
LEVEL_MIN_PIXELS = 9
#: ... and at least this share of the mask's pixels.
LEVEL_MIN_SHARE = 0.001

#: A pixel whose channels differ by more than this is coloured (grey masks saved as RGB JPEG differ by a few).
COLOUR_TOLERANCE = 32

#: Colours that differ by at most this in every channel are one level (JPEG moves flat colours a little) ...
COLOUR_MERGE = 24
#: ... and so are grey levels of 0-255 masks that differ by at most this (label maps 0..K-1 are never merged).
GREY_MERGE = 8

#: Everything that decides which values are levels (part of the cache key of mask summaries).
LEVEL_RULES = (LEVEL_MIN_PIXELS, LEVEL_MIN_SHARE, COLOUR_TOLERANCE)


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


def read_mask_pixels(path: Path) -> np.ndarray:
    """Decode a mask file: 2-D for grey masks, (H, W, 3) uint8 when its pixels have colour."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read mask {path}: {err}. Replace or remove the file.") from err
    if arr.ndim == 3:
        if arr.shape[-1] < 3:
            return arr[..., 0]
        rgb = arr[..., :3]
        return rgb if is_coloured(rgb) else rgb.max(axis=-1)
    return arr


def is_coloured(rgb: np.ndarray) -> bool:
    """True when some pixel of an (H, W, 3) array is clearly not grey."""
    spread = rgb.max(axis=-1).astype(np.int32) - rgb.min(axis=-1)
    return bool(spread.size) and int(spread.max()) > COLOUR_TOLERANCE


# --- levels: the values that fill regions --------------------------------------------------------------

def _pack(arr: np.ndarray) -> np.ndarray:
    """Grey values as they are; RGB pixels as one integer 0xRRGGBB, so colours compare like grey values."""
    if arr.ndim == 2:
        return arr
    rgb = arr.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _unpack_colour(value: int) -> tuple[int, int, int]:
    return (value >> 16 & 255, value >> 8 & 255, value & 255)


def solid_pixels(values: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D array whose 3x3 neighbourhood holds only their own value (the border is never solid)."""
    h, w = values.shape
    solid = np.zeros((h, w), bool)
    if h < 3 or w < 3:
        return solid
    centre = values[1:-1, 1:-1]
    inner = np.ones(centre.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            inner &= values[dy:dy + h - 2, dx:dx + w - 2] == centre
    solid[1:-1, 1:-1] = inner
    return solid


def mask_levels(arr: np.ndarray) -> list[int]:
    """The levels of one mask (packed values, see the module docstring), sorted."""
    packed = _pack(np.asarray(arr))
    if packed.size == 0:
        return []
    values, counts = np.unique(packed[solid_pixels(packed)], return_counts=True)
    enough = max(LEVEL_MIN_PIXELS, LEVEL_MIN_SHARE * packed.size)
    return [int(v) for v, c in zip(values, counts) if c >= enough]


def distinct_levels(levels: Iterable, colour: bool, top: int) -> list:
    """Sorted levels with near-duplicates (compression noise) dropped: the first of each close group stays.

    Colours are (R, G, B) tuples and merge within :data:`COLOUR_MERGE`; grey levels merge within
    :data:`GREY_MERGE` only in 0-255 masks (``top`` of at least :data:`BINARY_THRESHOLD`).
    """
    tolerance = COLOUR_MERGE if colour else (GREY_MERGE if top >= BINARY_THRESHOLD else 0)
    kept: list = []
    for level in sorted(levels):
        here = np.atleast_1d(np.asarray(level, np.int64))
        if all(np.abs(here - np.atleast_1d(np.asarray(k, np.int64))).max() > tolerance for k in kept):
            kept.append(level)
    return kept


def describe_level(value, colour: bool) -> str:
    return "({}, {}, {})".format(*value) if colour else str(value)


# --- one decision per data set -------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskCoding:
    """How the stored values of a data set's masks become class indices (see the module docstring).

    ``kind`` is ``"binary"`` (threshold), ``"labels"`` (label maps kept), ``"instances"`` (non-zero is
    foreground) or ``"levels"`` (``levels[i]`` becomes class ``i``; grey ints or RGB tuples).
    """

    kind: str
    num_labels: Optional[int] = None
    levels: tuple = ()
    colour: bool = False

    def mapping(self) -> Optional[list[dict]]:
        """``[{"value": stored value, "class": index}, ...]`` when values are mapped to classes, else None."""
        if self.kind != "levels":
            return None
        return [{"value": list(v) if self.colour else v, "class": i} for i, v in enumerate(self.levels)]

    def describe(self) -> str:
        """One line for the user, e.g. ``grey level 0 -> class 0, 128 -> class 1``."""
        if self.kind != "levels":
            return {"binary": "binary masks (0/1 kept, 0-255 thresholded at 128)",
                    "labels": f"label maps of {self.num_labels} classes",
                    "instances": "instance masks (every non-zero value is foreground)"}[self.kind]
        what = "colour" if self.colour else "grey level"
        return f"{what} " + ", ".join(f"{describe_level(v, self.colour)} -> class {i}"
                                      for i, v in enumerate(self.levels))

    def apply(self, arr: np.ndarray, source: str) -> np.ndarray:
        """The uint8 label map of one decoded mask (from :func:`read_mask_pixels`)."""
        if self.kind != "levels":
            grey = arr.max(axis=-1) if arr.ndim == 3 else arr
            labels = self.num_labels if self.kind == "labels" else None
            return prepare_mask(grey, labels, source, instances=self.kind == "instances", check_levels=False)
        return nearest_level(arr, self.levels, self.colour)


def nearest_level(arr: np.ndarray, levels: Sequence, colour: bool) -> np.ndarray:
    """Index of the nearest level of every pixel (grey distance, or squared RGB distance), as uint8."""
    if colour:
        rgb = np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr
        table = np.asarray(levels, np.int32)  # (K, 3)
        dist = ((rgb[..., None, :].astype(np.int32) - table) ** 2).sum(axis=-1)
        return dist.argmin(axis=-1).astype(np.uint8)
    grey = arr.max(axis=-1) if arr.ndim == 3 else arr
    table = np.asarray(levels, np.int64)
    if grey.dtype == np.uint8:  # a lookup table: 256 distances instead of one per pixel
        lut = np.abs(np.arange(256)[:, None] - table).argmin(axis=-1).astype(np.uint8)
        return lut[grey]
    return np.abs(grey.astype(np.int64)[..., None] - table).argmin(axis=-1).astype(np.uint8)


@dataclass
class _Survey:
    """What the mask files of a data set hold: the largest value, whether any is coloured, each file's levels."""

    top: int = 0
    colour: bool = False
    levels_of_file: dict = field(default_factory=dict)  # path -> (coloured, packed levels)

    def add(self, summary: dict) -> None:
        """Take in one :func:`summarise_mask` result."""
        self.top = max(self.top, summary["top"])
        self.colour |= summary["coloured"]
        self.levels_of_file[summary["path"]] = (summary["coloured"], list(summary["levels"]))

    def _set_levels(self, coloured: bool, packed: list) -> set:
        """A file's levels as values of the set: grey ints, or RGB tuples once any mask is coloured."""
        if not self.colour:
            return set(packed)
        return {_unpack_colour(v) if coloured else (v, v, v) for v in packed}

    def levels(self) -> list:
        """Sorted distinct levels of the whole set."""
        every = set().union(*(self._set_levels(*item) for item in self.levels_of_file.values()))
        return distinct_levels(every, self.colour, self.top)

    def examples(self, wanted: int) -> str:
        """Files that show the levels: the file holding the most of them, then others adding new ones."""
        ranked = sorted(self.levels_of_file.items(), key=lambda item: -len(item[1][1]))
        shown, seen = [], set()
        for path, item in ranked:
            values = self._set_levels(*item)
            if values - seen:
                seen |= values
                text = ", ".join(describe_level(v, self.colour) for v in sorted(values))
                shown.append(f"{path} holds {text}")
            if len(seen) >= wanted or len(shown) == 3:
                break
        return "; ".join(shown)


def summarise_mask(path: Path) -> dict:
    """What :func:`decide_mask_coding` needs of one mask file: largest value, colour and levels (packed)."""
    arr = read_mask_pixels(path)
    return {"path": str(path), "coloured": arr.ndim == 3, "top": int(arr.max()) if arr.size else 0,
            "levels": mask_levels(arr)}


def decide_mask_coding(paths: Iterable[Path], num_labels: Optional[int], instances: bool = False,
                       summaries: Optional[Iterable[dict]] = None) -> MaskCoding:
    """Decide from every mask file of a data set how its values become classes (module docstring).

    ``summaries`` (from :func:`summarise_mask`, e.g. cached) replace reading ``paths``. Raises
    :class:`DataError` naming files and levels when the masks hold several levels for a binary set, or a count
    of levels other than ``num_labels``.
    """
    binary = num_labels is None or num_labels <= 2
    if instances and binary:
        return MaskCoding("instances")
    survey = _Survey()
    for summary in (summaries if summaries is not None else map(summarise_mask, paths)):
        if binary and not summary["coloured"] and summary["top"] <= 1:
            continue  # 0/1 masks are binary as they are
        survey.add(summary)
    if not survey.colour and survey.top < BINARY_THRESHOLD:  # label maps: each file is checked when read
        return MaskCoding("binary") if binary else MaskCoding("labels", num_labels)
    if binary:
        return _binary_coding(survey)
    return _levels_coding(survey, num_labels)


def _what(survey: _Survey, count: int) -> str:
    return f"{count} {'colours' if survey.colour else 'grey levels'}"


def _binary_coding(survey: _Survey) -> MaskCoding:
    levels = survey.levels()
    if len(levels) <= 2:
        return MaskCoding("binary")
    shown = ", ".join(describe_level(v, survey.colour) for v in levels)
    raise DataError(
        f"the masks hold {_what(survey, len(levels))} ({shown}) that each fill regions, e.g. "
        f"{survey.examples(len(levels))}; a binary mask has two. Pass --num-labels {len(levels)} (num_labels="
        f"{len(levels)}) to make them classes 0..{len(levels) - 1} in this order, or fix the masks.")


def _levels_coding(survey: _Survey, num_labels: int) -> MaskCoding:
    levels = survey.levels()
    if len(levels) == num_labels:
        return MaskCoding("levels", num_labels, tuple(levels), survey.colour)
    shown = ", ".join(describe_level(v, survey.colour) for v in levels)
    if len(levels) <= 2:  # "Pass --num-labels 1 to make them classes 0..0" would be no advice at all
        raise DataError(
            f"the masks are binary ({_what(survey, len(levels))} that fill regions: {shown}), but {num_labels} "
            f"classes were asked for, e.g. {survey.examples(len(levels))}; leave out --num-labels (and use a binary "
            "config) to train on them as a binary set, or give masks with one grey level or colour per class.")
    raise DataError(
        f"the masks hold {_what(survey, len(levels))} ({shown}) that each fill regions, but {num_labels} "
        f"classes were asked for, e.g. {survey.examples(len(levels))}. Pass --num-labels {len(levels)} "
        f"(num_labels={len(levels)}) to make them classes 0..{len(levels) - 1} in this order, or fix the masks.")


# --- one mask ------------------------------------------------------------------------------------------

def prepare_mask(mask: np.ndarray, num_labels: Optional[int], source: str = "mask",
                 instances: bool = False, check_levels: bool = True) -> np.ndarray:
    """Turn a stored mask into a uint8 label map for ``num_labels`` classes.

    ``num_labels`` of ``None``, 1 or 2 means a binary set: masks already in {0, 1} are kept, 0-255 masks
    (anti-aliased ones included) are thresholded at :data:`BINARY_THRESHOLD`; a mask with several levels
    besides black (0/128/255: classes, see the module docstring) and values that look like a multi-class
    label map are refused. ``instances=True`` (GlaS, whose masks number each gland) makes every non-zero
    value foreground. With ``num_labels > 2`` the mask is a label map and every value must be below
    ``num_labels``. ``check_levels=False`` skips the level check (done once for a whole data set).
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
            if check_levels and mask.ndim == 2:
                _refuse_several_levels(mask, source)
            return (mask >= BINARY_THRESHOLD).astype(np.uint8)
        raise DataError(
            f"{source} holds values up to {top}, which is neither a binary 0/1 or 0/255 mask nor valid for "
            f"{num_labels or 2} classes; pass num_labels={top + 1} (--num-labels) if it is a label map.")
    if top >= num_labels:
        values = np.unique(mask)
        if top >= BINARY_THRESHOLD and len(values) <= 2:
            raise DataError(
                f"{source} is a binary mask (values {', '.join(map(str, values.tolist()))}) but {num_labels} "
                f"classes were asked for; use a binary model (num_labels 1, --num-labels 1) for it.")
        raise DataError(
            f"{source} holds label {top}, outside the {num_labels} classes 0..{num_labels - 1}; "
            f"check the mask or pass a larger num_labels.")
    return mask.astype(np.uint8)


def _refuse_several_levels(mask: np.ndarray, source: str) -> None:
    """A binary 0-255 mask has one level besides black; 0/128/255 would silently merge two classes."""
    if len(np.unique(mask)) <= 2:
        return
    levels = distinct_levels(mask_levels(mask), False, int(mask.max()))
    if len([v for v in levels if v != 0]) > 1:
        raise DataError(
            f"{source} holds {len(levels)} grey levels ({', '.join(map(str, levels))}) that each fill regions; "
            f"a binary mask has two. Pass --num-labels {len(levels)} (num_labels={len(levels)}) to make them "
            f"classes, or fix the mask.")


def read_mask(paths: Sequence[Path], num_labels: Optional[int], size: Optional[tuple[int, int]] = None,
              image_path: Optional[Path] = None, instances: bool = False,
              coding: Optional[MaskCoding] = None) -> np.ndarray:
    """Read one or more mask files of one image and join them (union, or maximum for label maps).

    ``coding`` is the data set's decision (:func:`decide_mask_coding`); without it the masks are read as
    :func:`prepare_mask` reads one array.
    """
    joined = None
    for path in paths:
        arr = read_mask_pixels(path)
        if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
            raise DataError(
                f"mask {path} is {arr.shape[1]}x{arr.shape[0]} but its image {image_path} is "
                f"{size[0]}x{size[1]} (width x height); they must have the same size.")
        if coding is None:
            grey = arr.max(axis=-1) if arr.ndim == 3 else arr
            arr = prepare_mask(grey, num_labels, source=f"mask {path}", instances=instances)
        else:
            arr = coding.apply(arr, source=f"mask {path}")
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
