"""RWKVUNetForSemanticSegmentation as a transformers model: save/load, Hub cache loading, gradient
checkpointing, bf16 autocast, the paper's ablation knobs (parameter counts from the layer shapes), input errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rwkvunet  # noqa: F401
from rwkvunet import ENCODER_VARIANTS, RWKVUNetConfig, RWKVUNetForSemanticSegmentation
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation

STEM = 24


def tiny(**kwargs) -> RWKVUNetForSemanticSegmentation:
    kwargs = {"variant": "t", "num_labels": 3, "in_channels": 1, **kwargs}
    return RWKVUNetForSemanticSegmentation(RWKVUNetConfig(**kwargs))


def batch(b=2, c=1, h=32, w=48, labels=3):
    return torch.randn(b, c, h, w), torch.randint(0, labels, (b, h, w))


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- save / load ------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny(id2label={0: "bg", 1: "a", 2: "b"}, label2id={"bg": 0, "a": 1, "b": 2}, decoder_kernel_size=7).eval()
    with torch.no_grad():  # non-default buffers too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    model.save_pretrained(tmp_path)
    config = {k: v for k, v in AutoConfig.from_pretrained(tmp_path).to_dict().items() if k != "_name_or_path"}
    assert config == {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    for auto in (AutoModelForSemanticSegmentation, AutoModel):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert type(loaded) is RWKVUNetForSemanticSegmentation
        state, want = loaded.state_dict(), model.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    x, _ = batch(1)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert loaded.config.decoder_kernel_size == 7 and loaded.config.id2label[2] == "b"


def test_encoder_keys_are_timm_keys():
    """The segmenter's encoder state is the timm encoder's (minus its classifier), key for key."""
    import timm

    model = tiny()
    enc = timm.create_model("rwkvunet_enc_t", num_classes=0, in_chans=1)
    own = {k[len("encoder."):] for k in model.state_dict() if k.startswith("encoder.")}
    assert own == {k for k in enc.state_dict() if not k.startswith("norm.")}


def test_save_with_code_writes_flat_modules_and_auto_map(tmp_path):
    """The saved code is self-contained: every relative import names a file of the folder, none reaches the
    package by name, and auto_map points the Auto classes at it (loading it is tested without rwkvunet in
    test_convert.py)."""
    import re

    from rwkvunet import RWKVUNetImageProcessor
    from rwkvunet.models.rwkv_unet.remote_code import AUTO_MAP, save_with_code

    save_with_code(tiny(), RWKVUNetImageProcessor(), tmp_path)
    modules = {p.stem for p in tmp_path.glob("*.py")}
    assert {"configuration_rwkv_unet", "modeling_rwkv_unet", "image_processing_rwkv_unet", "encoder", "layers",
            "bi_wkv"} <= modules
    for path in tmp_path.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+rwkvunet\b", text, re.M), path.name
        for dots, name in re.findall(r"^\s*from\s+(\.+)(\w*)", text, re.M):
            assert dots == "." and name in modules, (path.name, dots + name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for ref in AUTO_MAP.values():
        module, cls = ref.split(".")
        assert f"class {cls}(" in (tmp_path / f"{module}.py").read_text()
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": AUTO_MAP["AutoImageProcessor"]}


def _snapshot(cache, repo_id: str, files: dict, sha: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay files out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())


def test_loading_by_repo_id_from_an_offline_hub_cache(tmp_path):
    """Segmenter (Auto classes) and timm encoder (pretrained=True, hf-hub:) load by repo id with
    HF_HUB_OFFLINE=1 from a cache laid out like the Hub's; the weights arrive unchanged."""
    import timm
    from timm.models import save_for_hf

    from rwkvunet import HUB_ORG, RWKVUNetImageProcessor

    seg_dir, enc_dir, cache = tmp_path / "seg", tmp_path / "enc", tmp_path / "cache"
    tiny().save_pretrained(seg_dir)
    RWKVUNetImageProcessor(size={"height": 64, "width": 64}).save_pretrained(seg_dir)
    save_for_hf(timm.create_model("rwkvunet_enc_t"), enc_dir, safe_serialization=True)
    seg_repo, enc_repo = f"{HUB_ORG}/rwkvunet-t-test", f"{HUB_ORG}/rwkvunet_enc_t.in1k"
    _snapshot(cache, seg_repo, {p.name: p for p in seg_dir.iterdir()})
    _snapshot(cache, enc_repo, {p.name: p for p in enc_dir.iterdir()})
    script = textwrap.dedent(f"""
        import torch, timm, rwkvunet
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        def same(model, path, prefix=""):
            want = load_file(path)
            got = {{prefix + k: v for k, v in model.state_dict().items()}}
            assert want.keys() <= got.keys(), sorted(set(want) - set(got))[:5]
            assert all(torch.equal(got[k], want[k]) for k in want)

        seg = AutoModelForSemanticSegmentation.from_pretrained({seg_repo!r})
        same(seg, {str(seg_dir / 'model.safetensors')!r})
        assert AutoImageProcessor.from_pretrained({seg_repo!r}).size.height == 64
        same(timm.create_model("rwkvunet_enc_t", pretrained=True), {str(enc_dir / 'model.safetensors')!r})
        same(timm.create_model("hf-hub:{enc_repo}", pretrained=True), {str(enc_dir / 'model.safetensors')!r})
        try:
            AutoModelForSemanticSegmentation.from_pretrained("{HUB_ORG}/not-in-the-cache")
        except OSError:
            print("offline ok")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offline ok" in result.stdout


# --- training behaviour -----------------------------------------------------------------------------------
def _loss_and_grads(model, x, y, seed=0):
    torch.manual_seed(seed)
    model.zero_grad()
    loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny().train()  # drop path on: checkpointing must replay the same random draws
    x, y = batch(1, h=32, w=32)
    loss, grads = _loss_and_grads(model, x, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing and model.encoder.grad_checkpointing
    model.load_state_dict(state)  # same BatchNorm statistics as the first run
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x, y)
    assert torch.allclose(loss_ckpt, loss, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        assert torch.allclose(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-7), name
    model.activation_checkpointing_disable()
    assert not model.encoder.grad_checkpointing


def test_bf16_autocast_forward_and_backward_are_finite():
    model = tiny().train()
    x, y = batch()
    loss32, _ = _loss_and_grads(model, x, y)
    torch.manual_seed(0)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=x, labels=y)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert abs(out.loss.item() - loss32.item()) < 0.05 * loss32.item()  # bf16 keeps about 3 digits


def test_single_label_model_uses_sigmoid_losses():
    model = tiny(num_labels=1).eval()
    x = torch.randn(1, 1, 32, 32)
    y = (torch.rand(1, 32, 32) > 0.5).long()
    out = model(pixel_values=x, labels=y)
    p = torch.sigmoid(out.logits.double())[:, 0]
    t = y.double()
    bce = torch.nn.functional.binary_cross_entropy(p, t)
    dice = 1 - (2 * (p * t).sum() + 1e-5) / ((p * p).sum() + (t * t).sum() + 1e-5)
    assert torch.allclose(out.loss.double(), 0.5 * bce + 0.5 * dice, rtol=1e-5)


def test_parameter_count_matches_the_design():
    """DESIGN: RWKV-UNet-T with one class has 3.15M parameters used in the forward pass."""
    assert round(count(tiny(num_labels=1, in_channels=3)) / 1e6, 2) == 3.15


# --- ablation knobs: parameter differences from the layer shapes ------------------------------------------
def conv_bn(cin, cout, k, groups=1):
    return cin // groups * cout * k * k + 2 * cout  # conv without bias + BatchNorm affine


def layer_norm(c):
    return 2 * c


def spatial_mix(m):  # decay, first, three mixes, key/value/receptance/output, key_norm
    return 5 * m + 4 * m * m + layer_norm(m)


def attention_mix(m):  # qkv and proj with biases
    return 3 * m * m + 3 * m + m * m + m


def channel_mix(m):  # two mixes, key (m -> 2m), key_norm (2m), receptance (m -> m), value (2m -> m)
    return 2 * m + 2 * m * m + layer_norm(2 * m) + m * m + 2 * m * m


def mixing_mids(variant="t"):
    """Hidden widths of the blocks that mix (stages III-IV, all blocks after the first)."""
    arch = ENCODER_VARIANTS[variant]
    return [int(arch["dims"][s] * arch["expansions"][s]) for s in (2, 3) for _ in range(arch["depths"][s] - 1)]


def decoder(kind="c-d-c", k=9, num_skips=3, variant="t"):
    dims = ENCODER_VARIANTS[variant]["dims"]
    outs, cin, total = [dims[2], dims[1], dims[0], STEM], dims[3], 0
    for j, cout in enumerate(outs):
        if j > 0 and (3 - j) + 1 <= num_skips:
            cin += dims[3 - j]
        if kind == "c-d-c":
            total += conv_bn(cin, cin, 1) + conv_bn(cin, cin, k, groups=cin) + conv_bn(cin, cout, 1)
        elif kind == "c-c-d":
            total += conv_bn(cin, cin, 1) + conv_bn(cin, cout, 1) + conv_bn(cout, cout, k, groups=cout)
        else:
            total += conv_bn(cin, cout, k)
        cin = cout
    return total


def ccm(num_skips=3, variant="t"):
    chs = list(ENCODER_VARIANTS[variant]["dims"][:num_skips])
    if not chs:
        return 0
    c1, dim = chs[0], chs[0] * len(chs)
    return sum(c * c1 + c1 for c in chs) + channel_mix(dim) + layer_norm(dim) + sum(c1 * c + c for c in chs)


KNOBS = {
    "spatial_mixer=attention": (dict(spatial_mixer="attention"),
                                sum(attention_mix(m) - spatial_mix(m) for m in mixing_mids())),
    "spatial_mixer=none": (dict(spatial_mixer="none"), -sum(spatial_mix(m) + layer_norm(m) for m in mixing_mids())),
    "mix_dw_conv=False": (dict(mix_dw_conv=False), -sum(conv_bn(m, m, 5, groups=m) for m in mixing_mids())),
    "mix_channel_mix=True": (dict(mix_channel_mix=True), sum(channel_mix(m) + layer_norm(m) for m in mixing_mids())),
    "decoder_block=c-c-d": (dict(decoder_block="c-c-d"), decoder("c-c-d") - decoder()),
    "decoder_block=conv": (dict(decoder_block="conv", decoder_kernel_size=3), decoder("conv", 3) - decoder()),
    "decoder_kernel_size=3": (dict(decoder_kernel_size=3), decoder(k=3) - decoder()),
    "use_ccm=False": (dict(use_ccm=False), -ccm()),
    "num_skips=2": (dict(num_skips=2), decoder(num_skips=2) + ccm(2) - decoder() - ccm()),
    "num_skips=1": (dict(num_skips=1), decoder(num_skips=1) + ccm(1) - decoder() - ccm()),
    "num_skips=0": (dict(num_skips=0), decoder(num_skips=0) - decoder() - ccm()),
}


@pytest.fixture(scope="module")
def default_count():
    return count(tiny())


@pytest.mark.parametrize("name", list(KNOBS))
def test_ablation_knob_builds_runs_and_changes_parameters(name, default_count):
    kwargs, expected_delta = KNOBS[name]
    assert expected_delta != 0
    model = tiny(**kwargs).train()
    assert count(model) - default_count == expected_delta
    x, y = batch(1, h=32, w=32)
    out = model(pixel_values=x, labels=y)
    assert out.logits.shape == (1, 3, 32, 32)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_default_config_is_the_released_design():
    config = RWKVUNetConfig()
    assert (config.variant, config.spatial_mixer, config.mix_dw_conv, config.mix_channel_mix) == ("b", "rwkv", True, False)
    assert (config.decoder_block, config.decoder_kernel_size, config.num_skips, config.use_ccm) == ("c-d-c", 9, 3, True)
    with pytest.raises(ValueError, match="spatial_mixer"):
        RWKVUNetConfig(spatial_mixer="mamba")
    with pytest.raises(ValueError, match="num_skips"):
        RWKVUNetConfig(num_skips=4)


# --- clear errors -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_model():
    return tiny().eval()


@pytest.mark.parametrize("setting, words", [
    (dict(num_labels=0), "num_labels must be at least 1"),
    (dict(num_labels=-2), "got -2"),
    (dict(decoder_kernel_size=4), "positive odd number"),  # built, then failed in the decoder's concatenation
    (dict(decoder_kernel_size=0), "positive odd number"),
    (dict(drop_path_rate=1.5), r"drop_path_rate must be in \[0, 1\)"),
    (dict(ccm_drop_path_rate=-0.1), "ccm_drop_path_rate"),
    (dict(ce_weight=-1), "ce_weight must be a weight of at least 0"),  # trained towards a worse fit
    (dict(ce_weight=0, dice_weight=0), "both 0"),
    (dict(deep_supervision_weight=-1), "deep_supervision_weight"),
    (dict(image_size=0), "image_size"),
    (dict(initializer_range=-1), "initializer_range"),
])
def test_settings_the_model_would_fail_on_later_are_refused(setting, words):
    with pytest.raises(ValueError, match=words):
        RWKVUNetConfig(variant="t", **setting)


def test_settings_at_their_limits_are_accepted():
    config = RWKVUNetConfig(variant="t", num_labels=1, decoder_kernel_size=1, drop_path_rate=0.0, ce_weight=0.0,
                            dice_weight=1.0, deep_supervision_weight=0.0, initializer_range=0.0)
    assert config.num_labels == 1 and config.decoder_kernel_size == 1


def test_wrong_channel_count(eval_model):
    with pytest.raises(ValueError, match=r"3 channels but this model takes 1"):
        eval_model(pixel_values=torch.randn(1, 3, 32, 32))


def test_integer_pixel_values(eval_model):
    with pytest.raises(TypeError, match="floating point"):
        eval_model(pixel_values=torch.randint(0, 255, (1, 1, 32, 32), dtype=torch.uint8))


def test_missing_batch_dimension(eval_model):
    with pytest.raises(ValueError, match="batch dimension"):
        eval_model(pixel_values=torch.randn(1, 32, 32))


def test_labels_of_the_wrong_shape(eval_model):
    with pytest.raises(ValueError, match="labels must have shape"):
        eval_model(pixel_values=torch.randn(1, 1, 32, 32), labels=torch.zeros(1, 16, 16, dtype=torch.long))


def test_label_values_out_of_range_but_ignore_index_allowed(eval_model):
    x = torch.randn(1, 1, 32, 32)
    y = torch.zeros(1, 32, 32, dtype=torch.long)
    y[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"\[0, 3\).*found \[3\]"):
        eval_model(pixel_values=x, labels=y)
    y[0, 0, 0] = 255  # the ignore index
    assert torch.isfinite(eval_model(pixel_values=x, labels=y).loss)
    assert torch.isfinite(eval_model(pixel_values=x, labels=y[:, None]).loss)  # (B, 1, H, W) masks too


def test_multiclass_loss_is_zero_when_every_label_is_ignored():
    """An all-ignored batch has no labelled pixel: CE over none is 0 and the Dice term is 0, like the binary
    loss; the gradient is all zeros, not NaN."""
    model = tiny(num_labels=3).train()
    x = torch.randn(2, 1, 32, 32)
    labels = torch.full((2, 32, 32), model.config.semantic_loss_ignore_index)
    out = model(pixel_values=x, labels=labels)
    assert out.loss.item() == 0.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


def test_multiclass_loss_with_some_ignored_pixels_matches_the_formula():
    """CE averages over the labelled pixels only; Dice over the labelled pixels (float64 recomputation)."""
    model = tiny(num_labels=3).eval()
    x, y = batch(1, h=32, w=32)
    y[:, :10] = model.config.semantic_loss_ignore_index
    out = model(pixel_values=x, labels=y)
    logits, valid = out.logits.double(), y != model.config.semantic_loss_ignore_index
    logp = logits.log_softmax(1)
    ce = -logp.gather(1, y.clamp_max(2).unsqueeze(1))[:, 0][valid].mean()
    p = logits.softmax(1) * valid[:, None]
    t = torch.nn.functional.one_hot(y.clamp_max(2), 3).permute(0, 3, 1, 2).double() * valid[:, None]
    dice = (1 - (2 * (p * t).sum((0, 2, 3)) + 1e-5) / ((p * p).sum((0, 2, 3)) + (t * t).sum((0, 2, 3)) + 1e-5)).mean()
    assert torch.allclose(out.loss.double(), 0.5 * ce + 0.5 * dice, rtol=1e-5)


def test_float64_input_runs_in_the_model_dtype(eval_model):
    x = torch.randn(1, eval_model.config.in_channels, 32, 32)
    with torch.no_grad():
        want = eval_model(pixel_values=x).logits
        got = eval_model(pixel_values=x.double()).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # the float64 input is rounded to float32 first


def test_empty_batch_gives_empty_logits(eval_model):
    x = torch.randn(0, eval_model.config.in_channels, 40, 56)
    with torch.no_grad():
        out = eval_model(pixel_values=x, labels=torch.zeros(0, 40, 56, dtype=torch.long))
    assert out.logits.shape == (0, eval_model.config.num_labels, 40, 56)
    assert out.loss.item() == 0.0


def test_wrong_channel_count_names_in_channels(eval_model):
    with pytest.raises(ValueError, match=r"config\.in_channels"):
        eval_model(pixel_values=torch.randn(1, eval_model.config.in_channels + 2, 32, 32))
