"""The segmenter through torch.compile(fullgraph=True), torch.export and ONNX (onnxruntime), against eager.

Exported graphs take any batch and any height and width that are multiples of 16 (the encoder's stride; the
image processor's sizes are), from 48 up: the stage-IV grid must be at least 3 so that the token shift's
slices never have length 1 (export treats sizes 0 and 1 specially).
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
from timm.utils import reparameterize_model

import rwkvunet  # noqa: F401
from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation


def optional(module: str):
    """Import an optional dependency (the ``onnx`` extra); skip without it, except under CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{module} is missing; CI installs rwkvunet[onnx]")
        pytest.skip(f"{module} not installed (pip install 'rwkvunet[onnx]')")


class LogitsOnly(torch.nn.Module):
    """pixel_values -> logits, the signature exported graphs have."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=3, in_channels=1)).eval()
    with torch.no_grad():  # trained-like BatchNorm statistics and a head that separates the classes
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
        model.segmentation_head.weight.normal_(0, 0.5)
    return model


def eager(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def close(got, want, rel=1e-4):
    return float((got - want).abs().max()) <= rel * float(want.abs().max())


@pytest.fixture(scope="module")
def exported(model):
    """The deployed graph: BatchNorm folded into the convolutions (timm's reparameterize_model) before export."""
    batch = torch.export.Dim("batch", min=1, max=64)
    height = 16 * torch.export.Dim("height_16", min=3, max=256)
    width = 16 * torch.export.Dim("width_16", min=3, max=256)
    return torch.export.export(LogitsOnly(reparameterize_model(model)), (torch.randn(2, 1, 48, 64),),
                               dynamic_shapes={"pixel_values": {0: batch, 2: height, 3: width}})


def test_exported_graph_has_no_batch_norm(exported):
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "batch_norm" in t]


def test_compile_fullgraph_matches_eager(model, monkeypatch):
    """Whole-segmenter capture without graph breaks; aot_eager keeps it quick on CPU (inductor: slow test).
    The CPU kernel's lookup is forgotten first, as in a fresh process: the graph must not ask for it (finding a
    build touches the file system, which breaks a full graph)."""
    from rwkvunet.ops import cpu_kernel

    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 1, 40, 56)  # padded to 48 x 64 inside the graph
    with torch.no_grad():
        got = compiled(pixel_values=x).logits
    assert got.shape == (1, 3, 40, 56)
    assert close(got, eager(model, x), rel=1e-5)


@pytest.mark.slow
def test_compile_inductor_fullgraph_matches_eager(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        got = compiled(pixel_values=x).logits
    assert close(got, eager(model, x), rel=1e-4)


def test_torch_export_matches_eager_at_other_sizes(model, exported):
    module = exported.module()
    for shape in [(1, 1, 48, 80), (3, 1, 64, 48)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            got = module(x)
        assert got.shape == (shape[0], 3) + shape[2:]
        assert close(got, eager(model, x), rel=1e-5)


def test_channel_mix_in_the_encoder_exports_too():
    """The Cross-Channel Mix exports its channel mix in slices of rows; the encoder's channel mixes (the
    mix_channel_mix ablation) run at stages III-IV, whose rows (multiples of 2) cannot be cut into those
    slices, and export whole: the graph still takes every size from 48 up."""
    from rwkvunet.layers import EXPORT_ROW_SLICES, ChannelMix

    torch.manual_seed(1)
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=2, in_channels=1,
                                                           mix_channel_mix=True)).eval()
    slices = {name: m.export_row_slices for name, m in model.named_modules() if isinstance(m, ChannelMix)}
    assert slices.pop("ccm.channel") == EXPORT_ROW_SLICES > 1
    assert slices and set(slices.values()) == {1}
    height = 16 * torch.export.Dim("height_16", min=3, max=256)
    with torch.no_grad():  # as rwkvunet.onnx_export traces (inference forms); slicing them all failed here
        program = torch.export.export(LogitsOnly(model), (torch.randn(1, 1, 48, 64),), dynamic_shapes={
            "pixel_values": {2: height, 3: 16 * torch.export.Dim("w16", min=3)}})
    for shape in [(1, 1, 48, 48), (1, 1, 80, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert close(program.module()(x), eager(model, x), rel=1e-5)


@pytest.mark.slow  # the ONNX translation alone takes about a minute on two cores
def test_onnx_export_runs_in_onnxruntime_with_dynamic_shapes(model, exported, tmp_path):
    onnx = optional("onnx")
    ort = optional("onnxruntime")
    optional("onnxscript")
    path = tmp_path / "rwkvunet_t.onnx"
    torch.onnx.export(exported, (torch.randn(2, 1, 48, 64),), str(path), dynamo=True, opset_version=18,
                      input_names=["pixel_values"], output_names=["logits"], verbose=False)
    graph = onnx.load(str(path)).graph
    assert onnx.load(str(path)).opset_import[0].version >= 17
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # batch, height, width are symbolic
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 1, 48, 64), (1, 1, 96, 80)]:
        x = torch.randn(*shape)
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        assert got.shape == (shape[0], 3) + shape[2:]
        assert close(torch.from_numpy(got), eager(model, x), rel=1e-4)


def test_onnx_bi_wkv_takes_one_cumsum_per_sum():
    """Exported Bi-WKV: each of its four exclusive cumulative sums is one ONNX CumSum (exclusive, and reverse for
    the anti-causal side), with no flips or concatenations around it; ONNX Runtime gives the formula's values."""
    optional("onnxscript")
    onnx = optional("onnx")
    ort = optional("onnxruntime")
    from bi_wkv_reference import bi_wkv_reference
    from rwkvunet.onnx_export import CUSTOM_TRANSLATIONS
    from rwkvunet.ops import bi_wkv
    from rwkvunet.ops.bi_wkv import exclusive_cumsum_as_one_op

    class Mix(torch.nn.Module):
        def forward(self, w, u, k, v):
            return bi_wkv(w, u, k, v)

    g = torch.Generator().manual_seed(0)
    T, C = 37, 6
    w, u = (torch.rand(C, generator=g) - 0.5) / 5, torch.randn(C, generator=g)
    k, v = torch.randn(2, T, C, generator=g) * 3, torch.randn(2, T, C, generator=g)
    with torch.no_grad(), exclusive_cumsum_as_one_op():
        program = torch.export.export(Mix(), (w, u, k, v))
        model = torch.onnx.export(program, (w, u, k, v), dynamo=True, opset_version=18,
                                  custom_translation_table=CUSTOM_TRANSLATIONS).model_proto
    cumsums = [n for n in model.graph.node if n.op_type == "CumSum"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in cumsums]
    assert len(cumsums) == 4 and all(a.get("exclusive") == 1 for a in attrs)
    assert sorted(a.get("reverse", 0) for a in attrs) == [0, 0, 1, 1]
    assert not [n for n in model.graph.node if n.op_type == "Concat"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, (x.numpy() for x in (w, u, k, v)))))
    ref = bi_wkv_reference(w, u, k, v)
    assert ((torch.from_numpy(got).double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # without the context an exported program keeps plain ATen operators (for consumers other than ONNX)
    with torch.no_grad():
        plain = torch.export.export(Mix(), (w, u, k, v))
    assert "exclusive_cumsum" not in str(plain.graph) and "exclusive_cumsum" in str(program.graph)
