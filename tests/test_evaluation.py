"""Evaluation: per-volume scores from slice-by-slice prediction, flip TTA, binary per-image scores, sharding
across processes, the JSON/CSV writers and training/evaluate.py."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkvunet.evaluation import evaluate, predict_probabilities

medpy_binary = pytest.importorskip("medpy.metric.binary", reason="medpy is part of the dev extra")

REPO = Path(__file__).resolve().parents[1]


class LabelOracle(torch.nn.Module):
    """Reads the label out of the pixel value (label / 10): logits peak at the nearest class."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.num_labels = num_labels
        self.config = SimpleNamespace(num_labels=num_labels, in_channels=1, id2label=None)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device
        self.calls = 0

    def forward(self, pixel_values):
        self.calls += pixel_values.shape[0]
        value = pixel_values[:, :1] * 10
        classes = torch.arange(self.num_labels, dtype=value.dtype).view(1, -1, 1, 1)
        return SimpleNamespace(logits=-((value - classes) ** 2) * 10 + self.anchor)


class RandomConv(torch.nn.Module):
    """A model whose output is not symmetric under flips."""

    def __init__(self, num_labels: int, channels: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, num_labels, 5, padding=2)

    def forward(self, pixel_values):
        return SimpleNamespace(logits=self.conv(pixel_values) * 5)


def _volume_split(volumes):
    d, h, w = volumes[0][0].shape
    features = datasets.Features({"image": datasets.Array3D((None, h, w), "float32"),
                                  "mask": datasets.Array3D((None, h, w), "uint8"),
                                  "case_id": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [v[0] for v in volumes], "mask": [v[1] for v in volumes],
                                       "case_id": [f"case{i}" for i in range(len(volumes))]}, features=features)


def _label_volume(rng, shape=(5, 16, 16), num_labels=4):
    coarse = rng.integers(0, num_labels - 1, (shape[0], shape[1] // 4, shape[2] // 4))  # last class absent
    return np.kron(coarse, np.ones((1, 4, 4), np.int64)).astype(np.uint8)


def _transunet(pred, gt, c):
    p, g = pred == c, gt == c
    if p.any() and g.any():
        return medpy_binary.dc(p, g), medpy_binary.hd95(p, g)
    return (1.0, 0.0) if p.any() else (0.0, 0.0)


def test_volume_oracle_scores_perfectly_and_absent_class_counts_zero():
    rng = np.random.default_rng(0)
    labels = [_label_volume(rng) for _ in range(2)]
    split = _volume_split([(lab.astype(np.float32) / 10, lab) for lab in labels])
    model = LabelOracle(4)
    result = evaluate(model, split, img_size=16, batch_size=2, progress=False)
    assert [c.case_id for c in result.cases] == ["case0", "case1"]
    assert model.calls == 10  # slice by slice: 5 slices per volume
    for case in result.cases:
        assert case.dice[:2] == [1.0, 1.0] and case.hd95[:2] == [0.0, 0.0]
        assert (case.dice[2], case.hd95[2]) == (0.0, 0.0)  # class 3 in neither: TransUNet counts it as 0
    assert result.mean_dice == pytest.approx(2 / 3)


def test_volume_predicted_slice_by_slice_and_resized_back_with_nearest():
    rng = np.random.default_rng(1)
    vols = []
    for _ in range(2):
        lab = _label_volume(rng, (4, 12, 20))
        image = lab.astype(np.float32) / 10 + rng.normal(0, 0.03, lab.shape).astype(np.float32)
        vols.append((image, lab))
    split = _volume_split(vols)
    model = LabelOracle(4)
    result = evaluate(model, split, img_size=(32, 24), progress=False)
    for (image, lab), case in zip(vols, result.cases):
        x = torch.from_numpy(image)[:, None]  # slices as a batch
        up = F.interpolate(x, size=(32, 24), mode="bilinear", align_corners=False)  # upsampling: no antialias
        pred = model(pixel_values=up).logits.argmax(1, keepdim=True).float()
        pred = F.interpolate(pred, size=lab.shape[1:], mode="nearest")[:, 0].numpy()
        for c in (1, 2, 3):
            d, h = _transunet(pred, lab, c)  # 3-D scores of the whole volume
            assert case.dice[c - 1] == pytest.approx(d, abs=1e-9)
            assert case.hd95[c - 1] == pytest.approx(h, abs=1e-9)
    assert any(d < 1 for c in result.cases for d in c.dice[:2])  # the resampling did change some labels
    assert result.mean_hd95 == pytest.approx(np.mean([np.mean([c.hd95[k] for c in result.cases]) for k in range(3)]))


def test_flip_tta_averages_the_flipped_predictions():
    model = RandomConv(3)
    x = torch.randn(2, 1, 12, 16)
    soft = lambda t: torch.softmax(model(pixel_values=t).logits, 1)  # noqa: E731
    expected = (soft(x) + soft(x.flip(-1)).flip(-1) + soft(x.flip(-2)).flip(-2)) / 3
    torch.testing.assert_close(predict_probabilities(model, x, tta=True), expected)
    assert not torch.allclose(predict_probabilities(model, x), expected)  # the flips change something
    binary = RandomConv(1)
    sig = lambda t: torch.sigmoid(binary(pixel_values=t).logits)  # noqa: E731
    torch.testing.assert_close(predict_probabilities(binary, x, tta=True),
                               (sig(x) + sig(x.flip(-1)).flip(-1) + sig(x.flip(-2)).flip(-2)) / 3)


def test_tta_changes_the_evaluated_labels_as_the_averaged_probabilities_say():
    rng = np.random.default_rng(2)
    vols = [(rng.normal(0, 1, (3, 16, 16)).astype(np.float32), _label_volume(rng, (3, 16, 16), 3))]
    split = _volume_split(vols)
    model = RandomConv(3)
    result = evaluate(model, split, img_size=16, tta=True, progress=False)
    x = torch.from_numpy(vols[0][0])[:, None]
    pred = predict_probabilities(model, x, tta=True).argmax(1).numpy()
    for c in (1, 2):
        d, h = _transunet(pred, vols[0][1], c)
        assert result.cases[0].dice[c - 1] == pytest.approx(d, abs=1e-9)
        assert result.cases[0].hd95[c - 1] == pytest.approx(h, abs=1e-9)
    plain = evaluate(model, split, img_size=16, tta=False, progress=False)
    assert plain.cases[0].dice != result.cases[0].dice


def _binary_image_split(rng, n=5):
    from PIL import Image

    masks = [np.kron(rng.integers(0, 2, (4, 5)), np.ones((6, 6), np.uint8)).astype(np.uint8) for _ in range(n)]
    masks[0][:] = 0  # an image without foreground
    images = [Image.fromarray((np.where(m > 0, 200, 40) + rng.integers(0, 20, m.shape)).astype(np.uint8))
              for m in masks]
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                                  "case_id": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "mask": [Image.fromarray(m * 255) for m in masks],
                                       "case_id": [f"img{i}" for i in range(n)]}, features=features), masks


class Threshold(torch.nn.Module):
    """Binary sigmoid model: foreground where the grey value exceeds ``level``."""

    def __init__(self, level=0.5):
        super().__init__()
        self.level = torch.nn.Parameter(torch.tensor(level))

    def forward(self, pixel_values):
        return SimpleNamespace(logits=(pixel_values[:, :1] - self.level) * 50)


def test_binary_images_scored_per_image_and_written(tmp_path):
    rng = np.random.default_rng(3)
    split, masks = _binary_image_split(rng)
    result = evaluate(Threshold(0.5), split, img_size=(48, 40), batch_size=2, progress=False)
    assert result.binary and result.mean_hd95 is None
    assert [c.case_id for c in result.cases] == [f"img{i}" for i in range(5)]
    assert all(c.dice == [1.0] and c.iou == [1.0] for c in result.cases)  # empty image too: nothing found
    # a model that finds foreground everywhere: per-image Dice and IoU from their formulas
    everywhere = evaluate(Threshold(-1.0), split, img_size=24, progress=False)
    for m, case in zip(masks, everywhere.cases):
        fg, total = float(m.sum()), float(m.size)
        assert case.dice[0] == pytest.approx(2 * fg / (fg + total))
        assert case.iou[0] == pytest.approx(fg / total)
    assert everywhere.mean_dice == pytest.approx(np.mean([c.dice[0] for c in everywhere.cases]))

    everywhere.write_json(tmp_path / "out" / "metrics.json")
    per_class, per_case = everywhere.write_csv(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["mean_dice"] == pytest.approx(everywhere.mean_dice) and data["num_cases"] == 5
    assert [c["case_id"] for c in data["cases"]] == [f"img{i}" for i in range(5)]
    rows = list(csv.DictReader(per_case.open()))
    assert len(rows) == 5 and float(rows[2]["dice_class_1"]) == pytest.approx(everywhere.cases[2].dice[0], abs=1e-4)
    class_rows = list(csv.DictReader(per_class.open()))
    assert class_rows[-1]["class"] == "mean"
    assert float(class_rows[-1]["iou"]) == pytest.approx(everywhere.mean_iou, abs=1e-4)
    table = everywhere.format_table()
    assert "IoU" in table and f"{everywhere.mean_dice:.4f}" in table


def test_every_case_scored_once_across_processes(monkeypatch):
    """Process r of N scores cases r, r+N, ...; the gathered rows are de-duplicated and ordered."""
    import accelerate.utils

    rng = np.random.default_rng(4)
    labels = [_label_volume(rng, (2, 8, 8)) for _ in range(5)]
    split = _volume_split([(lab.astype(np.float32) / 10, lab) for lab in labels])
    gathered = {}

    class FakeAccelerator:
        device = torch.device("cpu")
        num_processes = 2

        def __init__(self, rank):
            self.process_index = rank

        def unwrap_model(self, model):
            return model

    def gather_as(rank):
        def gather_object(local):
            gathered[rank] = list(local)
            other = gathered.get(1 - rank, [])
            return list(local) + other + list(local)[:1]  # a duplicate, as uneven padding can produce
        return gather_object

    models = {}
    for rank in (1, 0):
        monkeypatch.setattr(accelerate.utils, "gather_object", gather_as(rank))
        models[rank] = LabelOracle(4)
        result = evaluate(models[rank], split, img_size=8, accelerator=FakeAccelerator(rank), progress=False)
    assert models[0].calls == 3 * 2 and models[1].calls == 2 * 2  # cases 0, 2, 4 and 1, 3; two slices each
    assert sorted(i for i, _ in gathered[0]) == [0, 2, 4] and sorted(i for i, _ in gathered[1]) == [1, 3]
    assert [c.case_id for c in result.cases] == [f"case{i}" for i in range(5)]


def test_evaluate_script_on_a_saved_segmenter(tmp_path):
    rwkvunet = pytest.importorskip("rwkvunet")
    if not hasattr(rwkvunet, "RWKVUNetForSemanticSegmentation"):
        pytest.fail("rwkvunet must provide RWKVUNetForSemanticSegmentation")
    from PIL import Image

    cfg = rwkvunet.RWKVUNetConfig(variant="t", num_labels=1, in_channels=1)
    rwkvunet.RWKVUNetForSemanticSegmentation(cfg).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(5)
    root = tmp_path / "data"
    for i in range(10):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray((rng.random((20, 24)) > 0.5).astype(np.uint8) * 255).save(root / "masks" / f"{i}.png")
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "training" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    out = tmp_path / "eval"
    code = script.main([str(tmp_path / "model"), "--dataset", str(root), "--img-size", "32", "--tta",
                        "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["num_cases"] == 1 and data["binary"] and 0.0 <= data["mean_dice"] <= 1.0
    assert (out / "per_class.csv").is_file() and (out / "per_case.csv").is_file()
    assert data["evaluated"] == {"model": str((tmp_path / "model").resolve()), "dataset": str(root.resolve()),
                                 "split": "test", "split_seed": None, "tta": True, "img_size": [32, 32]}

    # another evaluation into the same folder (here: without flips) was written over the first one's results
    common = [str(tmp_path / "model"), "--dataset", str(root), "--img-size", "32", "--output-dir", str(out),
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    before = (out / "metrics.json").read_text()
    assert script.main(common) == 2
    assert (out / "metrics.json").read_text() == before
    assert script.main(common + ["--tta"]) == 0  # the same evaluation again replaces its own results
    assert script.main(common + ["--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["evaluated"]["tta"] is False
