"""Image/mask folder layouts (plain, Kvasir, CVC, BUSI, GlaS, ISIC), splits, bad data and the converter,
on small generated files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rwkvunet.data import DataError, detect_layout, load_segmentation_dataset, ratio_split


def _blocks(rng, h=24, w=28):
    """A random binary mask of a few axis-aligned rectangles (edges survive JPEG compression)."""
    mask = np.zeros((h, w), np.uint8)
    for _ in range(2):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        mask[y:y + 8, x:x + 8] = 1
    return mask


def _save(arr, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def _load(path, tmp_path, **kw):
    return load_segmentation_dataset(str(path), cache_dir=str(tmp_path / "cache"), **kw)


def _all_rows(dd):
    return {r["case_id"]: r for split in dd.values() for r in split}


def test_images_masks_folder_pairs_by_stem_and_splits_8_1_1(tmp_path):
    rng = np.random.default_rng(0)
    root, truth = tmp_path / "set", {}
    for i in range(20):
        truth[f"img{i:02d}"] = _blocks(rng)
        _save(rng.integers(0, 255, (24, 28), dtype=np.uint8), root / "images" / f"img{i:02d}.png")
        _save(truth[f"img{i:02d}"] * 255, root / "masks" / f"img{i:02d}.png")
    assert detect_layout(str(root)) == "folder"
    dd = _load(root, tmp_path)
    assert {k: len(v) for k, v in dd.items()} == {"train": 16, "validation": 2, "test": 2}
    rows = _all_rows(dd)
    assert set(rows) == set(truth)  # every case exactly once across the splits
    for case, row in rows.items():
        np.testing.assert_array_equal(np.asarray(row["mask"]), truth[case])
        assert row["image"].size == (28, 24)
    # the split depends on the seed only
    expected = ratio_split(list(truth), 0)
    assert sorted(dd["test"]["case_id"]) == sorted(expected["test"])
    other = _load(root, tmp_path, split_seed=1)
    assert sorted(other["train"]["case_id"]) != sorted(dd["train"]["case_id"])


def test_ratio_split_is_the_papers_8_1_1_and_seeded():
    ids = [f"c{i:03d}" for i in range(100)]
    splits = [ratio_split(ids, seed) for seed in (0, 1, 2)]
    for s in splits:
        assert [len(s[k]) for k in ("train", "validation", "test")] == [80, 10, 10]
        assert sorted(s["train"] + s["validation"] + s["test"]) == ids
    assert splits[0]["test"] != splits[1]["test"] != splits[2]["test"]
    assert ratio_split(list(reversed(ids)), 1) == splits[1]  # independent of the listing order


def test_kvasir_jpeg_antialiased_rgb_masks_are_thresholded(tmp_path):
    rng = np.random.default_rng(1)
    root, truth = tmp_path / "Kvasir-SEG", {}
    for i in range(6):
        truth[f"cju{i}"] = _blocks(rng, 40, 48)
        _save(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), root / "images" / f"cju{i}.jpg", quality=90)
        rgb = np.repeat(truth[f"cju{i}"][..., None] * 255, 3, axis=-1).astype(np.uint8)
        _save(rgb, root / "masks" / f"cju{i}.jpg", quality=75)  # JPEG blurs edges: grey values appear
    grey = np.asarray(Image.open(root / "masks" / "cju0.jpg").convert("L"))
    assert len(np.unique(grey)) > 2
    rows = _all_rows(_load(root, tmp_path, layout="kvasir"))
    for case, row in rows.items():
        mask = np.asarray(row["mask"])
        assert set(np.unique(mask)) <= {0, 1}
        assert (mask == truth[case]).mean() > 0.98
        assert row["image"].mode == "RGB"


def test_cvc_tiff_original_and_ground_truth(tmp_path):
    rng = np.random.default_rng(2)
    root, truth = tmp_path / "CVC-ClinicDB", {}
    for i in range(1, 5):
        truth[str(i)] = _blocks(rng)
        _save(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8), root / "Original" / f"{i}.tif")
        _save(truth[str(i)] * 255, root / "Ground Truth" / f"{i}.tif")
    rows = _all_rows(_load(root, tmp_path, layout="cvc"))
    assert set(rows) == set(truth)
    for case, row in rows.items():
        np.testing.assert_array_equal(np.asarray(row["mask"]), truth[case])


def test_busi_several_masks_per_image_are_joined(tmp_path):
    rng = np.random.default_rng(3)
    root, truth = tmp_path / "Dataset_BUSI_with_GT", {}
    for cls in ("benign", "malignant", "normal"):
        for i in range(1, 3):
            name = f"{cls} ({i})"
            parts = [_blocks(rng) * (cls != "normal") for _ in range(2 if i == 1 else 1)]
            truth[name] = np.maximum.reduce(parts)
            _save(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8), root / cls / f"{name}.png")
            for k, part in enumerate(parts):
                suffix = "_mask" if k == 0 else f"_mask_{k}"
                _save(part * 255, root / cls / f"{name}{suffix}.png")
    assert len(list((root / "benign").glob("*_mask_1.png"))) == 1
    rows = _all_rows(_load(root, tmp_path, layout="busi"))
    assert set(rows) == set(truth)
    for case, row in rows.items():
        np.testing.assert_array_equal(np.asarray(row["mask"]), truth[case])
    assert not np.asarray(rows["normal (1)"]["mask"]).any()


def test_glas_bmp_instance_masks_become_binary(tmp_path):
    rng = np.random.default_rng(4)
    root, truth = tmp_path / "Warwick QU Dataset (Released 2016_07_08)", {}
    for name in ("train_1", "train_2", "testA_1", "testB_1"):
        inst = np.zeros((24, 28), np.uint8)
        inst[2:8, 2:8], inst[12:20, 10:20] = 1, 7  # glands numbered 1 and 7
        truth[name] = (inst > 0).astype(np.uint8)
        _save(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8), root / f"{name}.bmp")
        _save(inst, root / f"{name}_anno.bmp")
    assert detect_layout(str(root)) == "glas"
    rows = _all_rows(_load(root, tmp_path))
    assert set(rows) == set(truth)
    for case, row in rows.items():
        np.testing.assert_array_equal(np.asarray(row["mask"]), truth[case])


def test_isic_ground_truth_folder_and_superpixels_ignored(tmp_path):
    rng = np.random.default_rng(5)
    root, truth = tmp_path / "isic2017", {}
    for i in range(4):
        name = f"ISIC_{i:07d}"
        truth[name] = _blocks(rng)
        _save(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8), root / "ISIC-2017_Training_Data" / f"{name}.jpg")
        _save(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8),
              root / "ISIC-2017_Training_Data" / f"{name}_superpixels.png")
        _save(truth[name] * 255, root / "ISIC-2017_Training_Part1_GroundTruth" / f"{name}_segmentation.png")
    rows = _all_rows(_load(root, tmp_path, layout="isic"))
    assert set(rows) == set(truth)
    for case, row in rows.items():
        np.testing.assert_array_equal(np.asarray(row["mask"]), truth[case])


def test_gif_palette_images_and_masks(tmp_path):
    from rwkvunet.data.transforms import to_image_tensor

    rng = np.random.default_rng(6)
    root = tmp_path / "gifs"
    rgb = rng.integers(0, 255, (24, 28, 3), dtype=np.uint8)
    (root / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rgb).quantize(16).save(root / "images" / f"{i}.gif")  # palette image
        _save(_blocks(rng) * 255, root / "masks" / f"{i}.gif")
    dd = _load(root, tmp_path)
    row = dd["train"][0]
    assert row["image"].mode == "P"
    pixels = to_image_tensor(row["image"])
    palette_rgb = np.asarray(Image.open(root / "images" / f"{row['case_id']}.gif").convert("RGB"))
    assert pixels.shape == (3, 24, 28)  # the palette is applied, not its indices
    np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy() * 255, palette_rgb, atol=1e-3)


def test_split_folders_are_kept_and_validation_taken_from_train(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "presplit"
    for split, n in (("train", 9), ("test", 3)):
        for i in range(n):
            _save(rng.integers(0, 255, (24, 28), dtype=np.uint8), root / split / "images" / f"{split}{i}.png")
            _save(_blocks(rng) * 255, root / split / "masks" / f"{split}{i}.png")
    dd = _load(root, tmp_path)
    assert {k: len(v) for k, v in dd.items()} == {"train": 8, "validation": 1, "test": 3}
    assert all(c.startswith("test") for c in dd["test"]["case_id"])


def test_multiclass_label_maps_with_num_labels(tmp_path):
    rng = np.random.default_rng(8)
    root = tmp_path / "multi"
    for i in range(3):
        _save(rng.integers(0, 255, (24, 28), dtype=np.uint8), root / "images" / f"{i}.png")
        _save(rng.integers(0, 4, (24, 28), dtype=np.uint8), root / "masks" / f"{i}.png")
    with pytest.raises(DataError, match="num_labels=4"):  # binary by default: refuses to guess
        _load(root, tmp_path)
    dd = _load(root, tmp_path, num_labels=4)
    for split in dd.values():
        for row in split:
            assert set(np.unique(np.asarray(row["mask"]))) <= {0, 1, 2, 3}


def _good_folder(root, rng, n=3, scale=255):
    for i in range(n):
        _save(rng.integers(0, 255, (24, 28), dtype=np.uint8), root / "images" / f"{i}.png")
        _save(_blocks(rng) * scale, root / "masks" / f"{i}.png")


def test_error_names_an_unreadable_image(tmp_path):
    root = tmp_path / "bad"
    _good_folder(root, np.random.default_rng(9))
    (root / "images" / "1.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read image .*images/1\.png"):
        _load(root, tmp_path)


def test_error_names_a_size_mismatch(tmp_path):
    root = tmp_path / "bad"
    _good_folder(root, np.random.default_rng(10))
    _save(np.zeros((20, 20), np.uint8), root / "masks" / "2.png")
    with pytest.raises(DataError, match=r"masks/2\.png is 20x20 but its image .*images/2\.png is 28x24"):
        _load(root, tmp_path)


def test_error_names_labels_outside_the_classes(tmp_path):
    root = tmp_path / "bad"
    _good_folder(root, np.random.default_rng(11), scale=2)  # label maps 0/2 of 3 classes
    _save(np.full((24, 28), 5, np.uint8), root / "masks" / "0.png")
    with pytest.raises(DataError, match=r"masks/0\.png holds label 5, outside the 3 classes"):
        _load(root, tmp_path, num_labels=3)


def test_error_names_unpaired_files(tmp_path):
    root = tmp_path / "bad"
    _good_folder(root, np.random.default_rng(12))
    _save(np.zeros((24, 28), np.uint8), root / "images" / "lonely.png")
    with pytest.raises(DataError, match=r"1 image\(s\) without a mask.*lonely\.png"):
        _load(root, tmp_path)


def test_column_names_for_a_folder_are_refused(tmp_path):
    """--mask-column on an image folder was silently ignored (the folder's masks were scored as usual)."""
    root = tmp_path / "good"
    _good_folder(root, np.random.default_rng(13))
    with pytest.raises(DataError, match=r"mask_column 'image' .* read with the folder layout, which has none"):
        _load(root, tmp_path, mask_column="image")
    assert len(_all_rows(_load(root, tmp_path, image_column="image", mask_column="mask"))) == 3


def test_datasets_source_columns_renamed_and_split(tmp_path, monkeypatch):
    import datasets

    rng = np.random.default_rng(13)
    table = {"img": [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(10)],
             "label": [Image.fromarray(_blocks(rng, 12, 12)[:8, :8]) for _ in range(10)]}
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Image()})
    hub_copy = datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features)})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: calls.append(name) or hub_copy)
    dd = load_segmentation_dataset("someone/polyps", image_column="img", mask_column="label")
    assert calls == ["someone/polyps"]
    assert {k: len(v) for k, v in dd.items()} == {"train": 8, "validation": 1, "test": 1}
    assert set(dd["train"].column_names) == {"image", "mask", "case_id"}
    with pytest.raises(DataError, match="no column 'image'"):
        load_segmentation_dataset("someone/polyps")
    with pytest.raises(DataError, match="does not exist"):  # a mistyped folder is not sent to the Hub
        load_segmentation_dataset(str(tmp_path / "Kvasir-SEG"))


def test_names_that_cannot_be_hub_ids_are_not_sent_to_the_hub(tmp_path, monkeypatch):
    """'data/bu si' was huggingface_hub's HFValidationError (reported as a bug); 'data/busi224' beside a local
    data/busi_224 waited for the Hub (a minute offline) before saying it was not found."""
    import datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "busi_224").mkdir(parents=True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: pytest.fail("the Hub was asked"))
    with pytest.raises(DataError, match=r"data/busi224 does not exist \(did you mean data/busi_224\?\)"):
        load_segmentation_dataset("data/busi224")
    with pytest.raises(DataError, match="is not a Hub id either"):
        load_segmentation_dataset("my data")
    calls = []  # a valid id with no close local folder still goes to the Hub (where its name resolves)
    import rwkvunet.hub

    monkeypatch.setattr(rwkvunet.hub, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: calls.append(name) or (_ for _ in ()).throw(
        OSError("offline")))
    with pytest.raises(DataError, match="loading it as a Hub data set failed"):
        load_segmentation_dataset("data/other")
    assert calls == ["data/other"]


def test_converter_command_writes_a_standalone_dataset(tmp_path):
    import shutil

    from rwkvunet.cli import main

    rng = np.random.default_rng(14)
    root = tmp_path / "Kvasir-SEG"
    _good_folder(root, rng, n=10)
    dst = tmp_path / "converted"
    assert main(["data", str(root), str(dst), "--split-seed", "2", "--cache-dir", str(tmp_path / "c")]) == 0
    before = _all_rows(_load(root, tmp_path, split_seed=2))
    shutil.rmtree(root)  # the saved folder holds the pixels, not paths to the source
    assert detect_layout(str(dst)) == "disk"
    dd = load_segmentation_dataset(str(dst))
    assert {k: len(v) for k, v in dd.items()} == {"train": 8, "validation": 1, "test": 1}
    for case, row in _all_rows(dd).items():
        np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(before[case]["image"]))
        np.testing.assert_array_equal(np.asarray(row["mask"]), np.asarray(before[case]["mask"]))
    assert main(["data", str(tmp_path / "missing_but_not_hub_dir"), str(dst)]) == 2  # exists: nothing done


# --- masks with several grey levels or colours ----------------------------------------------------------

def _levels_folder(root, rng, masks):
    for i, mask in enumerate(masks):
        _save(rng.integers(0, 255, mask.shape[:2], dtype=np.uint8), root / "images" / f"{i}.png")
        _save(mask, root / "masks" / f"{i}.png")


def _downsampled(mask, factor=4):
    """A mask drawn large and resized down with antialiasing: grey values appear along every edge."""
    h, w = mask.shape
    big = Image.fromarray(mask).resize((w * factor, h * factor), Image.NEAREST)
    rng = np.random.default_rng(int(mask.sum()))
    shifted = np.roll(np.asarray(big), tuple(rng.integers(1, factor, 2)), axis=(0, 1))  # edges off the grid
    return np.asarray(Image.fromarray(shifted).resize((w, h), Image.BILINEAR))


def test_antialiased_binary_masks_stay_binary(tmp_path):
    rng = np.random.default_rng(20)
    truth = [_blocks(rng, 48, 48) for _ in range(6)]
    masks = [_downsampled(t * 255) for t in truth]
    assert all(len(np.unique(m)) > 3 for m in masks)  # many grey values along the edges
    _levels_folder(tmp_path / "set", rng, masks)
    dd = _load(tmp_path / "set", tmp_path)
    assert dd.mask_coding.kind == "binary" and dd.mask_coding.mapping() is None
    for row in _all_rows(dd).values():
        i = int(row["case_id"])
        np.testing.assert_array_equal(np.asarray(row["mask"]), (masks[i] >= 128).astype(np.uint8))


def test_grey_levels_in_different_files_are_refused_for_a_binary_set(tmp_path):
    """Each file alone looks binary (0/128, 0/255); together they are two classes, decided for the whole set."""
    rng = np.random.default_rng(21)
    masks = [_blocks(rng) * (128 if i % 2 else 255) for i in range(4)]
    _levels_folder(tmp_path / "set", rng, masks)
    with pytest.raises(DataError, match=r"3 grey levels \(0, 128, 255\).*masks/\d\.png holds 0, 128.*--num-labels 3"):
        _load(tmp_path / "set", tmp_path)


def test_antialiased_grey_levels_become_classes_by_nearest_level(tmp_path):
    rng = np.random.default_rng(22)
    drawn = []
    for _ in range(4):
        mask = np.zeros((40, 40), np.uint8)
        mask[4:20, 4:20], mask[22:38, 20:36] = 128, 255
        drawn.append(mask)
    masks = [_downsampled(m) for m in drawn]
    assert any(not set(np.unique(m)) <= {0, 128, 255} for m in masks)
    _levels_folder(tmp_path / "set", rng, masks)
    dd = _load(tmp_path / "set", tmp_path, num_labels=3)
    assert dd.mask_coding.levels == (0, 128, 255)
    for row in _all_rows(dd).values():
        stored = masks[int(row["case_id"])].astype(int)
        nearest = np.abs(stored[..., None] - np.array([0, 128, 255])).argmin(-1)
        np.testing.assert_array_equal(np.asarray(row["mask"]), nearest)
        assert np.asarray(row["mask"])[10, 10] == 1 and np.asarray(row["mask"])[30, 28] == 2


def test_one_array_with_grey_levels_is_refused_by_prepare_mask():
    from rwkvunet.data import prepare_mask

    mask = np.zeros((32, 32), np.uint8)
    mask[2:12, 2:12], mask[16:30, 16:30] = 128, 255
    with pytest.raises(DataError, match=r"mask of case 'x' holds 3 grey levels \(0, 128, 255\).*--num-labels 3"):
        prepare_mask(mask, 2, "mask of case 'x'")
    antialiased = _downsampled((mask > 0).astype(np.uint8) * 255)
    assert set(np.unique(prepare_mask(antialiased, 2))) == {0, 1}


def test_glas_instance_numbers_are_not_taken_for_levels(tmp_path):
    rng = np.random.default_rng(23)
    root = tmp_path / "glas"
    for name in ("train_1", "train_2", "testA_1"):
        inst = np.zeros((32, 32), np.uint8)
        inst[2:12, 2:12], inst[16:30, 16:30] = 3, 200  # two glands, far apart in value
        _save(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), root / f"{name}.bmp")
        _save(inst, root / f"{name}_anno.bmp")
    rows = _all_rows(_load(root, tmp_path))
    for row in rows.values():
        assert set(np.unique(np.asarray(row["mask"]))) == {0, 1}
