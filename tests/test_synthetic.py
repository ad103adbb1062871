"""The built-in synthetic data set: deterministic, multi-class, overlapping shapes, loader-shaped splits."""
from __future__ import annotations

import numpy as np
import pytest

from rwkvunet.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset, make_synthetic_image


@pytest.fixture(scope="module")
def dataset():
    return make_synthetic_dataset(seed=3, size=48, num_train=24, num_validation=4, num_test=5)


def test_splits_and_columns(dataset):
    from datasets import Image

    assert {k: len(v) for k, v in dataset.items()} == {"train": 24, "validation": 4, "test": 5}
    for split in dataset.values():
        assert isinstance(split.features["image"], Image) and isinstance(split.features["mask"], Image)
        assert split.column_names == ["image", "mask", "case_id"]
    ids = [c for split in dataset.values() for c in split["case_id"]]
    assert len(ids) == len(set(ids))
    row = dataset["test"][0]
    assert row["image"].mode == "L" and row["image"].size == (48, 48) and row["mask"].size == (48, 48)


def test_deterministic_by_seed(dataset):
    again = make_synthetic_dataset(seed=3, size=48, num_train=24, num_validation=4, num_test=5)
    other = make_synthetic_dataset(seed=4, size=48, num_train=24, num_validation=4, num_test=5)
    for i in (0, 7, 23):
        a, b, c = (np.asarray(d["train"][i]["image"]) for d in (dataset, again, other))
        assert np.array_equal(a, b) and not np.array_equal(a, c)
    # splits use disjoint image seeds: no test image repeats a training image
    train = {np.asarray(r["image"]).tobytes() for r in dataset["train"]}
    assert not any(np.asarray(r["image"]).tobytes() in train for r in dataset["test"])


def test_every_class_and_overlaps(dataset):
    masks = np.stack([np.asarray(r["mask"]) for r in dataset["train"]])
    assert set(np.unique(masks)) == set(range(len(SYNTHETIC_CLASSES)))
    # most images hold several classes (shapes touch and cover each other)
    classes_per_image = [len(set(np.unique(m)) - {0}) for m in masks]
    assert np.mean(np.array(classes_per_image) >= 2) > 0.8


def test_classes_differ_in_appearance():
    """Labels describe the pixels: mean grey level is ordered ellipse > rectangle > background > triangle, and
    stripes (class 1) vary along rows far more than along columns."""
    levels = {k: [] for k in range(4)}
    row_var, col_var = [], []
    for seed in range(30):
        image, mask = make_synthetic_image(seed, size=64)
        image = image.astype(np.float64)
        for k in range(4):
            if (mask == k).sum() > 50:
                levels[k].append(image[mask == k].mean())
        inside = mask == 1
        if inside.sum() > 200:
            rows, cols = np.nonzero(inside)
            r0, c0 = int(np.median(rows)), int(np.median(cols))
            patch = image[r0 - 3:r0 + 4, c0 - 3:c0 + 4]
            if (mask[r0 - 3:r0 + 4, c0 - 3:c0 + 4] == 1).all():
                row_var.append(np.var(patch.mean(axis=1)))
                col_var.append(np.var(patch.mean(axis=0)))
    mean = {k: np.mean(v) for k, v in levels.items()}
    assert mean[1] > mean[2] > mean[0] > mean[3]
    assert row_var and np.mean(row_var) > 3 * np.mean(col_var)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least one image per split"):
        make_synthetic_dataset(num_test=0)
