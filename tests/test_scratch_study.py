"""training/scratch_study.py: the commands it runs and the tables it collects from the runs' metrics.json."""
from __future__ import annotations

import csv
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("scratch_study", REPO / "training" / "scratch_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(work: Path, dataset: str, model: str, seed: int, dice: float, iou: float, seconds: float,
              run_seed=None):
    folder = work / "runs" / dataset / model / (f"seed{seed}" if run_seed is None else f"seed{seed}-run{run_seed}")
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "test": {"mean_dice": dice, "mean_iou": iou, "num_cases": 3}, "epochs": 4, "train_seconds": seconds}))


def test_tables_hold_each_run_and_the_mean_and_spread_over_seeds(study, tmp_path):
    dice = {0: 0.70, 1: 0.74, 2: 0.75}
    for seed, d in dice.items():
        _fake_run(tmp_path, "dsb", "rwkvunet-t", seed, d, d - 0.1, 60 + seed)
    _fake_run(tmp_path, "dsb", "smp-unet-r34", 0, 0.8, 0.7, 30)  # one seed only: spread 0
    rows = study.collect(tmp_path, ["dsb:folder", "busi"], ["rwkvunet-t", "smp-unet-r34"], [0, 1, 2])
    assert [(r["model"], r["seed"]) for r in rows] == [("rwkvunet-t", 0), ("rwkvunet-t", 1), ("rwkvunet-t", 2),
                                                       ("smp-unet-r34", 0)]
    summary = study.summarize(rows)
    t = summary[0]
    assert t["runs"] == 3 and t["epochs"] == 4
    assert t["dice_mean"] == pytest.approx(statistics.fmean(dice.values()))
    assert t["dice_std"] == pytest.approx(statistics.stdev(dice.values()))
    assert t["iou_mean"] == pytest.approx(statistics.fmean(dice.values()) - 0.1)
    assert summary[1]["dice_std"] == 0.0
    text = study.write_tables(tmp_path, rows, summary)
    assert f"{t['dice_mean']:.4f} ± {t['dice_std']:.4f}" in text and "| dsb | smp-unet-r34 | 0 | 0 | 0.8000 |" in text
    with (tmp_path / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    with (tmp_path / "summary.csv").open() as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["rwkvunet-t", "smp-unet-r34"]


def test_dry_run_builds_each_split_once_and_trains_each_model_with_the_same_options(study, tmp_path, capsys):
    (tmp_path / "src" / "dsb").mkdir(parents=True)
    work = tmp_path / "work"
    assert study.main(["--source", str(tmp_path / "src"), "--sets", "dsb:folder", "--seeds", "0", "1",
                       "--epochs", "3", "--img-size", "48", "--work-dir", str(work), "--dry-run",
                       "--", "--lr", "2e-3"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    data = [c for c in commands if " data " in c]
    assert len(data) == 2 and all("--layout folder" in c for c in data)
    runs = [c for c in commands if "finetune.py" in c]
    assert len(runs) == 4  # 2 seeds x 2 models
    for c in runs:
        assert "--epochs 3" in c and "--img-size 48" in c and "--lr 2e-3" in c and "--batch-size 8" in c
    assert sum("--model smp-unet-r34" in c for c in runs) == 2


def test_missing_source_folder_is_one_line(study, tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        study.main(["--source", str(tmp_path), "--sets", "nothing", "--work-dir", str(tmp_path / "w")])


def test_run_seeds_train_each_model_again_on_every_split_and_pool_the_runs(study, tmp_path, capsys):
    (tmp_path / "src" / "dsb").mkdir(parents=True)
    work = tmp_path / "work"
    assert study.main(["--source", str(tmp_path / "src"), "--sets", "dsb", "--seeds", "0", "1", "--run-seeds",
                       "split", "10", "10", "--work-dir", str(work), "--dry-run"]) == 0
    runs = [c for c in capsys.readouterr().out.splitlines() if c.startswith("+ ") and "finetune.py" in c]
    assert len(runs) == 8  # 2 splits x 2 run seeds (the repeated 10 once) x 2 models
    for split in (0, 1):
        mine = [c for c in runs if f"--split-seed {split} " in c]
        assert sum(f"--seed {split} " in c and f"/seed{split} " in c for c in mine) == 2
        assert sum("--seed 10 " in c and f"/seed{split}-run10 " in c for c in mine) == 2

    # the reference and RWKV-UNet on the same split and run seed are compared run by run
    for seed, run_seed, t, ref in ((0, None, 0.80, 0.78), (0, 10, 0.70, 0.74), (1, None, 0.90, 0.85)):
        _fake_run(work, "dsb", "rwkvunet-t", seed, t, t - 0.1, 60, run_seed)
        _fake_run(work, "dsb", "smp-unet-r34", seed, ref, ref - 0.1, 60, run_seed)
    rows = study.collect(work, ["dsb"], ["rwkvunet-t", "smp-unet-r34"], [0, 1], ["split", 10])
    assert [(r["model"], r["seed"], r["run_seed"]) for r in rows][:3] == [("rwkvunet-t", 0, 0), ("rwkvunet-t", 0, 10),
                                                                          ("rwkvunet-t", 1, 1)]
    summary = study.summarize(rows)
    assert summary[0]["runs"] == 3 and summary[0]["dice_mean"] == pytest.approx(0.8)
    (pair,) = study.paired(rows)
    diffs = [0.80 - 0.78, 0.70 - 0.74, 0.90 - 0.85]
    assert pair["reference"] == "smp-unet-r34" and pair["runs"] == 3 and pair["ahead"] == 2
    assert pair["dice_diff_mean"] == pytest.approx(statistics.fmean(diffs))
    assert pair["dice_diff_std"] == pytest.approx(statistics.stdev(diffs))
    text = study.write_tables(work, rows, summary)
    assert "| dsb | rwkvunet-t | smp-unet-r34 | 3 | +0.0100 ± " in text and "| 2 of 3 |" in text
    assert "| dsb | rwkvunet-t | 0 | 10 | 0.7000 |" in text


@pytest.mark.parametrize("argv, message", [
    (["--run-seeds", "one"], "neither an integer nor 'split'"),
    (["--run-seeds", "-1"], "not a seed"),
    (["--", "--seed", "3"], "--run-seeds"),
])
def test_run_seed_mistakes_are_usage_errors(study, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        study.main(["--source", str(tmp_path), "--sets", "dsb", "--work-dir", str(tmp_path / "w"), *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err
