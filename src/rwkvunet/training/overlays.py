"""The overlay grid's rows: the first cases of a split, predicted and scored as the evaluation does."""
from __future__ import annotations

import numpy as np
import torch

from ..data.files import check_labels
from ..data.loading import is_volume_split
from ..data.transforms import EvalTransform, to_image_tensor
from ..evaluation import ground_truth_labels, predict_labels
from ..metrics import case_metrics
from .plots import OverlayRow


@torch.no_grad()
def overlay_rows(model, split, *, img_size, in_channels: int, limit: int, tta: bool = False) -> list[OverlayRow]:
    """The first ``limit`` cases of ``split``. An image's Dice is its per-case value in the evaluation; a volume
    shows the slice with the most foreground, and the Dice of that slice."""
    transform = EvalTransform(img_size, num_channels=in_channels)
    volume = is_volume_split(split)
    rows = split.with_format("numpy") if volume else split
    num_classes = max(int(model.config.num_labels), 2)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for index in range(min(limit, len(split))):
        row = rows[index]
        case_id = str(row.get("case_id", index))
        if volume:
            mask = check_labels(np.asarray(row["mask"]), num_classes, f"case {case_id!r}")
            z = int((mask.reshape(mask.shape[0], -1) > 0).sum(1).argmax())
            image, truth, note = np.asarray(row["image"], dtype=np.float32)[z], mask[z], f"slice {z}"
        else:
            image, truth, note = row["image"], ground_truth_labels(row["mask"], num_classes, case_id), ""
        (prediction,) = predict_labels(model, [image], transform, device, tta, 1)
        dice = case_metrics(prediction, truth, num_classes)["dice"]
        out.append(OverlayRow(case_id, to_image_tensor(image).numpy(), truth, prediction, dice, note))
    if was_training:
        model.train()
    return out
