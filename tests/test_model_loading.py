"""Loading segmenters and weights files: every file a user can get wrong is a one-line UserError naming it.

A small RWKV-UNet-T is saved once; each test copies the folder and breaks one thing in it.
"""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import rwkvunet  # noqa: F401  (registers the Auto classes)
from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation
from rwkvunet.errors import UserError
from rwkvunet.hub import check_safetensors, load_segmentation_model, load_weights_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=3, in_channels=1)).eval()
    path = tmp_path_factory.mktemp("good")
    model.save_pretrained(path)
    return path


@pytest.fixture
def copy(saved, tmp_path):
    """A fresh copy of the saved folder to break."""
    dst = tmp_path / "model"
    shutil.copytree(saved, dst)
    return dst


def _one_line_error(call, *fragments) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _to_bin(folder) -> None:
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


# --- folders that load ---------------------------------------------------------------------------------------
def test_loads_a_saved_folder_with_its_weights(saved):
    model = load_segmentation_model(saved)
    want = load_file(str(saved / "model.safetensors"))
    got = model.state_dict()
    assert isinstance(model, RWKVUNetForSemanticSegmentation) and model.config.num_labels == 3
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_loads_pytorch_model_bin(copy):
    _to_bin(copy)
    assert load_segmentation_model(copy).config.num_labels == 3


def test_a_new_head_is_allowed_when_asked(saved):
    model = load_segmentation_model(saved, num_labels=5, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 5 and model.segmentation_head.weight.shape[0] == 5


# --- paths and configs ---------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    _one_line_error(lambda: load_segmentation_model(tmp_path / "typo"), "typo does not exist",
                    "not a Hub id", "check the path")


def test_hub_id_not_found_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(lambda: load_segmentation_model("rwkv-unet/no-such-model", cache_dir=str(tmp_path)),
                    "rwkv-unet/no-such-model", "Hub id", "check the path or the id")


def test_a_file_instead_of_the_folder(saved):
    _one_line_error(lambda: load_segmentation_model(saved / "model.safetensors"), "is a file",
                    "give the model folder")


def test_folder_without_config(copy):
    (copy / "config.json").unlink()
    _one_line_error(lambda: load_segmentation_model(copy), "has no config.json", "save_pretrained")


def test_config_that_is_not_json(copy):
    (copy / "config.json").write_text("{not json")
    _one_line_error(lambda: load_segmentation_model(copy), "config.json", "save the model again")


@pytest.mark.parametrize("model_type", ["segformer", "no_such_type"])
def test_config_of_another_model_type(copy, model_type):
    _edit_config(copy, model_type=model_type)
    _one_line_error(lambda: load_segmentation_model(copy), f"holds a '{model_type}' model", "not RWKV-UNet")


# --- weights -------------------------------------------------------------------------------------------------
def test_folder_without_weights(copy):
    (copy / "model.safetensors").unlink()
    _one_line_error(lambda: load_segmentation_model(copy), "no weights", "model.safetensors or pytorch_model.bin")


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999, 4 / 1e6])
def test_empty_or_truncated_safetensors(copy, keep):
    _truncate(copy / "model.safetensors", keep)
    _one_line_error(lambda: load_segmentation_model(copy), str(copy / "model.safetensors"),
                    "empty" if keep == 0 else "not a complete safetensors file", "again")


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_empty_or_truncated_pytorch_model_bin(copy, keep):
    _to_bin(copy)
    _truncate(copy / "pytorch_model.bin", keep)
    _one_line_error(lambda: load_segmentation_model(copy), str(copy / "pytorch_model.bin"),
                    "empty" if keep == 0 else "not a readable PyTorch weights file")


def test_weights_of_another_head_size(copy):
    _edit_config(copy, num_labels=5, id2label={str(i): f"c{i}" for i in range(5)},
                 label2id={f"c{i}": i for i in range(5)})
    _one_line_error(lambda: load_segmentation_model(copy), "do not fit its config.json",
                    "segmentation_head.bias: (3,) in the weights, (5,) in the model")


def test_weights_missing_tensors(copy):
    state = load_file(str(copy / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("decoder.")}, copy / "model.safetensors",
              metadata={"format": "pt"})
    _one_line_error(lambda: load_segmentation_model(copy), "lack", "decoder.", "random values")


def test_weights_with_foreign_tensors(copy):
    state = load_file(str(copy / "model.safetensors"))
    state["extra.weight"] = torch.zeros(2)
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(lambda: load_segmentation_model(copy), "extra.weight", "does not have")


def test_truncated_weights_of_a_cached_hub_id(saved, tmp_path, monkeypatch):
    """A Hub id whose cached snapshot holds a truncated file names that file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "models--rwkv-unet--broken"
    snapshot = root / "snapshots" / commit
    shutil.copytree(saved, snapshot)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    _truncate(snapshot / "model.safetensors")
    _one_line_error(lambda: load_segmentation_model("rwkv-unet/broken", cache_dir=str(tmp_path),
                                                    local_files_only=True),
                    "model.safetensors", "not a complete safetensors file")


# --- single weights files ------------------------------------------------------------------------------------
def test_weights_file_roundtrip(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"model": state}, tmp_path / "w.pth")
    assert torch.equal(load_weights_file(tmp_path / "w.safetensors")["w"], state["w"])
    assert torch.equal(load_weights_file(tmp_path / "w.pth")["model"]["w"], state["w"])
    check_safetensors(tmp_path / "w.safetensors")


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth", "w.pt", "w.bin"])
@pytest.mark.parametrize("keep, fragment", [(0.0, "is empty (0 bytes)"), (0.5, "truncated or damaged"),
                                            (0.02, "truncated or damaged")])
def test_weights_file_empty_or_truncated(tmp_path, name, keep, fragment):
    path = tmp_path / name
    state = {"w": torch.randn(64, 64)}
    save_file(state, path) if name.endswith(".safetensors") else torch.save(state, path)
    _truncate(path, keep)
    _one_line_error(lambda: load_weights_file(path), str(path), fragment)


def test_weights_file_garbage_and_legacy_format(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"hello, not a checkpoint at all")
    _one_line_error(lambda: load_weights_file(tmp_path / "junk.pth"), "junk.pth", "not a readable PyTorch")
    torch.save({"w": torch.zeros(100)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    _truncate(tmp_path / "old.pth", 0.9)
    _one_line_error(lambda: load_weights_file(tmp_path / "old.pth"), "old.pth", "truncated or damaged")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    _one_line_error(lambda: load_weights_file(tmp_path / "junk.safetensors"), "junk.safetensors",
                    "not a complete safetensors file")


def test_weights_file_that_is_an_image(tmp_path):
    """An image given as the checkpoint was said to hold "pickled objects other than tensors ()"."""
    from PIL import Image

    Image.new("L", (4, 4)).save(tmp_path / "scan.png")
    _one_line_error(lambda: load_weights_file(tmp_path / "scan.png"), "scan.png is not a PyTorch weights file",
                    "Unsupported operand", "not a pickle")


def test_weights_file_with_pickled_code(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "code.pth")
    _one_line_error(lambda: load_weights_file(tmp_path / "code.pth"), "code.pth", "argparse.Namespace",
                    "weights_only=True", "state_dict")


def test_weights_file_missing_or_a_folder(tmp_path):
    _one_line_error(lambda: load_weights_file(tmp_path / "nope.pth"), "nope.pth: no such file")
    (tmp_path / "dir.safetensors").mkdir()
    _one_line_error(lambda: load_weights_file(tmp_path / "dir.safetensors"), "is a folder")


def test_remote_code_folder_and_subfolder(saved, tmp_path):
    """Arguments for the files (subfolder) and for the model (trust_remote_code, dtype) pass through."""
    shutil.copytree(saved, tmp_path / "repo" / "seg")
    model = load_segmentation_model(tmp_path / "repo", subfolder="seg", trust_remote_code=True, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    (tmp_path / "repo" / "seg" / "model.safetensors").write_bytes(b"")
    _one_line_error(lambda: load_segmentation_model(tmp_path / "repo", subfolder="seg"), "seg/model.safetensors",
                    "is empty")


def test_a_mistyped_model_folder_gets_a_did_you_mean(saved, tmp_path, monkeypatch):
    """runs/rwkvunet-t-synthtic (one letter off a local run folder) was sent to the Hub and reported as "no local
    folder and cannot be loaded as a Hub id"; now it names the folder, without asking the Hub."""
    import transformers

    monkeypatch.chdir(tmp_path)
    shutil.copytree(saved, tmp_path / "runs" / "rwkvunet-t-synthetic")
    monkeypatch.setattr(transformers.PretrainedConfig, "get_config_dict",
                        lambda *a, **k: pytest.fail("the Hub was asked"))
    _one_line_error(lambda: load_segmentation_model("runs/rwkvunet-t-synthtic"),
                    "runs/rwkvunet-t-synthtic does not exist (did you mean runs/rwkvunet-t-synthetic?)")
    _one_line_error(lambda: load_segmentation_model("./runs/rwkvunet-t-synthtic"), "did you mean")


def test_an_onnx_file_given_as_a_model_folder(tmp_path):
    """`rwkvunet evaluate model.onnx` said "model.onnx/ is a file" (with a stray slash)."""
    (tmp_path / "model.onnx").write_bytes(b"graph")
    _one_line_error(lambda: load_segmentation_model(tmp_path / "model.onnx"), "model.onnx is an exported ONNX model",
                    "give the model folder it was exported from")
    (tmp_path / "weights.bin").write_bytes(b"x")
    message = _one_line_error(lambda: load_segmentation_model(tmp_path / "weights.bin"), "weights.bin is a file")
    assert "weights.bin/" not in message
