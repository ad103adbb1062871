"""RWKV-UNet beside a reference, on the user's own data: the same fine-tuning run for each model and seed, then one
table and one plot of curves.

    rwkvunet compare --dataset my_images_and_masks/ --seeds 0 1 2 --epochs 50 --output-dir cmp

Each run is :func:`rwkvunet.training.finetune.train` with identical options but ``--model`` (and ``--variant``),
``--seed``, unless given ``--lr`` (each model's own from-scratch lr, ``DEFAULT_LR``) and, unless given,
``--split-seed`` (the seed; the 8:1:1 split of sets without their own splits), into
``OUTPUT/runs/MODEL/seedK``. ``OUTPUT`` then holds ``comparison.csv`` and ``comparison.md`` (one row per run: model,
seed, data set, epochs, test Dice, IoU or HD95, training time, parameters; and each model's mean and standard
deviation over the seeds) and ``comparison_curves.png`` (validation Dice and training loss per model).

A finished run with the same settings is kept and an unfinished one resumed, so a stopped comparison continues
where it stopped. ``OUTPUT`` must be new, empty, or an earlier comparison (it holds ``compare.json``).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from .arguments import TrainArguments, check_arguments
from .run_folder import RESUME_FREE, RUN_FILE, changed_settings, changed_values, read_json

#: Written into the comparison folder: what was compared (and the mark of a folder that compare may fill).
MARKER = "compare.json"
TABLE_COLUMNS = ("model", "seed", "dataset", "scored_on", "epochs", "steps", "dice", "iou", "hd95", "train_seconds",
                 "num_parameters", "run")


def model_choices() -> list[str]:
    """``--models`` names: ``rwkvunet`` (at ``--variant``), ``rwkvunet-<variant>``, and each reference model."""
    from ..models.baselines import BASELINES
    from ..models.encoder import ENCODER_VARIANTS

    return ["rwkvunet", *(f"rwkvunet-{v}" for v in ENCODER_VARIANTS), *BASELINES]


@dataclass
class PlannedRun:
    label: str  # the model as the table names it
    seed: int
    args: TrainArguments

    @property
    def folder(self) -> Path:
        return Path(self.args.output_dir)


def plan_runs(base: TrainArguments, models: Sequence[str], seeds: Sequence[int], output_dir,
              fixed_split: bool = False) -> list[PlannedRun]:
    """One run per model and seed: ``base`` with the model, the seed (and the split seed unless ``fixed_split``)
    and its folder ``OUTPUT/runs/LABEL/seedK``; every run checked as finetune checks it."""
    choices = model_choices()
    unknown = [m for m in models if m not in choices]
    if unknown:
        raise UserError(f"--models {' '.join(unknown)}: unknown; choose from {', '.join(choices)}")
    labels = [_label(m, base.variant) for m in models]
    if len(set(labels)) != len(labels):
        raise UserError(f"--models names the same model twice ({' '.join(models)} with --variant {base.variant})")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds repeats a seed ({' '.join(map(str, seeds))})")
    runs = []
    for name, label in zip(models, labels):
        model, _, variant = name.partition("-") if name.startswith("rwkvunet") else (name, "", "")
        for seed in seeds:
            args = dataclasses.replace(
                base, model=model, variant=variant or base.variant, seed=seed,
                split_seed=base.split_seed if fixed_split else seed,
                output_dir=str(Path(output_dir) / "runs" / label / f"seed{seed}"))
            check_arguments(args)
            runs.append(PlannedRun(label, seed, args))
    return runs


def _label(model: str, variant: str) -> str:
    return f"rwkvunet-{variant}" if model == "rwkvunet" else model


def check_output_dir(output_dir) -> None:
    """``OUTPUT`` is new, empty, or an earlier comparison; refuse anything else (it is the user's)."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output-dir {folder} is a file; give a folder (it is created if missing)")
    if folder.is_dir() and any(folder.iterdir()) and read_json(folder / MARKER) is None:
        raise UserError(f"--output-dir {folder} holds files that are not a comparison (no {MARKER}); choose a new "
                        "or empty --output-dir")


def run_state(run: PlannedRun) -> str:
    """``new``, ``finished`` (with these settings: kept), ``unfinished`` (resumed from its last checkpoint),
    ``restart`` (stopped before its first checkpoint) or ``other`` (a run with other settings)."""
    record = read_json(run.folder / RUN_FILE)
    if record is None:
        return "new"
    if changed_settings(record, run.args.to_dict()):
        return "other"
    if record.get("status") == "finished" and (run.folder / "metrics.json").is_file():
        return "finished"
    checkpoints = run.folder / "checkpoints"
    return "unfinished" if checkpoints.is_dir() and any(checkpoints.iterdir()) else "restart"


def _settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in RESUME_FREE}


# --- the table ------------------------------------------------------------------------------------------------

def read_result(run: PlannedRun) -> dict:
    """The table row of a finished run, from its ``metrics.json`` (test scores; the best validation Dice when
    the data has no test split)."""
    metrics = json.loads((run.folder / "metrics.json").read_text())
    test = metrics.get("test")
    if test:
        scored_on, dice, iou, hd95 = "test", test.get("mean_dice"), test.get("mean_iou"), test.get("mean_hd95")
    else:
        scored_on, dice, iou, hd95 = "validation", metrics.get("best_validation_mean_dice"), None, None
    dataset = run.args.dataset
    return {"model": run.label, "seed": run.seed, "dataset": dataset_name(dataset), "scored_on": scored_on,
            "epochs": metrics.get("epochs"), "steps": metrics.get("steps"), "dice": dice, "iou": iou, "hd95": hd95,
            "train_seconds": metrics.get("train_seconds"), "num_parameters": metrics.get("num_parameters"),
            "run": str(run.folder)}


def dataset_name(dataset: str) -> str:
    """The data set as the table names it: its folder name, or a Hub id's name."""
    return Path(str(dataset).rstrip("/")).name or str(dataset)


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Each model's mean and sample standard deviation over its seeds (``None`` where a value is missing)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        summary = {"model": model, "seeds": len(mine), "dataset": mine[0]["dataset"],
                   "epochs": mine[0]["epochs"], "num_parameters": mine[0]["num_parameters"]}
        for key in ("dice", "iou", "hd95", "train_seconds"):
            values = [r[key] for r in mine if r[key] is not None]
            summary[key] = statistics.fmean(values) if values else None
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(summary)
    return out


def write_table(rows: Sequence[dict], output_dir) -> tuple[Path, Path]:
    """``comparison.csv`` (the runs, then a ``mean`` and a ``std`` row per model) and ``comparison.md``."""
    folder = Path(output_dir)
    summaries = summarize(rows)
    csv_path = folder / "comparison.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row[k]) for k in TABLE_COLUMNS})
        for s in summaries:
            for kind, suffix in (("mean", ""), ("std", "_std")):
                writer.writerow({"model": s["model"], "seed": kind, "dataset": s["dataset"], "epochs": s["epochs"],
                                 "num_parameters": s["num_parameters"],
                                 **{k: _cell(s[f"{k}{suffix}"]) for k in ("dice", "iou", "hd95", "train_seconds")}})
    md_path = folder / "comparison.md"
    md_path.write_text(format_markdown(rows, summaries))
    return csv_path, md_path


def _cell(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def format_markdown(rows: Sequence[dict], summaries: Sequence[dict]) -> str:
    """One table: a row per run, then each model's mean ± standard deviation over its seeds."""
    binary = any(r["iou"] is not None for r in rows)
    second = "IoU" if binary else "HD95"
    key = "iou" if binary else "hd95"
    scored_on = sorted({r["scored_on"] for r in rows})
    lines = [f"| model | seed | data set | epochs | Dice ({'/'.join(scored_on)}) | {second} | train time (s) | "
             "params (M) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['seed']} | {r['dataset']} | {r['epochs']} | {_num(r['dice'])} | "
                     f"{_num(r[key])} | {_num(r['train_seconds'], 1)} | {_millions(r['num_parameters'])} |")
    for s in summaries:
        if s["seeds"] < 2:
            continue
        lines.append(f"| **{s['model']}** | mean ± sd ({s['seeds']} seeds) | {s['dataset']} | {s['epochs']} | "
                     f"**{_spread(s['dice'], s['dice_std'])}** | {_spread(s[key], s[f'{key}_std'])} | "
                     f"{_spread(s['train_seconds'], s['train_seconds_std'], 1)} | "
                     f"{_millions(s['num_parameters'])} |")
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _spread(mean, std, digits: int = 4) -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _millions(count: Optional[int]) -> str:
    return "" if count is None else f"{count / 1e6:.2f}"


# --- the curves -----------------------------------------------------------------------------------------------

def read_curves(run: PlannedRun) -> dict:
    """``{"validation": [(step, dice)], "loss": [(step, loss)]}`` of a finished run."""
    metrics = json.loads((run.folder / "metrics.json").read_text())
    validation = [(int(step), float(dice)) for step, _, dice in metrics.get("validation_history") or []]
    loss = []
    log = run.folder / "train_log.csv"
    if log.is_file():
        with log.open() as f:
            loss = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    return {"validation": validation, "loss": loss}


# --- the command ----------------------------------------------------------------------------------------------

def _train_runs(runs: Sequence[PlannedRun], states: dict, state) -> None:
    """Train the planned runs in order: keep the finished ones, resume the unfinished ones."""
    from .finetune import train

    for number, run in enumerate(runs, start=1):
        what = states[id(run)]
        if state.is_main_process:
            doing = {"finished": "kept (finished)", "unfinished": "resumed"}.get(what, "training")
            print(f"[{number}/{len(runs)}] {run.label} seed {run.seed}: {doing} -> {run.folder}", flush=True)
        if what == "finished":
            continue
        args = dataclasses.replace(run.args, resume="latest" if what == "unfinished" else None,
                                   overwrite_output_dir=what in ("other", "restart"))
        train(args)


def compare(base: TrainArguments, models: Sequence[str], seeds: Sequence[int], output_dir,
            fixed_split: bool = False) -> list[dict]:
    """Train every planned run (keeping finished ones, resuming unfinished ones), then write the table and the
    curves; returns the table's rows."""
    from accelerate import PartialState

    from ..models.baselines import BASELINES, import_smp
    from .plots import plot_comparison

    runs = plan_runs(base, models, seeds, output_dir, fixed_split)
    settings = {"models": list(models), "seeds": list(seeds), "fixed_split": fixed_split,
                "options": {**_settings(base.to_dict()), "lr": base.lr}}  # None: each model's own lr
    check_output_dir(output_dir)
    if any(run.args.model in BASELINES for run in runs):
        import_smp()  # before any training: a missing extra is an error now, not after the first model
    states = {id(run): run_state(run) for run in runs}
    other = [run for run in runs if states[id(run)] == "other"]
    if other and not base.overwrite_output_dir:
        changed = changed_values(read_json(other[0].folder / RUN_FILE) or {}, other[0].args.to_dict())
        shown = ", ".join(f"--{k.replace('_', '-')} {old} there, {new} here" for k, old, new in changed[:3]) + (
            f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise UserError(f"{other[0].folder} holds a run with other settings ({shown}); choose another "
                        "--output-dir, or pass --overwrite-output-dir to train it again")
    state = PartialState()
    folder = Path(output_dir)
    created, new_marker = not folder.exists(), not (folder / MARKER).exists()
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(json.dumps(settings, indent=2))
    try:
        _train_runs(runs, states, state)
    except BaseException:
        # the first run failed before writing anything (e.g. a mistyped --dataset): leave nothing this call made
        if new_marker and state.is_main_process and [p.name for p in folder.iterdir()] == [MARKER]:
            (folder / MARKER).unlink()
            if created:
                folder.rmdir()
        raise
    rows = [read_result(run) for run in runs]
    if state.is_main_process:
        csv_path, md_path = write_table(rows, folder)
        curves = {}
        for run in runs:
            curves.setdefault(run.label, []).append(read_curves(run))
        plot_comparison(curves, folder / "comparison_curves.png")
        print(md_path.read_text(), end="")
        print(f"wrote {csv_path}, {md_path} and {folder / 'comparison_curves.png'}")
    state.wait_for_everyone()
    return rows
