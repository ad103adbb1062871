#!/usr/bin/env python
"""From-scratch comparison of RWKV-UNet and the smp U-Net reference at equal budget, with one command.

    python training/scratch_study.py --source /data --sets dsb2018_96 busi_224:busi --work-dir study

For each data set folder under ``--source`` (``NAME`` or ``NAME:LAYOUT``) and each split seed, the 8:1:1 split is
built once with ``rwkvunet data`` into ``WORK_DIR/data/``; then ``training/finetune.py`` trains every model of
``--models`` on it from scratch with the same options (epochs, batch, image size, everything else the defaults),
one run at a time, into ``WORK_DIR/runs/SET/MODEL/seedK`` (the split's seed is the run's seed too). ``--run-seeds
split 10 20`` trains each model three times on every split: once with the split's seed and once each with the
run seeds 10 and 20 (model start, data order, augmentation), into ``seedK``, ``seedK-run10`` and ``seedK-run20``:
more runs per model for a tighter mean, since one run moves with its start as much as with its split. Finished
runs (a ``metrics.json``) are kept, so an interrupted study continues where it stopped. The test scores are
collected into ``WORK_DIR/runs.csv`` (one row per run), ``WORK_DIR/summary.csv`` and ``WORK_DIR/summary.md``
(mean and standard deviation over the runs of the test Dice, IoU and training time). Options after ``--`` go to
every finetune run.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "training" / "finetune.py"


def _model_options() -> dict:
    """``--models`` names and the finetune options that select each: every registered variant and reference
    model (the names ``rwkvunet compare`` takes)."""
    from rwkvunet.models.baselines import BASELINES
    from rwkvunet.models.encoder import ENCODER_VARIANTS

    return {**{f"rwkvunet-{v}": ["--model", "rwkvunet", "--variant", v] for v in ENCODER_VARIANTS},
            **{name: ["--model", name] for name in BASELINES}}


#: ``--models`` names: the finetune options that select each model.
MODELS = _model_options()


#: ``--run-seeds`` word for "the split's own seed" (the study's one run per split, in ``seedK``).
SPLIT_SEED = "split"


def _run_seed(text: str):
    if text == SPLIT_SEED:
        return text
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor 'split'") from None
    if not 0 <= seed < 2 ** 32:
        raise argparse.ArgumentTypeError(f"{seed} is not a seed (0 to 2**32 - 1)")
    return seed


def run_folder(work: Path, dataset: str, model: str, seed: int, run_seed=SPLIT_SEED) -> Path:
    """``runs/SET/MODEL/seedK`` for the split's own run seed, ``seedK-runR`` for run seed R."""
    name = f"seed{seed}" if run_seed == SPLIT_SEED else f"seed{seed}-run{run_seed}"
    return work / "runs" / dataset / model / name


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="scratch_study.py", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder holding the data set folders")
    parser.add_argument("--sets", nargs="+", default=["dsb2018_96", "busi_224:busi"],
                        help="data set folders under --source, each NAME or NAME:LAYOUT (rwkvunet data --layout)")
    parser.add_argument("--models", nargs="+", default=["rwkvunet-t", "smp-unet-r34"], choices=sorted(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="split seeds (each also the run seed of its split's 'split' run)")
    parser.add_argument("--run-seeds", nargs="+", type=_run_seed, default=[SPLIT_SEED], metavar="SEED",
                        help="run seeds to train with on every split: integers, or 'split' for the split's own "
                             "seed (default: split, one run per split)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=64, help="training and evaluation size, all sets")
    parser.add_argument("--num-threads", type=int, default=None, help="CPU threads of each run")
    parser.add_argument("--work-dir", required=True, help="where the data splits, runs and tables go")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and collect what exists")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then options for every finetune run")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    if any(a == "--seed" or a.startswith("--seed=") for a in args.extra):
        parser.error("give run seeds with --run-seeds (e.g. --run-seeds split 10 20), not with '-- --seed'")
    args.run_seeds = list(dict.fromkeys(args.run_seeds))
    return args


def run(command, dry_run: bool, log: Path | None = None) -> None:
    print("+", " ".join(map(str, command)), flush=True)
    if dry_run:
        return
    if log is None:
        subprocess.run(list(map(str, command)), check=True)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        result = subprocess.run(list(map(str, command)), stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"scratch_study.py: error: {command[1]} failed (exit {result.returncode}); see {log}")


def prepare_split(source: Path, spec: str, seed: int, work: Path, dry_run: bool) -> Path:
    name, _, layout = spec.partition(":")
    dst = work / "data" / f"{name}_seed{seed}"
    if not (dst / "rwkvunet_data.json").is_file():
        command = [sys.executable, "-m", "rwkvunet.cli", "data", source / name, dst, "--split-seed", seed]
        run(command + (["--layout", layout] if layout else []), dry_run)
    return dst


def train(model: str, data: Path, out: Path, seed: int, args, run_seed=SPLIT_SEED) -> None:
    if (out / "metrics.json").is_file():
        print(f"= {out} done", flush=True)
        return
    command = [sys.executable, FINETUNE, *MODELS[model], "--dataset", data, "--split-seed", seed,
               "--seed", seed if run_seed == SPLIT_SEED else run_seed,
               "--epochs", args.epochs, "--batch-size", args.batch_size, "--img-size", args.img_size,
               "--output-dir", out, "--overwrite-output-dir", *args.extra]
    if args.num_threads:
        command += ["--num-threads", args.num_threads]
    start = time.time()
    run(command, args.dry_run, log=out.with_suffix(".log"))
    if not args.dry_run:
        print(f"= {out}: {time.time() - start:.0f} s", flush=True)


def collect(work: Path, sets, models, seeds, run_seeds=(SPLIT_SEED,)) -> list[dict]:
    rows = []
    for spec in sets:
        name = spec.partition(":")[0]
        for model in models:
            for seed in seeds:
                for run_seed in run_seeds:
                    path = run_folder(work, name, model, seed, run_seed) / "metrics.json"
                    if not path.is_file():
                        continue
                    metrics = json.loads(path.read_text())
                    test = metrics["test"]
                    rows.append(dict(dataset=name, model=model, seed=seed,
                                     run_seed=seed if run_seed == SPLIT_SEED else run_seed, epochs=metrics["epochs"],
                                     dice=test["mean_dice"], iou=test.get("mean_iou"),
                                     train_seconds=metrics["train_seconds"]))
    return rows


def _mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["model"]) == key]
        summary = dict(dataset=key[0], model=key[1], runs=len(group), epochs=group[0]["epochs"])
        for metric in ("dice", "iou", "train_seconds"):
            summary[f"{metric}_mean"], summary[f"{metric}_std"] = _mean_std(r[metric] for r in group)
        out.append(summary)
    return out


def paired(rows: list[dict]) -> list[dict]:
    """Each RWKV-UNet model against each reference model, run by run: the Dice difference on the same split
    and run seed (the two runs share data, order and augmentation, so the split's difficulty cancels)."""
    out = []
    by_key = {(r["dataset"], r["model"], r["seed"], r["run_seed"]): r["dice"] for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for model in (m for m in models if m.startswith("rwkvunet-")):
            for reference in (m for m in models if not m.startswith("rwkvunet-")):
                diffs = [dice - by_key[(dataset, reference, seed, run_seed)]
                         for (d, m, seed, run_seed), dice in by_key.items()
                         if d == dataset and m == model and (dataset, reference, seed, run_seed) in by_key]
                if diffs:
                    mean, std = _mean_std(diffs)
                    out.append(dict(dataset=dataset, model=model, reference=reference, runs=len(diffs),
                                    dice_diff_mean=mean, dice_diff_std=std, ahead=sum(d > 0 for d in diffs)))
    return out


def write_tables(work: Path, rows: list[dict], summary: list[dict]) -> str:
    for name, table in (("runs.csv", rows), ("summary.csv", summary)):
        if table:
            with (work / name).open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows(table)
    lines = ["| data set | model | runs | epochs | test Dice | test IoU | train time (min) |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['dataset']} | {s['model']} | {s['runs']} | {s['epochs']} | "
                     f"{s['dice_mean']:.4f} ± {s['dice_std']:.4f} | {s['iou_mean']:.4f} ± {s['iou_std']:.4f} | "
                     f"{s['train_seconds_mean'] / 60:.1f} ± {s['train_seconds_std'] / 60:.1f} |")
    lines += ["", "| data set | model | split seed | run seed | Dice | IoU | time (s) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['model']} | {r['seed']} | {r['run_seed']} | {r['dice']:.4f} | "
                     f"{r['iou'] if r['iou'] is None else format(r['iou'], '.4f')} | {r['train_seconds']:.0f} |")
    pairs = paired(rows)
    if pairs:
        lines += ["", "| data set | model | reference | paired runs | Dice difference | runs ahead |",
                  "|---|---|---|---|---|---|"]
        for p in pairs:
            lines.append(f"| {p['dataset']} | {p['model']} | {p['reference']} | {p['runs']} | "
                         f"{p['dice_diff_mean']:+.4f} ± {p['dice_diff_std']:.4f} | {p['ahead']} of {p['runs']} |")
    text = "\n".join(lines) + "\n"
    (work / "summary.md").write_text(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    work, source = Path(args.work_dir), Path(args.source)
    work.mkdir(parents=True, exist_ok=True)
    for spec in args.sets:
        if not (source / spec.partition(":")[0]).is_dir():
            raise SystemExit(f"scratch_study.py: error: {source / spec.partition(':')[0]} not found; give --source "
                             "the folder that holds the --sets folders")
    # seeds outermost: every model has a result on a seed before the next seed starts
    for seed in args.seeds:
        for spec in args.sets:
            data = prepare_split(source, spec, seed, work, args.dry_run)
            for run_seed in args.run_seeds:
                for model in args.models:
                    out = run_folder(work, spec.partition(":")[0], model, seed, run_seed)
                    train(model, data, out, seed, args, run_seed)
    rows = collect(work, args.sets, args.models, args.seeds, args.run_seeds)
    print(write_tables(work, rows, summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
