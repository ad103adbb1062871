"""Evaluate a trained RWKV-UNet segmenter with the paper's metrics.

    python training/evaluate.py runs/acdc_b --dataset /data/ACDC --split test --tta --output-dir runs/acdc_b/eval
    accelerate launch --num_processes 2 training/evaluate.py rwkv-unet/rwkvunet-b-synapse --dataset /data/Synapse

MODEL is a ``save_pretrained`` folder or a Hub id. Synapse and ACDC are scored per 3-D volume (Dice and HD95
per class), binary sets per image (Dice and IoU). Writes ``metrics.json``, ``per_class.csv`` and
``per_case.csv`` to ``--output-dir`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="save_pretrained folder or Hub id of the segmenter")
    parser.add_argument("--dataset", required=True,
                        help="Hub id, save_to_disk folder, image/mask folder, Synapse or ACDC root")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    parser.add_argument("--output-dir", default=None, help="where to write metrics (default: MODEL/eval-SPLIT "
                                                           "for a local folder, ./eval-SPLIT otherwise)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the image processor's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images or slices per forward pass")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of 8:1:1 splits (binary sets)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--mask-column", default="mask")
    parser.add_argument("--cache-dir", default=None, help="datasets cache folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def load_model(name: str):
    """The segmenter and its image processor settings (size, normalisation), if it has a processor."""
    import rwkvunet  # noqa: F401  registers the Auto classes
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(name)
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        processor = None
    return model, processor


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    from rwkvunet.data import DataError, load_segmentation_dataset
    from rwkvunet.data.transforms import EvalTransform
    from rwkvunet.evaluation import evaluate

    accelerator = Accelerator()
    model, processor = load_model(args.model)
    model.to(accelerator.device)
    size = args.img_size
    mean = std = None
    if processor is not None:
        if size is None and getattr(processor, "size", None):
            size = (processor.size["height"], processor.size["width"])
        if getattr(processor, "do_normalize", False):
            mean, std = processor.image_mean, processor.image_std
    size = size or 224
    num_labels = model.config.num_labels
    try:
        with accelerator.main_process_first():
            data = load_segmentation_dataset(args.dataset, image_column=args.image_column,
                                             mask_column=args.mask_column, split_seed=args.split_seed,
                                             num_labels=num_labels, cache_dir=args.cache_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.split not in data:
        print(f"error: {args.dataset} has no split {args.split!r} (it has {', '.join(data)})", file=sys.stderr)
        return 1
    transform = EvalTransform(size, num_channels=model.config.in_channels, mean=mean, std=std)
    result = evaluate(model, data[args.split], img_size=size, batch_size=args.batch_size, tta=args.tta,
                      accelerator=accelerator, progress=not args.no_progress, transform=transform)
    if accelerator.is_main_process:
        out = Path(args.output_dir) if args.output_dir else (
            Path(args.model) if Path(args.model).is_dir() else Path(".")) / f"eval-{args.split}"
        result.write_json(out / "metrics.json")
        result.write_csv(out)
        print(result.format_table())
        print(json.dumps({"mean_dice": result.mean_dice, "mean_hd95": result.mean_hd95,
                          "mean_iou": result.mean_iou}))
        print(f"wrote {out}/metrics.json, per_class.csv, per_case.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
