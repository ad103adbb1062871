"""Accelerate checkpoints written atomically, the last K kept.

A checkpoint is first written to a hidden temporary folder and renamed when complete, so a run killed
while saving leaves either the previous checkpoints or the new one, never a half-written folder that
``--resume`` would pick up.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ..file_modes import give_default_mode

_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointManager:
    """Save, list and prune ``<directory>/checkpoint-<step>`` folders made by ``accelerator.save_state``."""

    def __init__(self, directory, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = int(keep_last)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if p.is_dir() and (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, accelerator, step: int, metadata: Optional[dict] = None) -> Path:
        """Write the state of every process, then publish it with one rename (main process) and prune.
        ``metadata`` is written as ``run.json`` inside, so a checkpoint names the run it belongs to."""
        final = self.directory / f"checkpoint-{step:08d}"
        tmp = self.directory / f".tmp-checkpoint-{step:08d}"
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            for pattern in (".tmp-checkpoint-*", ".old-checkpoint-*"):  # left by a run killed while saving
                for stale in self.directory.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        tmp.mkdir(parents=True, exist_ok=True)  # every process writes its own RNG state into it
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if metadata is not None:
                (tmp / "run.json").write_text(json.dumps(metadata, indent=2))
            give_default_mode([tmp])  # accelerate's model.safetensors is written 0600 (see rwkvunet.file_modes)
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                old = self.directory / f".old-checkpoint-{step:08d}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            for old in self.checkpoints()[:-self.keep_last]:
                _remove(old)
        accelerator.wait_for_everyone()
        return final


def _remove(checkpoint: Path) -> None:
    """Hide the folder with one rename before deleting it: a kill during the deletion must not leave a
    half-deleted folder under a checkpoint's name."""
    hidden = checkpoint.with_name(f".old-{checkpoint.name}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(checkpoint, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush the files to disk before the rename makes them visible."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
