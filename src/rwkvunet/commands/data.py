"""``rwkvunet data``: a medical data set layout -> a ``datasets.DatasetDict`` folder (optionally on the Hub).

    rwkvunet data Kvasir-SEG/ kvasir_seed0/ --split-seed 0
    rwkvunet data ACDC/ acdc/ --layout acdc
    rwkvunet data Synapse/ synapse/ --push-to-hub me/synapse-transunet

The folder reloads with ``datasets.load_from_disk`` or ``rwkvunet.data.load_segmentation_dataset``, and holds
the image bytes themselves (not paths to the source files), so it can be moved or uploaded.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

LAYOUT_CHOICES = ("auto", "folder", "kvasir", "cvc", "busi", "glas", "isic", "synapse", "acdc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="data set root folder (or a Hub id / save_to_disk folder to re-split)")
    parser.add_argument("destination", help="output folder for DatasetDict.save_to_disk (must not exist)")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto", help="source layout (default: detect)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the 8:1:1 split of sets without their own splits (paper: 0, 1, 2)")
    parser.add_argument("--num-labels", type=int, default=None,
                        help="classes; default binary for image folders, 9 for Synapse, 4 for ACDC")
    parser.add_argument("--image-column", default="image", help="image column of Hub / save_to_disk sources")
    parser.add_argument("--mask-column", default="mask", help="mask column of Hub / save_to_disk sources")
    parser.add_argument("--cache-dir", default=None, help="datasets cache for the intermediate arrow files")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination folder")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to this Hub data set repo")
    parser.add_argument("--private", action="store_true", help="make the Hub repo private")


def embed_files(dataset_dict):
    """Replace image paths by the file bytes (what ``push_to_hub`` does), so the saved folder stands alone."""
    from datasets import DatasetDict
    from datasets.table import embed_table_storage

    out = {}
    for name, split in dataset_dict.items():
        fmt = split.format
        split = split.with_format("arrow").map(embed_table_storage, batched=True, desc=f"embedding {name}")
        out[name] = split.with_format(**fmt)
    return DatasetDict(out)


def convert(source: str, destination: str, *, layout: str = "auto", split_seed: int = 0, num_labels=None,
            image_column: str = "image", mask_column: str = "mask", cache_dir=None, overwrite: bool = False):
    """Load ``source`` with :func:`rwkvunet.data.load_segmentation_dataset` and save it to ``destination``.

    Writes to a temporary folder beside the destination and renames it, so an interrupted run leaves no
    half-written data set. Returns the saved ``DatasetDict``.
    """
    from ..data import load_segmentation_dataset

    dest = Path(destination)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; choose another destination or pass --overwrite")
    data = load_segmentation_dataset(source, layout=layout, split_seed=split_seed, num_labels=num_labels,
                                     image_column=image_column, mask_column=mask_column, cache_dir=cache_dir)
    data = embed_files(data)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        data.save_to_disk(str(tmp / "data"))
        if dest.exists():
            shutil.rmtree(dest)
        (tmp / "data").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data


def run(args: argparse.Namespace) -> int:
    from ..data import DataError, is_volume_split

    try:
        data = convert(args.source, args.destination, layout=args.layout, split_seed=args.split_seed,
                       num_labels=args.num_labels, image_column=args.image_column, mask_column=args.mask_column,
                       cache_dir=args.cache_dir, overwrite=args.overwrite)
    except (DataError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, split in data.items():
        kind = "volumes" if is_volume_split(split) else "2-D rows"
        print(f"{name}: {len(split)} {kind}")
    print(f"saved to {args.destination}")
    if args.push_to_hub:
        data.push_to_hub(args.push_to_hub, private=args.private)
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0
