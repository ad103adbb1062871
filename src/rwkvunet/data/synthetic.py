"""A synthetic multi-class segmentation set made on the fly: no download, deterministic by seed.

Each grey image holds a few overlapping shapes on a smooth, noisy background. The class of a shape is its
kind and its texture: 1 ellipse with horizontal stripes, 2 rectangle with a checkerboard, 3 triangle with
speckles. Shapes drawn later cover earlier ones, in the image and in the mask alike, so classes touch and
overlap as organs do. Brightness, size, position, angle and texture phase are random, and Gaussian noise is
added, so a model has to use shape and texture rather than a single grey level.

    ds = make_synthetic_dataset(seed=0)        # DatasetDict like load_segmentation_dataset's
    ds["train"][0]["image"], ds["train"][0]["mask"], ds["train"][0]["case_id"]
"""
from __future__ import annotations

import numpy as np

__all__ = ["SYNTHETIC_CLASSES", "SYNTHETIC_SOURCE", "make_synthetic_image", "make_synthetic_dataset"]

#: Label names, index = class id.
SYNTHETIC_CLASSES = ("background", "ellipse", "rectangle", "triangle")

#: The ``--dataset`` value that selects this set.
SYNTHETIC_SOURCE = "synthetic"


def _texture(kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture in [-1, 1] that tells the classes apart."""
    phase = rng.uniform(0, 2 * np.pi)
    if kind == 1:  # stripes
        period = rng.uniform(4.0, 7.0)
        return np.sin(2 * np.pi * yy / period + phase)
    if kind == 2:  # checkerboard
        period = rng.uniform(6.0, 10.0)
        return np.sign(np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period + phase))
    return rng.uniform(-1.0, 1.0, size=yy.shape) ** 3  # speckles


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    angle = rng.uniform(0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    u = (xx - cx) * ca + (yy - cy) * sa  # coordinates in the shape's own frame
    v = -(xx - cx) * sa + (yy - cy) * ca
    a, b = rng.uniform(0.1, 0.25, size=2) * size
    if kind == 1:
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == 2:
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    # triangle: inside three half-planes, apex up in its own frame
    return (v <= b) & (v >= -b + 2 * b * np.abs(u) / a - b) & (np.abs(u) <= a)


def make_synthetic_image(seed: int, size: int = 64, max_shapes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8, size x size) and its label map (uint8, values in ``range(len(SYNTHETIC_CLASSES))``)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    gy, gx = rng.uniform(-0.2, 0.2, size=2)
    image = 0.35 + gy * (yy / size - 0.5) + gx * (xx / size - 0.5)  # smooth illumination gradient
    mask = np.zeros((size, size), np.uint8)
    num_shapes = int(rng.integers(2, max_shapes + 1))
    kinds = rng.integers(1, len(SYNTHETIC_CLASSES), size=num_shapes)
    kinds[:3] = rng.permutation([1, 2, 3])[:min(3, num_shapes)]  # most images show most classes
    for kind in kinds:
        inside = _shape_mask(int(kind), yy, xx, size, rng)
        level = {1: 0.75, 2: 0.55, 3: 0.2}[int(kind)] + rng.uniform(-0.08, 0.08)
        shaded = level + 0.15 * _texture(int(kind), yy, xx, rng)
        image = np.where(inside, shaded, image)
        mask[inside] = kind
    image = image + rng.normal(0.0, 0.06, size=image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def make_synthetic_dataset(seed: int = 0, size: int = 64, num_train: int = 96, num_validation: int = 12,
                           num_test: int = 12):
    """The synthetic set as a ``datasets.DatasetDict`` (train / validation / test).

    Rows hold ``image`` and ``mask`` as ``datasets.Image`` (grey PNGs) and ``case_id``, the same shape as
    :func:`rwkvunet.data.load_segmentation_dataset` returns for 2-D sets. Image ``i`` of the set made with
    ``seed`` is the same on every machine; splits use disjoint image seeds.
    """
    from datasets import Dataset, DatasetDict, Features, Image, Value
    from PIL import Image as PILImage

    if min(num_train, num_validation, num_test) < 1 or size < 16:
        raise ValueError("the synthetic set needs at least one image per split and a size of 16 pixels or more")
    features = Features({"image": Image(), "mask": Image(), "case_id": Value("string")})
    root = np.random.SeedSequence(int(seed))
    splits = {}
    for name, count, child in zip(("train", "validation", "test"), (num_train, num_validation, num_test),
                                  root.spawn(3)):
        seeds = child.generate_state(count, dtype=np.uint64)
        rows = {"image": [], "mask": [], "case_id": []}
        for i, s in enumerate(seeds):
            img, msk = make_synthetic_image(int(s), size)
            rows["image"].append(PILImage.fromarray(img, mode="L"))
            rows["mask"].append(PILImage.fromarray(msk, mode="L"))
            rows["case_id"].append(f"{name}_{i:04d}")
        splits[name] = Dataset.from_dict(rows, features=features)
    return DatasetDict(splits)
