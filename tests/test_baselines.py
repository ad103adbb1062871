"""The smp U-Net reference goes through the fine-tuning loop exactly as RWKV-UNet does: same loss, same outputs,
a folder that the evaluation script and the loader read."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("segmentation_models_pytorch")

from rwkvunet.models.baselines import SMPUNetForSemanticSegmentation, build_baseline  # noqa: E402
from rwkvunet.models.rwkv_unet import RWKVUNetConfig  # noqa: E402
from rwkvunet.models.rwkv_unet.modeling_rwkv_unet import segmentation_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["--img-size", "32", "--batch-size", "4", "--synthetic-size", "32", "--synthetic-train", "8",
        "--synthetic-eval", "3", "--overlay-samples", "2", "--log-every", "1", "--num-threads", "1"]


@pytest.fixture(scope="module")
def finetune():
    spec = importlib.util.spec_from_file_location("finetune_script_baseline", REPO / "training" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # train in this process as it is: the script's own process would keep freed CPU memory for reuse, which
    # changes the allocator for every later test
    module._own_process_and_train = module.train
    return module


def test_loss_is_the_rwkvunet_loss():
    """Same inputs, same labels: the baseline's loss is segmentation_loss of its logits with the same weights."""
    torch.manual_seed(0)
    model = build_baseline("smp-unet-r34", num_labels=3, in_channels=1, ce_weight=0.3, dice_weight=0.7).eval()
    x = torch.rand(2, 1, 40, 36)  # not a multiple of 32: padded and cropped back
    labels = torch.randint(0, 3, (2, 40, 36))
    out = model(pixel_values=x, labels=labels)
    assert out.logits.shape == (2, 3, 40, 36)
    reference = segmentation_loss(out.logits, labels, RWKVUNetConfig(variant="t", num_labels=3, ce_weight=0.3,
                                                                      dice_weight=0.7))
    torch.testing.assert_close(out.loss, reference)


def test_baseline_runs_end_to_end(finetune, tmp_path):
    out = tmp_path / "run"
    assert finetune.main(TINY + ["--model", "smp-unet-r34", "--max-steps", "2", "--output-dir", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "metrics.json", "README.md",
                 "test_per_case.csv", "curves.png", "overlays.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["test"]["num_cases"] == 3
    assert json.loads((out / "config.json").read_text())["model_type"] == "rwkvunet_smp_unet"
    # the saved folder loads back to the same weights through the package's loader
    from rwkvunet.hub import load_segmentation_model

    model = load_segmentation_model(out)
    assert isinstance(model, SMPUNetForSemanticSegmentation)
    saved = load_file(str(out / "model.safetensors"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
    # and the evaluation script scores it as training did (the same synthetic split, saved to disk)
    from rwkvunet.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(seed=0, size=32, num_train=8, num_validation=3, num_test=3).save_to_disk(tmp_path / "ds")
    spec = importlib.util.spec_from_file_location("evaluate_script_baseline", REPO / "training" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    assert evaluate.run(evaluate.parse_args([str(out), "--dataset", str(tmp_path / "ds"), "--split", "test",
                                             "--no-progress", "--output-dir", str(tmp_path / "eval")])) == 0
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["mean_dice"] == pytest.approx(metrics["test"]["mean_dice"], abs=1e-6)


def test_missing_smp_is_one_line(finetune, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # import fails
    assert finetune.main(TINY + ["--model", "smp-unet-r34", "--max-steps", "1", "--output-dir",
                                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "rwkvunet[baselines]"' in err[0], err


def test_baseline_refuses_pretrained_weights(finetune, tmp_path, capsys):
    assert finetune.main(["--model", "smp-unet-r34", "--pretrained", str(tmp_path), "--output-dir",
                          str(tmp_path / "x")]) == 2
    assert "--model smp-unet-r34" in capsys.readouterr().err


def test_decoder_lr_scale_splits_the_smp_unet_at_its_encoder():
    from rwkvunet.training.optim import build_optimizer

    model = build_baseline("smp-unet-r34", num_labels=1, in_channels=3)
    optimizer = build_optimizer(model, 1e-3, 1e-4, rwkv_lr_scale=5.0, decoder_lr_scale=2.0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    encoder = {id(p) for p in model.unet.encoder.parameters()}
    assert len(lr_of) == len(list(model.parameters())) and encoder
    for p in model.parameters():  # no RWKV mixes here: the encoder at the base lr, decoder and head doubled
        assert lr_of[id(p)] == pytest.approx(1e-3 if id(p) in encoder else 2e-3)
