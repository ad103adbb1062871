"""``rwkvunet data``: a medical data set layout -> a ``datasets.DatasetDict`` folder (optionally on the Hub).

    rwkvunet data Kvasir-SEG/ kvasir_seed0/ --split-seed 0
    rwkvunet data ACDC/ acdc/ --layout acdc
    rwkvunet data Synapse/ synapse/ --push-to-hub me/synapse-transunet

The folder reloads with ``datasets.load_from_disk`` or ``rwkvunet.data.load_segmentation_dataset``, and holds
the image bytes themselves (not paths to the source files), so it can be moved or uploaded.

Nothing the command did not make is ever deleted: the destination may not be, contain or lie inside the source
(symbolic links resolved), and ``--overwrite`` replaces only an earlier output of this command, recognised by
the ``rwkvunet_data.json`` it writes into every output (source, layout, seed, split sizes, how mask values
became classes) beside ``datasets``' own ``dataset_dict.json``. The data set is written to a temporary folder
beside the destination and renamed into place; an earlier output is renamed aside first and deleted only once
the new one is in place.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..errors import PartlyDone, UserError, whole_number

LAYOUT_CHOICES = ("auto", "folder", "kvasir", "cvc", "busi", "glas", "isic", "synapse", "acdc")

#: Written into every output; ``--overwrite`` replaces only folders that have it.
OUTPUT_MARKER = "rwkvunet_data.json"
MARKER_FORMAT = "rwkvunet-data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="data set root folder (or a Hub id / save_to_disk folder to re-split)")
    parser.add_argument("destination", help="output folder for DatasetDict.save_to_disk (new, or empty; outside "
                                            "the source)")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto", help="source layout (default: detect)")
    parser.add_argument("--split-seed", type=whole_number(0), default=0,
                        help="seed of the 8:1:1 split of sets without their own splits (paper: 0, 1, 2)")
    parser.add_argument("--num-labels", type=whole_number(1), default=None,
                        help="classes; default binary for image folders, 9 for Synapse, 4 for ACDC. Masks with "
                             "this many grey levels or colours become classes 0..N-1 in sorted order")
    parser.add_argument("--image-column", default="image", help="image column of Hub / save_to_disk sources")
    parser.add_argument("--mask-column", default="mask", help="mask column of Hub / save_to_disk sources")
    parser.add_argument("--cache-dir", default=None, help="datasets cache for the intermediate arrow files")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the destination if it is an earlier output of this command")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to this Hub data set repo")
    parser.add_argument("--private", action="store_true", help="make the Hub repo private")


# --- where the output may go ---------------------------------------------------------------------------

def is_earlier_output(folder: Path) -> bool:
    """True for a folder written by this command: its marker names this format, beside a saved DatasetDict."""
    marker, saved = Path(folder) / OUTPUT_MARKER, Path(folder) / "dataset_dict.json"
    if not (marker.is_file() and saved.is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def local_source(source: str) -> Optional[Path]:
    """The resolved folder or file of a local source; None for a Hub id."""
    path = Path(source).expanduser()
    return path.resolve() if path.exists() else None


def refuse_overlap(source: Path, dest: Path) -> None:
    """The destination is replaced as a whole, so it must share nothing with the source."""
    if dest == source:
        raise UserError(f"the destination {dest} is the source folder itself; give a new folder outside the source.")
    if source in dest.parents:
        raise UserError(f"the destination {dest} lies inside the source {source}; give a folder outside the "
                        "source (it would be read as part of the data set next time).")
    if dest in source.parents:
        raise UserError(f"the destination {dest} contains the source {source}; give a folder outside it "
                        "(replacing it would delete the source).")


def check_replaceable(dest: Path, overwrite: bool) -> None:
    """An existing destination may be replaced when empty, or with ``overwrite`` when it is an earlier output."""
    if not dest.is_dir():
        raise UserError(f"the destination {dest} is a file; give a folder path for the data set (it is created).")
    if not any(dest.iterdir()):
        return  # an empty folder: nothing to lose
    if not overwrite:
        raise UserError(f"the destination {dest} exists; choose another folder, or pass --overwrite to replace it "
                        f"if it is an earlier output of rwkvunet data.")
    if not is_earlier_output(dest):
        raise UserError(f"the destination {dest} exists and is not an output of rwkvunet data (it has no "
                        f"{OUTPUT_MARKER} beside dataset_dict.json), so --overwrite leaves it alone; choose another "
                        f"folder or remove it yourself.")


def check_destination(source: str, destination: str, overwrite: bool, cache_dir: Optional[str] = None) -> Path:
    """Refuse every destination that could lose data, before anything is read; returns it resolved."""
    given = Path(destination).expanduser()
    if given.exists() and not given.is_dir():
        raise UserError(f"the destination {given} is a file; give a folder path for the data set (it is created).")
    dest = given.resolve()
    src = local_source(source)
    if src is not None:
        refuse_overlap(src, dest)
    if cache_dir is not None and dest in Path(cache_dir).expanduser().resolve().parents:
        raise UserError(f"--cache-dir {cache_dir} lies inside the destination {dest}; put the cache elsewhere.")
    if dest.exists():
        check_replaceable(dest, overwrite)
    return dest


# --- writing -------------------------------------------------------------------------------------------

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


def make_folder_beside(dest: Path) -> Path:
    """A temporary folder on the destination's file system, so renames into place are atomic."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as err:
        raise UserError(f"cannot create a folder in {dest.parent}: {err.strerror or err}; check the destination "
                        f"path and its permissions.") from err


def swap_in(new: Path, dest: Path, aside: Path, overwrite: bool) -> None:
    """Rename ``new`` to ``dest``; an existing ``dest`` is renamed to ``aside`` first and put back on failure."""
    if not dest.exists():
        new.rename(dest)
        return
    check_replaceable(dest, overwrite)  # again: it may have appeared while the data set was converted
    dest.rename(aside)
    try:
        new.rename(dest)
    except BaseException:
        aside.rename(dest)
        raise


def save_folder(data, dest: Path, marker: dict, overwrite: bool) -> None:
    """Save ``data`` with its marker into a temporary folder beside ``dest``, then swap it in."""
    tmp = make_folder_beside(dest)
    try:
        new = tmp / "data"
        data.save_to_disk(str(new))
        (new / OUTPUT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        swap_in(new, dest, tmp / "previous", overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the temporary copy, or the replaced earlier output


def describe_output(data, source: str, layout: str, split_seed: int, num_labels, coding) -> dict:
    """The marker's content: what was converted, how, and how mask values became classes."""
    from .. import __version__

    src = local_source(source)
    return {
        "format": MARKER_FORMAT,
        "written_by": f"rwkvunet {__version__}",
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(src) if src is not None else source,
        "layout": layout,
        "split_seed": split_seed,
        "num_labels": num_labels,
        "splits": {name: len(split) for name, split in data.items()},
        "masks": coding.describe() if coding is not None else None,
        "label_mapping": coding.mapping() if coding is not None else None,
    }


def convert(source: str, destination: str, *, layout: str = "auto", split_seed: int = 0, num_labels=None,
            image_column: str = "image", mask_column: str = "mask", cache_dir=None, overwrite: bool = False):
    """Load ``source`` with :func:`rwkvunet.data.load_segmentation_dataset` and save it to ``destination``.

    The destination is checked first (see the module docstring; :class:`~rwkvunet.errors.UserError` when it
    could lose data). Returns the saved ``DatasetDict``; its ``output_info`` attribute is the content of
    ``rwkvunet_data.json``.
    """
    from ..data import detect_layout, load_segmentation_dataset

    dest = check_destination(source, destination, overwrite, cache_dir)
    if layout == "auto":
        layout = detect_layout(source)
    loaded = load_segmentation_dataset(source, layout=layout, split_seed=split_seed, num_labels=num_labels,
                                       image_column=image_column, mask_column=mask_column, cache_dir=cache_dir)
    coding = getattr(loaded, "mask_coding", None)
    data = embed_files(loaded)
    data.output_info = describe_output(data, source, layout, split_seed, num_labels, coding)
    save_folder(data, dest, data.output_info, overwrite)
    return data


def run(args: argparse.Namespace) -> int:
    from ..data import is_volume_split

    if args.private and not args.push_to_hub:  # it was silently ignored
        raise UserError("--private makes the Hub repo of --push-to-hub private, and nothing is pushed; add "
                        "--push-to-hub REPO or drop --private")
    if args.push_to_hub:
        from ..hub import check_hub_upload

        check_hub_upload(args.push_to_hub, "--push-to-hub",
                         later="push the folder later (datasets.load_from_disk(DST).push_to_hub(REPO))")
    data = convert(args.source, args.destination, layout=args.layout, split_seed=args.split_seed,
                   num_labels=args.num_labels, image_column=args.image_column, mask_column=args.mask_column,
                   cache_dir=args.cache_dir, overwrite=args.overwrite)
    for name, split in data.items():
        kind = "volumes" if is_volume_split(split) else "2-D rows"
        print(f"{name}: {len(split)} {kind}")
    if data.output_info["label_mapping"] is not None:
        print(f"masks: {data.output_info['masks']} (written to {OUTPUT_MARKER})")
    print(f"saved to {args.destination}")
    if args.push_to_hub:
        try:
            data.push_to_hub(args.push_to_hub, private=args.private)
        except Exception as err:  # network, authentication, permissions: the folder itself is complete
            reason = " ".join(str(err).split())[:200]
            raise PartlyDone(f"{args.destination} is written, but the upload to {args.push_to_hub} failed "
                             f"({type(err).__name__}: {reason}); push it later with datasets.load_from_disk("
                             f"{str(args.destination)!r}).push_to_hub({args.push_to_hub!r})") from err
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0
