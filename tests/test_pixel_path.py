"""One pixel path: every supported input kind gives identical model pixels through every entry point (the image
processor, the training/evaluation transforms, Segmenter, predict's file reading, evaluate's settings), and
the values follow the documented rules (checked against numpy formulas)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import rwkvunet
from rwkvunet import pixels
from rwkvunet.data.transforms import EvalTransform, TrainTransform
from rwkvunet.inference import Segmenter, load_preprocessing
from rwkvunet.models.rwkv_unet import RWKVUNetImageProcessor
from rwkvunet.pixels import PixelConfig, PixelError, read_pixels
from rwkvunet.training.inputs import build_image_processor

RNG = np.random.default_rng(0)
H, W = 21, 34
RGB8 = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
GREY8 = RNG.integers(0, 256, (H, W), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
FLOAT = RNG.random((H, W), dtype=np.float32) * 3 - 1  # CT/MRI-like floats, kept as stored


def _luma(rgb: np.ndarray) -> np.ndarray:
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


# (name, input, expected float64 (H, W, C) before channel conversion)
KINDS = [
    ("PIL L", Image.fromarray(GREY8, mode="L"), GREY8[..., None] / 255.0),
    ("PIL RGB", Image.fromarray(RGB8, mode="RGB"), RGB8 / 255.0),
    ("PIL RGBA", Image.fromarray(np.dstack([RGB8, GREY8]), mode="RGBA"), RGB8 / 255.0),
    ("PIL LA", Image.fromarray(np.dstack([GREY8, GREY8[::-1]]), mode="LA"), GREY8[..., None] / 255.0),
    ("PIL P", Image.fromarray(RGB8).convert("P"), None),  # palette: compared through its RGB conversion
    ("PIL I;16", Image.fromarray(GREY16), GREY16[..., None] / 65535.0),
    ("PIL I", Image.fromarray(GREY16.astype(np.int32), mode="I"), GREY16[..., None] / 65535.0),
    ("PIL F", Image.fromarray(FLOAT, mode="F"), FLOAT[..., None].astype(np.float64)),
    ("PIL 1", Image.fromarray(GREY8 > 127).convert("1"), (GREY8 > 127)[..., None] * 1.0),
    ("uint8 HW", GREY8, GREY8[..., None] / 255.0),
    ("uint8 HWC", RGB8, RGB8 / 255.0),
    ("uint8 CHW", np.ascontiguousarray(RGB8.transpose(2, 0, 1)), RGB8 / 255.0),
    ("uint8 HWC RGBA", np.dstack([RGB8, GREY8]), None),  # 4 channels: alpha dropped for 1/3-channel models
    ("uint16 HW", GREY16, GREY16[..., None] / 65535.0),
    ("int16 HW", (GREY16 // 2).astype(np.int16), (GREY16 // 2)[..., None] / 65535.0),
    ("int32 HW", GREY16.astype(np.int32), GREY16[..., None] / 65535.0),
    ("float32 HW", FLOAT, FLOAT[..., None].astype(np.float64)),
    ("float64 HWC", FLOAT[..., None].astype(np.float64), FLOAT[..., None].astype(np.float64)),
    ("bool HW", GREY8 > 127, (GREY8 > 127)[..., None] * 1.0),
    ("tensor uint8 CHW", torch.from_numpy(RGB8).permute(2, 0, 1), RGB8 / 255.0),
    ("tensor float HW", torch.from_numpy(FLOAT), FLOAT[..., None].astype(np.float64)),
    ("tensor uint8 HWC", torch.from_numpy(RGB8), RGB8 / 255.0),
]
KINDS[4] = ("PIL P", KINDS[4][1], np.asarray(KINDS[4][1].convert("RGB")) / 255.0)
KINDS[12] = ("uint8 HWC RGBA", KINDS[12][1], RGB8 / 255.0)


def _expected(reference: np.ndarray, channels: int) -> torch.Tensor:
    """The float64 formula of the documented rules: (H, W, C) -> (channels, H, W)."""
    ref = reference
    if ref.shape[-1] == 1 and channels == 3:
        ref = np.repeat(ref, 3, axis=-1)
    elif ref.shape[-1] == 3 and channels == 1:
        ref = _luma(ref)[..., None]
    return torch.from_numpy(np.ascontiguousarray(ref.transpose(2, 0, 1)))


class _Tiny(torch.nn.Module):
    """Stands in for a model where only the pixels matter."""

    def __init__(self, channels: int):
        super().__init__()
        self.config = type("Config", (), {"in_channels": channels, "num_labels": 2, "id2label": {}})()
        self.dummy = torch.nn.Parameter(torch.zeros(()))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name,image,reference", KINDS, ids=[k[0] for k in KINDS])
def test_every_input_kind_gives_identical_pixels_everywhere(name, image, reference, channels):
    config = PixelConfig(num_channels=channels, size=(16, 24))
    floats, _ = config.to_float(image)
    torch.testing.assert_close(floats.double(), _expected(reference, channels), rtol=0, atol=2e-7)

    processed = RWKVUNetImageProcessor(**config.to_processor_kwargs())(image, return_tensors="pt")["pixel_values"][0]
    transformed = EvalTransform(pixels=config)(image)["pixel_values"]
    segmenter = Segmenter(_Tiny(channels), config, device="cpu").model_input(image)[0]
    assert processed.shape == (channels, 16, 24)
    assert torch.equal(processed, transformed), name
    assert torch.equal(processed, segmenter), name


def test_normalisation_is_the_same_everywhere():
    config = PixelConfig(num_channels=3, size=(16, 16), image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.4))
    processed = RWKVUNetImageProcessor(**config.to_processor_kwargs())(RGB8, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(processed, EvalTransform(pixels=config)(RGB8)["pixel_values"])
    assert torch.equal(processed, Segmenter(_Tiny(3), config, device="cpu").model_input(RGB8)[0])
    plain = PixelConfig(num_channels=3, size=(16, 16))(RGB8)
    mean, std = torch.tensor(config.image_mean).view(3, 1, 1), torch.tensor(config.image_std).view(3, 1, 1)
    torch.testing.assert_close(processed, (plain - mean) / std)


def test_a_saved_model_reads_its_settings_back_exactly(tmp_path):
    """What finetune saves (build_image_processor) is what Segmenter, evaluate and AutoImageProcessor read."""
    build_image_processor(48, 1).save_pretrained(tmp_path)
    trained = TrainTransform(48, num_channels=1).pixels
    assert load_preprocessing(tmp_path, 1) == trained
    from transformers import AutoImageProcessor

    assert AutoImageProcessor.from_pretrained(tmp_path).pixel_config() == trained


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_files_predict_as_they_trained(tmp_path, suffix):
    """A 16-bit file read by predict, by a datasets Image column (training, evaluation) and by PIL for the
    processor gives identical pixels (before, predict left 16-bit values unscaled while training divided by
    65535, and the model saw nearly all background)."""
    import datasets

    from rwkvunet import inference_io as io

    path = tmp_path / f"scan{suffix}"
    Image.fromarray(GREY16).save(path)
    build_image_processor(32, 1).save_pretrained(tmp_path / "model")
    config = load_preprocessing(tmp_path / "model", 1)
    column = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image())
    from_training = EvalTransform(32, num_channels=1)(column[0]["image"])["pixel_values"]
    from_predict = Segmenter(_Tiny(1), config, device="cpu").model_input(io.read_image(path))[0]
    from_processor = RWKVUNetImageProcessor.from_pretrained(tmp_path / "model")(
        Image.open(path), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(from_training, from_predict)
    assert torch.equal(from_training, from_processor)
    expected = torch.nn.functional.interpolate(torch.from_numpy(GREY16 / 65535.0)[None, None].float(), size=(32, 32),
                                               mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(from_predict, expected)


def test_integer_scaling_never_depends_on_the_values():
    """Two int32 images of one data set are scaled by the same factor whatever their maximum."""
    dark = np.full((4, 4), 200, np.int32)
    bright = np.full((4, 4), 1000, np.int32)
    config = PixelConfig()
    assert config.to_float(dark)[0].max().item() == pytest.approx(200 / 65535)
    assert config.to_float(bright)[0].max().item() == pytest.approx(1000 / 65535)
    with pytest.raises(PixelError, match="beyond 16 bits"):
        config.to_float(np.full((4, 4), 70000, np.int32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused_with_the_count(bad):
    image = FLOAT.copy()
    image[3, 4] = bad
    with pytest.raises(PixelError, match="1 NaN or infinite value"):
        PixelConfig()(image)
    with pytest.raises(PixelError, match="NaN or infinite"):
        Segmenter(_Tiny(1), PixelConfig(), device="cpu").model_input(image)
    with pytest.raises(ValueError, match="NaN or infinite"):
        RWKVUNetImageProcessor(num_channels=1)(image)


def test_complex_pixels_are_refused():
    """Complex arrays (MRI reconstructions) were cast to float32 with a warning, silently dropping the imaginary
    part."""
    with pytest.raises(PixelError, match=r"complex \(complex64\).*np.abs"):
        read_pixels(np.ones((8, 8), np.complex64))
    with pytest.raises(PixelError, match="complex"):
        read_pixels(torch.ones(1, 8, 8, dtype=torch.complex64))


def test_volumes_clean_non_finite_voxels_and_say_so():
    volume = np.zeros((4, 5, 6), np.float32)
    volume[1, 2, 3] = np.nan
    volume[0, 0, 0] = np.inf
    prepared, how = pixels.prepare_volume(volume, "minmax")
    assert np.isfinite(prepared).all() and "2 NaN or infinite voxels set to 0" in how


def test_two_channel_arrays_are_not_taken_for_grey_plus_alpha():
    with pytest.raises(PixelError, match="2 channels but the model takes 1"):
        PixelConfig(num_channels=1)(np.zeros((8, 8, 2), np.float32))
    assert PixelConfig(num_channels=2)(np.zeros((8, 8, 2), np.float32)).shape == (2, 8, 8)


def test_pipeline_names_the_values_of_a_binary_model(tmp_path):
    """A one-logit model's maps hold 0 and 1; the pipeline used to fail with KeyError: 1."""
    from transformers import pipeline

    config = rwkvunet.RWKVUNetConfig(variant="t", num_labels=1, in_channels=1, id2label={0: "tumour"},
                                     label2id={"tumour": 0})
    torch.manual_seed(0)
    model = rwkvunet.RWKVUNetForSemanticSegmentation(config).eval()
    with torch.no_grad():
        model.segmentation_head.bias.fill_(0.0)
        model.segmentation_head.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path)
    RWKVUNetImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    image = Image.fromarray(RNG.integers(0, 256, (40, 50), dtype=np.uint8))
    result = pipeline("image-segmentation", model=str(tmp_path))(image)
    proc = RWKVUNetImageProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        logits = model(**proc(image, return_tensors="pt")).logits
    expected = proc.post_process_semantic_segmentation(logits, target_sizes=[(40, 50)])[0].numpy()
    names = {r["label"]: np.array(r["mask"]) > 0 for r in result}
    assert set(names) <= {"background", "tumour"} and names
    for value, label in ((0, "background"), (1, "tumour")):
        if (expected == value).any():
            assert np.array_equal(names[label], expected == value)


def test_creating_a_pipeline_logs_no_error(tmp_path, capfd):
    from transformers import pipeline

    config = rwkvunet.RWKVUNetConfig(variant="t", num_labels=2, in_channels=1)
    rwkvunet.RWKVUNetForSemanticSegmentation(config).save_pretrained(tmp_path)
    RWKVUNetImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    capfd.readouterr()
    pipeline("image-segmentation", model=str(tmp_path))
    assert "not supported" not in capfd.readouterr().err


def test_evaluate_feeds_the_model_what_predict_feeds_it(tmp_path):
    """training/evaluate.py builds its transform from the model folder by the same code as Segmenter: a
    16-bit image scored by evaluate.py and segmented by predict reaches the model as the same pixels."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "evaluate_script", Path(__file__).resolve().parents[1] / "training" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = rwkvunet.RWKVUNetConfig(variant="t", num_labels=2, in_channels=1, image_size=40)
    rwkvunet.RWKVUNetForSemanticSegmentation(config).save_pretrained(tmp_path)
    build_image_processor(40, 1).save_pretrained(tmp_path)
    model, settings = script.load_model(str(tmp_path))
    transform = EvalTransform(pixels=script.eval_pixels(settings, None, model.config))
    segmenter = Segmenter.from_pretrained(tmp_path, device="cpu")
    assert torch.equal(transform(GREY16)["pixel_values"], segmenter.model_input(GREY16)[0])
    assert transform(GREY16)["pixel_values"].max() <= 1.0
