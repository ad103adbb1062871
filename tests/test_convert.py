"""``rwkvunet convert``: the authors' checkpoints (the shared fixtures) -> folders that reproduce their logits.

The fixtures hold the authors' state_dicts under ``sd.`` with the logits their code computed in float64
(fixtures/README.md); converted models must match them to 1e-4 (float32) / 1e-6 (float64) of the largest
logit. Everything goes through the command line entry point and the Auto classes, as a user would.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import rwkvunet  # noqa: F401  (registers the Auto classes)
from conftest import require_shared
from rwkvunet.commands import convert
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

# variant -> (input channels of the fixture, classes)
FIXTURES = {"t": (3, 2), "s": (1, 4), "b": (1, 9)}


def fixture_path(variant: str):
    return require_shared("fixtures", f"official_{variant}.safetensors")


def run_convert(*argv) -> int:
    return convert.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> folder written by ``rwkvunet convert`` (T also carries the model code)."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            channels, labels = FIXTURES[variant]
            dst = tmp_path_factory.mktemp(f"converted_{variant}")
            extra = ["--with-code"] if variant == "t" else []
            assert run_convert(fixture_path(variant), dst, "--prefix", "sd.", "--variant", variant,
                               "--num-labels", labels, "--in-channels", channels, "--force", *extra) == 0
            cache[variant] = dst
        return cache[variant]

    return get


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    return float((logits.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("variant", ["t", "s", "b"])
def test_converted_logits_match_authors_float32(variant, converted, fixture_file):
    data = fixture_file(variant)
    folder = converted(variant)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    channels, labels = FIXTURES[variant]
    assert type(model).__name__ == "RWKVUNetForSemanticSegmentation" and model.config.variant == variant
    assert model.config.num_labels == labels and model.config.in_channels == channels
    assert processor.num_channels == channels and processor.do_normalize == (channels == 3)
    with torch.no_grad():
        logits = model(pixel_values=data["input"].float()).logits
    assert logits.dtype == torch.float32 and logits.shape == data["logits"].shape
    assert relative_error(logits, data["logits"]) < 1e-4


def test_converted_logits_match_authors_float64_t(converted, fixture_file):
    data = fixture_file("t")
    model = AutoModelForSemanticSegmentation.from_pretrained(converted("t"), dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(pixel_values=data["input"][:1].double()).logits
    assert logits.dtype == torch.float64
    assert relative_error(logits, data["logits"][:1]) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["s", "b"])
def test_converted_logits_match_authors_float64(variant, converted, fixture_file):
    data = fixture_file(variant)
    model = AutoModelForSemanticSegmentation.from_pretrained(converted(variant), dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(pixel_values=data["input"].double()).logits
    assert relative_error(logits, data["logits"]) < 1e-6


def test_remote_code_reproduces_authors_without_rwkvunet(converted, fixture_file, tmp_path):
    """The folder written with --with-code loads through auto_map in a Python where rwkvunet cannot be imported."""
    data = fixture_file("t")
    io = tmp_path / "io.safetensors"
    save_file({"input": data["input"].float().contiguous()}, str(io))
    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    script = f"""
import sys
sys.path += {site_dirs!r}
try:
    import rwkvunet
except ImportError:
    pass
else:
    raise SystemExit('rwkvunet is importable: ' + rwkvunet.__file__)
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation
model = AutoModelForSemanticSegmentation.from_pretrained({str(converted('t'))!r}, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained({str(converted('t'))!r}, trust_remote_code=True)
assert type(model).__module__.startswith('transformers_modules.'), type(model).__module__
assert type(processor).__name__ == 'RWKVUNetImageProcessor'
assert all(k.startswith(('encoder.', 'ccm.', 'decoder.', 'segmentation_head.')) for k in model.state_dict())
with torch.no_grad():
    logits = model(pixel_values=load_file({str(io)!r})['input']).logits
save_file({{'logits': logits.contiguous()}}, {str(tmp_path / 'out.safetensors')!r})
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # dynamic modules are copied under HF_HOME/modules
    # -S: no site-packages processing, so the editable install's .pth path to src/ is never added
    result = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = load_file(str(tmp_path / "out.safetensors"))["logits"]
    assert relative_error(logits, data["logits"]) < 1e-4


def test_converter_reads_wrapped_pth_like_safetensors(converted, tmp_path):
    """A .pth holding {'model': state_dict} (read with weights_only=True) converts to the same tensors."""
    state = {k[len("sd."):]: v for k, v in load_file(str(fixture_path("t"))).items() if k.startswith("sd.")}
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pth")
    dst = tmp_path / "from_pth"
    assert run_convert(tmp_path / "ckpt.pth", dst, "--variant", "t", "--num-labels", 2) == 0
    got = load_file(str(dst / "model.safetensors"))
    want = load_file(str(converted("t") / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_converter_infers_variant_labels_and_channels(tmp_path):
    dst = tmp_path / "out"
    assert run_convert(fixture_path("s"), dst, "--prefix", "sd.", "--id2label", "bg,rv,myo,lv") == 0
    config = json.loads((dst / "config.json").read_text())
    assert (config["variant"], config["in_channels"]) == ("s", 3)  # the checkpoint's first conv takes RGB
    assert config["id2label"] == {"0": "bg", "1": "rv", "2": "myo", "3": "lv"}


@pytest.mark.parametrize("argv, message", [
    (["--variant", "b"], "looks like an RWKV-UNet-S checkpoint"),
    (["--variant", "s", "--num-labels", "9"], "predicts 4 classes"),
    (["--variant", "s", "--in-channels", "2"], "--in-channels 3 or 1"),
    (["--variant", "s", "--encoder"], None),  # a segmenter's encoder part converts as an encoder
])
def test_converter_refuses_mismatched_checkpoints(argv, message, tmp_path, capsys):
    rc = run_convert(fixture_path("s"), tmp_path / "out", "--prefix", "sd.", *argv)
    if message is None:
        assert rc == 0
        return
    assert rc == 2
    assert message in capsys.readouterr().err


def test_converter_refuses_encoder_checkpoint_as_segmenter(tmp_path, capsys):
    assert run_convert(fixture_path("t"), tmp_path / "out", "--prefix", "sd.encoder.", "--variant", "t") == 2
    assert "--encoder" in capsys.readouterr().err


def test_converter_refuses_pickled_objects(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "bad.pth")
    assert run_convert(tmp_path / "bad.pth", tmp_path / "out", "--variant", "t") == 2
    assert "weights_only=True" in capsys.readouterr().err


def test_converter_keeps_existing_folders(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    assert run_convert(fixture_path("t"), tmp_path / "out", "--prefix", "sd.") == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_encoder_conversion_is_a_timm_folder_matching_authors_stages(fixture_file, tmp_path):
    """--encoder writes model.safetensors + timm config.json; timm loads it and reproduces the authors'
    stem and stage outputs (fixture ``enc.stage0..4``)."""
    import timm

    data = fixture_file("t")
    dst = tmp_path / "enc"
    assert run_convert(fixture_path("t"), dst, "--prefix", "sd.encoder.", "--encoder") == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["architecture"] == "rwkvunet_enc_t" and config["num_classes"] == 1000
    assert {"num_features", "pretrained_cfg"} <= set(config)
    model = timm.create_model(f"local-dir:{dst}", pretrained=True).eval()
    with torch.no_grad():
        stages = model.forward_intermediates(data["input"].float(), indices=[0, 1, 2, 3, 4], intermediates_only=True)
    for i, out in enumerate(stages):
        assert relative_error(out, data[f"enc.stage{i}"]) < 1e-4, f"stage {i}"
