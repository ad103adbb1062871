"""ONNX export and ONNX Runtime inference on small inputs: the exported graph computes what eager PyTorch
computes (to 1e-4 of the largest logit) at other batches and sizes than it was traced with, the export command
writes a self-describing file only after that check and never over an existing one, and predict runs it.

A tiny registered variant (one mixing block in stages III and IV, with the Cross-Channel Mix and the decoder)
keeps the one export these tests share to about half a minute on two cores; references come from calling the
PyTorch model directly.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import rwkvunet  # noqa: F401  (registers the Auto classes)
from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation, register_variant, unregister_variant
from rwkvunet.backends import OnnxRuntimeSegmenter, onnxruntime_session
from rwkvunet.cli import main as cli_main
from rwkvunet.errors import UserError
from rwkvunet.inference import Segmenter
from rwkvunet.layers import mix_tokens, q_shift
from rwkvunet.onnx_export import METADATA_CONFIG, METADATA_PIXELS, ExportCheckError, export_onnx
from rwkvunet.pixels import PixelConfig

VARIANT = "onnx_tiny"
NUM_LABELS = 3


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.fixture(scope="module")
def model():
    register_variant(VARIANT, depths=(1, 1, 2, 2), dims=(8, 16, 24, 32), expansions=(1, 1.5, 2, 2))
    try:
        torch.manual_seed(0)
        model = RWKVUNetForSemanticSegmentation(
            RWKVUNetConfig(variant=VARIANT, num_labels=NUM_LABELS, in_channels=1)).eval()
        with torch.no_grad():  # trained-like statistics, a decay and bonus away from zero, a head that separates
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 1.5)
                if hasattr(module, "spatial_decay"):
                    module.spatial_decay.uniform_(-3, 3)
                    module.spatial_first.uniform_(-3, 3)
            model.segmentation_head.weight.normal_(0, 0.5)
        yield model
    finally:
        unregister_variant(VARIANT)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "RWKVUNetImageProcessor", "do_resize": False, "do_normalize": True,
         "image_mean": [0.25], "image_std": [0.5], "num_channels": 1}))
    return folder


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """``rwkvunet export`` run once; every test below reads its file."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert cli_main(["export", str(model_dir), str(out)]) == 0
    return out


def eager_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_export_writes_a_graph_with_dynamic_batch_height_and_width(model, exported):
    proto = onnx.load(str(exported))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]
    assert not [n for n in proto.graph.node if n.op_type in ("BatchNormalization", "ScatterND", "Loop")]
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata[METADATA_CONFIG])["variant"] == VARIANT
    assert json.loads(metadata[METADATA_PIXELS])["image_mean"] == [0.25]
    assert not [p for p in exported.parent.iterdir() if p != exported]  # no temporary file left
    session = onnxruntime_session(exported, threads=2)
    for shape in [(3, 1, 48, 96), (1, 1, 80, 64)]:  # neither the traced nor the checked shapes
        x = torch.randn(*shape)
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        assert got.shape == (shape[0], NUM_LABELS) + shape[2:]
        assert rel_error(torch.from_numpy(got), eager_logits(model, x)) <= 1e-4


def test_onnxruntime_keeps_the_layer_norms_unfused(exported, tmp_path):
    """ONNX Runtime rewrites an Add feeding a LayerNormalization as SkipLayerNormalization, whose CPU kernel is
    several times slower than the pair (1.32); the exported spatial mixes must not offer it that pattern, in any
    session (ours and a user's own, with every optimisation on)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable: no NCHWc ops
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "SkipLayerNormalization" not in ops
    assert ops.count("LayerNormalization") >= 2  # the spatial mixes' key norms are still there, as ONNX's own op


def test_runtime_model_pads_other_sizes_as_the_model_does(model, exported):
    runtime = OnnxRuntimeSegmenter.from_file(exported)
    assert runtime.config.num_labels == NUM_LABELS and runtime.pixels.image_mean == (0.25,)
    for shape in [(2, 1, 50, 70), (1, 1, 33, 100)]:  # padded to 64 x 80 and 48 x 112 inside
        x = torch.randn(*shape)
        got = runtime(pixel_values=x).logits
        assert got.shape == (shape[0], NUM_LABELS) + shape[2:]
        assert rel_error(got, eager_logits(model, x)) <= 1e-4
    assert runtime(pixel_values=torch.zeros(0, 1, 48, 48)).logits.shape == (0, NUM_LABELS, 48, 48)
    with pytest.raises(UserError, match="at least 33 pixels"):
        runtime(pixel_values=torch.randn(1, 1, 32, 64))


def test_segmenter_probabilities_match_eager(model_dir, exported):
    image = np.random.default_rng(0).integers(0, 255, (70, 90), dtype=np.uint8)
    eager = Segmenter.from_pretrained(model_dir, device="cpu").predict_proba(image, native=True)
    runtime = Segmenter.from_pretrained(exported)
    assert runtime.backend == "onnxruntime" and runtime.device.type == "cpu"
    assert runtime.preprocessing == PixelConfig(num_channels=1, image_mean=(0.25,), image_std=(0.5,))
    got = runtime.predict_proba(image, native=True)
    assert got.shape == eager.shape == (NUM_LABELS, 70, 90)
    assert np.abs(got - eager).max() <= 1e-4


def test_predict_runs_the_exported_file(model_dir, exported, tmp_path):
    image = np.random.default_rng(1).integers(0, 255, (64, 96), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "scan.png")
    for backend, model_arg in (("eager", model_dir), ("onnxruntime", exported)):
        rc = cli_main(["predict", str(model_arg), str(tmp_path / "scan.png"), "--out", str(tmp_path / backend),
                       "--backend", backend, "--native"])
        assert rc == 0
    eager = np.array(Image.open(tmp_path / "eager" / "scan_labels.png"))
    runtime = np.array(Image.open(tmp_path / "onnxruntime" / "scan_labels.png"))
    probs = Segmenter.from_pretrained(model_dir, device="cpu").predict_proba(image, native=True)
    top2 = np.sort(probs, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 1e-3  # away from ties, the labels must agree
    assert decided.mean() > 0.9 and np.array_equal(eager[decided], runtime[decided])


def test_the_demo_serves_the_exported_file(model_dir, exported, tmp_path):
    """`rwkvunet demo model.onnx` segments through ONNX Runtime as predict does."""
    pytest.importorskip("gradio")
    from rwkvunet.demo import DemoModel, Options

    image = np.random.default_rng(2).integers(0, 255, (64, 96), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "scan.png")
    demo = DemoModel.from_pretrained(str(exported))
    result = demo.segment(tmp_path / "scan.png", Options(size="native"))
    assert cli_main(["predict", str(exported), str(tmp_path / "scan.png"), "--out", str(tmp_path / "p"),
                     "--native"]) == 0
    served = np.array(Image.open(result.download))
    assert np.array_equal(served, np.array(Image.open(tmp_path / "p" / "scan_labels.png")))


def test_a_space_of_the_exported_file_carries_it(exported, tmp_path, monkeypatch):
    """`demo model.onnx --write-space DIR` took the file for a Hub id: app.py named 'model.onnx', nothing was copied."""
    pytest.importorskip("gradio")
    import runpy

    from rwkvunet.demo import write_space

    space = write_space(str(exported), tmp_path / "space")
    assert (space / exported.name).read_bytes() == exported.read_bytes()
    assert (space / "requirements.txt").read_text().startswith("rwkvunet[demo,nifti,onnx]")
    monkeypatch.chdir(tmp_path)  # the Space finds its file beside app.py, from any working directory
    assert type(runpy.run_path(str(space / "app.py"))["demo"]).__name__ == "Blocks"


def test_export_refuses_to_overwrite_and_bad_targets(model_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    assert cli_main(["export", str(model_dir), str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert cli_main(["export", str(model_dir), str(tmp_path / "model.txt")]) == 2
    assert "ending in .onnx" in capsys.readouterr().err
    assert cli_main(["export", str(model_dir), str(tmp_path / "missing" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # --opset 0 was taken as the default; 99 printed a converter assertion and wrote opset 18
    assert cli_main(["export", str(model_dir), str(tmp_path / "a.onnx"), "--opset", "0"]) == 2
    assert "--opset 0 is too old" in capsys.readouterr().err
    assert cli_main(["export", str(model_dir), str(tmp_path / "a.onnx"), "--opset", "99"]) == 2
    assert "--opset 99 is newer than the installed onnx" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()


def test_a_graph_that_disagrees_is_not_written(model, tmp_path, monkeypatch):
    """The check runs before the rename: a wrong graph (here: logits of zeros) leaves no file behind."""
    from onnx import TensorProto, helper

    def wrong_graph(model, in_channels, opset=18):
        nodes = [helper.make_node("ReduceSum", ["pixel_values", "axes"], ["s"], keepdims=1),
                 helper.make_node("Mul", ["s", "zero"], ["z"]),
                 helper.make_node("Concat", ["z"] * NUM_LABELS, ["logits"], axis=1)]
        graph = helper.make_graph(
            nodes, "wrong", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 1, "h", "w"])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
            [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]), helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    monkeypatch.setattr("rwkvunet.onnx_export.to_onnx", wrong_graph)
    with pytest.raises(ExportCheckError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []


def test_onnxruntime_backend_refuses_gpu_and_half_precision(model):
    with pytest.raises(UserError, match="runs on the CPU"):
        Segmenter(model, device="cuda", backend="onnxruntime")
    with pytest.raises(UserError, match="runs in float32"):
        Segmenter(model, device="cpu", dtype="bf16", backend="onnxruntime")
    with pytest.raises(UserError, match="unknown backend"):
        Segmenter(model, device="cpu", backend="tensorrt")


@pytest.mark.parametrize("channels", [5, 98])
def test_export_forms_of_the_token_shift_and_mix_equal_eager(channels):
    """Under torch.export the token shift and the lerps take other forms; they compute the same values."""
    weights = [torch.rand(1, 1, channels) for _ in range(2)]

    class ShiftAndMix(torch.nn.Module):
        def forward(self, x):
            shifted = q_shift(x, (6, 7))
            if torch.compiler.is_exporting():
                return [shifted] + mix_tokens(shifted, x, weights)
            return [shifted] + [torch.lerp(shifted, x, w) for w in weights]

    x = torch.randn(2, 42, channels)
    want = ShiftAndMix()(x)
    got = torch.export.export(ShiftAndMix(), (x,)).module()(x)
    assert torch.equal(got[0], want[0])  # the shift moves values: bit-identical
    for g, w in zip(got[1:], want[1:]):
        assert torch.allclose(g, w, rtol=0, atol=1e-6)
