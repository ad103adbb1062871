"""PNG figures of a run: loss and Dice curves, and overlays of image, ground truth and prediction."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

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


def _aligned(series: Sequence[Sequence[tuple]]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values (seeds, steps))`` at the steps every seed's ``[(step, value)]`` has."""
    steps = sorted(set.intersection(*(set(s for s, _ in one) for one in series))) if series else []
    values = np.array([[dict(one)[s] for s in steps] for one in series], dtype=float).reshape(len(series), -1)
    return np.array(steps), values


def plot_comparison(curves: dict, path) -> Path:
    """Validation mean Dice and training loss per model: ``curves`` maps a model to one
    ``{"validation": [(step, dice)], "loss": [(step, loss)]}`` per seed; several seeds draw their mean and, shaded,
    their range."""
    plt = _pyplot()
    fig, (ax_dice, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, (model, runs) in enumerate(curves.items()):
        colour = plt.get_cmap("tab10")(k % 10)
        seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
        steps, dice = _aligned([run["validation"] for run in runs])
        if len(steps):
            ax_dice.plot(steps, dice.mean(0), "o-", color=colour, ms=3, label=model + seeds)
            if len(runs) > 1:
                ax_dice.fill_between(steps, dice.min(0), dice.max(0), color=colour, alpha=0.2, lw=0)
        steps, loss = _aligned([run["loss"] for run in runs])
        if len(steps):
            window = max(1, len(steps) // 20)
            kernel = np.ones(window) / window

            def smooth(y):
                return np.convolve(y, kernel, mode="valid")

            x = steps[window - 1:]
            ax_loss.plot(x, smooth(loss.mean(0)), color=colour, lw=1.5,
                         label=model + seeds + (f", mean of {window} steps" if window > 1 else ""))
            if len(runs) > 1:
                ax_loss.fill_between(x, smooth(loss.min(0)), smooth(loss.max(0)), color=colour, alpha=0.2, lw=0)
    band = " (shaded: range over seeds)" if any(len(runs) > 1 for runs in curves.values()) else ""
    ax_dice.set(title="validation mean Dice" + band, xlabel="step", ylabel="Dice", ylim=(0, 1))
    ax_loss.set(title="training loss" + band, xlabel="step", ylabel="loss")
    for ax in (ax_dice, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
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


@dataclass
class OverlayRow:
    """One row of the overlay grid: a case's image with its ground truth and prediction (label maps of the same
    size), and the Dice of each foreground class as the evaluation scores them."""

    case_id: str
    image: np.ndarray  # (H, W) or (C, H, W)
    truth: np.ndarray  # (H, W) labels
    prediction: np.ndarray  # (H, W) labels
    dice: Sequence[float] = ()  # per foreground class
    note: str = ""  # what the row shows of the case, e.g. "slice 37" of a volume

    @property
    def mean_dice(self) -> Optional[float]:
        """The case's Dice: the mean over foreground classes (``mean_dice`` of the evaluation's per-case CSV)."""
        return float(np.mean(self.dice)) if len(self.dice) else None


def dice_text(row: OverlayRow, class_names: Sequence[str]) -> str:
    """``Dice 0.812`` under a row's prediction; with several classes a second line gives the Dice of each class
    present in the ground truth or the prediction."""
    if row.mean_dice is None:
        return ""
    head = f"{row.note}: " if row.note else ""
    text = f"{head}Dice {row.mean_dice:.3f}"
    if len(row.dice) > 1:
        shown = [f"{name} {d:.2f}" for k, (name, d) in enumerate(zip(class_names, row.dice), start=1)
                 if (row.truth == k).any() or (row.prediction == k).any()]
        text += "\n" + ", ".join(shown or ["no class present"])
    return text


def overlay_figure(rows: Sequence[OverlayRow], class_names: Sequence[str]):
    """The grid (image, ground truth, prediction per row) with the case's Dice under each prediction and a legend
    of the foreground classes' names and colours."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    colours = label_colours(len(class_names) + 1)
    count = max(len(rows), 1)
    legend_rows = math.ceil(len(class_names) / 4)
    height = 2.7 * count + 0.3 * legend_rows + 0.45
    fig, axes = plt.subplots(count, 3, figsize=(7.5, height), squeeze=False)
    for r, row in enumerate(rows):
        image = np.asarray(row.image, dtype=np.float32)
        grey = image[0] if image.ndim == 3 and image.shape[0] == 1 else image
        panels = [_overlay(grey, np.zeros_like(row.truth), colours), _overlay(grey, row.truth, colours),
                  _overlay(grey, row.prediction, colours)]
        for c, panel in enumerate(panels):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(("image", "ground truth", "prediction")[c])
        name = str(row.case_id)
        axes[r, 0].set_ylabel(name if len(name) <= 18 else name[:8] + "..." + name[-7:], fontsize=8)
        axes[r, 2].set_xlabel(dice_text(row, class_names), fontsize=8)
    handles = [Patch(facecolor=colours[k], edgecolor="none", label=name)
               for k, name in enumerate(class_names, start=1)]
    footnote = 0.25 / height
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, footnote), ncol=min(len(handles), 4),
               fontsize=8, frameon=False, handlelength=1.2, columnspacing=1.2)
    if any(len(row.dice) > 1 for row in rows):
        note = "Dice: the case's mean over classes, as the evaluation scores it (a class in neither mask counts 0)"
    else:
        note = "Dice: of each case, as the evaluation scores it"
    fig.text(0.5, 0.06 / height, note, ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, footnote + (0.3 * legend_rows + 0.05) / height, 1, 1))
    return fig


def plot_overlays(rows: Sequence[OverlayRow], class_names: Sequence[str], path) -> Path:
    """Write :func:`overlay_figure` as a PNG."""
    plt = _pyplot()
    fig = overlay_figure(rows, class_names)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
