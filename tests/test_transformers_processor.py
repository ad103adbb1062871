"""RWKVUNetImageProcessor: medical arrays keep their values, explicit channel conversion, label maps back at
the original size, save/load through AutoImageProcessor, and the image-segmentation pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rwkvunet  # noqa: F401
from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation, RWKVUNetImageProcessor
from transformers import AutoImageProcessor, pipeline
from transformers.modeling_outputs import SemanticSegmenterOutput


def test_float_ct_values_are_kept_and_resized():
    """Hounsfield units are neither clipped nor scaled by 1/255; a linear ramp stays linear when resized."""
    rows = np.linspace(-1000.0, 3000.0, 64, dtype=np.float32)
    ct = np.repeat(rows[:, None], 48, axis=1)  # (H, W) = (64, 48), constant along each row
    proc = RWKVUNetImageProcessor(size={"height": 32, "width": 24})
    out = proc(ct, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 1, 32, 24) and out.dtype == torch.float32
    # antialiased 2x downsampling of a ramp averages neighbouring rows: the midpoints of consecutive pairs
    expected = torch.from_numpy((rows[0::2] + rows[1::2]) / 2)
    assert torch.allclose(out[0, 0, 1:-1, 5], expected[1:-1], rtol=0, atol=1e-2)
    unresized = proc(ct, do_resize=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(unresized[0, 0], torch.from_numpy(ct))


def test_uint8_is_rescaled_by_default_and_floats_only_when_asked():
    img = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    proc = RWKVUNetImageProcessor(do_resize=False)
    got = proc(img, return_tensors="pt")["pixel_values"][0, 0]
    assert torch.allclose(got, torch.from_numpy(img).float() / 255, atol=1e-7)
    as_float = img.astype(np.float32)
    assert torch.equal(proc(as_float, return_tensors="pt")["pixel_values"][0, 0], torch.from_numpy(as_float))
    scaled = proc(as_float, do_rescale=True, rescale_factor=0.5, return_tensors="pt")["pixel_values"][0, 0]
    assert torch.equal(scaled, torch.from_numpy(as_float) * 0.5)
    assert torch.equal(proc(img, do_rescale=False, return_tensors="pt")["pixel_values"][0, 0], torch.from_numpy(img).float())


def test_all_input_kinds_give_the_same_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    proc = RWKVUNetImageProcessor(size={"height": 16, "width": 16}, num_channels=3)
    inputs = [rgb, np.moveaxis(rgb, -1, 0).copy(), Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1)]
    out = proc(inputs, return_tensors="pt")["pixel_values"]
    assert out.shape == (4, 3, 16, 16)
    for i in range(1, 4):
        assert torch.equal(out[i], out[0])


def test_explicit_channel_conversion():
    rng = np.random.default_rng(1)
    rgb = rng.random((6, 5, 3), dtype=np.float32)
    grey = RWKVUNetImageProcessor(do_resize=False, num_channels=1)(rgb, return_tensors="pt")["pixel_values"]
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert grey.shape == (1, 1, 6, 5) and np.allclose(grey[0, 0].numpy(), luma, atol=1e-6)
    slice_ = rng.random((6, 5), dtype=np.float32)
    three = RWKVUNetImageProcessor(do_resize=False, num_channels=3)(slice_, return_tensors="pt")["pixel_values"]
    assert three.shape == (1, 3, 6, 5) and all(torch.equal(three[0, c], torch.from_numpy(slice_)) for c in range(3))
    rgba = np.concatenate([rgb, np.ones((6, 5, 1), np.float32)], axis=-1)
    dropped = RWKVUNetImageProcessor(do_resize=False, num_channels=3)(rgba, return_tensors="pt")["pixel_values"]
    assert torch.equal(dropped[0], torch.from_numpy(rgb).permute(2, 0, 1))
    two = rng.random((2, 6, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="2 channels but the model takes 3"):
        RWKVUNetImageProcessor(num_channels=3)(two)  # channels first: its first axis is the short one
    with pytest.raises(ValueError, match="2 channels but the model takes 3"):
        RWKVUNetImageProcessor(num_channels=3)(two, input_data_format="channels_first")
    assert RWKVUNetImageProcessor(num_channels=2)(two, return_tensors="pt")["pixel_values"].shape == (1, 2, 224, 224)


def test_normalize_uses_the_given_statistics():
    img = np.full((4, 4, 3), 0.5, np.float32)
    proc = RWKVUNetImageProcessor(do_resize=False, num_channels=3, do_normalize=True)
    out = proc(img, return_tensors="pt")["pixel_values"][0, :, 0, 0]
    expected = (0.5 - torch.tensor(proc.image_mean)) / torch.tensor(proc.image_std)
    assert torch.allclose(out, expected.float(), atol=1e-6)


def test_segmentation_maps_stay_integer_labels():
    labels = np.zeros((40, 40), np.uint8)
    labels[:20, :] = 3
    labels[20:, 20:] = 7
    out = RWKVUNetImageProcessor(size={"height": 20, "width": 20})(
        np.zeros((40, 40), np.float32), segmentation_maps=labels, return_tensors="pt")
    got = out["labels"][0]
    assert got.dtype == torch.int64 and got.shape == (20, 20)
    assert set(got.unique().tolist()) == {0, 3, 7}
    assert (got[:10] == 3).all() and (got[10:, 10:] == 7).all() and (got[10:, :10] == 0).all()


def test_post_process_restores_original_sizes():
    proc = RWKVUNetImageProcessor()
    # class = quadrant index on a 4 x 4 grid of logits
    logits = torch.full((1, 4, 4, 4), -5.0)
    for c, (r, s) in enumerate([(slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 4)),
                                (slice(2, 4), slice(0, 2)), (slice(2, 4), slice(2, 4))]):
        logits[0, c, r, s] = 5.0
    maps = proc.post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits), target_sizes=[(40, 60)])
    assert maps[0].shape == (40, 60) and maps[0].dtype == torch.int64
    assert (maps[0][:18, :28] == 0).all() and (maps[0][:18, 32:] == 1).all()
    assert (maps[0][22:, :28] == 2).all() and (maps[0][22:, 32:] == 3).all()
    # a single-label model: sigmoid(logit) > 0.5, i.e. logit > 0
    binary = proc.post_process_semantic_segmentation(torch.tensor([[[[-1.0, 2.0], [0.5, -3.0]]]]))
    assert binary[0].tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="target sizes"):
        proc.post_process_semantic_segmentation(logits, target_sizes=[(4, 4), (4, 4)])


def test_save_and_auto_load_round_trip(tmp_path):
    proc = RWKVUNetImageProcessor(size={"height": 96, "width": 80}, num_channels=3, do_normalize=True,
                                  image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], do_rescale=True)
    proc.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is RWKVUNetImageProcessor
    assert loaded.to_dict() == proc.to_dict()
    x = np.random.default_rng(2).random((50, 40, 3), dtype=np.float32)
    assert torch.equal(loaded(x, return_tensors="pt")["pixel_values"], proc(x, return_tensors="pt")["pixel_values"])
    default = RWKVUNetImageProcessor()
    default.save_pretrained(tmp_path / "default")
    assert AutoImageProcessor.from_pretrained(tmp_path / "default").do_rescale is None  # "8-bit only" survives


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_segmenter")
    config = RWKVUNetConfig(variant="t", num_labels=3, in_channels=1, id2label={0: "background", 1: "liver", 2: "kidney"},
                            label2id={"background": 0, "liver": 1, "kidney": 2})
    torch.manual_seed(0)
    model = RWKVUNetForSemanticSegmentation(config).eval()
    with torch.no_grad():  # larger head weights so that every class wins somewhere
        model.segmentation_head.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    RWKVUNetImageProcessor(size={"height": 48, "width": 48}).save_pretrained(folder)
    return folder


def test_pipeline_image_segmentation(tiny_folder):
    """The pipeline reads RGB images; the processor makes them grey for the 1-channel model, and the masks
    equal the processor + model + post-processing path done by hand."""
    segmenter = pipeline("image-segmentation", model=str(tiny_folder))
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    result = segmenter(image)
    assert result and all(set(r) == {"score", "label", "mask"} for r in result)
    assert all(r["mask"].size == image.size for r in result)

    proc = AutoImageProcessor.from_pretrained(tiny_folder)
    model = segmenter.model
    with torch.no_grad():
        outputs = model(**proc(image, return_tensors="pt"))
    label_map = proc.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()
    names = model.config.id2label
    assert sorted(r["label"] for r in result) == sorted(names[int(i)] for i in np.unique(label_map))
    for r in result:
        class_id = model.config.label2id[r["label"]]
        assert np.array_equal(np.array(r["mask"]) > 0, label_map == class_id)


def test_grey_pil_and_16_bit_images(tiny_folder):
    proc = AutoImageProcessor.from_pretrained(tiny_folder)
    grey = Image.fromarray(np.full((10, 12), 255, np.uint8), mode="L")
    assert torch.allclose(proc(grey, return_tensors="pt")["pixel_values"], torch.ones(1, 1, 48, 48))
    mri = Image.fromarray(np.full((10, 12), 1200, np.uint16))  # 16-bit: by bit depth, as training scales it
    assert torch.allclose(proc(mri, return_tensors="pt")["pixel_values"], torch.full((1, 1, 48, 48), 1200 / 65535))


def test_pixel_values_feed_the_model_at_any_size(tiny_folder):
    proc = AutoImageProcessor.from_pretrained(tiny_folder)
    model = RWKVUNetForSemanticSegmentation.from_pretrained(tiny_folder).eval()
    x = np.random.default_rng(4).random((30, 45), dtype=np.float32)
    inputs = proc(x, do_resize=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 3, 30, 45)
    maps = proc.post_process_semantic_segmentation(logits, target_sizes=[(30, 45)])
    assert torch.equal(maps[0], logits[0].argmax(0))
    assert torch.equal(proc.post_process_semantic_segmentation(logits)[0], F.interpolate(logits, size=(30, 45))[0].argmax(0))
