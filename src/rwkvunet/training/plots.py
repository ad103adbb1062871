"""PNG figures of a run: loss and Dice curves, and overlays of image, ground truth and prediction."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(train_loss: Sequence, validation: Sequence, path) -> Path:
    """Training loss per step (with a moving average) and validation mean Dice per evaluation."""
    plt = _pyplot()
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train_loss:
        steps = np.array([r[0] for r in train_loss])
        loss = np.array([r[2] for r in train_loss], dtype=float)
        ax_loss.plot(steps, loss, lw=0.8, alpha=0.4, label="per step")
        window = max(1, len(loss) // 20)
        if window > 1:
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax_loss.plot(steps[window - 1:], smooth, lw=1.6, label=f"mean of {window}")
        ax_loss.legend()
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    if validation:
        ax_dice.plot([r[0] for r in validation], [r[2] for r in validation], "o-")
    ax_dice.set(title="validation mean Dice", xlabel="step", ylabel="Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def label_colours(num_classes: int) -> np.ndarray:
    """RGB in [0, 1] for each class (at least background and one more): the palette of ``rwkvunet predict``'s
    overlays and ``labels.json`` and of the demo page, so a class has one colour everywhere; background black."""
    from ..inference_io import colorize

    return colorize(np.arange(max(num_classes, 2))).astype(np.float64) / 255.0


def _overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    grey = image if image.ndim == 2 else image.mean(axis=0) if image.shape[0] in (1, 3) else image.mean(-1)
    lo, hi = float(grey.min()), float(grey.max())
    grey = (grey - lo) / (hi - lo) if hi > lo else np.zeros_like(grey)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    labels = np.clip(labels.astype(int), 0, len(colours) - 1)
    fg = labels > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[labels[fg]]
    return rgb


def plot_overlays(samples: Sequence[tuple], num_classes: int, path, titles=("image", "ground truth",
                                                                           "prediction")) -> Path:
    """Grid with one row per ``(case_id, image (H, W) or (C, H, W), gt (H, W), pred (H, W))``."""
    plt = _pyplot()
    colours = label_colours(num_classes)
    rows = max(len(samples), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for r, (case_id, image, gt, pred) in enumerate(samples):
        image = np.asarray(image, dtype=np.float32)
        grey = image[0] if image.ndim == 3 and image.shape[0] == 1 else image
        panels = [_overlay(grey, np.zeros_like(gt), colours), _overlay(grey, gt, colours),
                  _overlay(grey, pred, colours)]
        for c, panel in enumerate(panels):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c])
        name = str(case_id)
        axes[r, 0].set_ylabel(name if len(name) <= 18 else name[:8] + "..." + name[-7:], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
