"""Every mistake in a finetune.py or evaluate.py command is one line ``prog: error: ...`` and exit status 2, with
nothing written; a model scored on labels it does not predict, or a data set too small for its splits, is
refused with the numbers."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--img-size", "32", "--batch-size", "4", "--max-steps", "1", "--num-threads", "1", "--overlay-samples", "0"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune():
    return _script("finetune")


@pytest.fixture(scope="module")
def evaluate_script():
    return _script("evaluate")


def _folder(root: Path, count: int, masks) -> Path:
    """``count`` 24x24 grey images with masks drawn by ``masks(rng)``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(masks(rng)).save(root / "masks" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Image/mask folders: binary 0/255, binary 0/1, a label map of 0..5, two images only, and an empty one."""
    root = tmp_path_factory.mktemp("data")
    binary = lambda rng: (rng.random((24, 24)) > 0.5).astype(np.uint8) * 255  # noqa: E731
    return {
        "binary255": _folder(root / "binary255", 10, binary),
        "binary01": _folder(root / "binary01", 10, lambda rng: (rng.random((24, 24)) > 0.5).astype(np.uint8)),
        "labels6": _folder(root / "labels6", 10, lambda rng: rng.integers(0, 6, (24, 24)).astype(np.uint8)),
        "two": _folder(root / "two", 2, binary),
        "empty": _folder(root / "empty", 0, binary),
        "cache": root / "cache",
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved segmenters: binary, 4 classes, and a 4-class folder whose weights are truncated or empty."""
    import rwkvunet

    root = tmp_path_factory.mktemp("models")
    for name, labels in (("binary", 1), ("four", 4)):
        cfg = rwkvunet.RWKVUNetConfig(variant="t", num_labels=labels, in_channels=1)
        rwkvunet.RWKVUNetForSemanticSegmentation(cfg).save_pretrained(root / name)
    weights = (root / "four" / "model.safetensors").read_bytes()
    for name, content in (("truncated", weights[: len(weights) // 2]), ("empty", b"")):
        (root / name).mkdir()
        (root / name / "config.json").write_bytes((root / "four" / "config.json").read_bytes())
        (root / name / "model.safetensors").write_bytes(content)
    return root


def _run(main, argv, capsys):
    """Exit status and stderr of a script's ``main``, as the command line would see them."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    return code, capsys.readouterr().err


def _assert_one_line_error(code, err, prog, *words):
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("option, value, words", [
    ("--img-size", "0", ["--img-size", "at least 1"]),
    ("--batch-size", "0", ["--batch-size", "at least 1"]),
    ("--lr", "-1", ["--lr", "at least 0"]),
    ("--lr", "nan", ["--lr", "finite"]),
    ("--max-steps", "0", ["--max-steps", "at least 1"]),
    ("--keep-checkpoints", "0", ["--keep-checkpoints", "at least 1"]),
    ("--seed", "-5", ["--seed", "at least 0"]),  # numpy's seeding refused it deep inside, reported as a bug
    ("--seed", str(2 ** 32), ["--seed", "below 4294967296"]),
    ("--split-seed", "-1", ["--split-seed", "at least 0"]),
    ("--dice-weight", "-1", ["--dice-weight", "at least 0"]),
])
def test_bad_finetune_options_are_usage_errors(finetune, tmp_path, capsys, option, value, words):
    out = tmp_path / "run"
    code, err = _run(finetune.main, TINY + ["--output-dir", out, option, value], capsys)
    _assert_one_line_error(code, err, "finetune.py", *words)
    assert not out.exists()


def test_a_hub_model_id_without_push_to_hub_is_refused(finetune, tmp_path, capsys):
    """--hub-model-id alone was silently ignored: nothing was pushed."""
    out = tmp_path / "run"
    code, err = _run(finetune.main, TINY + ["--output-dir", out, "--hub-model-id", "me/model"], capsys)
    _assert_one_line_error(code, err, "finetune.py", "--hub-model-id me/model", "add --push-to-hub")
    assert not out.exists()


@pytest.mark.parametrize("extra, words", [
    (["--min-lr", "1", "--lr", "0.1"], "--min-lr 1 is above the peak lr 0.1"),
    (["--min-lr", "1"], "above the peak lr 0.02"),  # RWKV-UNet's own lr from scratch
])
def test_a_min_lr_above_the_peak_is_refused(finetune, tmp_path, capsys, extra, words):
    """The cosine schedule then rose from the peak to --min-lr instead of decaying."""
    out = tmp_path / "run"
    code, err = _run(finetune.main, TINY + ["--output-dir", out, *extra], capsys)
    _assert_one_line_error(code, err, "finetune.py", words)
    assert not out.exists()


def test_a_config_that_repeats_an_option_or_is_a_folder_is_one_line(finetune, tmp_path, capsys):
    """YAML kept the last of two `lr:` lines silently; a folder was "not found"."""
    (tmp_path / "dup.yaml").write_text("epochs: 1\nlr: 1.0e-3\nlr: 2.0e-3\n")
    code, err = _run(finetune.main, TINY + ["--output-dir", tmp_path / "run", "--config", tmp_path / "dup.yaml"],
                     capsys)
    _assert_one_line_error(code, err, "finetune.py", "'lr' is given twice (lines 2 and 3)")
    code, err = _run(finetune.main, TINY + ["--output-dir", tmp_path / "run", "--config", tmp_path], capsys)
    _assert_one_line_error(code, err, "finetune.py", "is a folder; give a YAML file")
    assert not (tmp_path / "run").exists()


def test_a_loss_of_zero_weights_is_refused(finetune, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(finetune.main, TINY + ["--output-dir", out, "--ce-weight", "0", "--dice-weight", "0"], capsys)
    _assert_one_line_error(code, err, "finetune.py", "--ce-weight and --dice-weight are both 0")
    assert not out.exists()


@pytest.mark.parametrize("model, size, ok_size", [("rwkvunet", "16", "17"), ("smp-unet-r34", "32", "33")])
def test_batch_of_one_at_a_size_without_room_for_batchnorm(finetune, tmp_path, capsys, model, size, ok_size):
    """--batch-size 1 where the deepest map is 1 x 1 was BatchNorm's ValueError in the first step, reported as a bug
    after the run folder was made."""
    if model != "rwkvunet":
        pytest.importorskip("segmentation_models_pytorch")
    out = tmp_path / "run"
    code, err = _run(finetune.main, TINY + ["--output-dir", out, "--model", model, "--img-size", size,
                                            "--batch-size", "1"], capsys)
    _assert_one_line_error(code, err, "finetune.py", f"--img-size {size}", "1 x 1", "--batch-size 2",
                           f"--img-size {ok_size} or more")
    assert not out.exists()


def test_bad_option_in_a_config_file_is_one_line(finetune, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lr: .nan\n")
    code, err = _run(finetune.main, TINY + ["--config", config, "--output-dir", tmp_path / "run"], capsys)
    _assert_one_line_error(code, err, "finetune.py", "lr", "finite")


@pytest.mark.parametrize("case, extra, words", [
    ("missing", [], ["does not exist"]),
    ("empty", [], ["empty"]),
    ("labels6", ["--num-labels", "4"], ["label 5", "4 classes"]),
    ("two", [], ["2 case(s)", "train 2, validation 0, test 0", "at least 3"]),
])
def test_bad_finetune_data_is_one_line(finetune, data, tmp_path, capsys, case, extra, words):
    dataset = data[case] if case in data else tmp_path / "no-such-data"
    out = tmp_path / "run"
    code, err = _run(finetune.main, TINY + ["--dataset", dataset, "--cache-dir", data["cache"], "--output-dir", out]
                     + extra, capsys)
    _assert_one_line_error(code, err, "finetune.py", *words)
    assert not out.exists()  # nothing done: not even a run record


def test_resume_with_nothing_to_resume_is_one_line(finetune, tmp_path, capsys):
    code, err = _run(finetune.main, TINY + ["--output-dir", tmp_path / "run", "--resume"], capsys)
    _assert_one_line_error(code, err, "finetune.py", "nothing to resume")


def test_an_encoder_hub_id_missing_from_the_cache_is_one_line(finetune, tmp_path, capsys, monkeypatch):
    """It was huggingface_hub's own paragraph ("An error happened while trying to locate the file ...")."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "run"
    argv = TINY + ["--synthetic-size", "32", "--synthetic-train", "4", "--synthetic-eval", "1",
                   "--encoder-pretrained", "hf-hub:someone/missing-encoder", "--output-dir", out]
    code, err = _run(finetune.main, argv, capsys)
    _assert_one_line_error(code, err, "finetune.py", "--encoder-pretrained hf-hub:someone/missing-encoder: not in "
                           "the Hub cache", "HF_HUB_OFFLINE is set", "rwkvunet convert CKPT OUT --encoder")


@pytest.mark.parametrize("name, words", [("truncated", ["not a complete safetensors"]), ("empty", ["empty"]),
                                         ("missing", ["does not exist"])])
def test_bad_pretrained_is_one_line(finetune, models, tmp_path, capsys, name, words):
    out = tmp_path / "run"
    argv = TINY + ["--synthetic-size", "32", "--synthetic-train", "4", "--synthetic-eval", "1",
                   "--pretrained", models / name, "--output-dir", out]
    code, err = _run(finetune.main, argv, capsys)
    _assert_one_line_error(code, err, "finetune.py", *words)
    assert not out.exists()


def test_debug_shows_the_traceback(finetune, tmp_path):
    from rwkvunet.errors import UserError

    with pytest.raises(UserError, match="nothing to resume"):
        finetune.main(TINY + ["--output-dir", str(tmp_path / "run"), "--resume", "--debug"])


# --- evaluate.py ----------------------------------------------------------------------------------------

def _evaluate(script, model, dataset, data, tmp_path, capsys, *extra):
    argv = [model, "--dataset", dataset, "--img-size", "32", "--cache-dir", data["cache"], "--no-progress",
            "--output-dir", tmp_path / "eval", *extra]
    return _run(script.main, argv, capsys)


@pytest.mark.parametrize("dataset, words", [
    ("binary01", ["binary masks", "{0, 1}", "4 classes"]),
    ("binary255", ["binary masks", "{0, 1}", "4 classes"]),
    ("labels6", ["label 5", "4 classes"]),
])
def test_evaluate_refuses_labels_the_model_does_not_predict(evaluate_script, models, data, tmp_path, capsys,
                                                            dataset, words):
    code, err = _evaluate(evaluate_script, models / "four", data[dataset], data, tmp_path, capsys)
    _assert_one_line_error(code, err, "evaluate.py", *words)
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_a_label_map_for_a_binary_model(evaluate_script, models, data, tmp_path, capsys):
    code, err = _evaluate(evaluate_script, models / "binary", data["labels6"], data, tmp_path, capsys)
    _assert_one_line_error(code, err, "evaluate.py", "{0, 1, 2, 3, 4, 5}", "label map of 6 classes", "binary")


def test_labels_above_the_model_classes_in_a_saved_data_set(tmp_path):
    """Hub / save_to_disk masks are not checked when loaded: the check before scoring names them."""
    import datasets

    from rwkvunet.data import DataError
    from rwkvunet.evaluation import check_model_fits_labels, split_labels

    split = datasets.Dataset.from_dict({"mask": [np.array([[0, 1], [2, 6]], dtype=np.uint8)]})
    assert split_labels(split) == [0, 1, 2, 6]
    with pytest.raises(DataError, match=r"labels \{0, 1, 2, 6\}, above the model's 4 classes"):
        check_model_fits_labels(4, split_labels(split), "set")
    check_model_fits_labels(4, [0, 1, 2, 3], "set")
    check_model_fits_labels(1, [0, 255], "set")


@pytest.mark.parametrize("model, words", [
    ("truncated", ["not a complete safetensors"]),
    ("empty", ["empty"]),
    ("missing", ["does not exist"]),
])
def test_evaluate_bad_model_is_one_line(evaluate_script, models, data, tmp_path, capsys, model, words):
    code, err = _evaluate(evaluate_script, models / model, data["binary255"], data, tmp_path, capsys)
    _assert_one_line_error(code, err, "evaluate.py", *words)


def test_evaluate_bad_paths_and_options_are_one_line(evaluate_script, models, data, tmp_path, capsys):
    code, err = _evaluate(evaluate_script, models / "binary", tmp_path / "no-such-data", data, tmp_path, capsys)
    _assert_one_line_error(code, err, "evaluate.py", "does not exist")
    code, err = _evaluate(evaluate_script, models / "binary", data["two"], data, tmp_path, capsys)
    _assert_one_line_error(code, err, "evaluate.py", "no cases in split 'test'", "train (2 cases)")
    code, err = _evaluate(evaluate_script, models / "binary", data["binary255"], data, tmp_path, capsys,
                          "--batch-size", "0")
    _assert_one_line_error(code, err, "evaluate.py", "--batch-size", "at least 1")
    (tmp_path / "file").write_text("x")
    code, err = _run(evaluate_script.main, [models / "binary", "--dataset", data["binary255"], "--cache-dir",
                                            data["cache"], "--output-dir", tmp_path / "file"], capsys)
    _assert_one_line_error(code, err, "evaluate.py", "is a file")


def test_label_above_num_labels_in_a_saved_data_set_is_refused_before_training(finetune, tmp_path, capsys):
    """save_to_disk masks are read before the run starts, so the folder is not even created."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"image": [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)) for _ in range(6)],
            "mask": [Image.fromarray(rng.integers(0, 6, (16, 16)).astype(np.uint8)) for _ in range(6)]}
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        tmp_path / "disk")
    out = tmp_path / "run"
    code, err = _run(finetune.main, TINY + ["--dataset", tmp_path / "disk", "--num-labels", "3", "--output-dir", out],
                     capsys)
    _assert_one_line_error(code, err, "finetune.py", "{0, 1, 2, 3, 4, 5}", "--num-labels 6")
    assert not out.exists()


def test_push_to_hub_that_cannot_happen_is_refused_before_training(finetune, data, tmp_path, capsys, monkeypatch):
    """Offline (or without a token, or with an id the Hub refuses) --push-to-hub trained the whole run and then
    ended in huggingface_hub's traceback, reported as a bug."""
    import huggingface_hub
    from huggingface_hub import constants

    out = tmp_path / "run"
    argv = TINY + ["--dataset", data["binary255"], "--cache-dir", data["cache"], "--output-dir", out, "--push-to-hub"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = _run(finetune.main, argv, capsys)
    _assert_one_line_error(code, err, "finetune.py", "--push-to-hub needs the Hub, but HF_HUB_OFFLINE is set")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, err = _run(finetune.main, argv, capsys)
    _assert_one_line_error(code, err, "finetune.py", "needs a Hub token", "hf auth login")
    code, err = _run(finetune.main, argv + ["--hub-model-id", "my model"], capsys)
    _assert_one_line_error(code, err, "finetune.py", "'my model' is not a valid Hub repo id")
    assert not out.exists()


def test_a_failed_upload_keeps_the_run_and_exits_1(finetune, data, tmp_path, capsys, unreachable_hub):
    out = tmp_path / "run"
    code, err = _run(finetune.main, TINY + ["--dataset", data["binary255"], "--cache-dir", data["cache"],
                                            "--output-dir", out, "--push-to-hub", "--hub-model-id", "me/run"], capsys)
    assert code == 1 and "Traceback" not in err
    assert (f"finetune.py: error: the run is complete in {out}, but the upload to me/run failed (ConnectionError: "
            f"Name or service not known); upload it later with: hf upload me/run {out}") in err
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
