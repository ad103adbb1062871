"""`rwkvunet predict` and the Segmenter API on generated images and volumes.

A small randomly initialised RWKV-UNet-T (seeded) is saved with save_pretrained; references are computed here
by calling the model directly, independently of the code under test.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import rwkvunet  # noqa: F401  (registers the Auto classes)
from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation
from rwkvunet.cli import main as cli_main
from rwkvunet.inference import Segmenter, labels_from_probs, match_channels
from rwkvunet.inference_io import InputError

NUM_LABELS = 3


def _build(seed: int, **kwargs) -> RWKVUNetForSemanticSegmentation:
    torch.manual_seed(seed)
    kwargs.setdefault("head_init", "small")  # the near-zero logits these tolerances were set for
    cfg = RWKVUNetConfig(variant="t", num_labels=kwargs.pop("num_labels", NUM_LABELS),
                         in_channels=kwargs.pop("in_channels", 1), **kwargs)
    return RWKVUNetForSemanticSegmentation(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _build(0)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model_t")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def segmenter(model_dir):
    return Segmenter.from_pretrained(model_dir, device="cpu")


def _probs(model, x: torch.Tensor) -> torch.Tensor:
    """Reference class probabilities straight from the model, float64."""
    with torch.no_grad():
        logits = model(pixel_values=x.float()).logits.double()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)


# --- images through the command ------------------------------------------------------------------------------
def test_cli_images_all_formats(model, model_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    src = tmp_path / "in"
    (src / "sub" / "deeper").mkdir(parents=True)
    images = {  # RGB and grey in every format; rgb.bmp shares its name with rgb.png; one 16-bit TIFF
        "rgb.png": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        "rgb.bmp": rng.integers(0, 256, (30, 45, 3), dtype=np.uint8),
        "sub/photo.jpg": rng.integers(0, 256, (33, 47, 3), dtype=np.uint8),
        "sub/grey.jpeg": rng.integers(0, 256, (21, 35), dtype=np.uint8),
        "sub/grey.tif": rng.integers(0, 256, (48, 31), dtype=np.uint8),
        "sub/deep.tiff": rng.integers(0, 65536, (18, 22), dtype=np.uint16),
        "sub/deeper/grey.bmp": rng.integers(0, 256, (25, 19), dtype=np.uint8),
        "grey.png": rng.integers(0, 256, (37, 50), dtype=np.uint8),
    }
    # of two names that would collide, the second in sorted order gets its extension
    outputs = {"rgb.png": "rgb_png", "sub/grey.tif": "sub/grey_tif"}
    for name, arr in images.items():
        Image.fromarray(arr).save(src / name)
    (src / ".hidden.png").write_bytes(b"skipped: hidden")
    (src / "notes.txt").write_text("skipped: not an image")
    out = tmp_path / "out"

    rc = cli_main(["predict", str(model_dir), str(src), "--out", str(out), "--color", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    for name, arr in images.items():
        stem = outputs.get(name, name.rsplit(".", 1)[0])
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.dtype == np.uint8 and labels.shape == arr.shape[:2]
        assert labels.max() < NUM_LABELS
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == (arr.shape[1], arr.shape[0])
        assert Image.open(out / f"{stem}_labels_color.png").size == overlay.size
    assert not list(out.rglob(".hidden*")) and not list(out.rglob("notes*"))
    # the grey model gets RGB images converted, and says so
    assert "RGB image converted to grey" in err and "rgb.bmp" in err  # said at the first one
    assert "(3 files)" in err  # three RGB images: the note is counted
    assert "wrote 24 files for 8 of 8 inputs" in err
    legend = json.loads((out / "labels.json").read_text())
    assert sorted(legend) == ["0", "1", "2"] and legend["2"]["name"] == "LABEL_2"
    assert legend["0"]["color"] == [0, 0, 0] and legend["1"]["color"] != legend["2"]["color"]

    # the command's label map equals the model's own argmax on the same pixels (/ 255, then luma)
    rgb = images["rgb.png"].astype(np.float64) / 255.0
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    ref = _probs(model, torch.from_numpy(grey)[None, None])[0]
    got = np.asarray(Image.open(out / "rgb_png_labels.png"))
    top2 = ref.topk(2, dim=0).values
    decided = (top2[0] - top2[1] > 1e-4).numpy()  # float32 ties may go either way
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(got[decided], ref.argmax(0).numpy()[decided])


# --- volumes -------------------------------------------------------------------------------------------------
def _nifti(path, data, affine):
    nib = pytest.importorskip("nibabel")
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(path))
    return nib.load(str(path))


def _affine():
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(0.3), -np.sin(0.3)], [0.0, np.sin(0.3), np.cos(0.3)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ tilt @ np.diag([0.7, 0.8, 2.5])
    aff[:3, 3] = [-120.5, 33.0, 410.25]
    return aff


def test_cli_nifti_volume_keeps_geometry(model, model_dir, tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(3)
    vol = rng.normal(40, 250, (24, 3, 20)).astype(np.int16)  # CT-like HU, sliced along axis 1
    vol[:4] = -1000
    src = _nifti(tmp_path / "case.nii.gz", vol, _affine())
    out = tmp_path / "out"

    rc = cli_main(["predict", str(model_dir), str(tmp_path / "case.nii.gz"), "--out", str(out), "--ct",
                   "--axis", "1", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "CT window [-125, 275]" in err and "3 slices along axis 1" in err
    res = nib.load(str(out / "case_labels.nii.gz"))
    labels = np.asarray(res.dataobj)
    assert res.shape == src.shape and labels.dtype == np.uint8 and res.get_data_dtype() == np.uint8
    np.testing.assert_allclose(res.affine, src.affine, atol=1e-6)
    np.testing.assert_allclose(res.header.get_zooms(), src.header.get_zooms())
    assert int(res.header["sform_code"]) == 2 and int(res.header["qform_code"]) == 1
    np.testing.assert_allclose(res.header.get_qform(), src.header.get_qform(), atol=1e-5)
    assert res.header.get_xyzt_units() == src.header.get_xyzt_units()
    assert labels.max() < NUM_LABELS
    assert Image.open(out / "case_montage.png").mode == "RGB"

    # each slice equals the model's argmax on that slice alone, windowed here by the formula
    for k in range(vol.shape[1]):
        x = (np.clip(vol[:, k, :].astype(np.float64), -125, 275) + 125) / 400
        ref = _probs(model, torch.from_numpy(x)[None, None])[0]
        top2 = ref.topk(2, dim=0).values
        decided = (top2[0] - top2[1] > 1e-4).numpy()
        np.testing.assert_array_equal(labels[:, k, :][decided], ref.argmax(0).numpy()[decided])


def test_volume_resized_to_training_size_keeps_shape(model, tmp_path):
    """With a processor that resizes, slices run at its size and the probabilities come back bilinearly."""
    from rwkvunet import RWKVUNetImageProcessor

    proc = RWKVUNetImageProcessor(size={"height": 32, "width": 32}, num_channels=1)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    seg = Segmenter.from_pretrained(tmp_path / "m", device="cpu")
    assert seg.preprocessing.size == (32, 32)
    vol = np.random.default_rng(4).random((20, 36, 2)).astype(np.float32)
    labels = seg.predict_volume(vol, axis=2, intensity=None)
    assert labels.shape == vol.shape and labels.dtype == np.uint8

    # reference: the image processor's own pixel values, the model, a bilinear resize back, argmax
    for k in range(vol.shape[2]):
        pixels = proc(vol[:, :, k], return_tensors="pt")["pixel_values"]
        assert tuple(pixels.shape) == (1, 1, 32, 32)
        probs = F.interpolate(_probs(model, pixels), size=vol.shape[:2], mode="bilinear", align_corners=False,
                              antialias=True)[0]
        top2 = probs.topk(2, dim=0).values
        decided = (top2[0] - top2[1] > 1e-4).numpy()
        np.testing.assert_array_equal(labels[:, :, k][decided], probs.argmax(0).numpy()[decided])


# --- test-time augmentation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_labels", [NUM_LABELS, 1])
def test_tta_is_mean_of_flipped_probabilities(model, num_labels):
    if num_labels == 1:  # the sigmoid path; a small conv model keeps it cheap
        torch.manual_seed(5)
        model = LocalModel(num_labels=1).eval()
    image = np.random.default_rng(5).random((32, 48)).astype(np.float32)
    got = Segmenter(model, device="cpu", tta=True).predict_proba(image)
    x = torch.from_numpy(image)[None, None]
    views = [_probs(model, x), _probs(model, x.flip(-1)).flip(-1), _probs(model, x.flip(-2)).flip(-2)]
    want = torch.stack(views).mean(0)[0].numpy()
    assert got.shape == (num_labels, 32, 48)
    # float32 model outputs against a float64 mean of the same views: probabilities agree to ~1e-6
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(want - views[0][0].numpy()).max() > 1e-3  # the flips do change the answer
    labels = labels_from_probs(got)
    expect = (want[0] > 0.5) if num_labels == 1 else want.argmax(0)
    decided = np.abs(want[0] - 0.5) > 1e-4 if num_labels == 1 else np.diff(np.sort(want, 0)[-2:], axis=0)[0] > 1e-4
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= set(range(max(num_labels, 2)))
    np.testing.assert_array_equal(labels[decided], expect[decided])


# --- tiles ---------------------------------------------------------------------------------------------------
class LocalModel(nn.Module):
    """Three 3x3 convolutions: each output pixel depends on the input within 3 pixels only."""

    radius = 3

    def __init__(self, in_channels=1, num_labels=NUM_LABELS):
        super().__init__()
        self.config = SimpleNamespace(in_channels=in_channels, num_labels=num_labels)
        self.net = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1),
                                 nn.Tanh(), nn.Conv2d(8, num_labels, 3, padding=1))
        self.seen = []

    def forward(self, pixel_values):
        self.seen.append(tuple(pixel_values.shape))
        return SimpleNamespace(logits=self.net(pixel_values) * 4)


def _tile_edges(length, tile, overlap):
    """Tile layout by definition: stride tile - overlap from 0, the last tile flush with the end."""
    starts = list(range(0, max(length - tile, 0), tile - overlap)) + [max(length - tile, 0)]
    return [(s, min(s + tile, length)) for s in starts]


def _near_inner_edge(length, tile, overlap, radius):
    """Pixels within ``radius`` of a tile edge that is not an image edge (their context is cut by a tile)."""
    near = np.zeros(length, bool)
    for s, e in _tile_edges(length, tile, overlap):
        if s > 0:
            near[s:s + radius] = True
        if e < length:
            near[e - radius:e] = True
    return near


def test_tiles_agree_with_whole_image_away_from_tile_borders():
    """Blending is exact where every tile sees the pixel's whole receptive field.

    RWKV-UNet itself has a global receptive field whatever its spatial mixer: the stem's squeeze-excite
    gate averages over the whole image (and Bi-WKV mixes globally), so its tiles cannot equal the whole image
    anywhere; a model with a known 3-pixel receptive field tests the tiling and blending instead.
    """
    torch.manual_seed(6)
    image = np.random.default_rng(6).random((100, 90)).astype(np.float32)
    seg = Segmenter(LocalModel(), device="cpu", batch_size=3)
    model = seg.inference_model  # the copy that predictions run
    whole = seg.predict_proba(image, native=True)
    model.seen.clear()
    tiled = seg.predict_proba(image, tile=48, overlap=16)
    # memory is bounded by the tile: at most batch_size tiles of at most 48 x 48 reach the model
    assert len(model.seen) > 1 and all(b <= 3 and h <= 48 and w <= 48 for b, _, h, w in model.seen)
    assert sum(b for b, *_ in model.seen) == len(_tile_edges(100, 48, 16)) * len(_tile_edges(90, 48, 16))
    near = _near_inner_edge(100, 48, 16, model.radius)[:, None] | _near_inner_edge(90, 48, 16, model.radius)[None]
    interior = ~near
    assert interior.mean() > 0.7
    np.testing.assert_allclose(tiled[:, interior], whole[:, interior], atol=1e-5)
    np.testing.assert_array_equal(tiled.argmax(0)[interior], whole.argmax(0)[interior])
    assert np.abs(tiled - whole)[:, near].max() > 1e-3  # cut context does show, so the mask matters
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=1e-5)


def test_one_tile_covering_the_image_equals_whole_image(segmenter):
    image = np.random.default_rng(7).random((40, 36)).astype(np.float32)
    whole = segmenter.predict_proba(image, native=True)
    tiled = segmenter.predict_proba(image, tile=64, overlap=16)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)


# --- channels ------------------------------------------------------------------------------------------------
def test_channel_conversion_rules():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb, note = match_channels(grey, 3)
    assert rgb.shape == (3, 4, 3) and (rgb == grey[..., None]).all() and "repeated" in note
    same, note = match_channels(np.repeat(grey[..., None], 3, -1), 1)
    assert (same[..., 0] == grey).all() and "nothing is lost" in note
    rgba = np.zeros((3, 4, 4), np.uint8)
    assert match_channels(rgba, 3)[0].shape == (3, 4, 3) and "alpha" in match_channels(rgba, 3)[1]
    assert match_channels(grey, 1)[1] is None
    with pytest.raises(InputError, match="3 channels but the model takes 2"):
        match_channels(np.zeros((3, 4, 3)), 2)
    with pytest.raises(InputError, match="2 channels but the model takes 1"):
        match_channels(np.zeros((3, 4, 2)), 1)


# --- errors --------------------------------------------------------------------------------------------------
def test_cli_missing_and_unsupported_inputs(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli_main(["predict", str(model_dir), str(tmp_path / "nope.png"), "--out", out]) == 2
    assert "nope.png: no such file or folder" in capsys.readouterr().err
    (tmp_path / "scan.dcm").write_bytes(b"\0" * 10)
    assert cli_main(["predict", str(model_dir), str(tmp_path / "scan.dcm"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unsupported format .dcm" in err and ".nii.gz" in err
    (tmp_path / "empty").mkdir()
    assert cli_main(["predict", str(model_dir), str(tmp_path / "empty"), "--out", out]) == 2
    assert "no images or NIfTI volumes found" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    assert cli_main(["predict", str(tmp_path / "empty"), str(tmp_path / "ok.png"), "--out", out]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli_main(["predict", str(tmp_path / "typo"), str(tmp_path / "ok.png"), "--out", out]) == 2
    assert "typo does not exist (and is not a Hub id" in capsys.readouterr().err
    assert cli_main(["predict", str(model_dir), str(tmp_path / "ok.png"), "--out", out,
                     "--window", "300", "-100"]) == 2
    assert "LOW < HIGH" in capsys.readouterr().err
    # --overlap without --tile was silently ignored
    assert cli_main(["predict", str(model_dir), str(tmp_path / "ok.png"), "--out", out, "--overlap", "10"]) == 2
    assert "--overlap 10 sets how much tiles overlap, and there are no tiles" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written when nothing could start


def test_cli_small_tiles_take_a_quarter_tile_overlap(model_dir, tmp_path, capsys):
    """`--tile 32` alone was refused: the default overlap (64) was not below the tile."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70), dtype=np.uint8)).save(tmp_path / "a.png")
    assert cli_main(["predict", str(model_dir), str(tmp_path / "a.png"), "--out", str(tmp_path / "o1"),
                     "--tile", "32"]) == 0
    assert "tiles of 32 px overlapping by 8" in capsys.readouterr().err
    assert cli_main(["predict", str(model_dir), str(tmp_path / "a.png"), "--out", str(tmp_path / "o2"),
                     "--tile", "32", "--overlap", "8"]) == 0
    capsys.readouterr()
    assert (tmp_path / "o1" / "a_labels.png").read_bytes() == (tmp_path / "o2" / "a_labels.png").read_bytes()


def test_api_small_tiles_take_a_quarter_tile_overlap(segmenter):
    """`predict_image(image, tile=32)` raised "need ... overlap < tile" for the default overlap of 64."""
    image = np.random.default_rng(1).random((40, 70)).astype(np.float32)
    np.testing.assert_array_equal(segmenter.predict_proba(image, tile=32),
                                  segmenter.predict_proba(image, tile=32, overlap=8))
    np.testing.assert_array_equal(segmenter.predict_proba(image, tile=512),
                                  segmenter.predict_proba(image, tile=512, overlap=64))


def test_cli_unreadable_files_fail_alone(model_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((16, 20), 128, np.uint8)).save(src / "good.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 4)
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    out = tmp_path / "out"
    rc = cli_main(["predict", str(model_dir), str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.png: cannot read the image" in err and "broken.nii.gz: cannot read the NIfTI volume" in err
    assert "2 input(s) could not be segmented" in err and "the others were written" in err
    assert "wrote 2 files for 1 of 3 inputs" in err
    assert err.strip().splitlines()[-1].startswith("rwkvunet predict: error: ")
    assert (out / "good_labels.png").is_file() and (out / "good_overlay.png").is_file()
    assert (out / "labels.json").is_file()


def test_cli_channel_mismatch_without_a_conversion(tmp_path, capsys):
    _build(12, in_channels=2).save_pretrained(tmp_path / "two")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "grey.png")
    rc = cli_main(["predict", str(tmp_path / "two"), str(tmp_path / "grey.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2  # the only input failed: nothing done
    assert "grey.png: the image has 1 channel but the model takes 2" in err and "no unambiguous conversion" in err
    assert "rwkvunet predict: error: nothing written: none of the 1 input(s)" in err
    assert "wrote 0 files" not in err and "labels.json" not in err
    assert not (tmp_path / "out").exists()


def test_missing_nibabel_names_the_extra(monkeypatch):
    import sys

    from rwkvunet import inference_io

    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match=r'pip install "rwkvunet\[nifti\]"'):
        inference_io.read_volume("case.nii.gz")


# --- API details ---------------------------------------------------------------------------------------------
def test_pixels_match_the_image_processor():
    """Without resizing, the segmenter's model inputs equal RWKVUNetImageProcessor's for the same settings."""
    from rwkvunet import RWKVUNetImageProcessor
    from rwkvunet.inference import Preprocessing

    rng = np.random.default_rng(8)
    images = (rng.integers(0, 256, (9, 11, 3), dtype=np.uint8), rng.integers(0, 256, (9, 11), dtype=np.uint8),
              rng.random((9, 11)).astype(np.float32), rng.random((9, 11, 3)).astype(np.float32))
    for channels, normalize in ((3, True), (1, False)):  # RGB model with ImageNet statistics; grey model
        proc = RWKVUNetImageProcessor(do_resize=False, do_normalize=normalize, num_channels=channels)
        seg = Segmenter(LocalModel(in_channels=channels), Preprocessing.from_dict(proc.to_dict(), channels),
                        device="cpu")
        for image in images:
            want = proc(image, return_tensors="pt")["pixel_values"]
            assert torch.equal(seg.model_input(image, native=True), want)


def test_find_inputs_skips_the_output_folder(tmp_path):
    from rwkvunet.inference_io import find_inputs

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "pred").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "pred" / "a_labels.png")
    (tmp_path / "vol.nii.gz").write_bytes(b"")
    found = find_inputs([tmp_path, tmp_path / "a.png"], exclude=tmp_path / "pred")
    assert [f.name for f, _ in found] == ["a.png", "vol.nii.gz"]  # a.png named twice, segmented once


def test_find_inputs_skips_earlier_outputs(tmp_path):
    """A folder holding predict's labels.json below a searched folder is an earlier run's output: its label maps
    and overlays were segmented again as inputs (into <name>_labels_labels.png) by a second run to another --out."""
    import json

    from rwkvunet.inference_io import find_inputs

    for name in ("a.png", "pred/a_labels.png", "pred/a_overlay.png", "masks/a.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    (tmp_path / "pred" / "labels.json").write_text(json.dumps({"0": {"name": "background", "color": [0, 0, 0]}}))
    (tmp_path / "masks" / "labels.json").write_text(json.dumps({"classes": ["a"]}))  # a user's file: not predict's
    skipped = []
    found = find_inputs([tmp_path], skipped=skipped)
    assert [str(f.relative_to(tmp_path)) for f, _ in found] == ["a.png", "masks/a.png"]
    assert skipped == [tmp_path / "pred"]
    # named as the input itself, an output folder is segmented: the user asked for it
    assert [f.name for f, _ in find_inputs([tmp_path / "pred"])] == ["a_labels.png", "a_overlay.png"]


def test_cli_a_second_run_to_another_out_skips_the_first_runs_outputs(model_dir, tmp_path, capsys):
    src = tmp_path / "in"
    _png(src / "a.png")
    assert cli_main(["predict", str(model_dir), str(src), "--out", str(src / "pred")]) == 0
    capsys.readouterr()
    assert cli_main(["predict", str(model_dir), str(src), "--out", str(src / "pred2")]) == 0
    assert f"note: skipped {src / 'pred'}: it holds an earlier rwkvunet predict output" in capsys.readouterr().err
    assert sorted(p.name for p in (src / "pred2").iterdir()) == ["a_labels.png", "a_overlay.png", "labels.json"]


def test_predict_function_routes_arrays_paths_and_volumes(segmenter, tmp_path):
    image = np.random.default_rng(9).integers(0, 256, (24, 20), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    from_array, from_path = rwkvunet.predict(segmenter, [image, tmp_path / "img.png"])
    assert from_array.shape == image.shape and from_array.dtype == np.uint8
    np.testing.assert_array_equal(from_array, from_path)
    volume = np.random.default_rng(9).random((16, 18, 2)).astype(np.float32)
    labels = rwkvunet.predict(segmenter, volume, axis=2, intensity="minmax")
    assert labels.shape == volume.shape and labels.max() < NUM_LABELS
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="unsupported format"):
        rwkvunet.predict(segmenter, tmp_path / "notes.txt")


def test_nifti_labels_keep_a_trailing_singleton_axis(tmp_path):
    nib = pytest.importorskip("nibabel")
    from rwkvunet.inference_io import read_volume, save_nifti_labels

    src = _nifti(tmp_path / "t.nii", np.random.default_rng(10).random((4, 5, 3, 1)).astype(np.float32), _affine())
    data, img = read_volume(tmp_path / "t.nii")
    assert data.shape == (4, 5, 3)
    labels = (data > 0.5).astype(np.uint8)
    save_nifti_labels(tmp_path / "t_labels.nii", labels, img)
    res = nib.load(str(tmp_path / "t_labels.nii"))
    assert res.shape == src.shape
    np.testing.assert_allclose(res.affine, src.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(res.dataobj)[..., 0], labels)


def test_bf16_autocast_runs_and_stays_close(segmenter):
    """The reduced-precision path (the CUDA default) on the CPU: float32 probabilities close to fp32's.

    bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 per op); over the ~40 layers of the T model this
    moves the logits by about 0.1 where they span about +-4, so probabilities agree to a few hundredths."""
    image = np.random.default_rng(11).random((32, 32)).astype(np.float32)
    fp32 = segmenter.predict_proba(image)
    bf16 = Segmenter(segmenter.model, device="cpu", dtype="bf16").predict_proba(image)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16.sum(0), 1.0, atol=1e-5)
    assert np.abs(bf16 - fp32).mean() < 0.02 and np.abs(bf16 - fp32).max() < 0.15
    assert (bf16.argmax(0) == fp32.argmax(0)).mean() > 0.9


def test_hub_id_from_a_local_cache(model_dir, tmp_path):
    """A Hub id resolves through a cache laid out like the Hub's (offline), with or without a processor."""
    import shutil

    from rwkvunet import RWKVUNetImageProcessor

    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, with_processor in (("rwkv-unet/tiny-test", True), ("rwkv-unet/tiny-bare", False)):
        root = tmp_path / f"models--{repo.replace('/', '--')}"
        snapshot = root / "snapshots" / commit
        shutil.copytree(model_dir, snapshot)
        if with_processor:
            RWKVUNetImageProcessor(size={"height": 48, "width": 40}).save_pretrained(snapshot)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(commit)
        seg = Segmenter.from_pretrained(repo, device="cpu", cache_dir=str(tmp_path), local_files_only=True)
        assert seg.num_labels == NUM_LABELS and seg.in_channels == 1
        assert seg.preprocessing.size == ((48, 40) if with_processor else None)


@pytest.mark.gpu
def test_cuda_default_is_bf16_and_close_to_cpu():
    """On a GPU the segmenter picks CUDA with bfloat16 autocast; probabilities stay within bf16 rounding of
    the CPU float32 ones (see the CPU bf16 test for the tolerance)."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")
    image = np.random.default_rng(13).random((64, 80)).astype(np.float32)
    cpu = Segmenter(_build(0), device="cpu").predict_proba(image)
    gpu_seg = Segmenter(_build(0))
    assert gpu_seg.device.type == "cuda" and gpu_seg.dtype in (torch.bfloat16, torch.float16)
    gpu = gpu_seg.predict_proba(image, tile=48, overlap=16)  # tiles too: crops move to the device and back
    whole = gpu_seg.predict_proba(image)
    assert gpu.dtype == np.float32 and np.abs(whole - cpu).mean() < 0.02 and np.abs(whole - cpu).max() < 0.15
    np.testing.assert_allclose(gpu.sum(0), 1.0, atol=1e-4)


# --- outputs: nothing replaced without --overwrite, inputs never, --out checked before the model ---------------
def _png(path, value: int = 0, size=(12, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _snapshot(folder):
    """Every file under ``folder`` with its bytes, to prove nothing was touched."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def loads(monkeypatch):
    """Records every model load of `rwkvunet predict` and refuses it, for checks that must come first."""
    from rwkvunet.commands import predict as command

    calls = []

    class NoModel:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            calls.append(args)
            raise RuntimeError("the model must not be loaded here")

    monkeypatch.setattr(command, "Segmenter", NoModel)
    return calls


def _one_error_line(err: str, *fragments) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("rwkvunet predict: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


def test_cli_refuses_to_overwrite_existing_outputs(model_dir, tmp_path, capsys, loads):
    src, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b", "c"):
        _png(src / f"{name}.png")
    (out / "a_labels.png").parent.mkdir()
    for name in ("a_labels.png", "b_overlay.png", "c_labels.png", "c_overlay.png"):
        (out / name).write_bytes(b"a user's file " + name.encode())
    before = _snapshot(tmp_path)

    assert cli_main(["predict", str(model_dir), str(src), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "4 output file(s) already exist", str(out / "a_labels.png"),
                           "and 1 more", "--overwrite")
    assert str(out / "c_overlay.png") not in line  # the first few are listed, then the count
    assert _snapshot(tmp_path) == before and not loads


def test_cli_overwrite_replaces_outputs(model_dir, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    _png(src / "a.png")
    out.mkdir()
    (out / "a_labels.png").write_bytes(b"old")
    assert cli_main(["predict", str(model_dir), str(src), "--out", str(out), "--overwrite"]) == 0, \
        capsys.readouterr().err
    assert np.asarray(Image.open(out / "a_labels.png")).shape == (12, 16)


def test_cli_labels_beside_an_input_when_out_is_its_folder(model_dir, tmp_path, capsys, loads):
    """`predict MODEL in/a.png --out in` must not replace in/a_labels.png (a user's mask, say)."""
    src = tmp_path / "in"
    _png(src / "a.png")
    _png(src / "a_labels.png", 1)
    before = _snapshot(tmp_path)
    assert cli_main(["predict", str(model_dir), str(src / "a.png"), "--out", str(src)]) == 2
    _one_error_line(capsys.readouterr().err, "already exist", str(src / "a_labels.png"), "--overwrite")
    assert _snapshot(tmp_path) == before and not loads


@pytest.mark.parametrize("overwrite", [False, True])
def test_cli_never_overwrites_an_input(model_dir, tmp_path, capsys, loads, overwrite):
    src = tmp_path / "in"
    _png(src / "a.png")
    _png(src / "a_labels.png", 1)  # named as an input too: it is someone's data
    before = _snapshot(tmp_path)
    argv = ["predict", str(model_dir), str(src / "a.png"), str(src / "a_labels.png"), "--out", str(src)]
    assert cli_main(argv + (["--overwrite"] if overwrite else [])) == 2
    _one_error_line(capsys.readouterr().err, "would replace input files", str(src / "a_labels.png"),
                    "output of", "--overwrite never replaces an input")
    assert _snapshot(tmp_path) == before and not loads


def test_cli_out_holding_an_input_folder(model_dir, tmp_path, capsys, loads):
    src = tmp_path / "in"
    _png(src / "a.png")
    for out in (src, tmp_path):
        assert cli_main(["predict", str(model_dir), str(src), "--out", str(out)]) == 2
        _one_error_line(capsys.readouterr().err, f"--out {out} holds the input folder {src}")
    assert not loads


def _unwritable(path, monkeypatch):
    """Make ``path`` read-only for the command, also when the tests run as root (who ignores modes)."""
    import os

    path.chmod(0o555)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(path)
                        else real(p, mode, **kw))


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only", "read_only_parent"])
def test_cli_bad_out_is_refused_before_the_model_is_loaded(model_dir, tmp_path, capsys, loads, monkeypatch, case):
    _png(tmp_path / "in" / "a.png")
    (tmp_path / "notes.txt").write_text("a user's file")
    (tmp_path / "ro").mkdir()
    out, fragment = {"file": (tmp_path / "notes.txt", "is a file"),
                     "under_a_file": (tmp_path / "notes.txt" / "out", "cannot be created"),
                     "read_only": (tmp_path / "ro", "is not writable"),
                     "read_only_parent": (tmp_path / "ro" / "new", "cannot be created")}[case]
    if case.startswith("read_only"):
        _unwritable(tmp_path / "ro", monkeypatch)
    before = _snapshot(tmp_path)
    try:
        rc = cli_main(["predict", str(model_dir), str(tmp_path / "in"), "--out", str(out)])
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert rc == 2
    _one_error_line(capsys.readouterr().err, f"--out {out}", fragment, "give a folder you can write to")
    assert _snapshot(tmp_path) == before and not loads


def test_cli_nothing_written_is_status_2_without_a_legend(model_dir, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 4)
    (src / "empty.jpg").write_bytes(b"")
    assert cli_main(["predict", str(model_dir), str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.png: cannot read the image" in err and "empty.jpg" in err
    assert "nothing written: none of the 2 input(s) could be segmented" in err
    assert "wrote 0 files" not in err and "labels.json" not in err and "Traceback" not in err
    assert not out.exists()


def test_cli_keeps_a_labels_json_it_did_not_write(model_dir, tmp_path, capsys, loads):
    src, out = tmp_path / "in", tmp_path / "out"
    _png(src / "a.png")
    out.mkdir()
    (out / "labels.json").write_text('{"study": "my own notes"}\n')
    before = _snapshot(tmp_path)
    assert cli_main(["predict", str(model_dir), str(src), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, str(out / "labels.json"), "not written by rwkvunet predict",
                    "--overwrite")
    assert _snapshot(tmp_path) == before and not loads


def test_cli_legend_of_an_earlier_run(model_dir, tmp_path, capsys):
    """A second run into the same --out keeps the same legend; one for other labels is kept, with a message."""
    src, out = tmp_path / "in", tmp_path / "out"
    _png(src / "a.png")
    _png(tmp_path / "more" / "b.png")
    assert cli_main(["predict", str(model_dir), str(src), "--out", str(out)]) == 0
    legend = (out / "labels.json").read_bytes()
    assert cli_main(["predict", str(model_dir), str(tmp_path / "more"), "--out", str(out)]) == 0
    assert (out / "b_labels.png").is_file() and (out / "labels.json").read_bytes() == legend
    capsys.readouterr()

    _build(5, num_labels=2).save_pretrained(tmp_path / "binary")
    _png(tmp_path / "third" / "c.png")
    before = _snapshot(out)
    assert cli_main(["predict", str(tmp_path / "binary"), str(tmp_path / "third"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "labels.json names other labels than this model's" in err.strip().splitlines()[-1]
    assert "Traceback" not in err and _snapshot(out) == before


def test_cli_truncated_model_weights_are_one_line(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    _png(tmp_path / "in" / "a.png")
    assert cli_main(["predict", str(broken), str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys.readouterr().err, str(broken / "model.safetensors"), "not a complete safetensors file")
    assert not (tmp_path / "out").exists()


def test_cli_help_names_the_nifti_outputs(capsys):
    with pytest.raises(SystemExit):
        cli_main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "<name>_labels.nii.gz" in text and ".nii input" in text and "--overwrite" in text


def test_nifti_labels_keep_the_input_compression(model_dir, tmp_path, capsys):
    pytest.importorskip("nibabel")
    vol = np.random.default_rng(4).random((12, 10, 2)).astype(np.float32)
    (tmp_path / "in").mkdir()
    _nifti(tmp_path / "in" / "plain.nii", vol, _affine())
    _nifti(tmp_path / "in" / "packed.nii.gz", vol, _affine())
    out = tmp_path / "out"
    assert cli_main(["predict", str(model_dir), str(tmp_path / "in"), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert (out / "plain_labels.nii").is_file() and (out / "packed_labels.nii.gz").is_file()
    assert (out / "packed_labels.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert (out / "plain_labels.nii").read_bytes()[:2] != b"\x1f\x8b"


def test_nan_voxels_are_set_to_zero_and_said(tmp_path, capsys):
    """A NIfTI volume with NaN voxels (outside the field of view) is segmented with them set to 0, and the
    output says how many; an image with a NaN pixel is that file's error, naming the count."""
    pytest.importorskip("nibabel")
    model = tmp_path / "model"
    _build(12).save_pretrained(model)
    volume = np.random.default_rng(11).random((16, 16, 3)).astype(np.float32)
    volume[2, 3, 1] = np.nan
    (tmp_path / "in").mkdir()
    _nifti(tmp_path / "in" / "scan.nii.gz", volume, _affine())
    rc = cli_main(["predict", str(model), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--mri-minmax"])
    err = capsys.readouterr().err
    assert rc == 0 and "1 NaN or infinite voxel set to 0" in err
    import tifffile

    image = np.random.default_rng(12).random((16, 16)).astype(np.float32)
    image[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", image)
    rc = cli_main(["predict", str(model), str(tmp_path / "nan.tif"), "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert rc == 2 and "1 NaN or infinite value" in err and "Traceback" not in err


# --- the fused inference copy ----------------------------------------------------------------------------------
def test_segmenter_runs_a_fused_copy_and_keeps_the_model_loadable(segmenter, model):
    """Predictions run a BatchNorm-folded copy (timm's reparameterize_model); ``Segmenter.model`` keeps its
    checkpoint layout, so its state_dict saves and loads as usual."""
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in segmenter.inference_model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in segmenter.model.modules())
    assert set(segmenter.model.state_dict()) == set(model.state_dict())
    segmenter.model.load_state_dict(model.state_dict())
    x = torch.rand(1, 1, 48, 48)
    got = segmenter.forward_probs(x).double()
    assert (got - _probs(model, x)).abs().max().item() < 1e-5


def test_predict_image_takes_a_path_as_predict_reads_it(segmenter, tmp_path):
    """A path was "unsupported image type str"; now it is read as `predict` reads files (16 bits kept)."""
    from rwkvunet.inference_io import InputError, read_image

    image = (np.random.default_rng(0).random((20, 24)) * 65535).astype(np.uint16)
    Image.fromarray(image).save(tmp_path / "scan.png")
    expected = segmenter.predict_image(read_image(tmp_path / "scan.png"))
    assert np.array_equal(segmenter.predict_image(str(tmp_path / "scan.png")), expected)
    assert np.array_equal(segmenter.predict_image(tmp_path / "scan.png"), expected)
    with pytest.raises(InputError, match="no such file"):
        segmenter.predict_image(tmp_path / "missing.png")
    (tmp_path / "v.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="is a volume; segment it with predict_volume"):
        segmenter.predict_image(tmp_path / "v.nii.gz")
    # a folder was "no such file; check the path"
    with pytest.raises(InputError, match="is a folder; predict_image takes one image"):
        segmenter.predict_image(tmp_path)
    import rwkvunet

    with pytest.raises(InputError, match="is a folder; give image or volume files"):
        rwkvunet.predict(segmenter, str(tmp_path))


def test_a_stack_of_slices_given_as_one_image_names_predict_volume(segmenter):
    """(5, 64, 64) is read as a 64-channel (H, W, C) image; the refusal now says what a stack is for."""
    from rwkvunet.pixels import PixelError

    with pytest.raises(PixelError, match="has 64 channels.*a stack of slices is a volume, for predict_volume"):
        segmenter.predict_image(np.random.default_rng(0).random((5, 64, 64)).astype(np.float32))


def test_segmenter_settings_that_meant_something_else_are_refused(model, segmenter):
    """batch_size 0 (or -5) was taken as 1 by the segmenter and as its own by predict_volume; an unknown device
    was torch's list of every device type."""
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1"):
            Segmenter(model, device="cpu", batch_size=bad)
    with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1, got 0"):
        segmenter.predict_volume(np.zeros((20, 30, 2), np.float32), batch_size=0)
    with pytest.raises(ValueError, match="unknown device 'tpu'; use 'cpu', 'cuda' or 'cuda:N'"):
        Segmenter(model, device="tpu")
    assert Segmenter(model, device="cpu", batch_size=np.int64(3)).batch_size == 3
