"""Pieces of the fine-tuning script: options, schedule, checkpoints, data order, the paper's configs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from rwkvunet.errors import UserError
from rwkvunet.training import CheckpointManager, EpochSampler, SeededSamples, cosine_schedule, parse_arguments
from rwkvunet.training.arguments import TrainArguments, shipped_configs

CONFIGS = [Path(str(p)) for p in shipped_configs().values()]


def test_command_line_overrides_config_overrides_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("variant: s\nlr: 5.0e-4\nepochs: 7\nmax-steps: 9\n")
    args = parse_arguments(["--config", str(cfg), "--epochs", "3", "--tta"])
    assert (args.variant, args.lr, args.epochs, args.max_steps, args.tta) == ("s", 5e-4, 3, 9, True)
    assert args.batch_size == TrainArguments.batch_size  # untouched default
    assert parse_arguments([]).dataset == "synthetic" and parse_arguments([]).variant == "t"


def test_bad_options_are_clear_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        parse_arguments(["--config", str(cfg)])
    with pytest.raises(ValueError, match="--variant must be one of t, s, b"):
        parse_arguments(["--variant", "x"])
    with pytest.raises(UserError, match="config file"):
        parse_arguments(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("text, words", [
    ("epochs: [1\n", ["not valid YAML", "expected ',' or ']'", "line 2, column 1", "fix the file"]),  # was a bug
    ("a: b: c\n", ["not valid YAML", "mapping values are not allowed here at line 1, column 5"]),
    (b"\xff\xfe\x00binary", ["is not a text file"]),
    ("lrr: 0.1\n", ["unknown option 'lrr' (did you mean 'lr'?)"]),
])
def test_config_file_mistakes_are_one_line(tmp_path, text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as err:
        parse_arguments(["--config", str(cfg)])
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert "crash_at_step" not in message  # a test hook, not an option to offer


def test_a_mistyped_shipped_config_name_gets_the_close_one():
    with pytest.raises(UserError, match=r"config file kvasir not found \(did you mean kvasir_seg\?\)"):
        parse_arguments(["--config", "kvasir"])


def _paper(name: str) -> dict:
    if name.startswith("synapse"):
        return dict(img_size=224, epochs=30, batch_size=24, lr=1e-3, min_lr=0.0, ce_weight=0.5, dice_weight=0.5,
                    num_labels=9, tta=True)
    if name.startswith("acdc"):
        return dict(img_size=224, epochs=150, batch_size=24, lr=5e-4, min_lr=0.0, ce_weight=0.3, dice_weight=0.7,
                    num_labels=4, tta=True)
    return dict(img_size=256, epochs=300, batch_size=8, lr=1e-4, min_lr=1e-5, ce_weight=0.5, dice_weight=1.0,
                num_labels=1)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_carry_the_paper_settings(path):
    args = parse_arguments(["--config", str(path)])
    for key, value in _paper(path.stem).items():
        assert getattr(args, key) == value, key
    assert args.encoder_pretrained == "imagenet"
    if path.stem[-2:] in ("_t", "_s", "_b"):
        assert args.variant == path.stem[-1]


def test_every_paper_data_set_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert {f"{d}_{v}" for d in ("synapse", "acdc") for v in "tsb"} <= names
    assert {"busi", "cvc_clinicdb", "cvc_colondb", "kvasir_seg", "isic2017", "glas"} <= names


def test_cosine_schedule_endpoints_and_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2, min_lr=1e-5)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[1] == pytest.approx(2e-3 / 3)  # linear warm-up
    assert lrs[2] == pytest.approx(1e-3)
    # float64 reference of the cosine part
    for step in range(2, 11):
        ref = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (step - 2) / 8))
        assert lrs[step] == pytest.approx(ref, rel=1e-12)
    assert lrs[10] == pytest.approx(1e-5)


class _FakeAccelerator:
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path, "model.safetensors").write_bytes(b"weights")


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / ".tmp-checkpoint-00000009").mkdir()  # a save killed half-way
    assert manager.latest() is None
    for step in (1, 2, 3):
        manager.save(_FakeAccelerator(), step)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["checkpoint-00000002", "checkpoint-00000003"]
    assert manager.latest().name == "checkpoint-00000003"
    manager.save(_FakeAccelerator(), 3)  # the same step again replaces it
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == names


def test_data_order_and_augmentation_depend_only_on_seed_epoch_index():
    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and second != first and sorted(first) == list(range(10))

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    samples = SeededSamples(Noisy(), seed=5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = samples[2]
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    torch.rand(7)  # whatever happened in between
    assert torch.equal(samples[2], a) and not torch.equal(samples[3], a)
    samples.set_epoch(1)
    assert not torch.equal(samples[2], a)


def test_config_values_are_plain_yaml():
    for path in CONFIGS:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict) and "dataset" in data


class _Killed(BaseException):
    pass


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Pruning hides a checkpoint with one rename before deleting it, so --resume never finds a checkpoint
    whose files are partly gone."""
    from rwkvunet.training import checkpoints as module

    rmtree = module.shutil.rmtree
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=1)
    manager.save(_FakeAccelerator(), 1, metadata={"run_id": "a"})

    def killed_half_way(path, ignore_errors=False):
        path = Path(path)
        if path.exists():
            next(p for p in path.iterdir() if p.is_file()).unlink()  # the first file goes, then the kill
            raise _Killed()

    monkeypatch.setattr(module.shutil, "rmtree", killed_half_way)
    with pytest.raises(_Killed):
        manager.save(_FakeAccelerator(), 2, metadata={"run_id": "a"})
    monkeypatch.setattr(module.shutil, "rmtree", rmtree)
    for checkpoint in manager.checkpoints():
        assert {p.name for p in checkpoint.iterdir()} == {"model.safetensors", "run.json"}, checkpoint
    manager.save(_FakeAccelerator(), 3, metadata={"run_id": "a"})  # the next save clears what the kill left
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint-00000003"]


def test_a_run_in_progress_is_never_replaced_or_resumed_by_a_second_one(tmp_path):
    """The same command started twice: the second called the live run "unfinished" and --overwrite-output-dir
    deleted its files while it trained (both then wrote into the folder)."""
    import json
    import socket
    import subprocess
    import sys

    from rwkvunet.training.run_folder import RUN_FILE, live_process, plan_run

    def record(pid):
        return {"run_id": "r", "status": "running", "started": "now", "num_processes": 1, "settings": {},
                "host": socket.gethostname(), "pid": pid}

    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "finetune"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / RUN_FILE).write_text(json.dumps(record(sleeper.pid)))
        for kwargs in ({}, {"overwrite": True}, {"resume": "latest"}):
            with pytest.raises(UserError, match=rf"a run is in progress in --output-dir .* \(process {sleeper.pid} "):
                plan_run(folder, {}, 1, **kwargs)
        assert live_process(record(other.pid)) is None  # alive, but not a run: a reused process id
        assert live_process(dict(record(sleeper.pid), status="finished")) is None
        assert live_process(dict(record(sleeper.pid), host="elsewhere")) is None
    finally:
        sleeper.kill()
        other.kill()
        sleeper.wait()
        other.wait()
    assert live_process(record(sleeper.pid)) is None  # killed: the folder is an unfinished run again
    assert plan_run(folder, {}, 1, overwrite=True).remove == [folder / RUN_FILE]


def test_resume_takes_the_same_data_folder_spelled_otherwise(tmp_path, monkeypatch):
    """`--dataset ds` started, `--dataset ./ds` (or the absolute path from another folder) resumed was refused as
    "other settings: --dataset 'ds' -> './ds'"; another folder still is."""
    from rwkvunet.training.run_folder import _check_same_settings, checkpoint_metadata, new_record

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    (tmp_path / "other").mkdir()
    meta = checkpoint_metadata(new_record({"dataset": "ds", "lr": 1.0, "head_bias": 0.0}, 1), 2)
    for spelling in ("./ds", str(tmp_path / "ds") + "/"):
        _check_same_settings(meta, {"dataset": spelling, "lr": 1.0, "head_bias": 0.0}, 1, tmp_path)
    monkeypatch.chdir(tmp_path / "other")  # the recorded absolute path decides, not the working directory
    _check_same_settings(meta, {"dataset": str(tmp_path / "ds"), "lr": 1.0, "head_bias": 0.0}, 1, tmp_path)
    with pytest.raises(UserError, match=r"--dataset 'ds' -> '\.\./other'"):
        _check_same_settings(meta, {"dataset": "../other", "lr": 1.0, "head_bias": 0.0}, 1, tmp_path)
    with pytest.raises(UserError, match=r"--lr 1.0 -> 2.0"):
        _check_same_settings(meta, {"dataset": "./ds", "lr": 2.0, "head_bias": 0.0}, 1, tmp_path)
