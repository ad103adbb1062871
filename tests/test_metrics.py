"""Dice and HD95 against medpy (the paper's reference implementation) and TransUNet's per-case rules.

The implementations follow the same definitions, so values must agree to float64 rounding (1e-9); the
bounding-box crop must not change any distance.
"""
from __future__ import annotations

import numpy as np
import pytest

medpy_binary = pytest.importorskip("medpy.metric.binary", reason="medpy is part of the dev extra")

from rwkvunet.metrics import case_metrics, dice, hd95, iou, transunet_case_metric  # noqa: E402


def _random_masks(rng, ndim):
    shape = tuple(int(s) for s in rng.integers(6, 24 if ndim == 3 else 48, size=ndim))
    density = rng.uniform(0.02, 0.4)
    pred = rng.random(shape) < density
    gt = rng.random(shape) < rng.uniform(0.02, 0.4)
    pred[tuple(rng.integers(0, s) for s in shape)] = True  # never empty
    gt[tuple(rng.integers(0, s) for s in shape)] = True
    return pred, gt


@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_and_hd95_equal_medpy_on_random_masks(ndim):
    rng = np.random.default_rng(ndim)
    for _ in range(15):
        pred, gt = _random_masks(rng, ndim)
        assert dice(pred, gt) == pytest.approx(medpy_binary.dc(pred, gt), abs=1e-12)
        assert hd95(pred, gt) == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-9)


def test_hd95_equals_medpy_with_anisotropic_spacing():
    rng = np.random.default_rng(7)
    for spacing in [(3.0, 0.7, 0.7), (1.0, 2.5, 0.5), 1.7]:
        pred, gt = _random_masks(rng, 3)
        ref = medpy_binary.hd95(pred, gt, voxelspacing=spacing)
        assert hd95(pred, gt, spacing=spacing) == pytest.approx(ref, abs=1e-9)
    pred, gt = _random_masks(rng, 3)
    assert hd95(pred, gt, spacing=(4.0, 1, 1)) != pytest.approx(hd95(pred, gt))


def test_small_objects_far_from_each_other_and_at_the_border():
    """Cropping keeps distances between objects far apart and the surface of objects touching the edge."""
    pred = np.zeros((40, 64, 64), bool)
    gt = np.zeros_like(pred)
    pred[0:5, 0:6, 0:4] = True           # touches three faces of the volume
    gt[30:40, 50:64, 55:64] = True      # touches the opposite faces
    gt[10:12, 10:12, 10:12] = True
    assert hd95(pred, gt) == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-9)
    assert hd95(pred, gt, (2.0, 1.0, 0.5)) == pytest.approx(medpy_binary.hd95(pred, gt, (2.0, 1.0, 0.5)), abs=1e-9)


def test_single_voxels():
    pred = np.zeros((9, 9, 9), bool)
    gt = np.zeros_like(pred)
    pred[1, 2, 3] = True
    gt[4, 6, 3] = True
    assert hd95(pred, gt) == pytest.approx(5.0)  # |(3, 4, 0)|
    assert hd95(pred, gt) == pytest.approx(medpy_binary.hd95(pred, gt))
    assert hd95(pred, pred) == 0.0
    assert dice(pred, gt) == medpy_binary.dc(pred, gt) == 0.0
    assert dice(pred, pred) == 1.0


def test_empty_masks():
    empty = np.zeros((8, 8), bool)
    some = np.zeros((8, 8), bool)
    some[2:4, 2:5] = True
    for a, b in [(empty, some), (some, empty)]:
        assert dice(a, b) == medpy_binary.dc(a, b) == 0.0
        with pytest.raises(RuntimeError):
            medpy_binary.hd95(a, b)
        with pytest.raises(ValueError, match="empty"):
            hd95(a, b)
    # medpy means 1.0 here (its ZeroDivisionError branch) but numpy integers divide to nan with a warning;
    # the intended value is kept so that means stay defined
    with np.errstate(invalid="ignore"):
        ref = medpy_binary.dc(empty, empty)
    assert np.isnan(ref) or ref == 1.0
    assert dice(empty, empty) == 1.0


def test_transunet_rules_per_class():
    some = np.zeros((8, 8), np.uint8)
    some[2:4, 2:5] = 1
    empty = np.zeros_like(some)
    assert transunet_case_metric(some, empty) == (1.0, 0.0)   # prediction only
    assert transunet_case_metric(empty, some) == (0.0, 0.0)   # missed
    assert transunet_case_metric(empty, empty) == (0.0, 0.0)  # absent in both: counted as 0 as TransUNet
    shifted = np.roll(some, 1, axis=1)
    d, h = transunet_case_metric(shifted, some)
    assert d == pytest.approx(medpy_binary.dc(shifted, some)) and h == pytest.approx(medpy_binary.hd95(shifted, some))


def test_case_metrics_multiclass_volume_matches_medpy_per_class():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 4, (6, 12, 12))
    pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 4, gt.shape))
    pred[pred == 2] = 0  # class 2 never predicted
    out = case_metrics(pred, gt, num_classes=5)  # class 4 absent from both
    assert set(out) == {"dice", "hd95"} and len(out["dice"]) == 4
    for c in (1, 3):
        assert out["dice"][c - 1] == pytest.approx(medpy_binary.dc(pred == c, gt == c), abs=1e-12)
        assert out["hd95"][c - 1] == pytest.approx(medpy_binary.hd95(pred == c, gt == c), abs=1e-9)
    assert (out["dice"][1], out["hd95"][1]) == (0.0, 0.0)
    assert (out["dice"][3], out["hd95"][3]) == (0.0, 0.0)


def test_binary_per_image_dice_and_iou():
    rng = np.random.default_rng(4)
    pred = (rng.random((16, 16)) < 0.3).astype(np.uint8)
    gt = (rng.random((16, 16)) < 0.3).astype(np.uint8)
    inter = float(np.sum(pred & gt))
    union = float(np.sum(pred | gt))
    out = case_metrics(pred, gt, num_classes=2)
    assert out["dice"] == [pytest.approx(2 * inter / (pred.sum() + gt.sum()))]
    assert out["iou"] == [pytest.approx(inter / union)]
    empty = np.zeros_like(pred)
    assert case_metrics(empty, empty, 2) == {"dice": [1.0], "iou": [1.0]}  # nothing to find, nothing found
    assert iou(pred, empty) == 0.0


def test_cropping_makes_hd95_fast_on_large_volumes():
    import time

    pred = np.zeros((150, 512, 512), bool)
    gt = np.zeros_like(pred)
    pred[60:70, 200:230, 300:320] = True
    gt[62:73, 205:232, 296:318] = True
    start = time.perf_counter()
    value = hd95(pred, gt)
    elapsed = time.perf_counter() - start
    small = (slice(55, 80), slice(190, 240), slice(290, 330))  # same objects: distances do not depend on margins
    assert value == pytest.approx(medpy_binary.hd95(pred[small], gt[small]), abs=1e-9)
    assert elapsed < 10.0  # medpy takes about 40 s on the full volume (2 shared cores)
