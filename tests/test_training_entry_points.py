"""Fine-tuning and evaluation from the package: ``rwkvunet finetune|evaluate``, ``python -m rwkvunet.finetune``,
the clone's ``training/*.py``, shipped configs by name, and the message when the ``train`` extra is missing."""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from rwkvunet.cli import main as cli_main
from rwkvunet.errors import UserError
from rwkvunet.training import parse_arguments
from rwkvunet.training.arguments import find_config, shipped_configs

REPO = Path(__file__).resolve().parents[1]
TINY = ["--img-size", "32", "--batch-size", "4", "--synthetic-size", "32", "--synthetic-train", "8",
        "--synthetic-eval", "2", "--overlay-samples", "1", "--num-threads", "1", "--max-steps", "1"]


def test_configs_ship_with_the_package_and_load_by_name(tmp_path, monkeypatch):
    shipped = shipped_configs()
    assert {"kvasir_seg", "acdc_b", "synapse_t"} <= set(shipped)
    import rwkvunet.training

    package = Path(rwkvunet.training.__file__).parent / "configs"
    assert Path(str(shipped["kvasir_seg"])) == package / "kvasir_seg.yaml"
    by_name = parse_arguments(["--config", "kvasir_seg"])
    expected = yaml.safe_load((package / "kvasir_seg.yaml").read_text())
    assert by_name.img_size == expected["img_size"] and by_name.lr == expected["lr"]
    assert parse_arguments(["--config", "kvasir_seg.yaml"]) == by_name
    # a file of that name in the working folder is a path, and wins over the shipped config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kvasir_seg").write_text("lr: 0.25\n")
    assert parse_arguments(["--config", "kvasir_seg"]).lr == 0.25
    with pytest.raises(UserError, match="shipped config: acdc_b, acdc_s"):
        find_config("no_such_config")
    with pytest.raises(UserError, match="not found"):  # a path is never replaced by a shipped name
        find_config("elsewhere/kvasir_seg.yaml")


def test_the_clone_keeps_training_configs():
    """``training/configs/NAME.yaml`` (the paths shown in older commands) still reads the shipped files."""
    assert sorted(p.stem for p in (REPO / "training" / "configs").glob("*.yaml")) == sorted(shipped_configs())


def _one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _entry_points(command: str) -> list:
    """``(main, prog)`` of ``rwkvunet COMMAND``, ``python -m rwkvunet.COMMAND`` and ``training/COMMAND.py``."""
    module = importlib.import_module(f"rwkvunet.{command}")  # what ``python -m`` runs
    return [(lambda argv: cli_main([command, *argv]), f"rwkvunet {command}"), (module.main, f"rwkvunet.{command}"),
            (_script(command), f"{command}.py")]


def test_each_finetune_entry_point_names_itself_in_errors(tmp_path, capsys):
    for main, prog in _entry_points("finetune"):
        assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
        assert "missing.yaml" in _one_error_line(capsys.readouterr().err, prog)
        with pytest.raises(SystemExit) as exit_:  # argparse's usage errors carry the same name
            main(["--lr", "nan"])
        assert exit_.value.code == 2 and f"{prog}: error: argument --lr" in capsys.readouterr().err


def test_each_evaluate_entry_point_names_itself_in_errors(tmp_path, capsys):
    for main, prog in _entry_points("evaluate"):
        assert main([str(tmp_path / "no-model"), "--dataset", str(tmp_path / "no-data")]) == 2
        assert "no-data" in _one_error_line(capsys.readouterr().err, prog)


def test_finetune_and_evaluate_subcommands_end_to_end(tmp_path, capsys):
    """``rwkvunet finetune`` on a saved data set, then ``rwkvunet evaluate`` of its model on the same test split:
    the same cases, and the scores the run reported."""
    from rwkvunet.data.synthetic import make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(seed=3, size=32, num_train=8, num_validation=2, num_test=3).save_to_disk(str(data))
    run = tmp_path / "run"
    common = ["--dataset", str(data), "--cache-dir", str(tmp_path / "cache")]
    assert cli_main(["finetune", *TINY, *common, "--output-dir", str(run)]) == 0
    trained = json.loads((run / "metrics.json").read_text())["test"]
    assert trained["num_cases"] == 3
    out = tmp_path / "eval"
    assert cli_main(["evaluate", str(run), *common, "--output-dir", str(out), "--no-progress"]) == 0
    scored = json.loads((out / "metrics.json").read_text())
    assert scored["num_cases"] == 3
    # evaluate runs the BatchNorm-folded model: rounding may flip a pixel or two, never a whole case
    assert scored["mean_dice"] == pytest.approx(trained["mean_dice"], abs=0.02)


def test_evaluate_scores_the_synthetic_set_its_run_trained_on(tmp_path, capsys):
    """``--dataset synthetic`` makes the set as the run did (size, counts and split seed from training_config.yaml):
    the same test cases, the score the run reported. It was refused as 'not a local folder or Hub data set'."""
    run = tmp_path / "run"
    assert cli_main(["finetune", *TINY, "--split-seed", "2", "--synthetic-eval", "3", "--output-dir", str(run)]) == 0
    trained = json.loads((run / "metrics.json").read_text())["test"]
    out = tmp_path / "eval"
    assert cli_main(["evaluate", str(run), "--dataset", "synthetic", "--output-dir", str(out), "--no-progress"]) == 0
    scored = json.loads((out / "metrics.json").read_text())
    assert [c["case_id"] for c in scored["cases"]] == [c["case_id"] for c in trained["cases"]]
    assert scored["num_cases"] == 3
    assert scored["mean_dice"] == pytest.approx(trained["mean_dice"], abs=0.02)  # BatchNorm folded, as above
    # another split seed is another set of images
    assert cli_main(["evaluate", str(run), "--dataset", "synthetic", "--split-seed", "0", "--output-dir",
                     str(tmp_path / "eval0"), "--no-progress"]) == 0
    other = json.loads((tmp_path / "eval0" / "metrics.json").read_text())
    assert other["mean_dice"] != scored["mean_dice"]
    capsys.readouterr()
    # a run trained on other data is refused by name, before any prediction
    config = yaml.safe_load((run / "training_config.yaml").read_text())
    config["dataset"] = "/data/busi"
    (run / "training_config.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["evaluate", str(run), "--dataset", "synthetic", "--output-dir", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert "trained on /data/busi, not on the synthetic set; pass --dataset /data/busi" in err
    assert not (tmp_path / "e2").exists()


def test_missing_train_extra_is_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    assert cli_main(["finetune", "--max-steps", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err, "rwkvunet finetune")
    assert "accelerate" in line and 'pip install "rwkvunet[train]"' in line


@pytest.mark.parametrize("text", ["[unclosed\n", "- a list\n"])
def test_evaluate_synthetic_with_a_damaged_run_record_is_one_line(tmp_path, capsys, text):
    (tmp_path / "training_config.yaml").write_text(text)
    assert cli_main(["evaluate", str(tmp_path), "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training_config.yaml" in err[0] and "restore it" in err[0], err
