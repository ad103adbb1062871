"""Encoder pretraining: two steps on a tiny ImageFolder, then the EMA export loads through timm's Hub path."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_script", REPO / "training" / "pretrain_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image_folder(root: Path, split: str, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def test_recipe_matches_the_paper():
    recipe = yaml.safe_load((REPO / "training" / "pretrain_imagenet.yaml").read_text())
    assert recipe["device_modules"] == ["rwkvunet"]
    expected = dict(opt="adamw", weight_decay=0.05, epochs=300, warmup_epochs=20, warmup_lr=5e-7, min_lr=5e-7,
                    aa="rand-m9-mstd0.5-inc1", color_jitter=0.4, train_interpolation="random", reprob=0.0,
                    mixup=0.0, cutmix=0.0, smoothing=0.1, model_ema_decay=0.9998, drop_path=0.05, amp=True)
    for key, value in expected.items():
        assert recipe[key] == value, key


def test_two_steps_then_export_loads_with_timm(pretrain, tmp_path):
    import timm

    import rwkvunet  # noqa: F401

    _image_folder(tmp_path / "data", "train", 4)
    _image_folder(tmp_path / "data", "val", 2)
    out = tmp_path / "run"
    argv = ["--config", str(REPO / "training" / "pretrain_imagenet.yaml"), "--data-dir", str(tmp_path / "data"),
            "--model", "rwkvunet_enc_t", "--num-classes", "2", "--img-size", "32", "--batch-size", "4", "--max-steps",
            "2", "--workers", "0", "--output", str(out), "--no-amp", "--model-ema-decay", "0.5", "--num-threads", "1"]
    assert pretrain.main(argv) == 0
    export = out / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "rwkvunet_enc_t" and config["num_classes"] == 2
    model = timm.create_model("rwkvunet_enc_t", pretrained=True, num_classes=2,
                              pretrained_cfg_overlay=dict(file=str(export / "model.safetensors"), num_classes=2))
    # the exported weights are the EMA's: checkpointed EMA state equals the loaded model's
    from safetensors.torch import load_file

    exported = load_file(str(export / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, exported[key]), key
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    ema_state = torch.load(ckpt / "custom_checkpoint_2.pkl", weights_only=True)
    for key, value in ema_state.items():
        name = key.removeprefix("module.")
        assert torch.equal(value, exported[name]), key
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()

    record = json.loads((out / pretrain.RUN_FILE).read_text())
    assert record["status"] == "finished" and record["steps"] == 2

    # the same command again would have replaced checkpoint-00000002 and the export with a new run's
    from rwkvunet.errors import UserError

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(UserError, match="holds an earlier pretraining.*pass --resume"):
        pretrain.main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_export_starts_a_segmenter(pretrain, tmp_path):
    """The exported folder is what ``finetune.py --encoder-pretrained`` takes: the segmenter's encoder carries it."""
    import timm

    from rwkvunet.training.arguments import parse_arguments
    from rwkvunet.training.inputs import build_model

    encoder = timm.create_model("rwkvunet_enc_t", num_classes=2)
    folder = pretrain.export_for_hub(encoder, tmp_path / "export", "rwkvunet_enc_t")
    args = parse_arguments(["--variant", "t", "--encoder-pretrained", str(folder)])
    model = build_model(args, num_labels=3, in_channels=3, names=["background", "a", "b"])
    reference = encoder.state_dict()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert model.config.num_labels == 3 and model.config.id2label[2] == "b"


@pytest.mark.parametrize("option, value, words", [
    ("--epochs", "0", "--epochs must be at least 1, got 0"),  # timm's scheduler asserted
    ("--lr", "-1", "--lr must be at least 0"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--num-classes", "1", "--num-classes must be at least 2"),
    ("--seed", "-1", "--seed must be from 0 to 4294967295"),
    ("--workers", "-1", "--workers must be at least 0"),
    ("--smoothing", "1", "--smoothing must be from 0 to 0.999"),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--model", "rwkvunet_enc_x", "did you mean rwkvunet_enc_t?"),
    ("--opt", "adamx", "not a timm optimizer (did you mean adamax?)"),
    ("--sched", "cosin", "--sched must be one of cosine"),
    ("--min-lr", "0.1", "--min-lr 0.1 is above --lr 0.003"),  # the cosine schedule rose to it
])
def test_mistakes_are_one_line_errors_before_anything_runs(pretrain, tmp_path, option, value, words):
    """Each of these was a traceback from timm or PyTorch, reported as a bug in rwkvunet."""
    from rwkvunet.errors import UserError

    _image_folder(tmp_path / "data", "train", 1)
    with pytest.raises(UserError) as info:
        pretrain.main(["--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "run"), option, value])
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_data_and_output_mistakes(pretrain, tmp_path):
    from rwkvunet.errors import UserError

    (tmp_path / "data" / "train" / "only").mkdir(parents=True)
    with pytest.raises(UserError, match="holds 1 class folder"):
        pretrain.main(["--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "run")])
    _image_folder(tmp_path / "data2", "train", 1)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="--output .* is a file"):
        pretrain.main(["--data-dir", str(tmp_path / "data2"), "--output", str(tmp_path / "file")])
    with pytest.raises(UserError, match="no checkpoint in .* to resume from"):
        pretrain.main(["--data-dir", str(tmp_path / "data2"), "--output", str(tmp_path / "new"), "--resume",
                       "--img-size", "32", "--batch-size", "2", "--num-threads", "1", "--workers", "0"])


def test_an_output_a_live_pretraining_writes_is_refused(pretrain, tmp_path):
    """Two pretrainings into one --output both wrote its checkpoints; a live one (even --resume) is refused, a
    killed one is not in the way."""
    import socket
    import subprocess
    import sys

    from rwkvunet.errors import UserError

    _image_folder(tmp_path / "data", "train", 1)
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "pretrain_imagenet.py"])
    try:
        record = dict(status="running", host=socket.gethostname(), pid=live.pid)
        (out / pretrain.RUN_FILE).write_text(json.dumps(record))
        for extra in ([], ["--resume"]):
            with pytest.raises(UserError, match=f"still running \\(process {live.pid} on this machine\\)"):
                pretrain.main(["--data-dir", str(tmp_path / "data"), "--output", str(out), *extra])
    finally:
        live.kill()
        live.wait()
    pretrain.check_output(out, resume=None)  # the process is gone: nothing in the way


def test_a_recipe_that_repeats_a_key_is_one_line(pretrain, tmp_path):
    """YAML kept the last of two `lr:` lines silently."""
    from rwkvunet.errors import UserError

    _image_folder(tmp_path / "data", "train", 1)
    (tmp_path / "recipe.yaml").write_text("lr: 0.001\nepochs: 2\nlr: 0.002\n")
    with pytest.raises(UserError, match="'lr' is given twice \\(lines 1 and 3\\)"):
        pretrain.main(["--config", str(tmp_path / "recipe.yaml"), "--data-dir", str(tmp_path / "data"),
                       "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
