"""The paper's segmentation metrics: Dice and HD95 as medpy computes them, and TransUNet's per-case rules.

:func:`dice` and :func:`hd95` give the values of ``medpy.metric.binary.dc`` and ``hd95`` (HD95 is the 95th
percentile of the surface distances of both directions pooled, in voxels unless ``spacing`` is given), but
work only on the masks' joint bounding box grown by one voxel, which leaves every surface voxel and every
distance unchanged and makes volumes with small organs fast.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

Spacing = Optional[Union[float, Sequence[float]]]


def dice(pred, gt) -> float:
    """Dice coefficient ``2|P & G| / (|P| + |G|)`` of two binary masks.

    1.0 when both are empty: the value medpy's ``dc`` means to return there (its ``ZeroDivisionError``
    branch), although with numpy integers it actually returns nan with a warning.
    """
    pred = np.atleast_1d(np.asarray(pred).astype(bool))
    gt = np.atleast_1d(np.asarray(gt).astype(bool))
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & gt) / float(total)


def iou(pred, gt) -> float:
    """Intersection over union of two binary masks; 1.0 when both are empty."""
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / float(union)


def _joint_crop(pred: np.ndarray, gt: np.ndarray) -> tuple:
    """Slices of the joint bounding box grown by one voxel (clipped to the array)."""
    both = pred | gt
    box = []
    for axis in range(both.ndim):
        other = tuple(a for a in range(both.ndim) if a != axis)
        hits = np.flatnonzero(both.any(axis=other) if other else both)
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, both.shape[axis])))
    return tuple(box)


def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing, footprint) -> np.ndarray:
    """Distances from each surface voxel of ``pred`` to the nearest surface voxel of ``gt``."""
    pred_border = pred ^ ndimage.binary_erosion(pred, structure=footprint, iterations=1)
    gt_border = gt ^ ndimage.binary_erosion(gt, structure=footprint, iterations=1)
    dt = ndimage.distance_transform_edt(~gt_border, sampling=spacing)
    return dt[pred_border]


def surface_distances(pred, gt, spacing: Spacing = None, connectivity: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Surface distances pred->gt and gt->pred (medpy's ``__surface_distances`` both ways)."""
    pred = np.atleast_1d(np.asarray(pred).astype(bool))
    gt = np.atleast_1d(np.asarray(gt).astype(bool))
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must have the same shape")
    if not pred.any():
        raise ValueError("the prediction is empty; surface distances need objects in both masks")
    if not gt.any():
        raise ValueError("the ground truth is empty; surface distances need objects in both masks")
    if spacing is not None:
        spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (pred.ndim,)).copy()
    box = _joint_crop(pred, gt)
    pred, gt = pred[box], gt[box]
    footprint = ndimage.generate_binary_structure(pred.ndim, connectivity)
    return (_surface_distances(pred, gt, spacing, footprint), _surface_distances(gt, pred, spacing, footprint))


def hd95(pred, gt, spacing: Spacing = None, connectivity: int = 1) -> float:
    """95th percentile Hausdorff distance as medpy's ``hd95`` (both directions pooled).

    Raises ``ValueError`` when either mask is empty (medpy raises ``RuntimeError``); :func:`case_metrics`
    applies the paper's rule for that case.
    """
    a, b = surface_distances(pred, gt, spacing, connectivity)
    return float(np.percentile(np.hstack((a, b)), 95))


def transunet_case_metric(pred, gt, spacing: Spacing = None) -> tuple[float, float]:
    """(Dice, HD95) of one class by TransUNet's rule: both non-empty -> the metrics; prediction only ->
    (1, 0); otherwise (0, 0)."""
    pred = np.asarray(pred) > 0
    gt = np.asarray(gt) > 0
    if pred.any() and gt.any():
        return dice(pred, gt), hd95(pred, gt, spacing)
    if pred.any():
        return 1.0, 0.0
    return 0.0, 0.0


def case_metrics(pred, gt, num_classes: int, spacing: Spacing = None, binary: Optional[bool] = None) -> dict:
    """Metrics of one case (an image or a volume) for each foreground class ``1..num_classes-1``.

    Multi-class sets (Synapse, ACDC): ``{"dice": [...], "hd95": [...]}`` by :func:`transunet_case_metric`.
    Binary sets (``num_classes <= 2`` unless ``binary`` says otherwise): ``{"dice": [d], "iou": [i]}`` of the
    image as a whole, where an empty prediction of an empty mask scores 1 (a correct "nothing here").
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must have the same shape")
    if binary is None:
        binary = num_classes <= 2
    if binary:
        ds, ious = [], []
        for c in range(1, max(num_classes, 2)):
            ds.append(dice(pred == c, gt == c))
            ious.append(iou(pred == c, gt == c))
        return {"dice": ds, "iou": ious}
    ds, hs = [], []
    for c in range(1, num_classes):
        d, h = transunet_case_metric(pred == c, gt == c, spacing)
        ds.append(d)
        hs.append(h)
    return {"dice": ds, "hd95": hs}
