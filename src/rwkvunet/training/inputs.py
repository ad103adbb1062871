"""The data set and the model a fine-tuning run starts from, with what it can infer from the data."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path


import numpy as np

from ..errors import UserError

logger = logging.getLogger(__name__)

#: Class names (index = label) of the layouts whose classes are fixed.
KNOWN_CLASSES = {
    "synapse": ("background", "aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas",
                "spleen", "stomach"),
    "acdc": ("background", "RV", "myocardium", "LV"),
}


def load_data(args):
    """``(DatasetDict, layout)`` for ``args.dataset`` ('synthetic' or anything ``load_segmentation_dataset`` reads)."""
    if args.dataset == "synthetic":
        from ..data.synthetic import make_synthetic_dataset

        ds = make_synthetic_dataset(seed=args.split_seed, size=args.synthetic_size, num_train=args.synthetic_train,
                                    num_validation=args.synthetic_eval, num_test=args.synthetic_eval)
        return ds, "synthetic"
    from ..data import detect_layout, load_segmentation_dataset

    layout = detect_layout(args.dataset)
    ds = load_segmentation_dataset(args.dataset, image_column=args.image_column, mask_column=args.mask_column,
                                   split_seed=args.split_seed, num_labels=args.num_labels, cache_dir=args.cache_dir)
    if "train" not in ds:
        raise UserError(f"{args.dataset} has no training split (found {list(ds) or 'none'}); fine-tuning needs one")
    return ds, layout


def check_dataset_path(dataset: str) -> None:
    """Refuse a missing or unrecognisable local data set before any process starts loading it."""
    if dataset != "synthetic":
        from ..data import detect_layout

        detect_layout(dataset)


def check_splits(data, dataset: str, need_validation: bool) -> None:
    """Refuse splits that would choose a best model or report scores on no cases; warn when there is no test."""
    counts = {name: len(data[name]) if name in data else 0 for name in ("train", "validation", "test")}
    total = sum(counts.values())
    shown = f"train {counts['train']}, validation {counts['validation']}, test {counts['test']}"
    if total < 3:
        raise UserError(f"{dataset} has {total} case(s) ({shown}): an 8:1:1 split needs at least 3 for one "
                        "validation and one test case; add images, or give train/, val/ and test/ folders")
    if need_validation and counts["validation"] == 0:
        raise UserError(f"{dataset} has no validation cases ({shown}), so no best model could be chosen; add "
                        "a validation split (val/ folder), or pass --eval-every 0 to keep the last weights")
    if counts["train"] == 0:
        raise UserError(f"{dataset} has no training cases ({shown}); add images to its training split")
    if counts["test"] == 0:
        logger.warning("%s has NO TEST CASES (%s): the model will not be scored; add a test split to score it",
                       dataset, shown)


def class_names(layout: str, num_labels: int) -> list[str]:
    if layout == "synthetic":
        from ..data.synthetic import SYNTHETIC_CLASSES

        return list(SYNTHETIC_CLASSES)
    if layout in KNOWN_CLASSES and len(KNOWN_CLASSES[layout]) == num_labels:
        return list(KNOWN_CLASSES[layout])
    if num_labels == 1:
        return ["foreground"]
    return ["background"] + [f"class_{k}" for k in range(1, num_labels)]


def infer_num_labels(train_split, layout: str, max_rows: int = 64) -> int:
    """Classes of the data: fixed for Synapse/ACDC/synthetic; otherwise 1 (binary, sigmoid) when the masks hold
    only 0 and 1, else the largest label + 1 (from the first ``max_rows`` masks)."""
    if layout == "synthetic":
        from ..data.synthetic import SYNTHETIC_CLASSES

        return len(SYNTHETIC_CLASSES)
    if layout in KNOWN_CLASSES:
        return len(KNOWN_CLASSES[layout])
    from ..data.transforms import to_mask_tensor

    top = 0
    for row in train_split.select(range(min(max_rows, len(train_split)))):
        top = max(top, int(np.asarray(to_mask_tensor(row["mask"])).max()))
    if top > 1:
        logger.info("masks hold labels up to %d: %d classes (pass --num-labels to change)", top, top + 1)
    return 1 if top <= 1 else top + 1


def resolve_num_labels(data, layout: str, num_labels, dataset: str) -> int:
    """``--num-labels`` or the data's classes. Hub and save_to_disk masks are not checked when loaded, so all
    of them are read here: a label outside the classes is refused now, not at some step of the training."""
    if layout not in ("hub", "disk"):
        return num_labels or infer_num_labels(data["train"], layout)
    from ..data.files import BINARY_THRESHOLD
    from ..evaluation import split_labels

    found = {name: split_labels(split) for name, split in data.items()}
    top = max((max(labels) for labels in found.values() if labels), default=0)
    binary = top <= 1 or top >= BINARY_THRESHOLD  # 0-255 masks are thresholded, as the loaders do
    num_labels = num_labels or (1 if binary else top + 1)
    classes = max(num_labels, 2)
    for name, labels in found.items():
        shown = "{" + ", ".join(map(str, labels[:8])) + (", ..." if len(labels) > 8 else "") + "}"
        if classes > 2 and labels and max(labels) >= classes:
            raise UserError(f"{dataset} ({name}) holds labels {shown}, outside the {classes} classes "
                            f"0..{classes - 1} of --num-labels {num_labels}; pass --num-labels {max(labels) + 1} "
                            "or fix the masks")
        if classes == 2 and labels and not (max(labels) <= 1 or max(labels) >= BINARY_THRESHOLD):
            raise UserError(f"{dataset} ({name}) holds labels {shown}, a label map of {max(labels) + 1} classes, "
                            f"but --num-labels {num_labels} is binary; pass --num-labels {max(labels) + 1}")
    return num_labels


def infer_in_channels(train_split) -> int:
    from ..data.transforms import to_image_tensor

    return int(to_image_tensor(train_split[0]["image"]).shape[0])


def _encoder_overlay(source: str) -> dict:
    """timm ``pretrained_cfg_overlay`` for a weights file or a Hub id (``hf-hub:org/name`` or ``org/name``)."""
    if Path(source).is_file():
        return {"file": str(Path(source).resolve())}
    if Path(source).is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (Path(source) / name).is_file():
                return {"file": str((Path(source) / name).resolve())}
        raise FileNotFoundError(f"{source} holds no model.safetensors; pass the weights file or a Hub id")
    return {"hf_hub_id": source.removeprefix("hf-hub:")}


def build_model(args, num_labels: int, in_channels: int, names: list[str]):
    """A segmenter from a variant name, a timm encoder checkpoint, or a saved segmenter (folder or Hub id)."""
    from ..models.rwkv_unet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation

    labels = dict(id2label={k: n for k, n in enumerate(names)}, label2id={n: k for k, n in enumerate(names)})
    common = dict(num_labels=num_labels, in_channels=in_channels, ce_weight=args.ce_weight,
                  dice_weight=args.dice_weight, drop_path_rate=args.drop_path_rate, image_size=args.img_size,
                  rwkv_init=args.rwkv_init, zero_init_residual=args.zero_init_residual,
                  deep_supervision=args.deep_supervision, head_init=args.head_init,
                  head_bias=args.head_bias, **labels)
    if args.pretrained:
        from ..hub import load_segmentation_model

        config = _pretrained_config(args.pretrained)
        if config.in_channels != in_channels:
            raise UserError(f"{args.pretrained} takes {config.in_channels}-channel images but the data has "
                            f"{in_channels}; pass --in-channels {config.in_channels} to convert the images")
        resized = config.num_labels != num_labels
        common.pop("in_channels")
        model = load_segmentation_model(args.pretrained, ignore_mismatched_sizes=resized, **common)
        if resized:
            logger.warning("%s has %d labels; its head was replaced for %d", args.pretrained, config.num_labels,
                           num_labels)
        return model
    if args.model != "rwkvunet":
        from ..models.baselines import build_baseline

        for name in ("drop_path_rate", "rwkv_init", "zero_init_residual", "deep_supervision", "head_init"):
            common.pop(name)
        return build_baseline(args.model, **common)
    if args.encoder_pretrained:
        from ..hub import hub_offline_within, hub_unreachable

        overlay = _encoder_overlay(args.encoder_pretrained)
        offline = "hf_hub_id" in overlay and hub_unreachable()
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            with hub_offline_within() if offline else contextlib.nullcontext():  # the cache at once, no retries
                return RWKVUNetForSemanticSegmentation.from_encoder_pretrained(
                    f"rwkvunet_enc_{args.variant}", pretrained_cfg_overlay=overlay, **common)
        except (LocalEntryNotFoundError, RepositoryNotFoundError) as err:  # huggingface_hub's paragraph
            from ..hub import _hub_reason

            reason = f"not in the Hub cache, and {offline}" if offline else _hub_reason(err)
            raise UserError(f"--encoder-pretrained {args.encoder_pretrained}: {reason}; give a weights file or a "
                            "folder written by `rwkvunet convert CKPT OUT --encoder`") from err
    return RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant=args.variant, **common))


def _pretrained_config(source: str):
    """The config of a saved segmenter; when it cannot be read, the loader names what is wrong with the folder."""
    from ..hub import load_segmentation_model
    from ..models.rwkv_unet import RWKVUNetConfig

    from ..hub import hub_unreachable

    local_only = not Path(source).exists() and hub_unreachable() is not None  # the cache at once, no retries
    try:
        return RWKVUNetConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        load_segmentation_model(source)  # raises a UserError that says what is wrong with the folder
        raise UserError(f"--pretrained {source}: {str(err).splitlines()[0]}") from err


def build_image_processor(img_size: int, in_channels: int):
    """The processor that feeds the saved model as training did (resize, [0, 1] for 8-bit, no normalisation)."""
    try:
        from ..models.rwkv_unet.image_processing_rwkv_unet import RWKVUNetImageProcessor
    except ImportError:  # pragma: no cover - older package layout
        return None
    return RWKVUNetImageProcessor(size={"height": img_size, "width": img_size}, num_channels=in_channels,
                                  do_normalize=False)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


