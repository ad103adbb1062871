"""``rwkvunet data``: it never deletes what it did not write, replaces only its own earlier outputs, and says in
one line (exit status 2) what is wrong with a source, a destination or the masks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rwkvunet.cli import main
from rwkvunet.commands import data as data_command
from rwkvunet.data import load_segmentation_dataset


def _save(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _blocks_mask(rng, values=(255,), h=32, w=32):
    """Background 0 and one 8x8 block of each value, at random places (blocks may overlap)."""
    mask = np.zeros((h, w), np.uint8)
    for value in values:
        y, x = rng.integers(0, h - 8, 2)
        mask[y:y + 8, x:x + 8] = value
    return mask


def _image_folder(root, n=10, seed=0, mask_of=None):
    """images/ + masks/ with ``n`` cases; ``mask_of(rng, i)`` makes the mask array (default 0/255 blocks)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        _save(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), root / "images" / f"case{i:02d}.png")
        mask = mask_of(rng, i) if mask_of else _blocks_mask(rng)
        _save(mask, root / "masks" / f"case{i:02d}.png")
    return root


def _snapshot(folder):
    """Every file under ``folder`` with its bytes, to prove that nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _run(capsys, *args):
    """Run the command; return (status, stdout, stderr)."""
    status = main(["data", *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


def _assert_one_line_error(status, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip() and "examples/s" not in line]
    assert status == 2, err
    assert len(lines) == 1, lines
    assert lines[0].startswith("rwkvunet data: error: "), lines
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def cache(tmp_path):
    return ["--cache-dir", tmp_path / "cache"]


# --- destinations that would lose data -----------------------------------------------------------------

def test_destination_holding_the_source_is_refused_even_with_overwrite(tmp_path, capsys, cache):
    work = tmp_path / "work"
    source = _image_folder(work / "Kvasir-SEG")
    _save(np.zeros((4, 4), np.uint8), work / "other_set" / "images" / "x.png")
    (work / "notes.txt").write_text("unrelated")
    before = _snapshot(work)
    status, _, err = _run(capsys, source, work, "--overwrite", *cache)
    _assert_one_line_error(status, err, str(work.resolve()), str(source.resolve()), "contains the source")
    assert _snapshot(work) == before


def test_source_deep_inside_the_destination_is_refused(tmp_path, capsys, cache):
    outer = tmp_path / "outer"
    source = _image_folder(outer / "a" / "b" / "set")
    before = _snapshot(outer)
    status, _, err = _run(capsys, source, outer, "--overwrite", *cache)
    _assert_one_line_error(status, err, str(outer.resolve()), str(source.resolve()))
    assert _snapshot(outer) == before


def test_destination_equal_to_the_source_is_refused(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set")
    before = _snapshot(source)
    for extra in ([], ["--overwrite"]):
        status, _, err = _run(capsys, source, source, *extra, *cache)
        _assert_one_line_error(status, err, str(source.resolve()), "is the source")
    assert _snapshot(source) == before


def test_destination_reaching_the_source_through_a_symlink_is_refused(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set")
    link = tmp_path / "link"
    os.symlink(source, link)
    before = _snapshot(source)
    status, _, err = _run(capsys, source, link, "--overwrite", *cache)
    _assert_one_line_error(status, err, str(source.resolve()))
    assert _snapshot(source) == before and link.is_symlink()


def test_destination_inside_the_source_is_refused(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set")
    before = _snapshot(source)
    status, _, err = _run(capsys, source, source / "converted", *cache)
    _assert_one_line_error(status, err, str((source / "converted").resolve()), "inside the source")
    assert _snapshot(source) == before
    assert not (source / "converted").exists()


def test_saved_source_cannot_be_replaced_by_its_own_resplit(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set")
    saved = tmp_path / "saved"
    assert _run(capsys, source, saved, *cache)[0] == 0
    before = _snapshot(saved)
    status, _, err = _run(capsys, saved, saved, "--overwrite", "--split-seed", "1", *cache)
    _assert_one_line_error(status, err, "is the source")
    assert _snapshot(saved) == before


def test_destination_that_is_a_file_is_refused(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set")
    target = tmp_path / "out.arrow"
    target.write_bytes(b"keep me")
    for extra in ([], ["--overwrite"]):
        status, _, err = _run(capsys, source, target, *extra, *cache)
        _assert_one_line_error(status, err, str(target), "is a file")
    assert target.read_bytes() == b"keep me"


def test_overwrite_leaves_a_folder_it_did_not_write_alone(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set")
    other = tmp_path / "results"
    (other / "run1").mkdir(parents=True)
    (other / "run1" / "model.safetensors").write_bytes(b"\x00weights")
    (other / "dataset_dict.json").write_text('{"splits": ["train"]}')  # a save_to_disk folder of someone else
    before = _snapshot(other)
    status, _, err = _run(capsys, source, other, "--overwrite", *cache)
    _assert_one_line_error(status, err, str(other.resolve()), "not an output of rwkvunet data")
    assert _snapshot(other) == before
    status, _, err = _run(capsys, source, other, *cache)
    _assert_one_line_error(status, err, "--overwrite")
    assert _snapshot(other) == before


def test_overwrite_replaces_an_earlier_output_and_records_what_it_wrote(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set", n=20)
    dest = tmp_path / "converted"
    assert _run(capsys, source, dest, "--split-seed", "0", *cache)[0] == 0
    first = json.loads((dest / "rwkvunet_data.json").read_text())
    assert first["source"] == str(source.resolve()) and first["layout"] == "folder"
    assert first["split_seed"] == 0 and sum(first["splits"].values()) == 20
    test_ids = sorted(load_segmentation_dataset(str(dest))["test"]["case_id"])

    status, out, _ = _run(capsys, source, dest, "--split-seed", "1", "--overwrite", *cache)
    assert status == 0 and f"saved to {dest}" in out
    second = json.loads((dest / "rwkvunet_data.json").read_text())
    assert second["split_seed"] == 1
    reloaded = load_segmentation_dataset(str(dest))
    assert {k: len(v) for k, v in reloaded.items()} == second["splits"]
    assert sorted(reloaded["test"]["case_id"]) != test_ids  # the new split, not the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "converted", "set"]  # no temporary left


def test_empty_existing_folder_is_used(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set")
    dest = tmp_path / "made_by_mkdir"
    dest.mkdir()
    assert _run(capsys, source, dest, *cache)[0] == 0
    assert (dest / "dataset_dict.json").is_file() and (dest / "rwkvunet_data.json").is_file()


def test_a_failed_replacement_keeps_the_earlier_output(tmp_path, monkeypatch):
    source = _image_folder(tmp_path / "set")
    dest = tmp_path / "converted"
    data_command.convert(str(source), str(dest), cache_dir=str(tmp_path / "cache"))
    before = _snapshot(dest)
    real_rename = Path.rename

    def rename_failing_into_place(self, target):
        if Path(target) == dest.resolve() and self.name == "data":
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_failing_into_place)
    with pytest.raises(OSError, match="No space left"):
        data_command.convert(str(source), str(dest), split_seed=1, cache_dir=str(tmp_path / "cache"),
                             overwrite=True)
    assert _snapshot(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "converted", "set"]


# --- sources that cannot be read ------------------------------------------------------------------------

def test_missing_empty_and_imageless_sources_are_one_line_errors(tmp_path, capsys):
    dest = tmp_path / "out"
    status, _, err = _run(capsys, tmp_path / "no_such_folder", dest)
    _assert_one_line_error(status, err, "no_such_folder", "does not exist")
    (tmp_path / "empty").mkdir()
    status, _, err = _run(capsys, tmp_path / "empty", dest)
    _assert_one_line_error(status, err, "empty", "is empty")
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "sub" / "readme.txt").write_text("no images here")
    status, _, err = _run(capsys, tmp_path / "docs", dest)
    _assert_one_line_error(status, err, "no images")
    only_images = tmp_path / "only_images"
    _save(np.zeros((8, 8), np.uint8), only_images / "a.png")
    status, _, err = _run(capsys, only_images, dest)
    _assert_one_line_error(status, err, "1 image(s)", "mask")
    assert not dest.exists()


@pytest.mark.parametrize("option, words", [
    (["--num-labels", "0"], "--num-labels: must be at least 1, got 0"),  # both were taken as binary
    (["--num-labels", "-3"], "--num-labels: must be at least 1"),
    (["--private"], "--private makes the Hub repo of --push-to-hub private, and nothing is pushed"),  # ignored
])
def test_options_that_meant_nothing_are_refused(tmp_path, capsys, option, words):
    source = _image_folder(tmp_path / "src", n=3)
    try:
        status = main(["data", str(source), str(tmp_path / "out"), *option])
    except SystemExit as usage_error:  # argparse's
        status = usage_error.code
    assert status == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_num_labels_below_one_is_refused_by_the_loader(tmp_path):
    from rwkvunet.data import load_segmentation_dataset

    with pytest.raises(ValueError, match="num_labels must be at least 1"):
        load_segmentation_dataset(str(_image_folder(tmp_path / "src", n=3)), num_labels=0)


def test_unreachable_hub_id_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import datasets

    def offline(name, **kw):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    status, _, err = _run(capsys, "someone/polyps", tmp_path / "out")
    _assert_one_line_error(status, err, "'someone/polyps' is not a local folder", "OfflineModeIsEnabled")


# --- masks with several grey levels or colours ----------------------------------------------------------

def _three_level_mask(rng, i):
    return _blocks_mask(rng, (128, 255))


def test_grey_levels_are_refused_for_a_binary_set(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set", mask_of=_three_level_mask)
    status, _, err = _run(capsys, source, tmp_path / "out", *cache)
    _assert_one_line_error(status, err, "3 grey levels (0, 128, 255)", "masks/case", "--num-labels 3")
    assert not (tmp_path / "out").exists()


def test_grey_levels_become_classes_with_num_labels_and_the_mapping_is_written(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set", mask_of=_three_level_mask)
    dest = tmp_path / "out"
    status, out, _ = _run(capsys, source, dest, "--num-labels", "3", *cache)
    assert status == 0
    assert "grey level 0 -> class 0, 128 -> class 1, 255 -> class 2" in out
    mapping = json.loads((dest / "rwkvunet_data.json").read_text())["label_mapping"]
    assert mapping == [{"value": 0, "class": 0}, {"value": 128, "class": 1}, {"value": 255, "class": 2}]
    lut = {m["value"]: m["class"] for m in mapping}
    for split in load_segmentation_dataset(str(dest)).values():
        for row in split:
            stored = np.asarray(Image.open(source / "masks" / f"{row['case_id']}.png"))
            expected = np.vectorize(lut.get)(stored)
            np.testing.assert_array_equal(np.asarray(row["mask"]), expected)


def test_colour_masks_are_refused_for_a_binary_set_and_mapped_with_num_labels(tmp_path, capsys, cache):
    red, green = (255, 0, 0), (0, 255, 0)

    def colour_mask(rng, i):
        mask = np.zeros((32, 32, 3), np.uint8)
        mask[2:12, 2:12] = red
        mask[18:30, 16:30] = green if i % 2 else red
        return mask

    source = _image_folder(tmp_path / "set", mask_of=colour_mask)
    status, _, err = _run(capsys, source, tmp_path / "out", *cache)
    _assert_one_line_error(status, err, "3 colours", "(0, 255, 0)", "(255, 0, 0)", "--num-labels 3")
    dest = tmp_path / "out"
    assert _run(capsys, source, dest, "--num-labels", "3", *cache)[0] == 0
    mapping = json.loads((dest / "rwkvunet_data.json").read_text())["label_mapping"]
    assert [m["value"] for m in mapping] == [[0, 0, 0], [0, 255, 0], [255, 0, 0]]  # black first, then sorted
    rows = {r["case_id"]: np.asarray(r["mask"]) for s in load_segmentation_dataset(str(dest)).values() for r in s}
    assert rows["case01"][5, 5] == 2 and rows["case01"][20, 20] == 1 and rows["case01"][0, 0] == 0
    assert rows["case02"][20, 20] == 2  # red is class 2 in every file, whatever else the file holds


def test_wrong_number_of_levels_for_num_labels_is_refused(tmp_path, capsys, cache):
    source = _image_folder(tmp_path / "set", mask_of=_three_level_mask)
    status, _, err = _run(capsys, source, tmp_path / "out", "--num-labels", "4", *cache)
    _assert_one_line_error(status, err, "3 grey levels (0, 128, 255)", "4 classes", "--num-labels 3")


def test_binary_masks_for_several_classes_get_advice(tmp_path, capsys, cache):
    """Binary masks with --num-labels 3 (or a multi-class config) advised "--num-labels 2 ... classes 0..1", and
    with one level "--num-labels 1 ... classes 0..0"."""
    source = _image_folder(tmp_path / "set")
    status, _, err = _run(capsys, source, tmp_path / "out", "--num-labels", "3", *cache)
    _assert_one_line_error(status, err, "the masks are binary (2 grey levels that fill regions: 0, 255)",
                           "3 classes", "leave out --num-labels")


def test_negative_split_seed_is_a_usage_error(tmp_path, capsys):
    # numpy's generator refused it deep inside, reported as a bug in rwkvunet
    src = tmp_path / "src"
    _save(np.zeros((8, 8), np.uint8), src / "images" / "a.png")
    _save(np.zeros((8, 8), np.uint8), src / "masks" / "a.png")
    with pytest.raises(SystemExit) as done:
        main(["data", str(src), str(tmp_path / "out"), "--split-seed", "-2"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "rwkvunet data: error: argument --split-seed: must be at least 0, got -2"
    assert not (tmp_path / "out").exists()


def test_push_that_cannot_happen_is_refused_before_converting(tmp_path, capsys, cache, monkeypatch):
    """Offline --push-to-hub wrote the folder and then ended in OfflineModeIsEnabled's traceback; an id with a
    space in HFValidationError's."""
    from huggingface_hub import constants

    source = _image_folder(tmp_path / "set")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    status, _, err = _run(capsys, source, tmp_path / "out", "--push-to-hub", "me/set", *cache)
    _assert_one_line_error(status, err, "--push-to-hub needs the Hub, but HF_HUB_OFFLINE is set",
                           "datasets.load_from_disk(DST).push_to_hub(REPO)")
    status, _, err = _run(capsys, source, tmp_path / "out", "--push-to-hub", "my set", *cache)
    _assert_one_line_error(status, err, "'my set' is not a valid Hub repo id")
    assert not (tmp_path / "out").exists()


def test_a_failed_push_keeps_the_folder_and_exits_1(tmp_path, capsys, cache, monkeypatch, online_hub):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", unreachable)
    status, out, err = _run(capsys, _image_folder(tmp_path / "set"), tmp_path / "out", "--push-to-hub", "me/set",
                            *cache)
    assert status == 1 and "Traceback" not in err and "saved to" in out
    assert "is written, but the upload to me/set failed (ConnectionError: Name or service not known)" in err
    assert set(load_segmentation_dataset(str(tmp_path / "out"))) == {"train", "validation", "test"}
