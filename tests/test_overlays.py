"""The overlay grid explains itself: a legend of the classes' names and colours, and on each row the case's Dice,
the value the evaluation gives that case."""
from __future__ import annotations

from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from PIL import Image

from rwkvunet.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset
from rwkvunet.evaluation import evaluate
from rwkvunet.metrics import dice as dice_of
from rwkvunet.training.overlays import overlay_rows
from rwkvunet.training.plots import OverlayRow, label_colours, overlay_figure, plot_overlays


class RandomConv(torch.nn.Module):
    """An untrained stand-in for a segmenter: some pixels right, some wrong, not symmetric under flips."""

    def __init__(self, num_labels: int, channels: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, num_labels, 5, padding=2)
        self.config = SimpleNamespace(num_labels=num_labels, in_channels=channels, id2label=None)

    def forward(self, pixel_values):
        return SimpleNamespace(logits=self.conv(pixel_values * 4 - 2) * 3)


def _binary_split(count: int = 3, size=(20, 28)) -> datasets.Dataset:
    """Grey images with a bright square and 0/255 masks of it (thresholded by the evaluation)."""
    rng = np.random.default_rng(2)
    images, masks = [], []
    for _ in range(count):
        mask = np.zeros(size, np.uint8)
        y, x = rng.integers(0, 10, 2)
        mask[y:y + 9, x:x + 12] = 255
        images.append(Image.fromarray((mask // 2 + rng.integers(0, 90, size)).astype(np.uint8)))
        masks.append(Image.fromarray(mask))
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                                  "case_id": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "mask": masks,
                                       "case_id": [f"img{i}" for i in range(count)]}, features=features)


@pytest.mark.parametrize("kind", ["multi-class", "binary 0/255"])
def test_row_dice_is_the_evaluations_per_case_value(kind):
    if kind == "multi-class":
        split, model = make_synthetic_dataset(seed=1, size=32, num_train=1, num_validation=1, num_test=4)["test"], \
            RandomConv(len(SYNTHETIC_CLASSES))
    else:
        split, model = _binary_split(), RandomConv(1, seed=3)
    rows = overlay_rows(model, split, img_size=32, in_channels=1, limit=3, tta=True)
    result = evaluate(model, split, img_size=32, batch_size=2, tta=True, progress=False)
    assert [r.case_id for r in rows] == [c.case_id for c in result.cases[:3]]
    for row, case in zip(rows, result.cases):
        assert list(row.dice) == pytest.approx(case.dice, abs=1e-12)
        assert row.mean_dice == pytest.approx(np.mean(case.dice), abs=1e-12)
        assert row.truth.shape == row.prediction.shape == np.asarray(split[0]["mask"]).shape
    values = [d for r in rows for d in r.dice]
    assert any(0 < d < 1 for d in values)  # neither all right nor all wrong: the comparison means something
    if kind == "binary 0/255":  # the 0/255 masks scored as foreground 1
        for row in rows:
            assert set(np.unique(row.truth)) == {0, 1}
            assert row.dice[0] == pytest.approx(dice_of(row.prediction == 1, row.truth == 1))


def test_a_volume_row_shows_its_fullest_slice_and_that_slices_dice():
    rng = np.random.default_rng(0)
    mask = np.zeros((4, 16, 16), np.uint8)
    mask[1, 2:6, 2:9] = 1
    mask[2, 3:13, 2:14] = 2  # the slice with the most foreground
    mask[2, 0:3, 0:3] = 1
    image = mask.astype(np.float32) / 3 + rng.normal(0, 0.05, mask.shape).astype(np.float32)
    features = datasets.Features({"image": datasets.Array3D((None, 16, 16), "float32"),
                                  "mask": datasets.Array3D((None, 16, 16), "uint8"),
                                  "case_id": datasets.Value("string")})
    split = datasets.Dataset.from_dict({"image": [image], "mask": [mask], "case_id": ["vol"]}, features=features)
    (row,) = overlay_rows(RandomConv(3, seed=1), split, img_size=16, in_channels=1, limit=5)
    assert row.note == "slice 2" and np.array_equal(row.truth, mask[2])
    for k in (1, 2):  # both classes are in the slice: TransUNet's rule is the plain Dice, or 0 when not predicted
        expected = dice_of(row.prediction == k, row.truth == k) if (row.prediction == k).any() else 0.0
        assert row.dice[k - 1] == pytest.approx(expected)


def _rows() -> list[OverlayRow]:
    truth = np.zeros((12, 12), np.int64)
    truth[2:6, 2:6], truth[7:11, 6:11] = 1, 3
    prediction = truth.copy()
    prediction[2:4, 2:6] = 0
    image = np.linspace(0, 1, 144).reshape(1, 12, 12)
    return [OverlayRow("case-a", image, truth, prediction, [0.75, 0.0, 1.0]),
            OverlayRow("case-b", image, truth, truth, [1.0, 0.0, 1.0], note="slice 7")]


def test_the_figure_has_a_legend_of_names_and_colours_and_each_rows_dice(tmp_path):
    names = list(SYNTHETIC_CLASSES[1:])
    rows = _rows()
    fig = overlay_figure(rows, names)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == names
    colours = label_colours(len(names) + 1)[1:]
    np.testing.assert_allclose([to_rgb(h.get_facecolor()) for h in legend.legend_handles], colours)
    grid = np.array(fig.axes).reshape(len(rows), 3)
    texts = [ax.get_xlabel() for ax in grid[:, 2]]
    assert texts[0].splitlines() == [f"Dice {np.mean([0.75, 0.0, 1.0]):.3f}", "ellipse 0.75, triangle 1.00"]
    assert texts[1].splitlines()[0] == "slice 7: Dice 0.667"  # rectangle: absent from both, scored 0
    assert [ax.get_ylabel() for ax in grid[:, 0]] == ["case-a", "case-b"]
    path = plot_overlays(rows, names, tmp_path / "overlays.png")
    assert Image.open(path).size[0] == 750


def test_binary_rows_say_one_dice():
    row = OverlayRow("x", np.zeros((4, 4)), np.eye(4, dtype=int), np.eye(4, dtype=int), [1.0])
    fig = overlay_figure([row], ["polyp"])
    assert fig.axes[2].get_xlabel() == "Dice 1.000"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["polyp"]
