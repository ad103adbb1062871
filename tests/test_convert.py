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
                               "--num-labels", labels, "--in-channels", channels, "--overwrite", *extra) == 0
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


# --- one-line errors, nothing written, nothing replaced ----------------------------------------------------------
@pytest.fixture
def checkpoint_t(tmp_path):
    """The authors' RWKV-UNet-T segmenter state_dict (3 channels, 2 classes) as a plain .safetensors file."""
    state = {k[len("sd."):]: v for k, v in load_file(str(fixture_path("t"))).items() if k.startswith("sd.")}
    path = tmp_path / "seg_t.safetensors"
    save_file(state, path)
    return path


def _one_error_line(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("rwkvunet convert: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


def _save(path, state):
    save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("keep, fragment", [(0.0, "is empty (0 bytes)"), (0.5, "truncated or damaged")])
def test_converter_empty_or_truncated_checkpoint(checkpoint_t, tmp_path, capsys, suffix, keep, fragment):
    src = _save(tmp_path / f"ckpt{suffix}", load_file(str(checkpoint_t)))
    data = src.read_bytes()
    src.write_bytes(data[: int(len(data) * keep)])
    assert run_convert(src, tmp_path / "out", "--variant", "t") == 2
    _one_error_line(capsys, str(src), fragment, "again")
    assert not (tmp_path / "out").exists()


def test_converter_wrong_shapes(checkpoint_t, tmp_path, capsys):
    state = load_file(str(checkpoint_t))
    key = next(k for k in sorted(state) if k.startswith("decoder1.") and k.endswith("conv.weight"))
    state[key] = torch.zeros(*(n + 1 for n in state[key].shape))
    src = _save(tmp_path / "bad.safetensors", state)
    assert run_convert(src, tmp_path / "out", "--variant", "t") == 2
    _one_error_line(capsys, "does not fit RWKV-UNet-T", "1 tensor(s) differ in shape", "in the checkpoint")
    assert not (tmp_path / "out").exists()


def test_converter_grey_segmenter_given_encoder(tmp_path, capsys):
    """A 1-channel segmenter (this package's keys) cannot become an RGB timm encoder: say so."""
    from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation

    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=2, in_channels=1))
    src = _save(tmp_path / "grey.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    assert run_convert(src, tmp_path / "enc", "--encoder") == 2
    _one_error_line(capsys, "takes 1-channel images but timm encoders take RGB", "without --encoder")
    assert not (tmp_path / "enc").exists()


@pytest.mark.parametrize("dst, fragment", [("notes.txt", "is a file"), ("notes.txt/out", "cannot be created")])
def test_converter_dst_a_file(checkpoint_t, tmp_path, capsys, dst, fragment):
    (tmp_path / "notes.txt").write_text("keep me")
    assert run_convert(checkpoint_t, tmp_path / dst, "--variant", "t") == 2
    _one_error_line(capsys, f"DST {tmp_path / dst}", fragment)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_converter_in_channels_message_names_each_choice_once(checkpoint_t, tmp_path, capsys):
    state = load_file(str(checkpoint_t))
    key = "encoder.stage0.0.conv.conv.weight"
    state[key] = state[key].sum(1, keepdim=True)  # a grey checkpoint
    src = _save(tmp_path / "grey.safetensors", state)
    assert run_convert(src, tmp_path / "out", "--in-channels", "3") == 2
    line = _one_error_line(capsys, "takes 1 channel(s), the model 3", "convert with --in-channels 1")
    assert "1 or 1" not in line


def test_converter_id2label_count_names_id2label(checkpoint_t, tmp_path, capsys):
    assert run_convert(checkpoint_t, tmp_path / "out", "--id2label", "a,b,c") == 2
    line = _one_error_line(capsys, "predicts 2 classes, not the 3 of --id2label", "give 2 names to --id2label")
    assert "--num-labels" not in line
    assert run_convert(checkpoint_t, tmp_path / "out", "--id2label", "a,b,c", "--num-labels", "2") == 2
    _one_error_line(capsys, "--id2label names 3 classes but --num-labels gives 2")
    assert not (tmp_path / "out").exists()


def test_converter_names_a_prefix_that_hides_the_weights(checkpoint_t, tmp_path, capsys):
    """A checkpoint saved under a framework's own prefix (DataParallel's module. is taken off already) read as no
    variant at all, with no word about --prefix."""
    state = {f"net.{k}": v for k, v in load_file(str(checkpoint_t)).items()}
    state["epoch"] = torch.tensor(3)  # a stray entry beside them
    src = _save(tmp_path / "wrapped.safetensors", state)
    assert run_convert(src, tmp_path / "out") == 2
    _one_error_line(capsys, "does not look like an RWKV-UNet checkpoint", f"{len(state) - 1} of its {len(state)} "
                    "keys start with 'net.', pass --prefix net.")
    assert run_convert(src, tmp_path / "out", "--prefix", "net.") == 0


@pytest.mark.parametrize("argv, words", [
    (["--id2label", "background,organ,organ"], "names 'organ' more than one class"),  # legends showed two alike
    (["--private"], "--private creates the Hub repo of --publish as private, and nothing is published"),  # ignored
])
def test_converter_refuses_options_that_would_mislead(checkpoint_t, tmp_path, capsys, argv, words):
    assert run_convert(checkpoint_t, tmp_path / "out", *argv) == 2
    _one_error_line(capsys, words)
    assert not (tmp_path / "out").exists()


def test_converter_overwrite_keeps_what_it_did_not_write(checkpoint_t, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    (dst / "model-00001-of-00002.safetensors").write_bytes(b"someone's shard")  # save_pretrained deletes these
    (dst / "config.json").write_text("{}")
    assert run_convert(checkpoint_t, dst) == 2
    _one_error_line(capsys, "is not empty", "--overwrite")
    assert (dst / "config.json").read_text() == "{}"

    assert run_convert(checkpoint_t, dst, "--overwrite") == 0
    assert (dst / "notes.txt").read_text() == "keep me"
    assert (dst / "model-00001-of-00002.safetensors").read_bytes() == b"someone's shard"
    assert json.loads((dst / "config.json").read_text())["variant"] == "t"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_converter_never_replaces_its_input(checkpoint_t, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    src = dst / "model.safetensors"
    src.write_bytes(checkpoint_t.read_bytes())
    before = src.read_bytes()
    assert run_convert(src, dst, "--overwrite") == 2
    _one_error_line(capsys, "would replace its own input", "give another DST")
    assert src.read_bytes() == before and sorted(p.name for p in dst.iterdir()) == ["model.safetensors"]


def test_converter_failure_after_saving_leaves_no_folder(checkpoint_t, tmp_path, capsys):
    """A processor that does not fit the model is found after the weights are saved: DST must not be left
    half-written."""
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"variant": "t", "in_channels": 3}))
    (hub / "preprocessor_config.json").write_text(json.dumps({"num_channels": 1}))
    assert run_convert(checkpoint_t, tmp_path / "out", "--hub-config", hub) == 2
    _one_error_line(capsys, "the image processor gives 1 channels but the model takes 3")
    assert not (tmp_path / "out").exists()


def test_converter_written_but_not_published_is_partial(checkpoint_t, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert run_convert(checkpoint_t, tmp_path / "out", "--publish", "someone/model") == 1
    err = capsys.readouterr().err
    assert "was written but not uploaded to someone/model" in err and "Traceback" not in err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_publish_to_an_id_the_hub_refuses_is_said_before_converting(checkpoint_t, tmp_path, capsys):
    assert run_convert(checkpoint_t, tmp_path / "out", "--publish", "my model") == 2
    _one_error_line(capsys, "--publish: 'my model' is not a valid Hub repo id")
    assert not (tmp_path / "out").exists()


def test_image_size_below_one_encoder_step_is_a_usage_error(tmp_path, capsys):
    # -5 was written into config.json and the image processor as given
    with pytest.raises(SystemExit) as done:
        run_convert(tmp_path / "any.safetensors", tmp_path / "out", "--image-size", "-5")
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --image-size: must be at least 16 pixels, got -5")
    assert not (tmp_path / "out").exists()
