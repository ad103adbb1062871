"""hub_configs/: every folder loads, builds its model, matches the released checkpoints' shapes, and carries a
model card whose metadata huggingface_hub parses (with the paper's numbers marked as reported by it)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import rwkvunet  # noqa: F401
from rwkvunet import HUB_ORG, RWKVUNetForSemanticSegmentation, RWKVUNetImageProcessor
from rwkvunet.hub import AUTHORS_URL
from transformers import AutoConfig, AutoImageProcessor

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"
ENCODERS = [f"rwkvunet_enc_{v}.in1k" for v in "tsb"]
SEGMENTERS = [f"rwkvunet-{v}-{d}" for v in "tsb" for d in ("synapse", "acdc")]
SYNAPSE = ["background", "aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen", "stomach"]
ACDC = ["background", "right ventricle", "myocardium", "left ventricle"]
# paper Tables 3 (Synapse: mean DSC, HD95) and 4 (ACDC: mean DSC)
PAPER = {("t", "synapse"): (81.58, 17.83), ("s", "synapse"): (82.20, 21.16), ("b", "synapse"): (84.02, 15.70),
         ("t", "acdc"): (90.92, None), ("s", "acdc"): (91.64, None), ("b", "acdc"): (92.17, None)}


def test_every_release_has_a_folder():
    assert sorted(p.name for p in HUB_CONFIGS.iterdir() if p.is_dir()) == sorted(ENCODERS + SEGMENTERS)


@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmenter_config_builds_its_model(name):
    folder = HUB_CONFIGS / name
    _, variant, dataset = name.split("-")
    config = AutoConfig.from_pretrained(folder)
    names = SYNAPSE if dataset == "synapse" else ACDC
    assert (config.model_type, config.variant, config.in_channels, config.image_size) == ("rwkv_unet", variant, 1, 224)
    assert [config.id2label[i] for i in range(config.num_labels)] == names
    assert all(config.label2id[n] == i for i, n in enumerate(names))
    assert (config.ce_weight, config.dice_weight) == ((0.5, 0.5) if dataset == "synapse" else (0.3, 0.7))
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor) is RWKVUNetImageProcessor
    assert processor.num_channels == 1 and (processor.size.height, processor.size.width) == (224, 224)
    assert not processor.do_normalize  # slices already in [0, 1]
    assert processor(torch.rand(50, 60), return_tensors="pt")["pixel_values"].shape == (1, 1, 224, 224)
    model = RWKVUNetForSemanticSegmentation(config).eval()
    with torch.no_grad():  # a small slice keeps the test quick; any size runs
        logits = model(**processor(torch.rand(30, 40), do_resize=False, return_tensors="pt")).logits
    assert logits.shape == (1, len(names), 30, 40)


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_config_is_timm_hub_format(name, tmp_path):
    import timm

    folder = HUB_CONFIGS / name
    config = json.loads((folder / "config.json").read_text())
    variant = name[len("rwkvunet_enc_")]
    assert config["architecture"] == f"rwkvunet_enc_{variant}" and config["num_classes"] == 1000
    assert config["num_features"] == rwkvunet.ENCODER_VARIANTS[variant]["dims"][-1]
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    # the folder plus weights is what timm loads from the Hub: build it from local-dir with random weights
    model = timm.create_model(config["architecture"])
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert timm.models.get_pretrained_cfg(f"rwkvunet_enc_{variant}.in1k").hf_hub_id == f"{HUB_ORG}/{name}"


def _license_fields(value, path=""):
    """(path, value) of every key naming a licence, at any depth of a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            if "licen" in key.lower():
                yield f"{path}{key}", item
            yield from _license_fields(item, f"{path}{key}.")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _license_fields(item, f"{path}{i}.")


def test_no_weights_card_or_config_claims_apache():
    """The authors publish no licence for their weights: Apache-2.0 (the code's) must not be claimed for them,
    in a card's metadata, a timm pretrained_cfg (ours or a Hub config.json), or any licence field of a release
    folder's JSON files. (The code's licence is named in the card text, as not covering the weights.)"""
    import timm
    from huggingface_hub import ModelCard

    claims = []
    for folder in sorted(p for p in HUB_CONFIGS.iterdir() if p.is_dir()):
        data = ModelCard.load(folder / "README.md").data.to_dict()
        claims += [f"{folder.name}/README.md {k}" for k in ("license", "license_name", "license_link")
                   if "apache" in str(data.get(k, "")).lower()]
        for file in folder.glob("*.json"):
            claims += [f"{folder.name}/{file.name} {k}" for k, v in _license_fields(json.loads(file.read_text()))
                       if "apache" in str(v).lower()]
    for name in ENCODERS:
        cfg = timm.models.get_pretrained_cfg(name)
        claims += [f"pretrained_cfg {name}"] if "apache" in str(cfg.license).lower() else []
        assert cfg.license == "unknown" and "no licence" in " ".join(cfg.notes)
        hub = json.loads((HUB_CONFIGS / name / "config.json").read_text())["pretrained_cfg"]
        assert hub["license"] == cfg.license and hub["notes"] == list(cfg.notes)
    assert not claims


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_hub_config_is_what_publishing_writes(name, tmp_path):
    """timm's save_for_hf (what training/publish_hub.py uploads for an encoder) writes exactly this config.json."""
    import timm
    from timm.models import save_for_hf

    save_for_hf(timm.create_model(name.split(".")[0]), tmp_path, safe_serialization=True)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == json.loads((HUB_CONFIGS / name / "config.json").read_text())


@pytest.mark.parametrize("name", ENCODERS + SEGMENTERS)
def test_model_card_metadata(name):
    from huggingface_hub import ModelCard

    card = ModelCard.load(HUB_CONFIGS / name / "README.md")
    data = card.data
    assert (data.license, data.license_name, data.license_link) == ("other", "unknown", AUTHORS_URL)
    assert "no licence" in card.text and "Apache-2.0" in card.text  # the weights have none; the code's is named
    assert data.library_name == ("timm" if name in ENCODERS else "transformers")
    assert data.datasets and data.tags
    assert "arXiv:2501.08458" in card.text or "2501.08458" in card.text
    assert "@article" in card.text and "```python" in card.text
    if name in ENCODERS:
        assert f'timm.create_model("{name.split(".")[0]}", pretrained=True)' in card.text
        return
    assert f'"{HUB_ORG}/{name}"' in card.text
    results = {r.metric_name: r for r in data.eval_results}
    _, variant, dataset = name.split("-")
    dice, hd95 = PAPER[(variant, dataset)]
    assert results["Mean Dice (%)"].metric_value == dice
    if hd95 is not None:
        assert results["Mean HD95 (mm)"].metric_value == hd95
    for result in data.eval_results:
        assert result.task_type == "image-segmentation" and result.verified is False
        assert re.search(r"[Rr]eported by the paper", result.source_name)
        assert result.source_url == "https://arxiv.org/abs/2501.08458"


def test_publish_script_assembles_a_hub_folder(tmp_path, monkeypatch, capsys):
    """training/publish_hub.py: checkpoint + hub config -> weights, configs, card and code; with --push and no
    network it keeps the folder and says the upload did not happen."""
    import runpy

    from huggingface_hub import constants

    from conftest import require_shared

    checkpoint = require_shared("fixtures", "official_s.safetensors")  # the authors' S with 4 classes, like ACDC
    script = runpy.run_path(str(HUB_CONFIGS.parent / "training" / "publish_hub.py"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "rwkvunet-s-acdc"
    rc = script["main"]([str(checkpoint), str(HUB_CONFIGS / "rwkvunet-s-acdc"), "--out", str(out), "--prefix", "sd.",
                         "--push"])
    assert rc == 1 and "not uploaded to rwkv-unet/rwkvunet-s-acdc" in capsys.readouterr().err  # written, not uploaded
    assert (out / "README.md").read_text() == (HUB_CONFIGS / "rwkvunet-s-acdc" / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    hub = json.loads((HUB_CONFIGS / "rwkvunet-s-acdc" / "config.json").read_text())
    assert {k: config[k] for k in hub} == hub | {"architectures": config["architectures"]}
    assert "AutoModelForSemanticSegmentation" in config["auto_map"] and (out / "modeling_rwkv_unet.py").is_file()
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    # the wrong hub config for this checkpoint is refused
    rc = script["main"]([str(checkpoint), str(HUB_CONFIGS / "rwkvunet-s-synapse"), "--out", str(tmp_path / "x"),
                         "--prefix", "sd."])
    err = capsys.readouterr().err
    assert rc == 2 and "predicts 4 classes" in err
    assert err.startswith("publish_hub.py: error: ")  # it was "rwkvunet convert: error:", a command not run
    # without --prefix the weights were taken for an encoder checkpoint
    rc = script["main"]([str(checkpoint), str(HUB_CONFIGS / "rwkvunet-s-acdc"), "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "keys start with 'sd.', pass --prefix sd." in err and "encoder" not in err
    with pytest.raises(SystemExit):  # --private without --push was silently ignored
        script["main"]([str(checkpoint), str(HUB_CONFIGS / "rwkvunet-s-acdc"), "--out", str(tmp_path / "z"),
                        "--prefix", "sd.", "--private"])
    assert "--private creates the Hub repo of --push as private" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))


def test_publish_script_keeps_what_is_in_a_non_empty_folder(tmp_path, capsys):
    """A folder with other files is refused, naming an option the script takes (it named --overwrite, which the
    script did not take); with it, or the older --force, the release is written and the other files are kept."""
    import runpy

    from conftest import require_shared

    checkpoint = require_shared("fixtures", "official_s.safetensors")
    script = runpy.run_path(str(HUB_CONFIGS.parent / "training" / "publish_hub.py"))
    out = tmp_path / "release"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = [str(checkpoint), str(HUB_CONFIGS / "rwkvunet-s-acdc"), "--out", str(out), "--prefix", "sd."]
    assert script["main"](argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err and sorted(os.listdir(out)) == ["notes.txt"]
    for flag in ("--overwrite", "--force"):
        assert script["main"](argv + [flag]) == 0
        assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_publish_script_refuses_a_card_that_claims_a_licence_for_the_weights(tmp_path):
    """A card that says apache-2.0 (the code's licence) for the authors' weights is not published."""
    import runpy
    import shutil

    from rwkvunet.errors import UserError

    script = runpy.run_path(str(HUB_CONFIGS.parent / "training" / "publish_hub.py"))
    folder = tmp_path / "rwkvunet-t-acdc"
    shutil.copytree(HUB_CONFIGS / "rwkvunet-t-acdc", folder)
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("license: other\n", "license: apache-2.0\n", 1))
    with pytest.raises(UserError, match="license 'apache-2.0'.*authors publish no licence"):
        script["main"]([str(tmp_path / "unused.pth"), str(folder), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_fine_tuned_cards_claim_no_licence_for_weights_they_started_from(tmp_path):
    """A model fine-tuned from others' weights (the authors' publish no licence) must not be carded apache-2.0."""
    import yaml

    from rwkvunet.training.model_card import write_model_card

    def meta(args):
        path = write_model_card(tmp_path, args=args, test=None, validation_best=None, steps=1, epochs=1,
                                num_parameters=1, train_seconds=1.0)
        return yaml.safe_load(Path(path).read_text().split("---")[1])

    assert "license" not in meta({"variant": "t", "dataset": "synthetic"})
    started = meta({"variant": "t", "dataset": "synthetic", "encoder_pretrained": "imagenet"})
    assert started["license"] == "other" and started["license_name"] == "unknown"
