"""Saved weights and exported graphs are readable by whoever may read the files beside them.

safetensors >= 0.8 writes through a temporary file created 0600 (safetensors issue #782) and tempfile.mkstemp does
the same, so model.safetensors and exported .onnx files were readable by their owner only, while config.json
beside them followed the umask: another user, or a container running as one, could not load the model.
"""
from __future__ import annotations

import os
import stat

import pytest
import torch

from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation
from rwkvunet.file_modes import default_file_mode, give_default_mode

pytestmark = pytest.mark.skipif(os.name != "posix", reason="permission bits are POSIX")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)  # a group-shared server: group may read, others not
    yield
    os.umask(old)


def test_default_mode_follows_the_umask(umask_027):
    assert default_file_mode() == 0o640


def test_save_pretrained_weights_have_the_mode_of_config_json(tmp_path, umask_027):
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="t", num_labels=2))
    model.save_pretrained(tmp_path)
    assert _mode(tmp_path / "config.json") == 0o640
    assert _mode(tmp_path / "model.safetensors") == 0o640


def test_only_owner_only_files_are_changed(tmp_path, umask_027):
    private, chosen = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path, mode in ((private, 0o600), (chosen, 0o604)):
        path.write_bytes(b"x")
        path.chmod(mode)
    give_default_mode([tmp_path])
    assert _mode(private) == 0o640 and _mode(chosen) == 0o604  # a mode somebody chose is kept


def test_an_exported_graph_has_the_default_mode(tmp_path, umask_027):
    pytest.importorskip("onnxruntime")
    from rwkvunet.onnx_export import _write_atomically

    _write_atomically(tmp_path / "m.onnx", b"graph", overwrite=False)
    assert _mode(tmp_path / "m.onnx") == 0o640


def test_checkpoints_have_the_default_mode(tmp_path, umask_027):
    from accelerate import Accelerator

    from rwkvunet.training.checkpoints import CheckpointManager

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    saved = CheckpointManager(tmp_path / "checkpoints").save(accelerator, 1)
    modes = {p.name: _mode(p) for p in saved.iterdir() if p.is_file()}
    assert modes and set(modes.values()) == {0o640}, modes
