"""One entry point for every data source: :func:`load_segmentation_dataset`."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

from .files import IMAGE_EXTENSIONS, LEVEL_RULES, DataError, file_stamp, is_image_file
from .folders import (FOLDER_LAYOUTS, find_pairs, has_instance_masks, looks_like_folder_layout, mask_coding,
                      mask_summaries, pair_rows)
from .splits import SPLIT_ALIASES, acdc_patient_split, ratio_split, synapse_validation_cases
from .volumes import (acdc_files, acdc_patient, array_features, default_num_labels, file_rows,
                      group_synapse_slices, is_volume_feature, shapes_of, stacked_rows, synapse_case,
                      synapse_files)

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "hub", "disk") + FOLDER_LAYOUTS + ("synapse", "acdc")


def _check_hub_id(source: str) -> None:
    """A name that is not a local path must be a valid Hub id; one that is a near miss of a local folder (the
    parent exists and holds a close name) is a mistyped path, said at once instead of after the Hub is asked."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ..errors import near_miss_folder

    close = near_miss_folder(source) if "/" in source else None
    if close:
        raise DataError(f"{source} does not exist (did you mean {close}?)")
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise DataError(f"{source} does not exist, and is not a Hub id either (those are 'name' or 'org/name' of "
                        "letters, digits, '-', '_' and '.'); check the path") from None


def detect_layout(source: str) -> str:
    """Name the layout of ``source``: ``hub`` (not a local path), ``disk`` (``save_to_disk`` folder),
    ``synapse``, ``acdc``, ``glas`` (``_anno`` masks) or ``folder`` (any image/mask folder)."""
    root = Path(source)
    if not root.exists():
        if source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source:
            raise DataError(f"{source} does not exist (and is not a Hub id of the form 'org/name').")
        _check_hub_id(source)
        return "hub"
    if not root.is_dir():
        raise DataError(f"{source} is a file; pass a folder or a Hub data set id.")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        return "disk"
    if (root / "train_npz").is_dir() or (root / "test_vol_h5").is_dir():
        return "synapse"
    if (root / "ACDC_training_slices").is_dir() or (root / "ACDC_training_volumes").is_dir():
        return "acdc"
    if looks_like_folder_layout(root):
        if any(p.stem.lower().endswith("_anno") for p in root.rglob("*_anno.*")):
            return "glas"
        return "folder"
    images = _refuse_without_images(root)
    raise DataError(
        f"cannot recognise the data layout of {source}: it holds {images} image(s) but none is recognisable as a "
        f"mask. Expected a save_to_disk folder, images/ + masks/ folders (or masks named <image>_mask.png), a "
        f"Synapse root (train_npz/, test_vol_h5/) or an ACDC root "
        f"(ACDC_training_slices/, ACDC_training_volumes/).")


def _refuse_without_images(root: Path) -> int:
    """Say what is missing when a folder has no files or no images at all (a wrong path, mostly); else count
    the images."""
    files = [p for p in root.rglob("*") if p.is_file()]
    if not files:
        raise DataError(f"{root} is empty; give the folder that holds the data set's images and masks.")
    images = sum(1 for p in files if is_image_file(p))
    if not images:
        raise DataError(f"{root} holds {len(files)} file(s) but no images ({', '.join(IMAGE_EXTENSIONS)}) nor "
                        f"Synapse/ACDC folders; give the folder that holds the data set's images and masks.")
    return images


def is_volume_split(split) -> bool:
    """True when the rows of ``split`` (a ``datasets.Dataset``) are 3-D volumes to evaluate per case."""
    return "image" in split.features and is_volume_feature(split.features["image"])


def load_segmentation_dataset(source: str, *, image_column: str = "image", mask_column: str = "mask",
                              split_seed: int = 0, num_labels: Optional[int] = None,
                              cache_dir: Optional[str] = None, layout: str = "auto"):
    """Load any supported segmentation data set as a ``datasets.DatasetDict``.

    Args:
        source: a Hub data set id, a ``save_to_disk`` folder, an image/mask folder (``images/`` + ``masks/``
            matched by file stem, or the Kvasir, CVC, BUSI, GlaS and ISIC layouts), or a Synapse or ACDC root.
        image_column, mask_column: column names of Hub / ``save_to_disk`` sets; renamed to ``image``/``mask``.
        split_seed: seed of the 8:1:1 split of sets without their own splits (the paper uses 0, 1 and 2).
        num_labels: number of classes. ``None``, 1 or 2 mean binary (0-255 masks thresholded at 128; masks
            with several grey levels or colours are refused); more means label maps whose values must be
            below it, or masks with exactly that many grey levels or colours, which become classes in sorted
            order (see :mod:`rwkvunet.data.files`). Synapse defaults to 9 and ACDC to 4.
        cache_dir: where ``datasets`` caches the converted arrow files (its default cache when ``None``).
        layout: force a layout (see :data:`LAYOUTS`) instead of detecting it.

    Returns:
        ``DatasetDict`` with splits ``train``, ``validation`` and ``test`` (those that have cases). Rows hold
        ``image`` (a lazily decoded ``datasets.Image`` for image files; float32 (H, W) for Synapse/ACDC
        slices), ``mask`` (uint8 label map) and ``case_id`` (str). Synapse test and ACDC validation/test rows
        are volumes: ``image`` float32 (D, H, W), ``mask`` uint8 (D, H, W); :func:`is_volume_split` tells.
        Masks are stored as uint8; ``with_format("numpy")`` hands integer arrays out as int64 (a choice of
        ``datasets``), which is why readers should not rely on the in-memory dtype. For image folders the
        returned dict has a ``mask_coding`` attribute (:class:`rwkvunet.data.files.MaskCoding`): how the
        stored mask values became classes; ``mask_coding.mapping()`` lists stored value -> class when mapped.

    Splits (see :mod:`rwkvunet.data.splits`):
        * image folders: 8:1:1 with ``split_seed``; a folder with ``train/`` and ``test/`` (``val/``)
          subfolders keeps them, and a missing validation split takes a ninth of the training cases. GlaS and
          ISIC are pooled and split 8:1:1 like the other binary sets.
        * ACDC: patients 031-100 train (slices), 021-030 validation and 001-020 test (volumes).
        * Synapse: ``train_npz`` train, ``test_vol_h5`` test; validation repeats the last two training cases
          as volumes (the paper has no validation split and reports its last epoch).
        * Hub / ``save_to_disk`` sets keep their splits (``val``/``valid`` renamed ``validation``); a set with
          only ``train`` is split 8:1:1, one without validation gives a ninth of ``train``. Their masks are
          checked when transformed (:class:`rwkvunet.data.transforms.TrainTransform` with ``num_labels``)
          or evaluated, not when loaded.

    Layouts ``kvasir``, ``cvc``, ``busi`` and ``isic`` are read as ``folder``; ``glas`` also makes every
    non-zero (gland instance) value foreground.

    Raises:
        DataError: naming the file, for unreadable files, image/mask size mismatches, labels outside the
            classes and masks whose grey levels or colours do not fit ``num_labels``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if num_labels is not None and int(num_labels) < 1:
        raise ValueError(f"num_labels must be at least 1 (None, 1 or 2: binary), got {num_labels}")
    if layout == "auto":
        layout = detect_layout(source)
    if layout in ("hub", "disk"):
        return _load_datasets_source(source, layout, image_column, mask_column, split_seed, cache_dir)
    renamed = [f"{name} {value!r}" for name, value, default in (("image_column", image_column, "image"),
                                                                  ("mask_column", mask_column, "mask"))
               if value != default]
    if renamed:  # they name columns of Hub / save_to_disk tables; a folder's files were read as usual
        raise DataError(f"{' and '.join(renamed)} (--image-column, --mask-column) name columns of Hub and "
                        f"save_to_disk data sets, but {source} is read with the {layout} layout, which has "
                        f"none; leave them out")
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"{source} is not a folder; the {layout} layout is read from a local folder.")
    if layout == "synapse":
        return _load_synapse(root, default_num_labels("synapse", num_labels), cache_dir)
    if layout == "acdc":
        return _load_acdc(root, default_num_labels("acdc", num_labels), cache_dir)
    return _load_folder(root, layout, num_labels, split_seed, cache_dir)


# --- datasets helpers ----------------------------------------------------------------------------------

def _generate(generator, features, cache_dir, writer_batch_size=None, **gen_kwargs):
    """``Dataset.from_generator`` that lets :class:`DataError` through instead of a generic wrapper."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    kwargs = {"writer_batch_size": writer_batch_size} if writer_batch_size else {}
    # lists in gen_kwargs would be taken for shards; tuples are not
    gen_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in gen_kwargs.items()}
    try:
        return Dataset.from_generator(generator, features=features, cache_dir=cache_dir, gen_kwargs=gen_kwargs,
                                      **kwargs)
    except DatasetGenerationError as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise DataError(str(cause)) from cause
        raise


def _image_mask_features():
    from datasets import Features, Image, Value

    return Features({"image": Image(), "mask": Image(), "case_id": Value("string")})


def _load_folder(root: Path, layout: str, num_labels, split_seed, cache_dir):
    from datasets import DatasetDict

    split_dirs = {SPLIT_ALIASES[p.name.lower()]: p for p in sorted(root.iterdir())
                  if p.is_dir() and p.name.lower() in SPLIT_ALIASES}
    if "train" in split_dirs and len(split_dirs) >= 2:
        pairs = {name: find_pairs(path) for name, path in split_dirs.items()}
        if "validation" not in pairs:  # take a ninth of the training cases, as in an 8:1:1 split
            cut = ratio_split([p.case_id for p in pairs["train"]], split_seed, (8 / 9, 1 / 9, 0.0))
            by_id = {p.case_id: p for p in pairs["train"]}
            pairs["train"] = [by_id[c] for c in sorted(cut["train"] + cut["test"])]
            pairs["validation"] = [by_id[c] for c in sorted(cut["validation"])]
    else:
        every = find_pairs(root)
        by_id = {p.case_id: p for p in every}
        pairs = {name: [by_id[c] for c in sorted(ids)] for name, ids in ratio_split(list(by_id), split_seed).items()}
    every_pair = [q for v in pairs.values() for q in v]
    instances = layout == "glas" or (layout == "folder" and has_instance_masks(every_pair))
    summaries = _mask_summaries(every_pair, instances, num_labels, cache_dir)
    coding = mask_coding(every_pair, num_labels, instances, summaries)
    if coding.mapping() is not None:
        logger.info("masks of %s: %s", root, coding.describe())
    out = {}
    for name in ("train", "validation", "test"):
        if pairs.get(name):
            files = [f for p in pairs[name] for f in [p.image, *p.masks]]
            out[name] = _generate(pair_rows, _image_mask_features(), cache_dir, pairs=pairs[name], coding=coding,
                                  stamp=file_stamp(files))
    data = DatasetDict(out)
    data.mask_coding = coding
    return data


def _mask_summaries(pairs, instances: bool, num_labels, cache_dir):
    """Levels of every mask file, computed once per version of the files (instance masks need none)."""
    from datasets import Features, List, Value

    if instances and (num_labels is None or num_labels <= 2):
        return None
    masks = [m for p in pairs for m in p.masks]
    features = Features({"path": Value("string"), "coloured": Value("bool"), "top": Value("int64"),
                         "levels": List(Value("int64"))})
    return _generate(mask_summaries, features, cache_dir, masks=masks, stamp=file_stamp(masks), rules=LEVEL_RULES)


def _load_synapse(root: Path, num_labels: int, cache_dir):
    from datasets import DatasetDict

    train, test = synapse_files(root)
    out = {}
    if train:
        out["train"] = _generate(file_rows, array_features(shapes_of(train), 2), cache_dir, writer_batch_size=64,
                                 files=train, num_labels=num_labels, stamp=file_stamp(train))
        val_cases = synapse_validation_cases([synapse_case(p) for p in train])
        groups = group_synapse_slices(train, val_cases)
        val_files = [p for g in groups.values() for p in g]
        out["validation"] = _generate(stacked_rows, array_features([(1, *s) for s in shapes_of(val_files)], 3),
                                      cache_dir, writer_batch_size=1, groups=groups, num_labels=num_labels,
                                      stamp=file_stamp(val_files))
    if test:
        out["test"] = _generate(file_rows, array_features(shapes_of(test), 3), cache_dir, writer_batch_size=1,
                                files=test, num_labels=num_labels, stamp=file_stamp(test))
    return DatasetDict(out)


def _load_acdc(root: Path, num_labels: int, cache_dir):
    from datasets import DatasetDict

    slices, volumes = acdc_files(root)
    patients = acdc_patient_split([acdc_patient(p) for p in slices + volumes])
    out = {}
    train = [p for p in slices if acdc_patient(p) in patients["train"]]
    if train:
        out["train"] = _generate(file_rows, array_features(shapes_of(train), 2), cache_dir, writer_batch_size=256,
                                 files=train, num_labels=num_labels, stamp=file_stamp(train))
    for name in ("validation", "test"):
        files = [p for p in volumes if acdc_patient(p) in patients[name]]
        if files:
            out[name] = _generate(file_rows, array_features(shapes_of(files), 3), cache_dir, writer_batch_size=4,
                                  files=files, num_labels=num_labels, stamp=file_stamp(files))
    return DatasetDict(out)


def _load_datasets_source(source, layout, image_column, mask_column, split_seed, cache_dir):
    import datasets

    from ..hub import hub_offline_within, hub_unreachable

    offline = None if layout == "disk" else hub_unreachable()
    try:
        if layout == "disk":
            loaded = datasets.load_from_disk(source)
        else:  # where the Hub cannot be reached, its cache at once instead of after ~50 s of retries
            with hub_offline_within() if offline else contextlib.nullcontext():
                loaded = datasets.load_dataset(source, cache_dir=cache_dir)
    except OSError as err:  # missing files, unknown Hub id, no connection (HF_HUB_OFFLINE)
        if layout == "disk":
            raise DataError(f"cannot load the save_to_disk folder {source}: {err}. Convert the data set "
                            f"again.") from err
        if offline:
            raise DataError(f"{source!r} is not a local folder and not in the datasets cache, and {offline}; give "
                            f"a local folder, or download the data set where there is a network and copy it (or "
                            f"its save_to_disk folder) here.") from err
        raise DataError(f"{source!r} is not a local folder, and loading it as a Hub data set failed: {err}. Check "
                        f"the path, or the Hub id (org/name) and the connection.") from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    out = {}
    for name, split in loaded.items():
        canonical = SPLIT_ALIASES.get(name.lower())
        if canonical is None:
            logger.warning("ignoring split %r of %s (not train/validation/test)", name, source)
            continue
        for column, wanted in ((image_column, "image"), (mask_column, "mask")):
            if column not in split.column_names:
                raise DataError(f"split {name!r} of {source} has no column {column!r}; its columns are "
                                f"{split.column_names}. Pass image_column=/mask_column= "
                                f"(--image-column, --mask-column).")
            if column != wanted:
                if wanted in split.column_names:
                    split = split.remove_columns(wanted)
                split = split.rename_column(column, wanted)
        if "case_id" not in split.column_names:
            split = split.add_column("case_id", [f"{canonical}_{i:06d}" for i in range(len(split))])
        out[canonical] = split
    if "train" not in out:
        raise DataError(f"{source} has no training split (found {list(loaded)}).")
    if "validation" not in out and "test" not in out:
        ids = ratio_split([str(i) for i in range(len(out["train"]))], split_seed)
        full = out["train"]
        for name, idx in ids.items():
            out[name] = full.select(sorted(int(i) for i in idx))
    elif "validation" not in out:
        ids = ratio_split([str(i) for i in range(len(out["train"]))], split_seed, (8 / 9, 1 / 9, 0.0))
        full = out["train"]
        out["train"] = full.select(sorted(int(i) for i in ids["train"] + ids["test"]))
        out["validation"] = full.select(sorted(int(i) for i in ids["validation"]))
    return datasets.DatasetDict({k: out[k] for k in ("train", "validation", "test") if k in out})
