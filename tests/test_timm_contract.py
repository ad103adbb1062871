"""The checks timm runs on every model it ships (its tests/test_models.py), on every ``rwkvunet_*`` model.

The bodies follow timm's tests; inputs are smaller (``TARGET_*`` below) so the suite stays quick on a CPU, and
where timm only checks shapes the scripted and traced models are also compared with eager mode.
"""
import math

import pytest
import torch
import timm
from timm import create_model, list_models, set_scriptable
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from timm.utils import reparameterize_model

import rwkvunet  # noqa: F401  (registers the models)

torchvision_fx = pytest.importorskip("torchvision.models.feature_extraction")

# every variant is checked; the default (fast) run checks the smallest, the others run with -m slow
FAST_MODELS = {"rwkvunet_enc_t"}
MODELS = [m if m in FAST_MODELS else pytest.param(m, marks=pytest.mark.slow) for m in list_models("rwkvunet_*")]

# timm caps inputs at 96-384 pixels; these keep the whole file within about a minute on two cores
TARGET_FWD_SIZE = 64
TARGET_BWD_SIZE = 48
TARGET_JIT_SIZE = 48
TARGET_FFEAT_SIZE = 48
TARGET_FX_SIZE = 48


def _get_input_size(model=None, model_name="", target=None):
    """timm's rule: the cfg's input size, each side capped at ``target`` (fixed sizes kept)."""
    cfg = model.pretrained_cfg if model is not None else timm.get_pretrained_cfg(model_name).to_dict()
    input_size = cfg["input_size"]
    if cfg.get("fixed_input_size"):
        return input_size
    if target and max(input_size) > target:
        if cfg.get("min_input_size"):
            return cfg["min_input_size"]
        input_size = tuple(min(x, target) for x in input_size)
    return input_size


def _create_fx_model(model, train=False):
    """timm's FX feature extractor around the final output (train and eval graphs)."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(),
        autowrap_functions=get_notrace_functions(),
        param_shapes_constant=True,
    )
    train_nodes, eval_nodes = torchvision_fx.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        tracer = torchvision_fx.NodePathTracer(**tracer_kwargs)
        graph = tracer.trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]
    return torchvision_fx.create_feature_extractor(
        model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes,
        tracer_kwargs=tracer_kwargs,
    )


def test_every_encoder_is_listed():
    names = list_models("rwkvunet_*")
    assert {"rwkvunet_enc_t", "rwkvunet_enc_s", "rwkvunet_enc_b"} <= set(names) and FAST_MODELS <= set(names)
    assert all(timm.get_pretrained_cfg(m) is not None for m in names)


def _assert_backward_reaches_every_parameter(model, outputs, num_params):
    """timm's backward checks: every parameter gets a gradient, 42 classes out, no NaN."""
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward(model_name, batch_size):
    model = create_model(model_name, pretrained=False).eval()
    input_size = _get_input_size(model=model, target=TARGET_FWD_SIZE)
    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"

    # grad checkpointing must not change the output
    model.set_grad_checkpointing()
    outputs2 = model(inputs)
    assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [2])
def test_model_backward(model_name, batch_size):
    input_size = _get_input_size(model_name=model_name, target=TARGET_BWD_SIZE)
    model = create_model(model_name, pretrained=False, num_classes=42)
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    outputs = model(torch.randn((batch_size, *input_size)))
    _assert_backward_reaches_every_parameter(model, outputs, num_params)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_default_cfgs(model_name, batch_size):
    model = create_model(model_name, pretrained=False).eval()
    assert model.num_classes >= 0
    assert model.num_features > 0
    assert model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    assert cfg == model.pretrained_cfg

    output_fmt = getattr(model, "output_fmt", "NCHW")
    spatial_axis = get_spatial_dim(output_fmt)
    feat_axis = get_channel_dim(output_fmt)
    # timm runs this at the cfg's input size; at a smaller one the unpooled map shrinks in proportion
    reduction = model.feature_info[-1]["reduction"]
    assert tuple(cfg["pool_size"]) == tuple(s // reduction for s in cfg["input_size"][1:])
    input_size = _get_input_size(model=model, target=TARGET_FWD_SIZE)
    pool_size = tuple(s // reduction for s in input_size[1:])
    input_tensor = torch.randn((batch_size, *input_size))

    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    assert outputs.shape[spatial_axis[0]] == pool_size[0], f"unpooled feature shape {outputs.shape} != config"
    assert outputs.shape[spatial_axis[1]] == pool_size[1], f"unpooled feature shape {outputs.shape} != config"
    assert outputs.shape[feat_axis] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 2
    assert outputs.shape[1] == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape

    model.reset_classifier(0, "")  # no classifier, no pooling
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    model = create_model(model_name, pretrained=False, num_classes=0, global_pool="").eval()
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in (classifier,) if isinstance(classifier, str) else classifier:
            assert c + ".weight" in state_dict.keys(), f"{c} not in model params"
    first_conv = cfg["first_conv"]
    for fc in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert fc + ".weight" in state_dict.keys(), f"{fc} not in model params"


@pytest.mark.parametrize("model_name", list_models("rwkvunet_*"))  # meta tensors: free for every variant
def test_model_factory_kwargs_on_meta(model_name):
    """timm's factory passes device/dtype: every tensor is created there, unknown kwargs raise, a new head
    follows the model's device, dtype and mode, and a forward on meta tensors keeps the dtype."""
    model = create_model(model_name, pretrained=False, device="meta", dtype=torch.float32).eval()
    misplaced = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not misplaced, misplaced[:5]
    with pytest.raises(TypeError):
        create_model(model_name, pretrained=False, device="meta", not_a_model_arg=1)
    x = torch.randn(1, *model.default_cfg["input_size"], device="meta")
    assert model.forward_features(x).shape[1] == model.num_features
    model.to(torch.bfloat16)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(dtype=torch.float64)
    model.reset_classifier(0, "")
    model.reset_classifier(2)  # keeps the current (absent) pooling: a per-position classifier
    assert model.head.weight.device.type == "meta" and model.head.weight.dtype == torch.float64
    assert all(not m.training for m in model.modules())
    assert model(x.to(torch.float64)).shape[:2] == (1, 2)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_torchscript(model_name, batch_size):
    input_size = _get_input_size(model_name=model_name, target=TARGET_JIT_SIZE)
    with set_scriptable(True):
        model = create_model(model_name, pretrained=False)
    model.eval()
    inputs = torch.randn((batch_size, *input_size))
    with torch.no_grad():
        eager = model(inputs)
        outputs = torch.jit.script(model)(inputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    # the same modules, compiled by TorchScript: rounding apart
    torch.testing.assert_close(outputs, eager, rtol=1e-4, atol=1e-5)


def _check_feature_shapes(outputs, channels, reductions, input_size, batch_size, output_fmt="NCHW"):
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    assert len(channels) == len(outputs)
    spatial_size = input_size[-2:]
    for e, r, o in zip(channels, reductions, outputs):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(spatial_size[0] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(spatial_size[1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_features(model_name, batch_size):
    """features_only (default and forward_intermediates-backed) against forward_intermediates itself."""
    models = []
    for kwargs in (dict(features_only=True), dict(features_only=True, feature_cls="getter"), {}):
        torch.manual_seed(0)  # one initialisation for the three
        models.append(create_model(model_name, pretrained=False, **kwargs).eval())
    model, getter, full = models
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    assert channels == [f["num_chs"] for f in full.feature_info]
    assert reductions == [f["reduction"] for f in full.feature_info]
    assert channels[-1] == full.num_features

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    x = torch.randn((batch_size, *input_size))
    with torch.no_grad():
        outputs = model(x)
        intermediates = full.forward_intermediates(x, intermediates_only=True)
        _check_feature_shapes(outputs, channels, reductions, input_size, batch_size)
        for a, b, c in zip(outputs, getter(x), intermediates):
            assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_intermediates(model_name, batch_size):
    model = create_model(model_name, pretrained=False).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    channels, reductions = feature_info.channels(), feature_info.reduction()
    assert len(channels) >= 3
    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    inpt = torch.randn((batch_size, *input_size))
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(inpt, output_fmt="NCHW")
        _check_feature_shapes(intermediates, channels, reductions, input_size, batch_size)
        assert torch.allclose(output, model.forward_features(inpt))

        model.set_grad_checkpointing()
        output3, _ = model.forward_intermediates(inpt, output_fmt="NCHW")
    assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_fx(model_name, batch_size):
    """The symbolically traced model computes exactly what the module does."""
    model = create_model(model_name, pretrained=False).eval()
    input_size = _get_input_size(model=model, target=TARGET_FX_SIZE)
    with torch.inference_mode():
        inputs = torch.randn((batch_size, *input_size))
        outputs = model(inputs)
        fx_outputs = torch.cat(tuple(_create_fx_model(model)(inputs).values()))
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [2])
def test_model_backward_fx(model_name, batch_size):
    input_size = _get_input_size(model_name=model_name, target=TARGET_FX_SIZE)
    model = create_model(model_name, pretrained=False, num_classes=42).train()
    num_params = sum(x.numel() for x in model.parameters())
    model = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(model(torch.randn((batch_size, *input_size))).values()))
    _assert_backward_reaches_every_parameter(model, outputs, num_params)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_fx_features(model_name, batch_size):
    """timm's FX feature extraction (``feature_cls="fx"``) gives the features forward_intermediates gives."""
    torch.manual_seed(0)
    model = create_model(model_name, pretrained=False, features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)  # the same initialisation
    full = create_model(model_name, pretrained=False).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    input_size = _get_input_size(model=full, target=TARGET_FX_SIZE)
    x = torch.randn((batch_size, *input_size))
    with torch.inference_mode():
        outputs = model(x)
        _check_feature_shapes(outputs, channels, reductions, input_size, batch_size)
        for a, b in zip(outputs, full.forward_intermediates(x, intermediates_only=True)):
            assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_fx_torchscript(model_name, batch_size):
    """Symbolically trace, then script the traced graph."""
    input_size = _get_input_size(model_name=model_name, target=TARGET_JIT_SIZE)
    with set_scriptable(True):
        model = create_model(model_name, pretrained=False)
    model.eval()
    scripted = torch.jit.script(_create_fx_model(model))
    with torch.inference_mode():
        x = torch.randn((batch_size, *input_size))
        outputs = torch.cat(tuple(scripted(x).values()))
        eager = model(x)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    torch.testing.assert_close(outputs, eager, rtol=1e-4, atol=1e-5)


# --- reparameterize_model (timm's inference fusion, as for RepViT and MobileOne) ---------------------------
def _with_trained_norms(model):
    """Non-trivial BatchNorm statistics and affine parameters, so that folding them changes the weights."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("model_name", MODELS)
def test_model_reparameterize(model_name):
    """The fused copy computes the same outputs to float rounding, holds no BatchNorm, scripts and traces;
    the model it was made from keeps its modules and weights."""
    model = _with_trained_norms(create_model(model_name, pretrained=False))
    input_size = _get_input_size(model=model, target=TARGET_JIT_SIZE)
    inputs = torch.randn((1, *input_size))
    keys = set(model.state_dict())
    fused = reparameterize_model(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        eager = model(inputs)
        torch.testing.assert_close(fused(inputs), eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.jit.script(fused)(inputs), eager, rtol=1e-4, atol=1e-5)
        fx_outputs = torch.cat(tuple(_create_fx_model(fused)(inputs).values()))
        torch.testing.assert_close(fx_outputs, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_features_reparameterize(model_name):
    model = _with_trained_norms(create_model(model_name, pretrained=False, features_only=True))
    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    inputs = torch.randn((1, *input_size))
    fused = reparameterize_model(model)
    with torch.no_grad():
        for got, want in zip(fused(inputs), model(inputs)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
