"""Evaluate a segmenter on a data split with the paper's protocol (see :mod:`rwkvunet.metrics`).

Volumes (Synapse, ACDC) are predicted slice by slice at ``img_size`` and the label maps resized back to the
slice size with nearest neighbour, then scored per 3-D case: Dice and HD95 per class by TransUNet's rules.
Images of binary sets are predicted at ``img_size``, resized back and scored per image (Dice, IoU). Under
Accelerate every process takes every N-th case and the rows are gathered, so each case is scored once.

    result = evaluate(model, ds["test"], img_size=224, tta=True)
    print(result.format_table()); result.write_json("metrics.json"); result.write_csv("out/")
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.files import BINARY_THRESHOLD, DataError, check_labels, prepare_mask
from .data.loading import is_volume_split
from .data.transforms import EvalTransform, image_hw, to_mask_tensor
from .metrics import case_metrics


@dataclass
class CaseResult:
    """Scores of one case: one value per foreground class (``hd95`` for multi-class, ``iou`` for binary)."""

    case_id: str
    dice: list
    hd95: Optional[list] = None
    iou: Optional[list] = None


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


@dataclass
class EvaluationResult:
    """Per-case rows and their means: per class over cases, then over classes (as TransUNet reports)."""

    class_names: list
    cases: list = field(default_factory=list)
    binary: bool = False

    def _class_mean(self, metric: str, k: int) -> Optional[float]:
        return _mean(getattr(c, metric)[k] for c in self.cases if getattr(c, metric) is not None)

    @property
    def per_class(self) -> list[dict]:
        """``[{"class": name, "dice": ..., "hd95"/"iou": ...}]`` averaged over cases."""
        second = "iou" if self.binary else "hd95"
        return [{"class": name, "dice": self._class_mean("dice", k), second: self._class_mean(second, k)}
                for k, name in enumerate(self.class_names)]

    @property
    def mean_dice(self) -> Optional[float]:
        return _mean(row["dice"] for row in self.per_class)

    @property
    def mean_hd95(self) -> Optional[float]:
        """Mean HD95 over classes (multi-class sets; ``None`` for binary sets)."""
        return None if self.binary else _mean(row["hd95"] for row in self.per_class)

    @property
    def mean_iou(self) -> Optional[float]:
        """Mean IoU (binary sets; ``None`` for multi-class sets)."""
        return _mean(row["iou"] for row in self.per_class) if self.binary else None

    def to_dict(self) -> dict:
        return {
            "num_cases": len(self.cases), "binary": self.binary,
            "mean_dice": self.mean_dice, "mean_hd95": self.mean_hd95, "mean_iou": self.mean_iou,
            "per_class": self.per_class,
            "cases": [{k: v for k, v in vars(c).items() if v is not None} for c in self.cases],
        }

    def write_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def write_csv(self, directory, prefix: str = "") -> tuple[Path, Path]:
        """``{prefix}per_class.csv`` and ``{prefix}per_case.csv`` (one row per case, one column per class)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        second = "iou" if self.binary else "hd95"
        per_class = directory / f"{prefix}per_class.csv"
        with per_class.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "dice", second])
            for row in self.per_class:
                writer.writerow([row["class"], _fmt(row["dice"]), _fmt(row[second])])
            writer.writerow(["mean", _fmt(self.mean_dice), _fmt(self.mean_iou if self.binary else self.mean_hd95)])
        per_case = directory / f"{prefix}per_case.csv"
        with per_case.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case_id", "mean_dice", f"mean_{second}"]
                            + [f"{m}_{n}" for n in self.class_names for m in ("dice", second)])
            for c in self.cases:
                other = getattr(c, second)
                cells = [v for k in range(len(self.class_names)) for v in (c.dice[k], other[k])]
                writer.writerow([c.case_id, _fmt(_mean(c.dice)), _fmt(_mean(other))] + [_fmt(v) for v in cells])
        return per_class, per_case

    def format_table(self) -> str:
        """A plain-text table of the per-class means and the overall means."""
        second = "IoU" if self.binary else "HD95"
        width = max([len("mean")] + [len(str(n)) for n in self.class_names]) + 2
        lines = [f"{'class':<{width}}{'Dice':>10}{second:>10}", "-" * (width + 20)]
        for row in self.per_class:
            lines.append(f"{row['class']:<{width}}{_fmt(row['dice']):>10}{_fmt(row[second.lower()]):>10}")
        lines.append("-" * (width + 20))
        overall = self.mean_iou if self.binary else self.mean_hd95
        lines.append(f"{'mean':<{width}}{_fmt(self.mean_dice):>10}{_fmt(overall):>10}")
        lines.append(f"({len(self.cases)} cases)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# --- prediction ------------------------------------------------------------------------------------------

@torch.no_grad()
def predict_probabilities(model, pixel_values: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Class probabilities (B, L, H, W) at the input size: softmax, or sigmoid for one-label models.

    ``tta`` averages the probabilities of the image, its horizontal flip and its vertical flip (each flipped
    back), as the paper's flip test-time augmentation.
    """
    def once(x):
        logits = model(pixel_values=x).logits
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits.float()
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)

    probs = once(pixel_values)
    if tta:
        for dims in ((-1,), (-2,)):
            probs = probs + once(pixel_values.flip(dims)).flip(dims)
        probs = probs / 3
    return probs


def probabilities_to_labels(probs: torch.Tensor) -> torch.Tensor:
    """Label maps (B, H, W): argmax, or probability > 0.5 for one-label models."""
    return (probs[:, 0] > 0.5).long() if probs.shape[1] == 1 else probs.argmax(dim=1)


def _resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of label maps (B, h, w) to ``size``."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def predict_labels(model, images: Sequence, transform, device, tta: bool, batch_size: int) -> list[np.ndarray]:
    """Label maps of 2-D images (any sizes), each at its own size: what :func:`evaluate` scores."""
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        tensors = [transform(img)["pixel_values"] for img in chunk]
        x = torch.stack(tensors).to(device)
        labels = probabilities_to_labels(predict_probabilities(model, x, tta)).cpu()
        for img, lab in zip(chunk, labels):
            size = image_hw(img)
            out.append(_resize_labels(lab[None], size)[0].numpy().astype(np.uint8))
    return out


def _model_info(model):
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    channels = getattr(config, "in_channels", None) or getattr(config, "num_channels", None)
    id2label = getattr(config, "id2label", None)
    return num_labels, channels, id2label


def evaluate(model, dataset_split, *, img_size=224, batch_size: int = 8, tta: bool = False, accelerator=None,
             progress: bool = True, num_labels: Optional[int] = None, transform=None,
             class_names: Optional[Sequence[str]] = None, spacing=None) -> EvaluationResult:
    """Score ``model`` on ``dataset_split`` (a split of :func:`rwkvunet.data.load_segmentation_dataset`).

    Args:
        model: any module called as ``model(pixel_values=x)`` returning an object with ``.logits``
            (B, L, h, w); L = 1 means a binary sigmoid model. ``model.config`` (num_labels, in_channels,
            id2label) is used when present.
        dataset_split: rows with ``image``, ``mask`` and ``case_id``; volumes are detected with
            :func:`rwkvunet.data.is_volume_split`.
        img_size: network input size (int or (h, w)).
        batch_size: images or slices per forward pass.
        tta: flip test-time augmentation (see :func:`predict_probabilities`).
        accelerator: an ``accelerate.Accelerator``; cases are sharded over its processes and gathered, and
            every process returns the full result.
        progress: tqdm bar on the main process.
        num_labels: classes when the model has no ``config`` (defaults to the logits' channels).
        transform: image transform (default :class:`rwkvunet.data.transforms.EvalTransform`).
        class_names: names of the foreground classes (default from ``id2label``).
        spacing: voxel spacing for HD95 (the paper uses voxel units: ``None``).
    """
    from tqdm.auto import tqdm

    # the bare module: processes run different numbers of forward passes, so no DDP collectives may happen
    model = _unwrap(model, accelerator)
    cfg_labels, channels, id2label = _model_info(model)
    num_labels = num_labels or cfg_labels
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    transform = transform or EvalTransform(img_size, num_channels=channels)
    volume = is_volume_split(dataset_split)
    from datasets import Image

    arrays = not isinstance(dataset_split.features.get("image"), Image)
    rows = dataset_split.with_format("numpy") if arrays else dataset_split  # PIL keeps GIF palettes
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    indices = list(range(rank, len(rows), world))
    was_training = model.training
    model.eval()

    local = []
    bar = tqdm(total=len(indices), desc="evaluating", unit="case", disable=not progress or rank != 0)
    pending = []  # 2-D rows waiting for a full batch

    def score(items, preds):
        for (index, case_id, gt), pred in zip(items, preds):
            local.append((index, _score(case_id, pred, gt, num_classes, spacing)))
        bar.update(len(items))

    num_classes = None
    for index in indices:
        row = rows[index]
        case_id = str(row["case_id"]) if "case_id" in row else str(index)
        if volume:
            image = np.asarray(row["image"], dtype=np.float32)
            if num_classes is None:
                num_classes = _num_classes(model, num_labels, image[0], transform, device)
            gt = check_labels(np.asarray(row["mask"]), num_classes, f"case {case_id!r}")
            slices = predict_labels(model, list(image), transform, device, tta, batch_size)
            score([(index, case_id, gt)], [np.stack(slices)])
        else:
            if num_classes is None:
                num_classes = _num_classes(model, num_labels, row["image"], transform, device)
            gt = ground_truth_labels(row["mask"], num_classes, case_id)
            pending.append((index, case_id, gt, row["image"]))
            if len(pending) == batch_size:
                score([p[:3] for p in pending],
                      predict_labels(model, [p[3] for p in pending], transform, device, tta, batch_size))
                pending = []
    if pending:
        score([p[:3] for p in pending], predict_labels(model, [p[3] for p in pending], transform, device, tta,
                                                        batch_size))
    bar.close()
    if was_training:
        model.train()

    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)
        if num_classes is None:  # a process without cases still needs the class count
            num_classes = max(len(r.dice) for _, r in local) + 1 if local else 2
    seen, cases = set(), []
    for index, result in sorted(local, key=lambda item: item[0]):
        if index not in seen:
            seen.add(index)
            cases.append(result)
    num_classes = num_classes or 2
    binary = num_classes <= 2
    if class_names is None:
        class_names = foreground_class_names(id2label, num_labels, num_classes)
    return EvaluationResult(class_names=list(class_names), cases=cases, binary=binary)


def ground_truth_labels(mask, num_classes: int, case_id: str) -> np.ndarray:
    """The label map :func:`evaluate` scores a 2-D case's mask as (0-255 binary masks thresholded)."""
    try:
        gt = to_mask_tensor(mask).numpy()
        return prepare_mask(gt, num_classes if num_classes > 2 else 2, f"mask of case {case_id!r}")
    except DataError as err:
        raise DataError(f"case {case_id!r}: {err}") from err


def split_labels(dataset_split) -> list[int]:
    """The distinct values of a split's masks, read before any prediction to check that the model fits them."""
    from datasets import Image

    masks = dataset_split.select_columns(["mask"])
    if not isinstance(masks.features["mask"], Image):
        masks = masks.with_format("numpy")
    seen: set[int] = set()
    for row in masks:
        mask = row["mask"]
        values = np.unique(np.asarray(mask) if isinstance(mask, np.ndarray) else to_mask_tensor(mask).numpy())
        seen.update(int(v) for v in values)
    return sorted(seen)


def check_model_fits_labels(num_labels: int, labels: Sequence[int], where: str) -> None:
    """Refuse to score a model on masks whose labels it does not predict (nothing would say the scores are
    meaningless): binary masks for a multi-class model, labels above its classes, label maps for a binary one.
    0-255 masks count as binary, as the data loaders threshold them."""
    if not labels:
        return
    classes, top = max(int(num_labels), 2), max(labels)
    shown = "{" + ", ".join(map(str, labels[:8])) + (", ..." if len(labels) > 8 else "") + "}"
    binary = top <= 1 or top >= BINARY_THRESHOLD
    if classes > 2 and binary:
        raise DataError(f"{where} holds binary masks (labels {shown}) but the model predicts {classes} classes; "
                        f"score a binary model (num_labels 1) on it, or this model on masks labelled "
                        f"0..{classes - 1}")
    if classes > 2 and top >= classes:
        raise DataError(f"{where} holds labels {shown}, above the model's {classes} classes 0..{classes - 1}; "
                        f"score a model trained for {top + 1} classes, or check the masks")
    if classes == 2 and not binary:
        raise DataError(f"{where} holds labels {shown}, a label map of {top + 1} classes, but the model is binary "
                        f"(num_labels {num_labels}); score a model trained for {top + 1} classes")


def foreground_class_names(id2label, num_labels, num_classes) -> list[str]:
    """Foreground class names from ``id2label`` (label 0 of a one-label sigmoid model is the foreground)."""
    id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
    if num_labels == 1:
        name = id2label.get(0, "")
        return [name if name and not name.startswith("LABEL_") else "foreground"]
    return [id2label.get(k, f"class_{k}") for k in range(1, num_classes)]


def _unwrap(model, accelerator):
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _num_classes(model, num_labels, sample_image, transform, device) -> int:
    """Classes to score: the model's labels (one sigmoid label means 2 classes)."""
    if num_labels is None:
        x = transform(sample_image)["pixel_values"][None].to(device)
        with torch.no_grad():
            num_labels = model(pixel_values=x).logits.shape[1]
    return max(int(num_labels), 2)


def _score(case_id: str, pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing) -> CaseResult:
    metrics = case_metrics(pred, gt, num_classes, spacing=spacing)
    return CaseResult(case_id=case_id, dice=metrics["dice"], hd95=metrics.get("hd95"), iou=metrics.get("iou"))
