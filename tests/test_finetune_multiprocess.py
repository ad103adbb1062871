"""The fine-tuning script under ``accelerate launch`` with two CPU processes (gloo).

``accelerate launch --cpu`` starts several CPU processes only through MPI; ``--multi_gpu`` starts them with
torchrun, and on a machine without GPUs the script joins them with gloo.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_train_and_score_every_case_once(tmp_path):
    import torch

    if torch.accelerator.is_available():
        pytest.skip("checks the gloo path of machines without GPUs")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "training" / "finetune.py"),
           "--img-size", "32", "--batch-size", "2", "--synthetic-size", "32", "--synthetic-train", "12",
           "--synthetic-eval", "5", "--max-steps", "4", "--overlay-samples", "2", "--num-threads", "1",
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # 12 images, 2 per process and step, 2 processes: 3 steps per epoch, so 4 steps cross an epoch end
    assert metrics["steps"] == 4 and metrics["epochs"] == 2
    # 5 test cases over 2 processes (3 + 2): every case scored exactly once after the gather
    with (out / "test_per_case.csv").open() as f:
        ids = [row["case_id"] for row in csv.DictReader(f)]
    assert sorted(ids) == [f"test_{i:04d}" for i in range(5)]
    assert metrics["test"]["num_cases"] == 5
    # both processes saved their RNG state in the checkpoint
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert (out / "model.safetensors").is_file() and (out / "overlays.png").is_file()


@pytest.mark.slow
def test_a_data_error_on_the_main_process_stops_both(tmp_path):
    """The main process loads the data first: its error reaches the other process, which would otherwise wait
    at the barrier for good; both print the one-line message."""
    import numpy as np
    import torch
    from PIL import Image

    if torch.accelerator.is_available():
        pytest.skip("checks the gloo path of machines without GPUs")
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(data / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 6, (16, 16)).astype(np.uint8)).save(data / "masks" / f"{i}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "training" / "finetune.py"), "--dataset", str(data), "--num-labels", "4", "--img-size", "16",
           "--max-steps", "1", "--num-threads", "1", "--cache-dir", str(tmp_path / "cache"),
           "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("finetune.py: error:") == 2, proc.stderr[-4000:]
    assert "outside the 4 classes" in proc.stderr
    assert not (tmp_path / "run").exists()
