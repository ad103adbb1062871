"""Every documented way to load pretrained weights, offline: timm encoders by name (``pretrained=True``), by
``hf-hub:`` id, from ``local-dir:`` and through a file overlay; segmenters by Hub id with the Auto classes and
``Segmenter``; all from a cache laid out like the Hub's with HF_HUB_OFFLINE=1. A repo missing from the cache is
a one-line error that says where weights can be had."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

import rwkvunet
from rwkvunet.errors import UserError
from rwkvunet.hub import AUTHORS_URL, create_encoder, encoder_repo_id, load_segmentation_model, segmenter_repo_id

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"
ENC_B, SEG_B = encoder_repo_id("b"), segmenter_repo_id("b", "synapse")
WHERE = (AUTHORS_URL, "rwkvunet convert", "publish_hub.py")


def _snapshot(cache: Path, repo_id: str, folder: Path) -> None:
    """Put ``folder``'s files into ``cache`` as the Hub's main revision of ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _same(model: torch.nn.Module, weights: dict, skip=()) -> bool:
    """Every tensor of ``weights`` (but those under ``skip``) is in ``model`` unchanged (features_only models
    keep the encoder under ``model.``)."""
    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    keys = [k for k in weights if not k.startswith(skip)]
    return bool(keys) and all(torch.equal(state[k], weights[k].to(state[k].dtype)) for k in keys)


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    """What training/publish_hub.py uploads, with random weights: the B and T encoders (timm's save_for_hf, as
    ``rwkvunet convert --encoder`` writes them) and rwkvunet-b-synapse (its hub_configs folder + weights)."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("rwkvunet_enc_b"), root / "enc", safe_serialization=True)
    save_for_hf(timm.create_model("rwkvunet_enc_t"), root / "enc_t", safe_serialization=True)
    config = rwkvunet.RWKVUNetConfig.from_pretrained(HUB_CONFIGS / "rwkvunet-b-synapse")
    rwkvunet.RWKVUNetForSemanticSegmentation(config).save_pretrained(root / "seg")
    shutil.copy(HUB_CONFIGS / "rwkvunet-b-synapse" / "preprocessor_config.json", root / "seg")
    shutil.copy(HUB_CONFIGS / "rwkvunet-b-synapse" / "README.md", root / "seg")
    return root


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache with HF_HUB_OFFLINE=1 (set where huggingface_hub reads it at call time)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(cache)), ("HF_HOME", str(tmp_path / "home"))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# --- encoders -------------------------------------------------------------------------------------------------
def test_encoder_by_name_and_hub_id_from_the_cache(hub_files, offline_cache):
    _snapshot(offline_cache, ENC_B, hub_files / "enc")
    weights = load_file(str(hub_files / "enc" / "model.safetensors"))
    by_name = timm.create_model("rwkvunet_enc_b", pretrained=True)
    assert _same(by_name, weights)
    assert by_name.pretrained_cfg["hf_hub_id"] == ENC_B and by_name.pretrained_cfg["license"] == "unknown"
    assert _same(timm.create_model(f"hf-hub:{ENC_B}", pretrained=True), weights)
    assert _same(create_encoder("rwkvunet_enc_b"), weights)
    # the encoder card's segmentation use: one input channel, features only
    features = timm.create_model("rwkvunet_enc_b", pretrained=True, features_only=True, in_chans=1)
    stem = {k.removeprefix("model."): v for k, v in features.state_dict().items()}["stem.conv.conv.weight"]
    torch.testing.assert_close(stem, weights["stem.conv.conv.weight"].sum(1, keepdim=True))


def test_encoder_from_local_dir_and_weights_file(hub_files):
    folder = hub_files / "enc_t"
    weights = load_file(str(folder / "model.safetensors"))
    assert _same(timm.create_model(f"local-dir:{folder}", pretrained=True), weights)
    assert _same(create_encoder(f"local-dir:{folder}"), weights)
    overlay = dict(file=str(folder / "model.safetensors"))
    assert _same(timm.create_model("rwkvunet_enc_t", pretrained=True, pretrained_cfg_overlay=overlay), weights)
    assert _same(create_encoder("rwkvunet_enc_t", weights=folder), weights)


def _authors_encoder(fixture_file, tmp_path) -> Path:
    """The authors' T encoder weights (their key names), as an ImageNet encoder checkpoint holds them."""
    path = tmp_path / "authors_enc_t.safetensors"
    save_file({k[len("sd.encoder."):]: v.contiguous() for k, v in fixture_file("t").items()
               if k.startswith("sd.encoder.")}, str(path))
    return path


def test_authors_checkpoint_through_a_file_overlay_and_convert(fixture_file, tmp_path):
    """The weights available today: the authors' checkpoint, read directly by a file overlay or converted with
    ``rwkvunet convert --encoder`` into a local folder; the overlay reproduces the authors' stage IV features
    and every route holds the same weights."""
    from rwkvunet.commands import convert

    fx, ckpt = fixture_file("t"), _authors_encoder(fixture_file, tmp_path)
    overlay = timm.create_model("rwkvunet_enc_t", pretrained=True, features_only=True,
                                pretrained_cfg_overlay=dict(file=str(ckpt))).eval()
    with torch.no_grad():
        got = overlay(fx["input"][:1].float())[-1]
    want = fx["enc.stage4"][:1].float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    out = tmp_path / "enc_t"
    assert convert.main([str(ckpt), str(out), "--encoder"]) == 0
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["license"] == "unknown"
    converted = load_file(str(out / "model.safetensors"))
    for model in (timm.create_model(f"local-dir:{out}", pretrained=True, features_only=True),
                  create_encoder("rwkvunet_enc_t", weights=ckpt, features_only=True),
                  create_encoder("rwkvunet_enc_t", weights=out, features_only=True)):
        assert _same(model, converted, skip=("norm.", "head.")) and _same(model, overlay.state_dict())


@pytest.mark.parametrize("name", ["rwkvunet_enc_b", "rwkvunet_enc_s.in1k", f"hf-hub:{ENC_B}"])
def test_encoder_missing_from_the_cache_says_where_weights_are(offline_cache, name):
    with pytest.raises(UserError) as info:
        create_encoder(name)
    message = str(info.value)
    repo = ENC_B if "enc_b" in name else encoder_repo_id("s")
    assert message.startswith(repo) and "not in the Hub cache" in message and "HF_HUB_OFFLINE" in message
    assert all(text in message for text in WHERE + ("pretrained_cfg_overlay", "local-dir:")), message
    assert "\n" not in message


def test_encoder_bad_local_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="has no config.json.*rwkvunet convert"):
        create_encoder(f"local-dir:{tmp_path / 'nowhere'}")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "rwkvunet_enc_t"}))
    with pytest.raises(UserError, match="holds no model.safetensors"):
        create_encoder(f"local-dir:{tmp_path}")
    with pytest.raises(UserError, match="holds no model.safetensors"):
        create_encoder("rwkvunet_enc_t", weights=tmp_path)
    with pytest.raises(UserError, match="no such file"):
        create_encoder("rwkvunet_enc_t", weights=tmp_path / "enc_t.pth")
    torch.save({"stem.conv.conv.weight": torch.zeros(24, 3, 3, 3)}, tmp_path / "enc_t.pth")
    (tmp_path / "enc_t.pth").write_bytes((tmp_path / "enc_t.pth").read_bytes()[:300])  # a cut-off download
    with pytest.raises(UserError, match="enc_t.pth is not a readable PyTorch weights file"):
        create_encoder("rwkvunet_enc_t", weights=tmp_path / "enc_t.pth")


# --- segmenters -----------------------------------------------------------------------------------------------
def test_segmenter_by_hub_id_from_the_cache(hub_files, offline_cache):
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    _snapshot(offline_cache, SEG_B, hub_files / "seg")
    weights = load_file(str(hub_files / "seg" / "model.safetensors"))
    model = AutoModelForSemanticSegmentation.from_pretrained(SEG_B)
    assert type(model) is rwkvunet.RWKVUNetForSemanticSegmentation and _same(model, weights)
    assert model.config.id2label[8] == "stomach"
    assert AutoImageProcessor.from_pretrained(SEG_B).size.height == 224
    assert _same(load_segmentation_model(SEG_B), weights)
    seg = rwkvunet.Segmenter.from_pretrained(SEG_B, device="cpu")
    assert _same(seg.model, weights) and seg.num_labels == 9
    assert seg.preprocessing.size == (224, 224) and seg.preprocessing.source.endswith("preprocessor_config.json")


@pytest.mark.parametrize("load", ["load_segmentation_model", "Segmenter"])
def test_segmenter_missing_from_the_cache_says_where_weights_are(offline_cache, load):
    repo = segmenter_repo_id("s", "synapse")
    loader = load_segmentation_model if load == "load_segmentation_model" else rwkvunet.Segmenter.from_pretrained
    with pytest.raises(UserError) as info:
        loader(repo)
    message = str(info.value)
    assert message.startswith(repo) and all(text in message for text in WHERE), message
    assert "--hub-config hub_configs/" in message and "\n" not in message


def test_segmenter_cached_without_weights_says_where_weights_are(hub_files, offline_cache, tmp_path):
    """A cache holding the config but not the weights (an interrupted download) names the weights as missing."""
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(hub_files / "seg" / "config.json", partial)
    _snapshot(offline_cache, SEG_B, partial)
    with pytest.raises(UserError) as info:
        load_segmentation_model(SEG_B)
    message = str(info.value)
    assert "config.json is here but its weights are not" in message and all(text in message for text in WHERE)


# --- a machine where the Hub's name does not resolve, without HF_HUB_OFFLINE --------------------------------------
@pytest.fixture
def no_dns(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset, no proxy, and no host name resolves (an air-gapped machine). Returns the Hub cache and
    the list of names looked up: huggingface_hub retried each file for ~25 s there before using its cache."""
    import socket

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # read from the environment at its import
    looked_up = []

    def no_name(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_name)
    return cache, looked_up


def test_unresolvable_hub_reads_the_cache_at_once(hub_files, no_dns):
    from rwkvunet.hub import hub_unreachable

    cache, looked_up = no_dns
    assert "cannot be reached from this machine" in hub_unreachable()
    _snapshot(cache, SEG_B, hub_files / "seg")
    model = load_segmentation_model(SEG_B)
    assert _same(model, load_file(str(hub_files / "seg" / "model.safetensors")))
    # the probe, and at most huggingface_hub's one-time fetch of its user-agent registry: no retried requests
    assert set(looked_up) == {"huggingface.co"} and len(looked_up) <= 2


def test_unresolvable_hub_and_an_uncached_model_is_one_line_at_once(no_dns):
    _, looked_up = no_dns
    with pytest.raises(UserError) as info:
        load_segmentation_model("someone/not-cached")
    message = str(info.value)
    assert "not in the Hub cache" in message and "its name does not resolve" in message and "\n" not in message
    assert len(looked_up) <= 2  # huggingface_hub retried each file 5 times


def test_a_proxy_or_hf_hub_offline_leaves_the_choice_to_huggingface_hub(no_dns, monkeypatch):
    from huggingface_hub import constants

    from rwkvunet.hub import hub_unreachable

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy resolves names, not this machine
    assert hub_unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the cache is read at once already
    assert hub_unreachable() is None


def test_unresolvable_hub_data_set_is_one_line_at_once(no_dns, tmp_path):
    import datasets.config
    from huggingface_hub import constants

    from rwkvunet.data import DataError, load_segmentation_dataset

    _, looked_up = no_dns
    with pytest.raises(DataError, match="not in the datasets cache, and the Hub .* its name does not resolve"):
        load_segmentation_dataset("someone/not-cached-set", cache_dir=str(tmp_path / "ds"))
    assert len(looked_up) <= 2  # datasets retried for ~50 s
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # restored


def test_unresolvable_hub_encoders_read_the_cache_at_once(hub_files, no_dns):
    from huggingface_hub import constants

    cache, looked_up = no_dns
    _snapshot(cache, ENC_B, hub_files / "enc")
    assert _same(create_encoder("rwkvunet_enc_b"), load_file(str(hub_files / "enc" / "model.safetensors")))
    with pytest.raises(UserError) as info:
        create_encoder("rwkvunet_enc_t")  # not cached
    message = str(info.value)
    assert message.startswith(encoder_repo_id("t")) and "its name does not resolve" in message
    assert all(text in message for text in WHERE) and "\n" not in message
    assert len(looked_up) <= 3 and constants.HF_HUB_OFFLINE is False  # two probes; offline mode restored
