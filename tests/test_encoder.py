"""timm encoders: fidelity to the authors' code, parameter counts, any input size, the timm model contract."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import timm.optim
import torch
from safetensors.torch import save_file

import rwkvunet  # noqa: F401  (registers the encoders)
from rwkvunet.models.encoder import checkpoint_filter_fn

VARIANTS = ["t", "s", "b"]
USED_PARAMS_M = {"t": 2.94, "s": 9.42, "b": 16.69}  # DESIGN section 3
DIMS = {"t": (32, 48, 96, 160), "s": (32, 64, 128, 192), "b": (48, 72, 144, 240)}


def authors_encoder(fx):
    return {k[len("sd.encoder."):]: t for k, t in fx.items() if k.startswith("sd.encoder.")}


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_fidelity_through_pretrained_file(variant, fixture_file, tmp_path):
    """The authors' encoder checkpoint (.pth) through timm's public pretrained path reproduces every stage."""
    fx = fixture_file(variant)
    path = tmp_path / "their_encoder.pth"
    torch.save({"state_dict": authors_encoder(fx)}, path)
    x = fx["input"]
    model = timm.create_model(f"rwkvunet_enc_{variant}", pretrained=True, features_only=True,
                              in_chans=x.shape[1], pretrained_cfg_overlay=dict(file=str(path))).eval()
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        model = model.to(dtype)
        with torch.no_grad():
            feats = model(x.to(dtype))
        assert len(feats) == 5
        for i, f in enumerate(feats):
            ref = fx[f"enc.stage{i}"]
            assert f.shape == ref.shape
            assert max_rel(f, ref) < tol, f"stage{i} {dtype}: {max_rel(f, ref):.2e}"


def test_one_channel_equals_three_channel_repeat(fixture_file, tmp_path):
    """in_chans=1 adapts only the first conv; it equals the authors' x.repeat(1, 3, 1, 1)."""
    fx = fixture_file("s")
    path = tmp_path / "enc.safetensors"
    save_file(authors_encoder(fx), str(path))
    kw = dict(pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=str(path)))
    grey = timm.create_model("rwkvunet_enc_s", in_chans=1, **kw).eval().double()
    rgb = timm.create_model("rwkvunet_enc_s", in_chans=3, **kw).eval().double()
    x = fx["input"][:1, :, :40, :56].double()  # any input: this compares two models, not the fixture
    with torch.no_grad():
        for a, b in zip(grey(x), rgb(x.repeat(1, 3, 1, 1))):
            assert max_rel(a, b) < 1e-12
    assert grey.stem.conv.conv.weight.shape[1] == 1
    assert grey.stem.conv.conv.weight.shape[0] == 3  # the stem keeps its 3 internal channels


@pytest.mark.parametrize("variant", VARIANTS)
def test_used_parameter_counts(variant):
    model = timm.create_model(f"rwkvunet_enc_{variant}", features_only=True)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == USED_PARAMS_M[variant]


@pytest.mark.parametrize("shape", [(1, 3, 67, 131), (2, 1, 224, 160)])
def test_any_input_size(shape):
    B, C, H, W = shape
    model = timm.create_model("rwkvunet_enc_t", features_only=True, in_chans=C).eval()
    with torch.no_grad():
        feats = model(torch.randn(shape))
    h, w = H, W
    expected = [(B, 24, h, w)]
    for dim in DIMS["t"]:
        h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 5x5 conv with padding 2 -> ceil(n / 2)
        expected.append((B, dim, h, w))
    assert [tuple(f.shape) for f in feats] == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_classifies(variant):
    model = timm.create_model(f"rwkvunet_enc_{variant}").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_timm_contract(variant="t"):
    name = f"rwkvunet_enc_{variant}"
    assert name in timm.list_models("rwkvunet_enc_*")
    assert f"{name}.in1k" in timm.list_pretrained(f"{name}*")
    model = timm.create_model(name, num_classes=10, drop_rate=0.1, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        feats = model.forward_features(x)
        assert feats.shape == (2, DIMS[variant][-1], 4, 3)
        assert model.forward_head(feats, pre_logits=True).shape == (2, DIMS[variant][-1])
    assert model.get_classifier() is model.head
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, DIMS[variant][-1])
    model.reset_classifier(0, "")
    assert model(x).shape == (2, DIMS[variant][-1], 4, 3)
    model.reset_classifier(3, "")  # unpooled classifier: logits at every position, equal to a 1x1 conv
    with torch.no_grad():
        logits = model(x)
        expected = torch.nn.functional.conv2d(model.forward_features(x), model.head.weight[:, :, None, None],
                                              model.head.bias)
    assert logits.shape == (2, 3, 4, 3)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_pretrained_cfg():
    cfg = timm.models.get_pretrained_cfg("rwkvunet_enc_b.in1k").to_dict()
    assert cfg["hf_hub_id"] == f"{rwkvunet.HUB_ORG}/rwkvunet_enc_b.in1k"
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["first_conv"] == "stem.conv.conv" and cfg["classifier"] == "head"
    assert "2501.08458" in cfg["paper_ids"] and cfg["license"]
    model = timm.create_model("rwkvunet_enc_b")
    assert dict(model.named_modules())["stem.conv.conv"].in_channels == 3
    assert isinstance(dict(model.named_modules())["head"], torch.nn.Linear)


def test_features_only_contract():
    model = timm.create_model("rwkvunet_enc_t", features_only=True)
    assert model.feature_info.channels() == [24, 32, 48, 96, 160]
    assert model.feature_info.reduction() == [1, 2, 4, 8, 16]
    own = set(timm.create_model("rwkvunet_enc_t").state_dict())
    assert set(model.state_dict()) <= own  # the model's own weight names
    picked = timm.create_model("rwkvunet_enc_t", features_only=True, out_indices=(2, 4))
    assert picked.feature_info.channels() == [48, 160]
    assert [f.shape[1] for f in picked(torch.randn(1, 3, 32, 32))] == [48, 160]


def test_forward_intermediates_and_prune():
    model = timm.create_model("rwkvunet_enc_t").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [24, 32, 48, 96, 160]
        torch.testing.assert_close(final, model.forward_features(x))
        nhwc = model.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", intermediates_only=True)
        assert [tuple(t.shape) for t in nhwc] == [(1, 32, 32, 32), (1, 8, 8, 96)]
        kept = model.prune_intermediate_layers(indices=[1, 3])
        assert list(kept) == [1, 3]
        again = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        for a, b in zip(again, nhwc):
            torch.testing.assert_close(a, b.permute(0, 3, 1, 2))
    assert isinstance(model.stage4, torch.nn.Identity) and isinstance(model.head, torch.nn.Identity)


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    a = timm.create_model("rwkvunet_enc_t", num_classes=7, drop_path_rate=0.0).train()
    b = timm.create_model("rwkvunet_enc_t", num_classes=7, drop_path_rate=0.0).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 48, 48)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_no_weight_decay_and_group_matcher():
    model = timm.create_model("rwkvunet_enc_t")
    nwd = model.no_weight_decay()
    assert "stage3.1.mix.spatial_decay" in nwd and "stage4.1.mix.spatial_mix_k" in nwd
    assert all(any(s in n for s in ("spatial_decay", "spatial_first", "spatial_mix_")) for n in nwd)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.named_parameters()))
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 6  # stem, four stages, then the classifier norm and head
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert id(named["stage3.1.mix.spatial_mix_k"]) in no_decay


def test_checkpoint_filter_drops_unused_and_maps_names(fixture_file):
    enc = authors_encoder(fixture_file("t"))
    model = timm.create_model("rwkvunet_enc_t")
    mapped = checkpoint_filter_fn({"model": enc}, model)
    assert set(mapped) == set(model.state_dict())
    assert checkpoint_filter_fn(mapped, model).keys() == mapped.keys()  # own layout passes through


def test_pretrained_from_offline_hub_cache(fixture_file, tmp_path):
    """`pretrained=True` resolves rwkv-unet/rwkvunet_enc_t.in1k from a local cache laid out as the Hub's."""
    fx = fixture_file("t")
    model = timm.create_model("rwkvunet_enc_t")
    weights = checkpoint_filter_fn(authors_encoder(fx), model)
    repo = tmp_path / "hub" / f"models--{rwkvunet.HUB_ORG}--rwkvunet_enc_t.in1k"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architecture": "rwkvunet_enc_t", "num_classes": 1000}))
    torch.save(fx["input"], tmp_path / "x.pt")
    torch.save(fx["enc.stage4"], tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import torch, timm, rwkvunet
        m = timm.create_model("rwkvunet_enc_t", pretrained=True, features_only=True).eval()
        x = torch.load(r"{tmp_path / 'x.pt'}", weights_only=True)
        ref = torch.load(r"{tmp_path / 'ref.pt'}", weights_only=True)
        with torch.no_grad():
            out = m(x)[-1]
        print(((out - ref).abs().max() / ref.abs().max()).item())
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-4


def test_in_chans_zero_is_refused_at_creation():
    with pytest.raises(ValueError, match="in_chans"):
        timm.create_model("rwkvunet_enc_t", in_chans=0)


@pytest.mark.parametrize("out_indices", [(7,), (0, 5), (-6,)])
def test_out_of_range_out_indices_are_refused_at_creation(out_indices):
    with pytest.raises(ValueError, match=r"0 \(stem\) to 4 \(stage IV\)"):
        timm.create_model("rwkvunet_enc_t", features_only=True, out_indices=out_indices)


def test_negative_out_indices_still_work():
    model = timm.create_model("rwkvunet_enc_t", features_only=True, out_indices=(-1,))
    assert model.feature_info.channels() == [160]


def test_float64_input_is_cast_to_the_model_dtype():
    model = timm.create_model("rwkvunet_enc_t", num_classes=0).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x), model(x.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_empty_batch_gives_empty_features():
    model = timm.create_model("rwkvunet_enc_t", num_classes=0).eval()
    with torch.no_grad():
        assert model(torch.randn(0, 3, 64, 64)).shape == (0, 160)
        feats = model.forward_intermediates(torch.randn(0, 3, 64, 64), intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(0, 24, 64, 64), (0, 32, 32, 32), (0, 48, 16, 16), (0, 96, 8, 8),
                                               (0, 160, 4, 4)]


def test_wrong_channel_count_names_in_chans():
    model = timm.create_model("rwkvunet_enc_t", num_classes=0, in_chans=1)
    with pytest.raises(ValueError, match=r"in_chans=1"):
        model(torch.randn(1, 3, 32, 32))
