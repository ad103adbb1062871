"""Evaluate a trained RWKV-UNet segmenter with the paper's metrics.

    rwkvunet evaluate runs/acdc_b --dataset /data/ACDC --split test --tta --output-dir runs/acdc_b/eval
    accelerate launch --num_processes 2 -m rwkvunet.evaluate rwkv-unet/rwkvunet-b-synapse --dataset /data/Synapse
    python training/evaluate.py runs/acdc_b --dataset /data/ACDC                                  # from a clone

MODEL is a ``save_pretrained`` folder or a Hub id. Synapse and ACDC are scored per 3-D volume (Dice and HD95
per class), binary sets per image (Dice and IoU). ``--dataset synthetic`` scores the built-in synthetic set that
``finetune`` trains on by default, made as the run folder's ``training_config.yaml`` made it (its size, image counts
and split seed; the defaults for a model without one). Writes ``metrics.json``, ``per_class.csv`` and
``per_case.csv`` to ``--output-dir`` and prints the table.

A model whose classes do not fit the masks (binary masks for a multi-class model, labels above its classes, a
label map for a binary model) is refused before any prediction. Mistakes are one line ``<prog>: error: ...``
and exit status 2 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rwkvunet.errors import UserError, run_main, whole_number
from rwkvunet.ops.cpu_memory import keep_freed_cpu_memory


#: The program name in messages when run as ``python -m rwkvunet.evaluate`` (``accelerate launch -m ...``).
PROG = "rwkvunet.evaluate"


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also RWKVUNET_DEBUG=1)")
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options but ``--debug`` (``rwkvunet`` adds its own)."""
    parser.add_argument("model", help="save_pretrained folder or Hub id of the segmenter")
    parser.add_argument("--dataset", required=True,
                        help="Hub id, save_to_disk folder, image/mask folder, Synapse or ACDC root, or 'synthetic' "
                             "(the built-in set, as the model's run made it)")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    parser.add_argument("--output-dir", default=None, help="where to write metrics (default: MODEL/eval-SPLIT "
                                                           "for a local folder, ./eval-SPLIT otherwise)")
    parser.add_argument("--img-size", type=whole_number(1), default=None,
                        help="input size (default: the image processor's)")
    parser.add_argument("--batch-size", type=whole_number(1), default=8, help="images or slices per forward pass")
    parser.add_argument("--split-seed", type=whole_number(0), default=None,
                        help="seed of 8:1:1 splits (binary sets; default 0, for the synthetic set its run's)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--mask-column", default="mask")
    parser.add_argument("--cache-dir", default=None, help="datasets cache folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of another evaluation (other data, split or settings) in "
                             "--output-dir; the same evaluation run again replaces its own without it")


def load_model(name: str):
    """The segmenter and the pixel settings it was trained with (its ``preprocessor_config.json``, read by the
    same code as ``Segmenter`` and ``rwkvunet predict``); a missing, empty or truncated model is a one-line
    error."""
    from rwkvunet.hub import load_segmentation_model
    from rwkvunet.inference import load_preprocessing

    model = load_segmentation_model(name)
    return model, load_preprocessing(name, int(model.config.in_channels))


def eval_pixels(pixels, img_size, config):
    """The model's pixel settings at ``--img-size``, else at its processor's size, else at its training size."""
    import dataclasses

    size = img_size or pixels.size or getattr(config, "image_size", None) or 224
    return dataclasses.replace(pixels, size=(size, size) if isinstance(size, int) else tuple(size))


def output_folder(args) -> Path:
    out = Path(args.output_dir) if args.output_dir else (
        Path(args.model) if Path(args.model).is_dir() else Path(".")) / f"eval-{args.split}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file; give a folder (it is created if missing)")
    return out


SYNTHETIC = "synthetic"


def evaluation_settings(args, size) -> dict:
    """What an evaluation scored and how, recorded in its metrics.json: the model, the data (a local path made
    absolute), the split and its seed, flips and the input size."""
    def where(name: str) -> str:
        return str(Path(name).resolve()) if name != SYNTHETIC and Path(name).exists() else name

    return {"model": where(args.model), "dataset": where(args.dataset), "split": args.split,
            "split_seed": args.split_seed, "tta": bool(args.tta), "img_size": list(size)}


def check_earlier_results(out: Path, settings: dict, overwrite: bool) -> None:
    """Keep another evaluation's results: a metrics.json in ``out`` from other data, split or settings (or from an
    evaluation that did not record them) is replaced only with --overwrite."""
    earlier = out / "metrics.json"
    if overwrite or not earlier.is_file():
        return
    try:
        recorded = json.loads(earlier.read_text(encoding="utf-8")).get("evaluated")
    except (ValueError, UnicodeDecodeError, AttributeError):
        recorded = None
    if recorded == settings:
        return  # the same evaluation again: its results are replaced
    what = ("another evaluation's results (" + ", ".join(f"{k} {recorded.get(k)} there, {settings[k]} here"
                                                        for k in settings if recorded.get(k) != settings[k]) + ")"
            if isinstance(recorded, dict) else "results that do not say what they scored")
    raise UserError(f"{earlier} holds {what}; give another --output-dir for this evaluation, or pass --overwrite "
                    "to replace them")


def synthetic_settings(model: str, split_seed) -> dict:
    """How the run of ``model`` made the synthetic set: its ``training_config.yaml`` (a local run folder), else
    finetune's defaults; ``split_seed`` when given overrides the run's."""
    import dataclasses

    import yaml

    from rwkvunet.training.arguments import TrainArguments

    defaults = {f.name: f.default for f in dataclasses.fields(TrainArguments)}
    keys = ("synthetic_size", "synthetic_train", "synthetic_eval", "split_seed")
    settings = {k: defaults[k] for k in keys}
    recorded = Path(model) / "training_config.yaml"
    if recorded.is_file():
        try:
            saved = yaml.safe_load(recorded.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            reason = " ".join(str(err).split())
            raise UserError(f"{recorded} is not readable YAML ({reason}); restore it, or score another "
                            "--dataset") from None
        if not isinstance(saved, dict):
            raise UserError(f"{recorded} holds no option: value mapping; restore it, or score another --dataset")
        if saved.get("dataset", SYNTHETIC) != SYNTHETIC:
            raise UserError(f"{model} was trained on {saved['dataset']}, not on the synthetic set; pass "
                            f"--dataset {saved['dataset']}")
        settings.update({k: saved[k] for k in keys if isinstance(saved.get(k), int)})
    if split_seed is not None:
        settings["split_seed"] = split_seed
    return settings


def load_data(args, num_labels: int):
    """The data set read for the model's classes. Masks it cannot read that way are read once more as a binary
    set or a label map, so that the message names the labels found and the model's classes."""
    from rwkvunet.data import DataError, load_segmentation_dataset
    from rwkvunet.evaluation import check_model_fits_labels, split_labels

    if args.dataset == SYNTHETIC:
        from rwkvunet.data.synthetic import make_synthetic_dataset

        s = synthetic_settings(args.model, args.split_seed)
        return make_synthetic_dataset(seed=s["split_seed"], size=s["synthetic_size"], num_train=s["synthetic_train"],
                                      num_validation=s["synthetic_eval"], num_test=s["synthetic_eval"])

    def load(labels):
        return load_segmentation_dataset(args.dataset, image_column=args.image_column,
                                         mask_column=args.mask_column,
                                         split_seed=0 if args.split_seed is None else args.split_seed,
                                         num_labels=labels, cache_dir=args.cache_dir)
    try:
        return load(num_labels)
    except DataError as err:
        try:  # read the masks as a binary set (multi-class model) or as a label map (binary model)
            other = load(None if num_labels > 2 else 256)
        except DataError:
            raise err from None
        labels = sorted({v for split in other.values() for v in split_labels(split)})
        check_model_fits_labels(num_labels, labels, args.dataset)
        raise


def main(argv=None, prog: str = PROG) -> int:
    args = parse_args(argv, prog=prog)
    return run_main(prog, lambda: _own_process_and_run(args), debug=args.debug)


def _own_process_and_run(args) -> int:
    keep_freed_cpu_memory()  # the entry point owns the process: freed CPU activations are kept for reuse
    return run(args)


def run(args) -> int:
    from accelerate import Accelerator
    from timm.utils import reparameterize_model

    from rwkvunet.data import detect_layout
    from rwkvunet.data.transforms import EvalTransform
    from rwkvunet.evaluation import check_model_fits_labels, evaluate, split_labels
    from rwkvunet.training.processes import main_process_first

    # every check that can refuse comes before the processes wait for each other
    if args.dataset == SYNTHETIC:
        synthetic_settings(args.model, args.split_seed)  # a model trained on other data is refused here
    else:
        detect_layout(args.dataset)
    out = output_folder(args)
    model, pixels = load_model(args.model)
    pixels = eval_pixels(pixels, args.img_size, model.config)
    settings = evaluation_settings(args, pixels.size)
    check_earlier_results(out, settings, args.overwrite)
    accelerator = Accelerator()
    model.to(accelerator.device)
    num_labels = model.config.num_labels
    data = main_process_first(accelerator, lambda: load_data(args, num_labels))
    if args.split not in data or len(data[args.split]) == 0:
        found = ", ".join(f"{k} ({len(v)} cases)" for k, v in data.items()) or "none"
        raise UserError(f"{args.dataset} has no cases in split {args.split!r} (its splits: {found}); pass "
                        "--split with one of them")
    check_model_fits_labels(num_labels, split_labels(data[args.split]), f"{args.dataset} ({args.split})")
    transform = EvalTransform(pixels=pixels)
    # inference only: BatchNorm folded into the convolutions (timm's reparameterize_model), in place
    model = reparameterize_model(model.eval(), inplace=True)
    result = evaluate(model, data[args.split], img_size=pixels.size, batch_size=args.batch_size, tta=args.tta,
                      accelerator=accelerator, progress=not args.no_progress, transform=transform)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"evaluated": settings, **result.to_dict()}, indent=2))
        result.write_csv(out)
        print(result.format_table())
        print(json.dumps({"mean_dice": result.mean_dice, "mean_hd95": result.mean_hd95,
                          "mean_iou": result.mean_iou}))
        print(f"wrote {out}/metrics.json, per_class.csv, per_case.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
