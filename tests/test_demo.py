"""The demo's callbacks against `rwkvunet predict` on the same files, bad uploads, the command's errors, and the
Space folder. The page itself is driven in a browser by tests/test_demo_browser.py."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo_model import make_model_folder
from rwkvunet.cli import main as cli_main
from rwkvunet.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_image
from rwkvunet.demo import DemoModel, Options, write_space
from rwkvunet.demo.examples import VOLUME_SPACING, write_examples
from rwkvunet.inference_io import PALETTE

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("demo_model"))


@pytest.fixture(scope="module")
def demo(model_dir, tmp_path_factory):
    return DemoModel.from_pretrained(model_dir, device="cpu", batch_size=4,
                                     workdir=tmp_path_factory.mktemp("demo_work"))


def _affine():
    aff = np.diag([0.7, 0.9, 3.0, 1.0])
    aff[:3, 3] = [-40.0, 12.5, 80.0]
    return aff


def _save_nifti(path, data):
    img = nib.Nifti1Image(data, _affine())
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(_affine(), code=1)
    img.set_sform(_affine(), code=2)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One file of each kind the page takes."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    grey, _ = make_synthetic_image(1, 72)
    Image.fromarray(np.stack([grey, grey // 2, 255 - grey], -1)).save(folder / "rgb.png")  # a grey model's RGB
    Image.fromarray((grey.astype(np.uint16) * 257)).save(folder / "deep.tif")  # 16-bit TIFF
    Image.fromarray(make_synthetic_image(2, 80)[0]).save(folder / "photo.jpg")
    Image.fromarray(make_synthetic_image(3, 50)[0][:, :45]).save(folder / "small.bmp")
    # few slices along the axes the tests use, so they run quickly
    ct = np.stack([make_synthetic_image(10 + k, 40)[0] for k in range(3)], axis=1).astype(np.float32) * 4 - 700
    _save_nifti(folder / "ct.nii.gz", ct.astype(np.int16))  # holds air in HU: automatic CT window
    _save_nifti(folder / "mr.nii", rng.gamma(2.0, 80.0, (36, 3, 40)).astype(np.float32))
    _save_nifti(folder / "sagittal.nii.gz", np.moveaxis(ct, 1, 0)[:2])
    return folder


def _predict(model_dir, files, out, *options):
    rc = cli_main(["predict", str(model_dir), *map(str, files), "--out", str(out), "--batch-size", "4", *options])
    assert rc == 0
    return out


def _labels(path):
    return np.asarray(nib.load(str(path)).dataobj) if ".nii" in path.name else np.asarray(Image.open(path))


@pytest.mark.parametrize("options, flags, names", [
    (Options(axis=1), ["--axis", "1"], ["rgb.png", "deep.tif", "ct.nii.gz"]),
    (Options(tta=True, size="native", intensity="minmax", axis=1), ["--tta", "--native", "--mri-minmax",
                                                                    "--axis", "1"], ["photo.jpg", "mr.nii"]),
    (Options(size="tiles", tile=32, overlap=8, intensity="window", window=(-300.0, 100.0), axis=0),
     ["--tile", "32", "--overlap", "8", "--window", "-300", "100", "--axis", "0"],
     ["small.bmp", "sagittal.nii.gz"]),
], ids=["defaults", "tta-native-minmax", "tiles-window"])
def test_labels_equal_predict(demo, model_dir, inputs, tmp_path, options, flags, names):
    """The page's labels, views and downloads are those `rwkvunet predict` writes for the same file and options."""
    out = _predict(model_dir, [inputs / n for n in names], tmp_path / "out", *flags)
    for name in names:
        result = demo.segment(inputs / name, options)
        stem = name.split(".")[0]
        ext = {"ct.nii.gz": ".nii.gz", "sagittal.nii.gz": ".nii.gz", "mr.nii": ".nii"}.get(name, ".png")
        want = _labels(out / f"{stem}_labels{ext}")
        assert result.labels.dtype == np.uint8 and result.labels.shape == want.shape
        np.testing.assert_array_equal(result.labels, want)
        np.testing.assert_array_equal(_labels(result.download), want)  # what the page offers for download
        assert result.counts == {int(v): int(c) for v, c in zip(*np.unique(want, return_counts=True))}
        if result.kind == "image":
            assert result.download.name == f"{stem}_labels.png"
            # the overlay view is predict's overlay (small images are enlarged by whole pixels)
            _, overlay = demo.views(result, 0, 0.5)
            zoom = overlay.shape[0] // want.shape[0]
            np.testing.assert_array_equal(overlay[::zoom, ::zoom],
                                          np.asarray(Image.open(out / f"{stem}_overlay.png")))
        else:
            src = nib.load(str(inputs / name))
            res = nib.load(str(result.download))
            np.testing.assert_allclose(res.affine, src.affine)
            assert int(res.header["sform_code"]) == 2 and res.get_data_dtype() == np.uint8
            assert result.num_slices == want.shape[options.axis]
            voxel_ml = 0.7 * 0.9 * 3.0 / 1000
            assert result.voxel_ml == pytest.approx(voxel_ml, rel=1e-6)
    assert ("TTA on" in result.summary) == options.tta and "Segmented in" in result.summary


def test_summary_says_what_was_chosen(demo, inputs):
    rgb = demo.segment(inputs / "rgb.png", Options())
    assert "image 72x72x3 (uint8); resized to 64x64; TTA off" in rgb.summary and "on cpu (float32)" in rgb.summary
    assert "RGB image converted to grey" in rgb.summary
    ct = demo.segment(inputs / "ct.nii.gz", Options(axis=1))
    assert "3 slices along axis 1" in ct.summary and "CT window [-125, 275]" in ct.summary
    assert "automatic" in ct.summary


def test_volume_views_follow_the_slider(demo, inputs):
    result = demo.segment(inputs / "ct.nii.gz", Options(axis=1))
    first = result.default_slice()
    fg = [np.count_nonzero(np.take(result.labels, k, axis=1)) for k in range(3)]
    assert fg[first] == max(fg)
    views = [demo.views(result, k, 1.0) for k in range(3)]
    for k, (image, overlay) in enumerate(views):
        labels = np.take(result.labels, k, axis=1)
        zoom = image.shape[0] // labels.shape[0]
        assert image.shape == overlay.shape == (labels.shape[0] * zoom, labels.shape[1] * zoom, 3)
        # at full opacity each labelled pixel has its label's colour, the others the image's grey
        small = overlay[::zoom, ::zoom]
        np.testing.assert_array_equal(small[labels > 0], PALETTE[labels[labels > 0]])
        np.testing.assert_array_equal(small[labels == 0], image[::zoom, ::zoom][labels == 0])
    assert not np.array_equal(views[0][0], views[1][0])  # another slice
    clear = demo.views(result, first, 0.0)[1]
    np.testing.assert_array_equal(clear, demo.views(result, first, 0.0)[0])  # opacity 0: the input


def test_legend_names_colours_and_volumes(demo, inputs):
    html = demo.legend_html()
    for value, name in enumerate(SYNTHETIC_CLASSES):
        assert f"<td style=\"padding:2px 10px;border:none;text-align:left\">{name}</td>" in html
        assert "rgb({},{},{})".format(*PALETTE[value]) in html
    result = demo.segment(inputs / "ct.nii.gz", Options(axis=1))
    html = demo.legend_html(result)
    assert "volume (mL)" in html
    for value, count in result.counts.items():
        assert f"{count:,}" in html and f"{count * 0.7 * 0.9 * 3.0 / 1000:.2f}" in html


def test_huge_image_runs_in_tiles(model_dir, inputs, tmp_path):
    """An image too large to run whole is predicted in tiles, as `predict --tile` does, and the page says so."""
    small = DemoModel.from_pretrained(model_dir, device="cpu", workdir=tmp_path, max_whole_pixels=48 * 48)
    result = small.segment(inputs / "photo.jpg", Options(size="native", tile=32, overlap=8))
    assert "80x80 pixels are too many to run whole" in result.summary
    out = _predict(model_dir, [inputs / "photo.jpg"], tmp_path / "out", "--tile", "32", "--overlap", "8")
    np.testing.assert_array_equal(result.labels, _labels(out / "photo_labels.png"))


def test_views_of_large_images_are_subsampled(demo, tmp_path):
    from rwkvunet.demo.callbacks import MAX_VIEW_SIDE

    path = tmp_path / "wide.png"
    Image.fromarray(np.tile(make_synthetic_image(4, 64)[0], (2, 40))).save(path)  # 128 x 2560
    result = demo.segment(path, Options())
    image, overlay = demo.views(result, 0, 0.5)
    step = -(-2560 // MAX_VIEW_SIDE)  # every step-th pixel of each row and column
    assert result.labels.shape == (128, 2560)
    assert image.shape == overlay.shape == (-(-128 // step), -(-2560 // step), 3)


def _bad_files(folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "cut.nii.gz").write_bytes(b"\x1f\x8b\x08\x00truncated")
    frames = [Image.fromarray(make_synthetic_image(k, 32)[0]) for k in range(3)]
    frames[0].save(folder / "stack.tif", save_all=True, append_images=frames[1:])  # 3-D as a multi-page TIFF
    _save_nifti(folder / "series.nii.gz", np.zeros((8, 8, 4, 3), np.float32))  # 4-D
    _save_nifti(folder / "flat.nii", np.zeros((8, 8), np.float32))  # 2-D
    Image.new("1", (15000, 15000)).save(folder / "bomb.png")  # beyond Pillow's decompression-bomb guard
    return {"bomb.png": "Pillow refuses images this large","broken.png": "cannot read the image", "notes.txt": "unsupported file type",
            "cut.nii.gz": "cannot read the NIfTI volume", "stack.tif": "has 3 frames",
            "series.nii.gz": "expected a 3-D volume", "flat.nii": "expected a 3-D volume"}


def test_bad_uploads_give_a_message_and_the_page_goes_on(demo, inputs, tmp_path):
    for name, expected in _bad_files(tmp_path).items():
        result, message = demo.handle(tmp_path / name, Options())
        assert result is None and expected in message, (name, message)
        assert message.startswith(name) and str(tmp_path) not in message  # the file's name, not a server path
    result, message = demo.handle(inputs / "small.bmp", Options())
    assert message is None and result.labels.shape == (50, 45)


@pytest.mark.parametrize("options, expected", [
    (Options(size="tiles", tile=8), "at least 16 pixels"),
    (Options(size="tiles", tile=32, overlap=32), "overlap between 0"),
    (Options(intensity="window", window=(5.0, 5.0)), "low < high"),
])
def test_bad_options_give_a_message(demo, inputs, options, expected):
    result, message = demo.handle(inputs / "small.bmp", options)
    assert result is None and expected in message


def test_examples_are_synthetic_and_segmentable(demo, tmp_path):
    image, volume = write_examples(tmp_path)
    assert Image.open(image).size == (128, 128)
    vol = nib.load(str(volume))
    assert vol.shape == (64, 64, 16) and vol.header.get_zooms() == pytest.approx(VOLUME_SPACING)
    assert demo.segment(volume, Options()).voxel_ml == pytest.approx(np.prod(VOLUME_SPACING) / 1000)


# --- the command ---------------------------------------------------------------------------------------------
def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_requirement_lines_pip_would_fail_on_are_refused(model_dir, tmp_path, capsys):
    """An invalid --requirement was written into the Space's requirements.txt (its build failed on the Hub);
    without a Space to write it was silently ignored."""
    for spec in ("torch==", "", "a\nb"):
        assert cli_main(["demo", str(model_dir), "--requirement", spec, "--write-space", str(tmp_path / "s")]) == 2
        assert "--requirement" in _error(capsys)
    assert not (tmp_path / "s").exists()
    assert cli_main(["demo", str(model_dir), "--requirement", "rwkvunet", "--port", "0"]) == 2
    assert "no Space is written" in _error(capsys)
    for i, spec in enumerate(("rwkvunet[demo]>=0.1", "git+https://github.com/o/r", "rwkvunet @ git+https://x/y.git")):
        assert cli_main(["demo", str(model_dir), "--requirement", spec, "--write-space", str(tmp_path / f"ok{i}")]) == 0
        assert (tmp_path / f"ok{i}" / "requirements.txt").read_text().splitlines()[0] == spec
    capsys.readouterr()


def test_command_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch):
    assert cli_main(["demo", str(model_dir), "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535" in _error(capsys)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli_main(["demo", str(model_dir), "--port", str(port)]) == 2
        assert f"port {port} on 127.0.0.1 is in use" in _error(capsys)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "gradio", None)  # as if Gradio were not installed
        assert cli_main(["demo", str(model_dir), "--port", "0"]) == 2
        assert _error(capsys) == 'rwkvunet demo: error: the demo needs Gradio: pip install "rwkvunet[demo]"'
    assert cli_main(["demo", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "does not exist" in _error(capsys)
    (tmp_path / "empty").mkdir()
    assert cli_main(["demo", str(tmp_path / "empty"), "--port", "0"]) == 2
    assert "config.json" in _error(capsys)


def test_write_space(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # writing a Space does not need Gradio
    space = tmp_path / "space"
    assert cli_main(["demo", str(model_dir), "--write-space", str(space)]) == 0
    assert "try it with: python" in capsys.readouterr().err
    card = (space / "README.md").read_text()
    meta = card.split("---")[1]
    assert "sdk: gradio" in meta and "app_file: app.py" in meta and "sdk_version: " in meta
    assert (space / "requirements.txt").read_text().startswith("rwkvunet[demo,nifti]==")
    assert "build_app(MODEL" in (space / "app.py").read_text()
    assert sorted(p.name for p in (space / "model").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    assert json.loads((space / "model" / "config.json").read_text())["id2label"]["1"] == "ellipse"
    # nothing is replaced: a second write into the folder is refused
    assert cli_main(["demo", str(model_dir), "--write-space", str(space)]) == 2
    assert "not empty" in _error(capsys)
    # a Hub id is referenced, not copied (checked offline: the id must load, so write directly)
    hub = write_space("someone/rwkvunet-model", tmp_path / "hub_space",
                      requirement="rwkvunet[demo] @ git+https://example.org/rwkvunet")
    assert "MODEL = 'someone/rwkvunet-model'" in (hub / "app.py").read_text()
    assert not (hub / "model").exists()
    assert (hub / "requirements.txt").read_text() == "rwkvunet[demo] @ git+https://example.org/rwkvunet\n"


def test_push_offline_is_refused_before_writing(model_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    space = tmp_path / "space"
    assert cli_main(["demo", str(model_dir), "--write-space", str(space), "--push", "someone/demo"]) == 2
    assert "--push needs the Hub, but HF_HUB_OFFLINE is set" in _error(capsys)
    assert not space.exists()


def test_a_failed_push_keeps_the_space_and_exits_1(model_dir, tmp_path, capsys, unreachable_hub):
    space = tmp_path / "space"
    assert cli_main(["demo", str(model_dir), "--write-space", str(space), "--push", "someone/demo"]) == 1
    assert f"or upload {space} yourself" in _error(capsys)
    assert (space / "app.py").is_file()


def test_a_pushed_temporary_space_is_removed(model_dir, tmp_path, capsys, monkeypatch, online_hub):
    """Without --write-space the Space is assembled in a temporary folder: kept when the upload fails (to upload
    by hand), removed once uploaded (each push left a copy of the weights in the temporary folder)."""
    import tempfile

    from huggingface_hub import HfApi

    uploaded = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/spaces/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, folder_path, **kw: uploaded.append(
        sorted(p.name for p in Path(folder_path).iterdir())))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli_main(["demo", str(model_dir), "--push", "someone/demo"]) == 0
    assert uploaded and "app.py" in uploaded[0]
    assert not list(tmp_path.glob("rwkvunet-space-*"))


def test_old_downloads_are_deleted(demo, inputs):
    import os

    old = demo.segment(inputs / "small.bmp", Options()).download
    os.utime(old.parent, (0, 0))  # made long ago
    new = demo.segment(inputs / "small.bmp", Options()).download
    assert not old.parent.exists() and new.is_file()


def test_own_work_folder_is_removed_and_a_given_one_kept(model_dir, inputs, tmp_path):
    """A demo that made its own temporary folder removes it when it goes (also at exit: weakref.finalize), so
    repeated `rwkvunet demo` runs leave nothing in /tmp; a folder the user gave is never deleted."""
    import gc

    own = DemoModel.from_pretrained(model_dir, device="cpu")
    folder = own.workdir
    assert own.segment(inputs / "small.bmp", Options()).download.is_file()
    del own
    gc.collect()
    assert not folder.exists()

    given = DemoModel.from_pretrained(model_dir, device="cpu", workdir=tmp_path / "mine")
    given.workdir.mkdir()
    (given.workdir / "keep.txt").write_text("user data")
    del given
    gc.collect()
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"
