"""The fine-tuning script end to end on tiny synthetic runs: outputs, reloading, exact resume."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rwkvunet.training.arguments import DEFAULT_LR

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


@pytest.mark.parametrize("ema", [None, "0.9"], ids=["raw", "ema"])
def test_resume_after_crash_is_bit_identical(finetune, tmp_path, ema):
    """Steps 1-6 over two epochs of 3 steps, checkpoints every 2 steps and at epoch ends; the crash after step 5
    resumes from step 4, in the middle of epoch 1 (one batch of it consumed). With a weight EMA, the average
    resumes too: the saved (averaged) model is bit-identical."""
    common = TINY + ["--max-steps", "6", "--save-every-steps", "2", "--keep-checkpoints", "3",
                     "--overlay-samples", "0"] + (["--ema-decay", ema] if ema else [])
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


def test_ema_model_is_the_moving_average_of_the_steps(finetune, tmp_path):
    """The saved model of an ``--ema-decay`` run without validation is the moving average of the weights after
    each step (from the step checkpoints), recomputed here in float64 with the warmed-up decay
    ``min(decay, 1 - (1 + i) ** -0.75)`` of the i-th update (0 at the first: it starts from step 1's weights)."""
    decay, steps = 0.6, 4
    assert finetune.main(TINY + ["--max-steps", str(steps), "--save-every-steps", "1", "--keep-checkpoints",
                                 str(steps), "--eval-every", "0", "--overlay-samples", "0", "--ema-decay",
                                 str(decay), "--output-dir", str(tmp_path)]) == 0
    raw = [load_file(str(tmp_path / "checkpoints" / f"checkpoint-{s:08d}" / "model.safetensors"))
           for s in range(1, steps + 1)]
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved.keys() == raw[-1].keys()
    floats = [k for k, v in saved.items() if v.is_floating_point()]
    expected = {k: raw[0][k].double() for k in floats}
    for i in range(1, steps):
        d = min(decay, 1 - (1 + i) ** -0.75)
        expected = {k: d * expected[k] + (1 - d) * raw[i][k].double() for k in floats}
    moved = 0
    for k in floats:
        torch.testing.assert_close(saved[k].double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.equal(saved[k], raw[-1][k])
    assert moved > len(floats) // 2  # the average is not simply the last weights
    for k in set(saved) - set(floats):  # integer buffers (BatchNorm's batch count) follow the model
        assert torch.equal(saved[k], raw[-1][k]), k


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


# --- one output folder, one run ---------------------------------------------------------------------------

def _contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(finetune, argv, capsys, *words) -> str:
    code = finetune.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("finetune.py: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_second_run_into_a_finished_run_is_refused(finetune, short_run, capsys):
    """The finished run's model, checkpoints and scores are left as they were."""
    before = _contents(short_run)
    _refused(finetune, TINY + ["--max-steps", "1", "--lr", "0.002", "--output-dir", str(short_run)], capsys,
             "already holds a finished run", "--overwrite-output-dir")
    assert _contents(short_run) == before


def _crashed_run(finetune, folder: Path, common: list) -> None:
    with pytest.raises(finetune.SimulatedCrash):
        finetune.train(common + ["--output-dir", str(folder), "--crash-at-step", "3"])


def test_resume_continues_only_its_own_run(finetune, tmp_path, capsys):
    common = TINY + ["--max-steps", "4", "--save-every-steps", "1", "--keep-checkpoints", "2", "--eval-every", "0",
                     "--overlay-samples", "0"]
    run = tmp_path / "run"
    _crashed_run(finetune, run, common)
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    before = _contents(run)
    # a new run into the killed one's folder would prune its checkpoints as the newest: refused
    _refused(finetune, common + ["--output-dir", str(run)], capsys, "unfinished run", "step 3", "--resume")
    # another run's checkpoint in the folder: resume would mix the two runs
    other = tmp_path / "other"
    _crashed_run(finetune, other, common)
    foreign = run / "checkpoints" / "checkpoint-00000009"
    shutil.copytree(other / "checkpoints" / "checkpoint-00000003", foreign)
    _refused(finetune, common + ["--output-dir", str(run), "--resume"], capsys, "another run", foreign.name)
    _refused(finetune, common + ["--output-dir", str(run), "--resume", str(other / "checkpoints" /
                                                                          "checkpoint-00000003")],
             capsys, "another run")
    shutil.rmtree(foreign)
    # other settings would make it another run
    _refused(finetune, common + ["--output-dir", str(run), "--resume", "--lr", "0.002"], capsys,
             "other settings", f"--lr {DEFAULT_LR['rwkvunet']} -> 0.002")  # the default lr it started at
    assert _contents(run) == before
    assert finetune.main(common + ["--output-dir", str(run), "--resume"]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["run_id"] == run_id and record["status"] == "finished"
    assert [r["from"] for r in record["resumed"]] == ["checkpoint-00000003"]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    for checkpoint in (run / "checkpoints").iterdir():
        assert json.loads((checkpoint / "run.json").read_text())["run_id"] == run_id


def test_overwrite_output_dir_removes_only_the_earlier_run(finetune, tmp_path, capsys):
    common = TINY + ["--save-every-steps", "1", "--keep-checkpoints", "5", "--eval-every", "0",
                     "--overlay-samples", "0"]
    run = tmp_path / "run"
    assert finetune.main(common + ["--max-steps", "3", "--output-dir", str(run)]) == 0
    first = json.loads((run / "run.json").read_text())["run_id"]
    (run / "notes.txt").write_text("mine")
    before = _contents(run)
    _refused(finetune, common + ["--max-steps", "1", "--output-dir", str(run), "--overwrite-output-dir"], capsys,
             "did not write", "notes.txt")
    assert _contents(run) == before
    (run / "notes.txt").unlink()
    assert finetune.main(common + ["--max-steps", "1", "--output-dir", str(run), "--overwrite-output-dir"]) == 0
    assert json.loads((run / "run.json").read_text())["run_id"] != first
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-00000001"]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 1
    # a folder that no run wrote is never emptied
    user = tmp_path / "user"
    user.mkdir()
    (user / "scan.png").write_bytes(b"data")
    _refused(finetune, common + ["--max-steps", "1", "--output-dir", str(user)], capsys, "scan.png")
    _refused(finetune, common + ["--max-steps", "1", "--output-dir", str(user), "--overwrite-output-dir"], capsys,
             "only the folder of an earlier finetune.py run")
    assert sorted(p.name for p in user.iterdir()) == ["scan.png"]


class _Clock:
    """A stand-in for the script's ``time``: each reading is ``tick`` seconds after the last."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def time(self) -> float:
        self.now += self.tick
        return self.now


def test_train_seconds_adds_up_the_pieces_of_a_resumed_run(finetune, tmp_path, monkeypatch):
    from rwkvunet.training import finetune as loop  # the module whose clock the training loop reads

    common = TINY + ["--max-steps", "4", "--save-every-steps", "1", "--eval-every", "0", "--overlay-samples", "0"]
    run = tmp_path / "run"
    monkeypatch.setattr(loop, "time", _Clock(100.0))  # the first piece: 100 s between readings
    _crashed_run(finetune, run, common)
    state = torch.load(run / "checkpoints" / "checkpoint-00000003" / "custom_checkpoint_1.pkl", weights_only=False)
    first = state["train_seconds"]
    assert first >= 300  # steps 1, 2 and 3 were each checkpointed 100 s apart
    monkeypatch.setattr(loop, "time", _Clock(1.0))  # the resumed piece: 1 s between readings
    assert finetune.main(common + ["--output-dir", str(run), "--resume"]) == 0
    total = json.loads((run / "metrics.json").read_text())["train_seconds"]
    assert first < total < first + 10
