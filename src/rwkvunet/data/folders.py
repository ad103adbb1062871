"""Image/mask folders: plain ``images/`` + ``masks/`` and the Kvasir, CVC, BUSI, GlaS and ISIC layouts.

Every layout is read the same way: a file is a mask when it lies under a mask folder (``masks``,
``Ground Truth``, ``..._GroundTruth``...) or its name ends in a mask suffix (``_mask``, ``_mask_1``,
``_segmentation``, ``_anno``); every other image file is an image. A mask belongs to the image whose file
stem equals the mask's stem without that suffix, so several masks of one image (BUSI) are joined. Images are
stored by path and decoded only when read; masks are read, checked and stored as PNG label maps, all with the
one :class:`~rwkvunet.data.files.MaskCoding` decided from every mask of the set (:func:`mask_coding`).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .files import (IMAGE_EXTENSIONS, DataError, MaskCoding, decide_mask_coding, image_size, is_image_file, read_mask,
                    summarise_mask)

MASK_FOLDERS = {"masks", "mask", "ground truth", "groundtruth", "gt", "labels", "label", "annotations",
                "annotation", "segmentations", "segmentation"}
MASK_SUFFIX = re.compile(r"(?i)[_\- ](mask|segmentation|anno|annotation)(?:[_\- ]?\d+)?$")
IGNORED_SUFFIX = re.compile(r"(?i)_superpixels$")  # ISIC ships superpixel maps beside its images

FOLDER_LAYOUTS = ("folder", "kvasir", "cvc", "busi", "glas", "isic")


@dataclass
class Pair:
    """One image and the mask files that belong to it."""

    case_id: str
    image: Path
    masks: list = field(default_factory=list)


def _is_mask_folder(name: str) -> bool:
    low = name.lower()
    return low in MASK_FOLDERS or low.endswith("groundtruth") or low.endswith("_gt")


def find_pairs(root: Path) -> list[Pair]:
    """Pair every image under ``root`` with its masks; raises :class:`DataError` on unpaired or duplicate files."""
    root = Path(root)
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)):
        rel_dirs = path.relative_to(root).parts[:-1]
        stem = path.stem
        if IGNORED_SUFFIX.search(stem):
            continue
        suffix = MASK_SUFFIX.search(stem)
        if any(_is_mask_folder(d) for d in rel_dirs) or suffix:
            key = stem[:suffix.start()] if suffix else stem
            masks[key].append(path)
        else:
            if stem in images:
                raise DataError(f"two images share the name {stem!r}: {images[stem]} and {path}; masks are "
                                f"matched by file name, so rename one or load the folders separately.")
            images[stem] = path
    if not images:
        raise DataError(f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    lonely_images = [str(images[k]) for k in images if k not in masks]
    lonely_masks = [str(m) for k in masks if k not in images for m in masks[k]]
    if lonely_images or lonely_masks:
        lines = []
        if lonely_images:
            lines.append(f"{len(lonely_images)} image(s) without a mask, e.g. {lonely_images[:3]}")
        if lonely_masks:
            lines.append(f"{len(lonely_masks)} mask(s) without an image, e.g. {lonely_masks[:3]}")
        raise DataError(f"cannot pair the files under {root}: " + "; ".join(lines) + ". Masks must have the "
                        "image's file name, optionally followed by _mask, _mask_N, _segmentation or _anno.")
    return [Pair(k, images[k], sorted(masks[k])) for k in sorted(images)]


def looks_like_folder_layout(root: Path) -> bool:
    """True when ``root`` holds images and masks recognisable by :func:`find_pairs`."""
    for path in Path(root).rglob("*"):
        if path.is_file() and is_image_file(path):
            rel_dirs = path.relative_to(root).parts[:-1]
            if any(_is_mask_folder(d) for d in rel_dirs) or MASK_SUFFIX.search(path.stem):
                return True
    return False


def has_instance_masks(pairs: list[Pair]) -> bool:
    """GlaS masks (``_anno``) number each gland; they are binarised as non-zero."""
    return any(m.stem.lower().endswith("_anno") for p in pairs for m in p.masks)


def mask_coding(pairs: list[Pair], num_labels: Optional[int], instances: bool, summaries=None) -> MaskCoding:
    """How the masks of all ``pairs`` (every split of a set) become classes: one decision for the whole set.

    ``summaries`` are the :func:`mask_summaries` rows of those masks when they were computed (and cached)
    already.
    """
    return decide_mask_coding([m for p in pairs for m in p.masks], num_labels, instances, summaries)


def mask_summaries(masks: Sequence[Path], stamp=None, rules=None):
    """Rows for ``datasets.Dataset.from_generator``: one :func:`summarise_mask` per mask file (cached by
    ``datasets``, so a data set already converted is not decoded twice on every load). ``stamp`` and ``rules``
    only take part in the cache key."""
    for path in masks:
        yield summarise_mask(path)


def pair_rows(pairs: list[Pair], coding: MaskCoding, stamp=None):
    """Rows for ``datasets.Dataset.from_generator``: image by path (lazy), mask as a checked PNG label map.

    ``stamp`` (file sizes and times) only takes part in the cache key of ``from_generator``.
    """
    for pair in pairs:
        size = image_size(pair.image)
        mask = read_mask(pair.masks, coding.num_labels, size=size, image_path=pair.image, coding=coding)
        yield {"image": str(pair.image), "mask": np.ascontiguousarray(mask), "case_id": pair.case_id}
