"""timm's ``reparameterize_model`` on the released weights: the BatchNorm-folded encoder and segmenter
reproduce the authors' outputs within the same float32 tolerance as the unfolded models, leave the original
model untouched, and hold no BatchNorm."""
import pytest
import timm
import torch
from timm.utils import reparameterize_model

import rwkvunet  # noqa: F401  (registers the encoders)
from rwkvunet.commands.convert import convert_segmenter

VARIANTS = ["t", "s", "b"]
FP32_TOL = 1e-4  # the float32 fidelity tolerance of tests/test_encoder.py and tests/test_convert.py


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def batch_norms(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_reparameterized_encoder_matches_authors(variant, fixture_file, tmp_path):
    fx = fixture_file(variant)
    path = tmp_path / "their_encoder.pth"
    torch.save({"state_dict": {k[len("sd.encoder."):]: t for k, t in fx.items() if k.startswith("sd.encoder.")}},
               path)
    x = fx["input"].float()
    model = timm.create_model(f"rwkvunet_enc_{variant}", pretrained=True, features_only=True, in_chans=x.shape[1],
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = reparameterize_model(model)
    assert batch_norms(fused) == [] and batch_norms(model) != []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the original is untouched
    with torch.no_grad():
        got, unfused = fused(x), model(x)
    for i, (f, u) in enumerate(zip(got, unfused)):
        ref = fx[f"enc.stage{i}"]
        assert max_rel(f, ref) < FP32_TOL, f"stage{i}: {max_rel(f, ref):.2e}"
        assert max_rel(f, u) < FP32_TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_reparameterized_segmenter_matches_authors(variant, fixture_file):
    fx = fixture_file(variant)
    state = {k[len("sd."):]: v for k, v in fx.items() if k.startswith("sd.")}
    x = fx["input"].float()
    model = convert_segmenter(state, variant=variant, num_labels=fx["logits"].shape[1], in_channels=x.shape[1])
    fused = reparameterize_model(model)
    assert batch_norms(fused) == [] and batch_norms(model) != []
    with torch.no_grad():
        got = fused(pixel_values=x).logits
        unfused = model(pixel_values=x).logits
    assert max_rel(got, fx["logits"]) < FP32_TOL
    assert max_rel(got, unfused) < FP32_TOL
    assert fused.encoder.stem_folded and not model.encoder.stem_folded  # the stem fold was part of it
    # the unfused model keeps its checkpoint layout: it saves and loads as before
    model.load_state_dict(model.state_dict())


def test_reparameterize_in_place_and_twice():
    torch.manual_seed(0)
    model = timm.create_model("rwkvunet_enc_t", num_classes=0).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    same = reparameterize_model(model, inplace=True)
    assert same is model and batch_norms(model) == []
    reparameterize_model(model, inplace=True)  # nothing left to fold
    with torch.no_grad():
        assert max_rel(model(x), want) < 1e-5


def _randomise_batch_norms(model):
    """Statistics and affines far from the identity, so that every fold has something to fold."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


def test_segmenter_folds_the_stem_into_stage_one():
    """The segmenter never reads the stem's output, so its projection (3 -> 24, linear) and stage I's first 1x1
    conv become one 3 -> C conv; the logits stay those of the unfused model in float64."""
    from rwkvunet.models.rwkv_unet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation

    torch.manual_seed(0)
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=3)).eval()
    _randomise_batch_norms(model)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        want = model.double()(pixel_values=x.double()).logits
        fused = reparameterize_model(model.float())
        got = fused(pixel_values=x).logits
    conv = fused.encoder.stage1[0].conv.conv
    assert isinstance(fused.encoder.stem.proj, torch.nn.Identity)
    assert (conv.in_channels, conv.out_channels) == (3, model.encoder.stage1[0].conv.conv.out_channels)
    assert max_rel(got, want) < 1e-5
    reparameterize_model(fused, inplace=True)  # a second pass folds nothing more
    with torch.no_grad():
        assert torch.equal(fused(pixel_values=x).logits, got)
    with pytest.raises(ValueError, match="feature 0"):  # the stem's output no longer exists, and says so
        fused.encoder.forward_intermediates(x, indices=[0])


def test_encoder_keeps_its_stem_feature():
    """A timm encoder returns the stem's output as feature 0, so reparameterizing it folds only BatchNorms."""
    torch.manual_seed(0)
    model = timm.create_model("rwkvunet_enc_t", features_only=True).eval()
    _randomise_batch_norms(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        got = reparameterize_model(model)(x)
    assert [f.shape for f in got] == [f.shape for f in want]
    assert max(max_rel(g, w) for g, w in zip(got, want)) < 1e-5
