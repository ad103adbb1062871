"""One output folder holds one run: what may be written into it, what may be deleted, what may be resumed.

A run writes ``run.json`` (its id and settings) into ``--output-dir`` when it starts and into every checkpoint,
so that a second run into the same folder is refused instead of pruning the first run's checkpoints or
overwriting its model, and ``--resume`` continues only the run whose checkpoints these are, with the settings
it was started with. Everything here is read-only except :func:`prepare_folder`, which the main process calls
once every process has passed the checks.
"""
from __future__ import annotations

import datetime
import fnmatch
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .checkpoints import CheckpointManager

RUN_FILE = "run.json"

#: What finetune.py (and evaluate.py's default ``MODEL/eval-SPLIT``) writes into an output folder.
OUTPUT_PATTERNS = (
    RUN_FILE, "config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "preprocessor_config.json", "README.md", "metrics.json", "test_per_class.csv", "test_per_case.csv",
    "train_log.csv", "training_config.yaml", "curves.png", "overlays.png", "checkpoints", "logs", "best-model",
    ".tmp-*", "eval-*",
)

#: Options that may change when a run is resumed; any other difference would make it a different run.
RESUME_FREE = frozenset({
    "resume", "output_dir", "num_workers", "num_threads", "cpu", "report_to", "log_every", "keep_checkpoints",
    "save_every_steps", "overlay_samples", "eval_batch_size", "push_to_hub", "hub_model_id", "cache_dir",
})

#: Options added after runs were recorded without them, with the value such runs trained at: resuming one of them
#: with that value continues it exactly, and any other value is refused by name like any other change.
VALUE_BEFORE_THE_OPTION = {"head_bias": 0.0}


@dataclass
class RunPlan:
    """What the checks decided: the run record to write, the checkpoint to resume, the outputs to remove."""

    folder: Path
    record: dict
    resume_from: Optional[Path] = None
    remove: list = field(default_factory=list)


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing or unreadable (a foreign or damaged file)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


#: Options that name local files or folders: a resume may spell them otherwise (``./data``, an absolute path from
#: another working directory) as long as they name the same place.
PATH_OPTIONS = ("dataset", "pretrained", "encoder_pretrained")


def local_paths(settings: dict) -> dict:
    """The absolute form of each path option that names an existing local file or folder."""
    found = {}
    for key in PATH_OPTIONS:
        value = settings.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            found[key] = str(Path(value).expanduser().resolve())
    return found


def new_record(settings: dict, num_processes: int) -> dict:
    return {"run_id": uuid.uuid4().hex, "status": "running", "started": _now(), "num_processes": num_processes,
            "settings": settings, "paths": local_paths(settings)}


def checkpoint_metadata(record: dict, step: int) -> dict:
    """What each checkpoint carries, so that it can be matched to its run without the folder's run.json."""
    return {"run_id": record["run_id"], "step": int(step), "num_processes": record["num_processes"],
            "settings": record["settings"], "paths": record.get("paths", {})}


def plan_run(folder, settings: dict, num_processes: int, resume: Optional[str] = None,
             overwrite: bool = False) -> RunPlan:
    """Check ``folder`` for a new run (or for ``--resume``) and say what to do; raises :class:`UserError`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output-dir {folder} is a file; give a folder (it is created if missing)")
    record = read_json(folder / RUN_FILE)
    pid = live_process(record)
    if pid is not None:  # --overwrite-output-dir would delete its files under it, --resume write over its checkpoints
        raise UserError(f"a run is in progress in --output-dir {folder} (process {pid} on this machine, started "
                        f"{record.get('started', '?')}); wait for it to finish or stop it, or choose another "
                        "--output-dir")
    if resume:
        return _plan_resume(folder, settings, num_processes, resume)
    entries = _entries(folder)
    if not entries:
        return RunPlan(folder, new_record(settings, num_processes))
    if not overwrite:
        fix = ("pass --overwrite-output-dir to replace it" if _is_run(folder) else "empty it")
        raise UserError(f"--output-dir {folder} already holds {describe_folder(folder)}; choose another "
                        f"--output-dir{_resume_hint(folder)}, or {fix}")
    return RunPlan(folder, new_record(settings, num_processes), remove=_removable(folder, entries))


def prepare_folder(plan: RunPlan) -> None:
    """Remove the earlier run's outputs (``--overwrite-output-dir``) and record this run (main process only)."""
    for path in plan.remove:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    plan.folder.mkdir(parents=True, exist_ok=True)
    record = dict(plan.record, host=socket.gethostname(), pid=os.getpid())  # who is writing the folder now
    if plan.resume_from is not None:
        record["resumed"] = list(record.get("resumed", [])) + [{"from": plan.resume_from.name, "at": _now()}]
        record["status"] = "running"
    write_json(plan.folder / RUN_FILE, record)
    plan.record = record


def finish_record(plan: RunPlan, **results) -> None:
    """Mark the run finished (main process only): a later run into the folder is then told what it holds."""
    record = dict(plan.record, status="finished", finished=_now(), **results)
    write_json(plan.folder / RUN_FILE, record)
    plan.record = record


def live_process(record: Optional[dict]) -> Optional[int]:
    """The process id of a run recorded as running on this machine that is still alive, else None (a run that
    was killed, one on another machine, this very process, or a process id since reused by another program)."""
    if not record or record.get("status") != "running" or record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return pid
    except OSError:  # no such signal test here (Windows): say nothing rather than guess
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return pid
    ours = (b"rwkvunet", b"finetune", b"pretrain_imagenet")
    return pid if any(word in command for word in ours) else None


def describe_folder(folder: Path) -> str:
    """A short account of what ``folder`` holds, for the messages that refuse it."""
    record = read_json(folder / RUN_FILE)
    latest = CheckpointManager(folder / "checkpoints").latest()
    if record is not None and record.get("status") == "finished":
        dice = record.get("test_mean_dice")
        scored = f", test mean Dice {dice:.4f}" if isinstance(dice, (int, float)) else ""
        return f"a finished run (model trained for {record.get('steps', '?')} steps{scored})"
    if record is not None or latest is not None:
        where = f"last checkpoint at step {_step(latest)}" if latest is not None else "no checkpoint yet"
        return f"an unfinished run ({where})"
    if (folder / "training_config.yaml").is_file() or (folder / "model.safetensors").is_file():
        return "the outputs of an earlier run"
    names = sorted(p.name for p in _entries(folder))
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{len(names)} other file(s) or folder(s) ({shown})"


def _plan_resume(folder: Path, settings: dict, num_processes: int, resume: str) -> RunPlan:
    record = read_json(folder / RUN_FILE)
    if resume == "latest":
        checkpoint = _latest_checkpoint(folder, record)
    else:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint folder; pass a checkpoint-<step> folder, or "
                            f"--resume alone for the latest checkpoint in --output-dir")
    meta = read_json(checkpoint / RUN_FILE)
    if meta is None or "run_id" not in meta:
        raise UserError(f"{checkpoint} carries no run record ({RUN_FILE}), so it cannot be matched to a run (it "
                        "was written by an older rwkvunet or by another program); start a new run in a new "
                        "--output-dir")
    if record is None:
        if _entries(folder):
            raise UserError(f"--output-dir {folder} holds {describe_folder(folder)} but no run of {checkpoint}; "
                            "resume into the run's own folder or an empty one")
        record = {k: meta[k] for k in ("run_id", "num_processes", "settings")}
        record["paths"] = meta.get("paths", {})
        record.update(status="running", started=_now())
    if meta["run_id"] != record.get("run_id"):
        raise UserError(f"{checkpoint} belongs to another run ({meta['run_id'][:8]}) than the one in {folder} "
                        f"({str(record.get('run_id'))[:8]}); resume from one of {folder}/checkpoints, or start a new "
                        "run in a new --output-dir")
    _check_same_settings(meta, settings, num_processes, checkpoint)
    return RunPlan(folder, record, resume_from=checkpoint)


def _latest_checkpoint(folder: Path, record: Optional[dict]) -> Path:
    manager = CheckpointManager(folder / "checkpoints")
    found = manager.checkpoints()
    if not found:
        if not _entries(folder):
            raise UserError(f"nothing to resume in --output-dir {folder}: it is empty or does not exist; run "
                            "without --resume to start a new run there, or pass --resume CHECKPOINT")
        what = "the run there stopped before its first checkpoint" if record is not None else "it holds no run"
        raise UserError(f"nothing to resume in --output-dir {folder}: {what}; start again with "
                        "--overwrite-output-dir (without --resume), or choose another --output-dir")
    if record is None:
        raise UserError(f"{folder} has checkpoints but no run record ({RUN_FILE}; written by an older rwkvunet?), "
                        "so they cannot be matched to one run; start a new run in a new --output-dir")
    ids = {p: (read_json(p / RUN_FILE) or {}).get("run_id") for p in found}
    foreign = [p.name for p, run_id in ids.items() if run_id is not None and run_id != record.get("run_id")]
    if foreign:
        raise UserError(f"{folder}/checkpoints holds checkpoints of another run ({', '.join(foreign)}); resume "
                        "would mix two runs. Pass --resume with one of this run's checkpoint folders, or start a "
                        "new run in a new --output-dir")
    own = [p for p, run_id in ids.items() if run_id is not None]
    if not own:
        raise UserError(f"{folder}/checkpoints holds no checkpoint of the run in {folder} (none carries its "
                        f"{RUN_FILE}); start a new run in a new --output-dir")
    return own[-1]


def changed_settings(record: dict, settings: dict) -> list:
    """The options (names) in which ``settings`` make another run than the one ``record`` (run.json or a
    checkpoint's) describes; those free to change on a resume, and paths spelled otherwise, do not count."""
    old = {**VALUE_BEFORE_THE_OPTION, **(record.get("settings") or {})}
    old_paths = {**local_paths(old), **(record.get("paths") or {})}  # recorded, else as seen from here
    new_paths = local_paths(settings)

    def same(key) -> bool:
        return old.get(key) == settings.get(key) or (key in new_paths and old_paths.get(key) == new_paths[key])

    return [k for k in sorted(set(old) | set(settings)) if k not in RESUME_FREE and not same(k)]


def changed_values(record: dict, settings: dict) -> list:
    """``(option, recorded value, value here)`` for each of :func:`changed_settings`, for messages."""
    old = {**VALUE_BEFORE_THE_OPTION, **(record.get("settings") or {})}
    return [(k, old.get(k), settings.get(k)) for k in changed_settings(record, settings)]


def _check_same_settings(meta: dict, settings: dict, num_processes: int, checkpoint: Path) -> None:
    """Refuse a resume whose options would make it another run (other data, model, schedule or seed)."""
    changed = [f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, old, new in changed_values(meta, settings)]
    if changed:
        raise UserError(f"cannot resume {checkpoint} with other settings than the run was started with: "
                        f"{'; '.join(changed)}; resume with the run's settings (see training_config.yaml or "
                        f"{RUN_FILE}), or start a new run in a new --output-dir")
    if meta.get("num_processes", num_processes) != num_processes:
        raise UserError(f"{checkpoint} was trained by {meta['num_processes']} process(es) and this launch has "
                        f"{num_processes}; resume with accelerate launch --num_processes {meta['num_processes']}")


def _removable(folder: Path, entries: list) -> list:
    """The outputs of an earlier run, for ``--overwrite-output-dir``; refuses folders holding anything else."""
    is_run = _is_run(folder)
    foreign = sorted(p.name for p in entries if not any(fnmatch.fnmatch(p.name, pat) for pat in OUTPUT_PATTERNS))
    if not is_run:
        raise UserError(f"--overwrite-output-dir replaces only the folder of an earlier finetune.py run, and "
                        f"{folder} holds {describe_folder(folder)}; choose another --output-dir")
    if foreign:
        raise UserError(f"--output-dir {folder} holds files this script did not write ({', '.join(foreign)}); "
                        "move them away or choose another --output-dir (--overwrite-output-dir removes only a "
                        "run's own outputs)")
    return entries


def _is_run(folder: Path) -> bool:
    """Whether ``folder`` was written by this script (now or by a version without run records)."""
    return any((folder / name).exists() for name in (RUN_FILE, "training_config.yaml", "checkpoints"))


def _resume_hint(folder: Path) -> str:
    record = read_json(folder / RUN_FILE)
    if record is not None and record.get("status") != "finished" and CheckpointManager(folder / "checkpoints").latest():
        return ", pass --resume to continue that run"
    return ""


def _entries(folder: Path) -> list:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
