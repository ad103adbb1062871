"""``rwkvunet compare``: RWKV-UNet and the smp reference trained alike on the synthetic set, one table whose numbers
are the runs' own metrics, means and spreads over seeds, a curves plot, and a rerun that keeps finished runs."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from rwkvunet.cli import main as cli_main

TINY = ["--img-size", "32", "--batch-size", "4", "--synthetic-size", "32", "--synthetic-train", "8",
        "--synthetic-eval", "2", "--overlay-samples", "0", "--num-threads", "1", "--max-steps", "2",
        "--warmup-steps", "0"]
MODELS = ["rwkvunet", "smp-unet-r34"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    assert cli_main(["compare", *TINY, "--models", *MODELS, "--seeds", *map(str, SEEDS), "--output-dir",
                     str(out)]) == 0
    return out


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_every_model_and_seed_ran_with_the_same_settings(comparison):
    configs = {}
    for label in ("rwkvunet-t", "smp-unet-r34"):
        for seed in SEEDS:
            config = yaml.safe_load((comparison / "runs" / label / f"seed{seed}" / "training_config.yaml").read_text())
            assert config["seed"] == config["split_seed"] == seed
            configs[label, seed] = config
    # lr and the RWKV lr multiplier: each model's own (no --lr; smp has no RWKV parameters)
    per_run = {"model", "variant", "seed", "split_seed", "output_dir", "lr", "rwkv_lr_scale"}
    first = {k: v for k, v in configs["rwkvunet-t", 0].items() if k not in per_run}
    for config in configs.values():
        assert {k: v for k, v in config.items() if k not in per_run} == first
    assert configs["smp-unet-r34", 1]["model"] == "smp-unet-r34" and configs["rwkvunet-t", 1]["model"] == "rwkvunet"
    from rwkvunet.training.arguments import DEFAULT_LR, SCRATCH_RWKV_LR_SCALE

    assert configs["smp-unet-r34", 1]["lr"] == DEFAULT_LR["smp-unet-r34"] != configs["rwkvunet-t", 0]["lr"]
    assert configs["rwkvunet-t", 0]["lr"] == DEFAULT_LR["rwkvunet"]
    assert configs["rwkvunet-t", 0]["rwkv_lr_scale"] == SCRATCH_RWKV_LR_SCALE
    assert configs["smp-unet-r34", 0]["rwkv_lr_scale"] == 1.0


def test_table_numbers_are_each_runs_metrics(comparison):
    from rwkvunet.hub import load_segmentation_model

    rows = _rows(comparison / "comparison.csv")
    runs = [r for r in rows if r["seed"] not in ("mean", "std")]
    assert [(r["model"], int(r["seed"])) for r in runs] == [(m, s) for m in ("rwkvunet-t", "smp-unet-r34")
                                                            for s in SEEDS]
    for row in runs:
        folder = comparison / "runs" / row["model"] / f"seed{row['seed']}"
        assert Path(row["run"]) == folder
        metrics = json.loads((folder / "metrics.json").read_text())
        assert float(row["dice"]) == metrics["test"]["mean_dice"]
        assert float(row["hd95"]) == metrics["test"]["mean_hd95"] and row["iou"] == ""  # a multi-class set
        assert int(row["epochs"]) == metrics["epochs"] and int(row["steps"]) == metrics["steps"] == 2
        assert float(row["train_seconds"]) == metrics["train_seconds"] > 0
        assert (row["dataset"], row["scored_on"]) == ("synthetic", "test")
        model = load_segmentation_model(folder)
        assert int(row["num_parameters"]) == sum(p.numel() for p in model.parameters())
    # each model's mean and sample standard deviation over its seeds
    for label in ("rwkvunet-t", "smp-unet-r34"):
        dice = [float(r["dice"]) for r in runs if r["model"] == label]
        (mean,) = [r for r in rows if r["model"] == label and r["seed"] == "mean"]
        (std,) = [r for r in rows if r["model"] == label and r["seed"] == "std"]
        assert float(mean["dice"]) == pytest.approx(sum(dice) / len(dice), abs=1e-12)
        assert float(std["dice"]) == pytest.approx(statistics.stdev(dice), abs=1e-12)
    assert len({r["num_parameters"] for r in runs}) == 2  # two different models were trained
    markdown = (comparison / "comparison.md").read_text()
    for row in runs:
        line = f"| {row['model']} | {row['seed']} | synthetic | {row['epochs']} | {float(row['dice']):.4f} |"
        assert line in markdown
    assert "mean ± sd (2 seeds)" in markdown


def test_curves_plot_holds_both_models(comparison):
    from PIL import Image

    assert Image.open(comparison / "comparison_curves.png").size == (1000, 380)
    assert (comparison / "compare.json").is_file()


def test_a_rerun_keeps_finished_runs(comparison, capsys):
    before = {p: p.stat().st_mtime_ns for p in (comparison / "runs").rglob("metrics.json")}
    assert cli_main(["compare", *TINY, "--models", *MODELS, "--seeds", *map(str, SEEDS), "--output-dir",
                     str(comparison)]) == 0
    assert capsys.readouterr().out.count("kept (finished)") == 4
    assert {p: p.stat().st_mtime_ns for p in (comparison / "runs").rglob("metrics.json")} == before


def test_a_rerun_with_other_settings_names_them(comparison, capsys):
    """It said only "holds a run with other settings"."""
    before = {p: p.stat().st_mtime_ns for p in (comparison / "runs").rglob("metrics.json")}
    assert cli_main(["compare", *TINY, "--max-steps", "3", "--models", *MODELS, "--seeds", *map(str, SEEDS),
                     "--output-dir", str(comparison)]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (--max-steps 2 there, 3 here)" in err, err
    assert {p: p.stat().st_mtime_ns for p in (comparison / "runs").rglob("metrics.json")} == before


@pytest.mark.parametrize("argv, words", [
    (["--models", "rwkvunet", "unet++"], ["--models unet++", "smp-unet-r34"]),
    (["--models", "rwkvunet", "rwkvunet-t"], ["same model twice"]),
    (["--seeds", "1", "1"], ["repeats a seed"]),
    # --variant sized nothing here and was silently ignored
    (["--models", "rwkvunet-t", "smp-unet-r34", "--variant", "s"], ["--variant s", "drop --variant"]),
])
def test_mistakes_are_one_line(tmp_path, capsys, argv, words):
    assert cli_main(["compare", *TINY, "--output-dir", str(tmp_path / "cmp"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rwkvunet compare: error: ") and all(w in err[0] for w in words), err
    assert not (tmp_path / "cmp").exists()


def test_a_seed_numpy_cannot_take_is_a_usage_error(tmp_path, capsys):
    # it was a traceback from numpy's seeding, after compare.json was written
    with pytest.raises(SystemExit) as done:
        cli_main(["compare", *TINY, "--output-dir", str(tmp_path / "cmp"), "--seeds", "-3"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("rwkvunet compare: error: argument --seeds: must be from 0 to "
                                            "4294967295, got -3")
    assert not (tmp_path / "cmp").exists()


def test_a_folder_of_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main(["compare", *TINY, "--output-dir", str(tmp_path)]) == 2
    assert "not a comparison" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_data_set_that_cannot_load_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """A mistyped --dataset fails in the first run; what compare wrote for it (compare.json, and the folder if it
    made it) is removed; an empty folder given as --output-dir is kept, empty."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-data")
    assert cli_main(["compare", *TINY, "--output-dir", str(tmp_path / "cmp"), "--dataset", missing]) == 2
    assert "no-such-data" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    (tmp_path / "empty").mkdir()
    assert cli_main(["compare", *TINY, "--output-dir", str(tmp_path / "empty"), "--dataset", missing]) == 2
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
