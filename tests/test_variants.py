"""Encoder variants come from one table: a variant added with ``register_variant`` reaches the timm registry,
the segmenter config, training's ``--variant``, the benchmark's ``--models`` and ``rwkvunet convert``, and
``unregister_variant`` takes it out of all of them again."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import rwkvunet
from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation, register_variant, unregister_variant
from rwkvunet.commands import bench, convert
from rwkvunet.layers import DECODER_BLOCKS, SPATIAL_MIXERS
from rwkvunet.models.encoder import released_variants
from rwkvunet.training.arguments import parse_arguments

TINY = "tiny"
TINY_ARGS = dict(depths=(1, 1, 2, 2), dims=(8, 16, 24, 32), expansions=(1, 1.5, 2, 2))


@pytest.fixture
def tiny():
    register_variant(TINY, doc="A tiny encoder for tests.", **TINY_ARGS)
    try:
        yield TINY
    finally:
        unregister_variant(TINY)


def test_released_variants_are_registered_once():
    assert tuple(rwkvunet.ENCODER_VARIANTS) == released_variants() == ("t", "s", "b")
    assert sorted(timm.list_models("rwkvunet_enc_*")) == sorted(f"rwkvunet_enc_{v}" for v in "tsb")
    assert timm.list_pretrained("rwkvunet_enc_*") == sorted(f"rwkvunet_enc_{v}.in1k" for v in "tsb")


def test_tiny_variant_runs_end_to_end(tiny):
    name = f"rwkvunet_enc_{tiny}"
    assert name in timm.list_models("rwkvunet_enc_*") and name not in timm.list_pretrained("rwkvunet_enc_*")
    x = torch.randn(2, 3, 32, 32)
    encoder = timm.create_model(name, num_classes=5).eval()
    assert encoder.depths == TINY_ARGS["depths"] and encoder.dims == TINY_ARGS["dims"]
    with torch.no_grad():
        assert encoder(x).shape == (2, 5)
    features = timm.create_model(name, features_only=True, in_chans=1).eval()
    assert features.feature_info.channels() == [24, *TINY_ARGS["dims"]]
    with torch.no_grad():
        assert [f.shape[-1] for f in features(x[:, :1])] == [32, 16, 8, 4, 2]

    config = RWKVUNetConfig(variant=tiny, num_labels=3, in_channels=1)
    assert config.encoder_name == name
    assert RWKVUNetConfig(encoder_name=name).variant == tiny
    model = RWKVUNetForSemanticSegmentation(config).eval()
    with torch.no_grad():
        assert model(pixel_values=torch.randn(1, 1, 40, 24)).logits.shape == (1, 3, 40, 24)

    assert parse_arguments(["--variant", tiny]).variant == tiny
    assert bench.model_aliases()[f"rwkv_unet_{tiny}"] == tiny


def test_convert_refuses_a_variant_the_authors_never_released(tiny, tmp_path, capsys):
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant=tiny, num_labels=2))
    src = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    assert tiny not in released_variants()
    for extra in ([], ["--encoder"]):
        capsys.readouterr()
        assert convert.main([str(src), str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"rwkvunet_enc_{tiny}" in err and "released no checkpoints" in err
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:  # not a --variant choice: only released variants convert
        convert.main([str(src), str(tmp_path / "out"), "--variant", tiny])
    assert exit_info.value.code == 2


def test_unregistered_variant_is_gone_everywhere(tiny):
    unregister_variant(tiny)
    try:
        assert tiny not in rwkvunet.ENCODER_VARIANTS
        assert f"rwkvunet_enc_{tiny}" not in timm.list_models("rwkvunet_enc_*")
        with pytest.raises(RuntimeError, match="Unknown model"):
            timm.create_model(f"rwkvunet_enc_{tiny}")
        with pytest.raises(ValueError, match="variant must be one of"):
            RWKVUNetConfig(variant=tiny)
        with pytest.raises(ValueError, match="--variant must be one of"):
            parse_arguments(["--variant", tiny])
        assert f"rwkv_unet_{tiny}" not in bench.model_aliases()
    finally:
        register_variant(tiny, **TINY_ARGS)  # for the fixture's own unregistering


def test_register_variant_refuses_bad_entries():
    with pytest.raises(ValueError, match="already registered"):
        register_variant("t", **TINY_ARGS)
    with pytest.raises(ValueError, match="four each"):
        register_variant("bad", depths=(1, 1), dims=(8, 16), expansions=(1, 1))
    with pytest.raises(ValueError, match="not registered"):
        unregister_variant("never")
    assert "bad" not in rwkvunet.ENCODER_VARIANTS


def test_config_choices_come_from_the_layers():
    for mixer in SPATIAL_MIXERS:
        assert RWKVUNetConfig(spatial_mixer=mixer).spatial_mixer == mixer
    for block in DECODER_BLOCKS:
        assert RWKVUNetConfig(decoder_block=block).decoder_block == block
    with pytest.raises(ValueError, match="decoder_block must be one of"):
        RWKVUNetConfig(decoder_block="d-c-d")
