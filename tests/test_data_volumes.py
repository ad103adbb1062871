"""Synapse (npz slices + h5 volumes) and ACDC (h5 slices and volumes) layouts with the paper's splits."""
from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from rwkvunet.data import (ACDC_PATIENTS, DataError, acdc_patient_split, detect_layout, is_volume_split,
                           load_segmentation_dataset)


def _volume(rng, d, h, w, num_labels):
    return rng.random((d, h, w), dtype=np.float32), rng.integers(0, num_labels, (d, h, w)).astype(np.uint8)


def _write_h5(path, image, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label
        f["scribble"] = label.astype(np.uint16)  # present in the real files, ignored


def _acdc(root, patients, rng, shape_of=lambda p: (3, 12, 10 + p % 3)):
    """Slices and volumes of two frames per patient; heights/widths differ between patients as in ACDC."""
    truth = {}
    for p in patients:
        for frame in (1, 12):
            image, label = _volume(rng, *shape_of(p), 4)
            name = f"patient{p:03d}_frame{frame:02d}"
            truth[name] = (image, label)
            _write_h5(root / "ACDC_training_volumes" / f"{name}.h5", image, label)
            for z in range(image.shape[0]):
                truth[f"{name}_slice_{z}"] = (image[z], label[z])
                _write_h5(root / "ACDC_training_slices" / f"{name}_slice_{z}.h5", image[z], label[z])
    return truth


def _stored_dtypes(split):
    """Arrow storage types of image and mask (numpy format widens integers to int64, as datasets does)."""
    def leaf(feature):
        while hasattr(feature, "feature"):
            feature = feature.feature
        return getattr(feature, "dtype", None)
    return leaf(split.features["image"]), leaf(split.features["mask"])


def test_acdc_paper_split_by_patient_id():
    split = acdc_patient_split(range(1, 101))
    assert split["train"] == list(range(31, 101))
    assert split["validation"] == list(range(21, 31))
    assert split["test"] == list(range(1, 21))
    assert ACDC_PATIENTS["test"] == tuple(range(1, 21))


def test_acdc_layout_slices_for_training_volumes_for_evaluation(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ACDC"
    truth = _acdc(root, [3, 19, 22, 31, 100], rng)
    assert detect_layout(str(root)) == "acdc"
    dd = load_segmentation_dataset(str(root), cache_dir=str(tmp_path / "cache"))
    assert not is_volume_split(dd["train"]) and is_volume_split(dd["validation"]) and is_volume_split(dd["test"])
    patients = {name: sorted({c[:10] for c in dd[name]["case_id"]}) for name in dd}
    assert patients == {"train": ["patient031", "patient100"], "validation": ["patient022"],
                        "test": ["patient003", "patient019"]}
    assert len(dd["train"]) == 2 * 2 * 3 and len(dd["test"]) == 4
    for name in dd:
        assert _stored_dtypes(dd[name]) == ("float32", "uint8")
        for row in dd[name].with_format("numpy"):
            image, label = truth[row["case_id"]]
            assert row["image"].dtype == np.float32
            np.testing.assert_array_equal(row["image"], image)
            np.testing.assert_array_equal(row["mask"], label)


def test_acdc_subset_without_paper_test_patients_is_split_by_id_with_a_warning(tmp_path, caplog):
    root = tmp_path / "acdc_dev"
    _acdc(root, range(91, 101), np.random.default_rng(1), shape_of=lambda p: (2, 8, 8))
    with caplog.at_level(logging.WARNING):
        dd = load_segmentation_dataset(str(root), cache_dir=str(tmp_path / "cache"))
    assert "70/10/20" in caplog.text
    assert sorted({c[:10] for c in dd["test"]["case_id"]}) == ["patient091", "patient092"]
    assert sorted({c[:10] for c in dd["validation"]["case_id"]}) == ["patient093"]
    assert len({c[:10] for c in dd["train"]["case_id"]}) == 7


def test_acdc_label_outside_the_classes_names_the_file(tmp_path):
    root = tmp_path / "ACDC"
    _acdc(root, [31, 32], np.random.default_rng(2))
    bad = root / "ACDC_training_slices" / "patient032_frame12_slice_1.h5"
    image = np.zeros((12, 12), np.float32)
    label = np.full((12, 12), 7, np.uint8)
    bad.unlink()
    _write_h5(bad, image, label)
    with pytest.raises(DataError, match=r"patient032_frame12_slice_1\.h5 holds labels 7\.\.7, outside the 4 classes"):
        load_segmentation_dataset(str(root), cache_dir=str(tmp_path / "cache"))


def test_synapse_layout_train_slices_test_volumes_and_rebuilt_validation(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "Synapse"
    (root / "train_npz").mkdir(parents=True)
    slices = {}
    for case in ("case0005", "case0006", "case0007"):
        for z in (0, 2, 10):  # slice 10 sorts before 2 as text: the volume must follow the numbers
            image, label = _volume(rng, 1, 16, 16, 9)
            slices[(case, z)] = (image[0], label[0])
            np.savez(root / "train_npz" / f"{case}_slice{z:03d}.npz" if z != 10 else
                     root / "train_npz" / f"{case}_slice{z}.npz", image=image[0], label=label[0])
    tests = {}
    for case in ("case0001", "case0002"):
        tests[case] = _volume(rng, 4 + int(case[-1]), 16, 16, 9)
        _write_h5(root / "test_vol_h5" / f"{case}.npy.h5", *tests[case])
    assert detect_layout(str(root)) == "synapse"
    dd = load_segmentation_dataset(str(root), cache_dir=str(tmp_path / "cache"))
    assert {k: len(v) for k, v in dd.items()} == {"train": 9, "validation": 2, "test": 2}
    assert not is_volume_split(dd["train"]) and is_volume_split(dd["validation"]) and is_volume_split(dd["test"])
    for row in dd["test"].with_format("numpy"):
        np.testing.assert_array_equal(row["image"], tests[row["case_id"]][0])
        np.testing.assert_array_equal(row["mask"], tests[row["case_id"]][1])
        assert row["image"].shape == (4 + int(row["case_id"][-1]), 16, 16)
    # validation: the last two training cases as volumes, slices in numeric order; they stay in train
    val = dd["validation"].with_format("numpy")
    assert list(val["case_id"]) == ["case0006", "case0007"]
    for row in val:
        expected = np.stack([slices[(row["case_id"], z)][1] for z in (0, 2, 10)])
        np.testing.assert_array_equal(row["mask"], expected)
    assert sum(c.startswith("case0007") for c in dd["train"]["case_id"]) == 3
    row = dd["train"].with_format("numpy")[0]
    assert row["image"].shape == (16, 16)
    assert all(_stored_dtypes(dd[name]) == ("float32", "uint8") for name in dd)


def test_synapse_unreadable_file_is_named(tmp_path):
    root = tmp_path / "Synapse"
    (root / "train_npz").mkdir(parents=True)
    np.savez(root / "train_npz" / "case0005_slice000.npz", image=np.zeros((4, 4), np.float32),
             label=np.zeros((4, 4), np.uint8))
    (root / "train_npz" / "case0005_slice001.npz").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"case0005_slice001\.npz"):
        load_segmentation_dataset(str(root), cache_dir=str(tmp_path / "cache"))
