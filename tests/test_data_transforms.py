"""Joint image/mask transforms: conversion, the authors' augmentation, nearest masks, seeding, batching."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rwkvunet.data.transforms import (EvalTransform, SegmentationDataset, TrainTransform, batch_transform,
                                      collate_fn, to_image_tensor, to_mask_tensor)


def _labels(h=16, w=20, num_labels=4, seed=0):
    """Blocky label map that is not symmetric under any rotation or flip."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, num_labels, (h // 4, w // 4)), np.ones((4, 4), np.int64)).astype(np.uint8)


def test_image_conversion_keeps_channels_and_float_values():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_image_tensor(grey).shape == (1, 3, 4)
    torch.testing.assert_close(to_image_tensor(grey)[0], torch.from_numpy(grey).float() / 255)
    rgb = np.random.default_rng(0).integers(0, 255, (3, 4, 3), dtype=np.uint8)
    assert to_image_tensor(Image.fromarray(rgb)).shape == (3, 3, 4)  # PIL: channels last, even when 3 rows
    rgb = np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8)
    assert to_image_tensor(rgb).shape == (3, 5, 6)
    assert to_image_tensor(rgb.transpose(2, 0, 1)).shape == (3, 5, 6)
    ct = np.array([[-1000.0, 0.0], [250.5, 3000.0]], np.float32)  # Hounsfield units are not 0-255
    torch.testing.assert_close(to_image_tensor(ct)[0], torch.from_numpy(ct))
    sixteen = np.array([[0, 65535]], np.uint16)
    torch.testing.assert_close(to_image_tensor(sixteen)[0], torch.tensor([[0.0, 1.0]]))
    assert to_image_tensor(grey, num_channels=3).shape == (3, 3, 4)
    luma = to_image_tensor(rgb, num_channels=1)[0]
    expected = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(luma.numpy(), expected, atol=1e-6)
    rgba = Image.fromarray(np.dstack([rgb, np.full((5, 6), 255, np.uint8)]))
    assert to_image_tensor(rgba).shape == (3, 5, 6)


def test_eval_transform_resizes_image_bilinear_and_mask_nearest():
    labels = _labels()
    image = labels.astype(np.float32) * 10.0
    out = EvalTransform((32, 40))(image, labels)
    assert out["pixel_values"].shape == (1, 32, 40) and out["pixel_values"].dtype == torch.float32
    assert out["labels"].shape == (32, 40) and out["labels"].dtype == torch.long
    # nearest: 2x upsampling repeats each label; no value between classes appears
    np.testing.assert_array_equal(out["labels"].numpy(), np.kron(labels, np.ones((2, 2))).astype(np.int64))
    ref = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=(32, 40), mode="bilinear",
                                          align_corners=False)[0]
    torch.testing.assert_close(out["pixel_values"], ref, atol=1e-4, rtol=0)
    same = EvalTransform(16)(np.zeros((16, 16), np.float32) + 0.25)
    assert "labels" not in same and torch.all(same["pixel_values"] == 0.25)


def _dihedral(arr):
    """The 8 results of rot90 (k = 0..3) followed by a flip along either axis."""
    return [np.flip(np.rot90(arr, k), axis) for k in range(4) for axis in (0, 1)]


def test_rot90_flip_moves_image_and_mask_together():
    labels = _labels(16, 16)
    image = labels.astype(np.float32) / 10
    tf = TrainTransform(16, p_rot_flip=1.0)
    seen = set()
    for _ in range(40):
        out = tf(image, labels)
        lab = out["labels"].numpy()
        np.testing.assert_allclose(out["pixel_values"][0].numpy() * 10, lab, atol=1e-5)  # still aligned
        matches = [i for i, d in enumerate(_dihedral(labels)) if np.array_equal(d, lab)]
        assert matches, "output is not a rot90 + flip of the input"
        seen.add(matches[0])
    # rot90 then a flip, as TransUNet's random_rot_flip: exactly the 4 reflections of the square, all reached
    assert len({_dihedral(labels)[i].tobytes() for i in seen}) == 4


def test_rotation_is_within_20_degrees_and_masks_stay_labels():
    labels = _labels(32, 32, num_labels=3)
    tf = TrainTransform(32, p_rot_flip=0.0, p_rotate=1.0, degrees=20)
    for _ in range(10):
        out = tf(labels.astype(np.float32), labels)
        lab = out["labels"].numpy()
        assert set(np.unique(lab)) <= {0, 1, 2}  # nearest: no interpolated labels
        # the centre barely moves under a small rotation about it
        assert (lab[12:20, 12:20] == labels[12:20, 12:20]).mean() > 0.6
    # 90 degrees is out of range: the outputs never equal a quarter turn of a random image
    noise = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    quarter = np.rot90(noise).copy()
    for _ in range(5):
        assert not np.allclose(tf(noise)["pixel_values"][0].numpy(), quarter, atol=0.05)


def test_augmentation_is_reproducible_from_torch_seed():
    labels = _labels(16, 16)
    image = np.random.default_rng(2).random((16, 16)).astype(np.float32)
    tf = TrainTransform(24)

    def run():
        return [tf(image, labels) for _ in range(8)]

    torch.manual_seed(5)
    first = run()
    torch.manual_seed(5)
    second = run()
    for a, b in zip(first, second):
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
        assert torch.equal(a["labels"], b["labels"])
    assert any(not torch.equal(a["labels"], first[0]["labels"]) for a in first[1:])


def test_binary_masks_thresholded_when_num_labels_given():
    mask = np.array([[0, 127, 128, 255]], np.uint8)
    np.testing.assert_array_equal(to_mask_tensor(mask, num_labels=1).numpy(), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(to_mask_tensor(mask).numpy(), mask)  # unchanged without num_labels


def test_torch_dataset_collate_and_set_transform():
    import datasets

    rng = np.random.default_rng(3)
    rows = {"image": [Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)) for _ in range(3)],
            "mask": [Image.fromarray(_labels(12, 16, 2, seed=i)) for i in range(3)],
            "case_id": ["a", "b", "c"]}
    feats = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                               "case_id": datasets.Value("string")})
    split = datasets.Dataset.from_dict(rows, features=feats)
    tf = EvalTransform(8)
    batch = collate_fn([SegmentationDataset(split, tf)[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["labels"].shape == (3, 8, 8)
    assert batch["case_id"] == ["a", "b", "c"]
    with_tf = split.with_transform(batch_transform(tf))
    torch.testing.assert_close(with_tf[1]["pixel_values"], batch["pixel_values"][1])

    arrays = datasets.Dataset.from_dict(
        {"image": [np.ones((6, 6), np.float32) * 7], "mask": [np.eye(6, dtype=np.uint8)], "case_id": ["v"]},
        features=datasets.Features({"image": datasets.Array2D((6, 6), "float32"),
                                    "mask": datasets.Array2D((6, 6), "uint8"), "case_id": datasets.Value("string")}))
    item = SegmentationDataset(arrays, EvalTransform(6))[0]
    assert torch.all(item["pixel_values"] == 7) and torch.equal(item["labels"], torch.eye(6, dtype=torch.long))


def test_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in size"):
        EvalTransform(8)(np.zeros((4, 5), np.float32), np.zeros((5, 4), np.uint8))


def test_a_binary_mask_for_a_multi_class_model_names_the_fix():
    from rwkvunet.data import DataError, prepare_mask

    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    with pytest.raises(DataError, match=r"binary mask \(values 0, 255\) but 4 classes.*--num-labels 1"):
        prepare_mask(mask, 4)
