"""``pip install "rwkvunet[train]"`` alone fine-tunes and evaluates: the wheel is built from this tree, installed
with torch into a fresh virtualenv, and run from a folder outside the source tree (no PYTHONPATH), as a user
would. Minutes and several GB of disk: marked ``wheel`` (``pytest -m wheel``; ``.ci/run`` runs it)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.wheel

REPO = Path(__file__).resolve().parents[1]
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]  # the README's install line
SYNTHETIC = {"synthetic_size": 32, "synthetic_train": 8, "synthetic_eval": 3}
TINY = ["--img-size", "32", "--batch-size", "4", "--num-threads", "1", "--overlay-samples", "2",
        *[x for k, v in SYNTHETIC.items() for x in ("--" + k.replace("_", "-"), str(v))]]


def _run(argv, cwd, env=None, timeout=1800) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what it packages (the source tree gets no build/ or egg-info)."""
    root = tmp_path_factory.mktemp("build")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src" / "rwkvunet", source / "src" / "rwkvunet",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", root / "dist", source],
         cwd=root)
    (found,) = (root / "dist").glob("rwkvunet-*.whl")
    return found


@pytest.fixture(scope="module")
def user(wheel, tmp_path_factory):
    """``(environment, working folder, venv)``: a fresh virtualenv holding torch and ``rwkvunet[train]`` from the
    wheel, and a folder outside the source tree to run in. The virtualenv is removed afterwards."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", *TORCH], cwd=venv.parent)
    _run([python, "-m", "pip", "install", "--quiet", f"{wheel}[train]"], cwd=venv.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    work = tmp_path_factory.mktemp("user")
    assert REPO not in work.parents
    yield env, work, venv
    shutil.rmtree(venv, ignore_errors=True)


def test_wheel_ships_the_training_code_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.name for p in (REPO / "src" / "rwkvunet" / "training" / "configs").glob("*.yaml")}
    assert configs and {f"rwkvunet/training/configs/{c}" for c in configs} <= names
    for module in ("finetune.py", "evaluate.py", "cli.py", "commands/finetune.py", "commands/evaluate.py",
                   "commands/compare.py", "training/finetune.py", "training/evaluate.py", "training/compare.py"):
        assert f"rwkvunet/{module}" in names, module
    assert "rwkvunet/ops/csrc/bi_wkv_cpu.cpp" in names  # the CPU kernel is built from the installed source
    assert not any(n.startswith(("tests/", "training/")) for n in names)


def test_installed_package_is_the_one_used_and_finds_configs_by_name(user):
    env, work, venv = user
    code = ("import json, rwkvunet; from rwkvunet.training import parse_arguments; "
            "a = parse_arguments(['--config', 'kvasir_seg']); "
            "print(json.dumps([rwkvunet.__file__, a.img_size, a.lr, a.epochs]))")
    where, img_size, lr, epochs = json.loads(_run([venv / "bin" / "python", "-c", code], work, env).stdout)
    assert Path(where).is_relative_to(venv)
    expected = yaml.safe_load((REPO / "src" / "rwkvunet" / "training" / "configs" / "kvasir_seg.yaml").read_text())
    assert (img_size, lr, epochs) == (expected["img_size"], expected["lr"], expected["epochs"])


def test_finetune_then_evaluate_from_the_wheel(user):
    env, work, venv = user
    run = work / "run"
    _run(["rwkvunet", "finetune", *TINY, "--max-steps", "2", "--output-dir", run], work, env)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "metrics.json", "curves.png",
                 "overlays.png", "README.md"):
        assert (run / name).is_file(), name
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["steps"] == 2 and trained["test"]["num_cases"] == SYNTHETIC["synthetic_eval"]

    # the same synthetic set, saved as a data set evaluate reads
    data = work / "data"
    save = (f"from rwkvunet.data.synthetic import make_synthetic_dataset; make_synthetic_dataset(seed=0, "
            f"size={SYNTHETIC['synthetic_size']}, num_train={SYNTHETIC['synthetic_train']}, "
            f"num_validation={SYNTHETIC['synthetic_eval']}, num_test={SYNTHETIC['synthetic_eval']})"
            f".save_to_disk({str(data)!r})")
    _run([venv / "bin" / "python", "-c", save], work, env)
    _run(["rwkvunet", "evaluate", run, "--dataset", data, "--output-dir", work / "eval", "--no-progress"],
         work, env)
    scored = json.loads((work / "eval" / "metrics.json").read_text())
    assert scored["num_cases"] == trained["test"]["num_cases"]
    # evaluate runs the BatchNorm-folded model: rounding may flip a pixel, never a case
    assert scored["mean_dice"] == pytest.approx(trained["test"]["mean_dice"], abs=0.02)


def test_accelerate_launch_the_installed_module(user):
    env, work, venv = user
    out = work / "launched"
    _run(["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "-m", "rwkvunet.finetune", *TINY, "--max-steps", "1", "--eval-every", "0",
          "--overlay-samples", "0", "--output-dir", out], work, env)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1
    proc = subprocess.run(["rwkvunet", "finetune", "--lr", "nan"], cwd=work, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "rwkvunet finetune: error: argument --lr" in proc.stderr


def test_compare_without_the_baselines_extra_says_what_to_install(user):
    """``[train]`` alone has no smp: compare refuses before training anything, naming the extra."""
    env, work, venv = user
    proc = subprocess.run(["rwkvunet", "compare", *TINY, "--max-steps", "1", "--output-dir", work / "cmp"], cwd=work,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'pip install "rwkvunet[baselines]"' in proc.stderr and not (work / "cmp" / "runs").exists()
