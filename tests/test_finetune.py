"""The fine-tuning script end to end on tiny synthetic runs: outputs, reloading, exact resume."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

# a few seconds per run (one thread: shared CPUs): 12 x 32 x 32 images, batch 4, RWKV-UNet-T
TINY = ["--img-size", "32", "--batch-size", "4", "--synthetic-size", "32", "--synthetic-train", "12",
        "--synthetic-eval", "3", "--overlay-samples", "2", "--log-every", "1", "--num-threads", "1"]


@pytest.fixture(scope="module")
def finetune():
    spec = importlib.util.spec_from_file_location("finetune_script", REPO / "training" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def short_run(finetune, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert finetune.main(TINY + ["--max-steps", "2", "--output-dir", str(out)]) == 0
    return out


def test_default_run_outputs(short_run):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "metrics.json",
                 "test_per_class.csv", "test_per_case.csv", "curves.png", "overlays.png", "training_config.yaml"):
        assert (short_run / name).is_file(), name
    metrics = json.loads((short_run / "metrics.json").read_text())
    assert metrics["steps"] == 2
    test = metrics["test"]
    assert test["num_cases"] == 3
    # the per-case CSV holds each test case once, and its class means are the JSON's
    rows = _read_csv(short_run / "test_per_case.csv")
    assert sorted(r["case_id"] for r in rows) == ["test_0000", "test_0001", "test_0002"]
    for k, name in enumerate(["ellipse", "rectangle", "triangle"]):
        mean = sum(float(r[f"dice_{name}"]) for r in rows) / len(rows)
        assert mean == pytest.approx(test["per_class"][k]["dice"], abs=1e-4)
    card = (short_run / "README.md").read_text()
    assert f"{test['mean_dice']:.4f}" in card and "library_name: transformers" in card
    # the checkpoint folder is complete (no temporary leftovers) and at most --keep-checkpoints are kept
    names = sorted(p.name for p in (short_run / "checkpoints").iterdir())
    assert names == ["checkpoint-00000002"]
    assert not (short_run / "best-model").exists()


def test_output_reloads_with_auto_classes(short_run):
    import rwkvunet  # noqa: F401
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(short_run).eval()
    processor = AutoImageProcessor.from_pretrained(short_run)
    assert model.config.num_labels == 4 and model.config.in_channels == 1
    assert model.config.id2label[3] == "triangle"
    saved = load_file(str(short_run / "model.safetensors"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    from rwkvunet.data.synthetic import make_synthetic_image

    image, _ = make_synthetic_image(0, size=40)
    inputs = processor(image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 1, 32, 32)
    assert float(inputs["pixel_values"].max()) <= 1.0  # 8-bit input scaled to [0, 1] as in training
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 4, 32, 32) and torch.isfinite(logits).all()


def test_finetune_a_saved_segmenter(finetune, short_run, tmp_path):
    """--pretrained starts from a saved folder: with lr 0 one step changes nothing but BatchNorm statistics."""
    out = tmp_path / "again"
    assert finetune.main(TINY + ["--max-steps", "1", "--pretrained", str(short_run), "--lr", "0", "--min-lr", "0",
                                 "--output-dir", str(out), "--eval-every", "0", "--overlay-samples", "0"]) == 0
    before, after = load_file(str(short_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key, value in before.items():
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(value, after[key]), key


def test_resume_after_crash_is_bit_identical(finetune, tmp_path):
    """Steps 1-6 over two epochs of 3 steps, checkpoints every 2 steps and at epoch ends; the crash after step 5
    resumes from step 4, in the middle of epoch 1 (one batch of it consumed)."""
    common = TINY + ["--max-steps", "6", "--save-every-steps", "2", "--keep-checkpoints", "3",
                     "--overlay-samples", "0"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert finetune.main(common + ["--output-dir", str(straight)]) == 0
    with pytest.raises(finetune.SimulatedCrash):
        finetune.train(common + ["--output-dir", str(broken), "--crash-at-step", "5"])
    assert sorted(p.name for p in (broken / "checkpoints").iterdir())[-1] == "checkpoint-00000004"
    assert finetune.main(common + ["--output-dir", str(broken), "--resume"]) == 0

    # the weights after the last step (the final checkpoint) and the saved best model are bit-identical
    last = Path("checkpoints") / "checkpoint-00000006" / "model.safetensors"
    for name in (last, Path("model.safetensors")):
        a, b = load_file(str(straight / name)), load_file(str(broken / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # the same losses and learning rates step by step, and the same scores
    assert (straight / "train_log.csv").read_text() == (broken / "train_log.csv").read_text()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, broken))
    assert ma["test"] == mb["test"] and ma["validation_history"] == mb["validation_history"]
    # the last optimizer states match too (the resumed run's final checkpoint)
    oa = torch.load(straight / "checkpoints" / "checkpoint-00000006" / "optimizer.bin", weights_only=True)
    ob = torch.load(broken / "checkpoints" / "checkpoint-00000006" / "optimizer.bin", weights_only=True)
    for k, state in oa["state"].items():
        for name, value in state.items():
            assert torch.equal(value, ob["state"][k][name]), (k, name)


def test_resume_without_checkpoint_is_a_clear_error(finetune, tmp_path):
    from rwkvunet.errors import UserError

    with pytest.raises(UserError, match="nothing to resume"):
        finetune.train(TINY + ["--max-steps", "1", "--output-dir", str(tmp_path), "--resume"])


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """A real kill (SIGKILL at whatever moment follows the third checkpoint, possibly mid-save), then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [sys.executable, str(REPO / "training" / "finetune.py")] + TINY + [
        "--max-steps", "8", "--save-every-steps", "1", "--keep-checkpoints", "2", "--overlay-samples", "0"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(common + ["--output-dir", str(straight)], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(common + ["--output-dir", str(broken)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "checkpoint-00000003").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (broken / "metrics.json").exists()
    subprocess.run(common + ["--output-dir", str(broken), "--resume"], env=env, check=True, capture_output=True)
    last = Path("checkpoints") / "checkpoint-00000008" / "model.safetensors"
    for name in (last, Path("model.safetensors")):
        a, b = load_file(str(straight / name)), load_file(str(broken / name))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert (straight / "train_log.csv").read_text() == (broken / "train_log.csv").read_text()


def test_missing_tracker_is_a_clear_error(finetune):
    with pytest.raises(ValueError, match="not installed"):
        finetune.check_trackers("no-such-tracker")
    assert finetune.check_trackers(None) is None
