"""The TransUNet Synapse layout and the ACDC h5 layout (slices for training, volumes for evaluation).

Synapse: ``train_npz/caseXXXX_sliceYYY.npz`` and ``test_vol_h5/caseXXXX.npy.h5``; ACDC:
``ACDC_training_slices/patientXXX_frameYY_slice_Z.h5`` and ``ACDC_training_volumes/patientXXX_frameYY.h5``.
Both store ``image`` (float, already scaled to [0, 1]) and ``label`` (uint8 class indices).

Slices become 2-D rows (``image`` float32 (H, W)); volumes become rows with ``image`` float32 (D, H, W) and
``mask`` uint8 (D, H, W), stored as fixed-size ``Array2D``/``Array3D`` features when every file of a split has
the same height and width, as nested lists otherwise. :func:`is_volume_feature` tells them apart.
"""
from __future__ import annotations

import re
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .files import DataError, check_labels

SYNAPSE_NUM_LABELS = 9
ACDC_NUM_LABELS = 4
SYNAPSE_SLICE = re.compile(r"^(case\d+)_slice(\d+)$")
ACDC_NAME = re.compile(r"^patient(\d+)_frame(\d+)(?:_slice_(\d+))?$")


def _h5():
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py is part of the train extra
        raise ImportError("reading Synapse/ACDC h5 files needs h5py: pip install 'rwkvunet[train]'") from err
    return h5py


def _npz_shape(path: Path, key: str) -> tuple:
    """Shape of ``key`` in an .npz without reading the array."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return reader(f)[0]
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as err:
        raise DataError(f"cannot read {key!r} from {path}: {err}. Replace or remove the file.") from err


def _h5_shape(path: Path, key: str) -> tuple:
    try:
        with _h5().File(path, "r") as f:
            return f[key].shape
    except (OSError, KeyError) as err:
        raise DataError(f"cannot read {key!r} from {path}: {err}. Replace or remove the file.") from err


def read_pair(path: Path, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (float32) and ``label`` (uint8, checked against ``num_labels``) of an .npz or .h5 file."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                image, label = data["image"], data["label"]
        else:
            with _h5().File(path, "r") as f:
                image, label = f["image"][()], f["label"][()]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read image/label from {path}: {err}. Replace or remove the file.") from err
    if image.shape != label.shape:
        raise DataError(f"{path}: image {image.shape} and label {label.shape} differ in size; they must match.")
    return np.asarray(image, dtype=np.float32), check_labels(label, num_labels, str(path))


def array_features(shapes: Sequence[tuple], ndim: int):
    """``Array2D``/``Array3D`` (first axis free for volumes) when heights and widths agree, else nested lists."""
    from datasets import Array2D, Array3D, Features, List, Value

    hw = {tuple(s[-2:]) for s in shapes}
    for s in shapes:
        if len(s) != ndim:
            raise DataError(f"expected {ndim}-D arrays, found shape {s}")
    if len(hw) == 1:
        (h, w), = hw
        if ndim == 2:
            image, mask = Array2D((h, w), "float32"), Array2D((h, w), "uint8")
        else:
            image, mask = Array3D((None, h, w), "float32"), Array3D((None, h, w), "uint8")
    else:
        def nested(dtype):
            f = Value(dtype)
            for _ in range(ndim):
                f = List(f)
            return f
        image, mask = nested("float32"), nested("uint8")
    return Features({"image": image, "mask": mask, "case_id": Value("string")})


def is_volume_feature(feature) -> bool:
    """True for the ``image`` feature of a volume split (3-D arrays)."""
    from datasets import Array3D

    if isinstance(feature, Array3D):
        return True
    depth = 0
    while hasattr(feature, "feature"):
        feature, depth = feature.feature, depth + 1
    return depth == 3


def file_rows(files: Sequence[Path], num_labels: int, stamp=None):
    """One row per file (a slice or a volume)."""
    for path in files:
        image, label = read_pair(path, num_labels)
        yield {"image": image, "mask": label, "case_id": case_name(path)}


def stacked_rows(groups: dict, num_labels: int, stamp=None):
    """One volume per case, stacked from its slice files in slice order (Synapse validation)."""
    for case, files in groups.items():
        pairs = [read_pair(p, num_labels) for p in files]
        yield {"image": np.stack([p[0] for p in pairs]), "mask": np.stack([p[1] for p in pairs]), "case_id": case}


def case_name(path: Path) -> str:
    name = path.name
    for ext in (".npy.h5", ".h5", ".npz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


# --- layouts -------------------------------------------------------------------------------------------

def synapse_files(root: Path):
    """(training slices, test volumes), sorted; raises when neither folder has files."""
    train = sorted((root / "train_npz").glob("*.npz")) if (root / "train_npz").is_dir() else []
    test = sorted((root / "test_vol_h5").glob("*.h5")) if (root / "test_vol_h5").is_dir() else []
    if not train and not test:
        raise DataError(f"{root} has no train_npz/*.npz nor test_vol_h5/*.npy.h5 files (TransUNet Synapse layout).")
    return train, test


def group_synapse_slices(files: Sequence[Path], cases: Sequence[str]) -> dict[str, list[Path]]:
    groups = defaultdict(list)
    for path in files:
        m = SYNAPSE_SLICE.match(case_name(path))
        if m and m.group(1) in cases:
            groups[m.group(1)].append((int(m.group(2)), path))
    return {c: [p for _, p in sorted(groups[c])] for c in sorted(groups)}


def synapse_case(path: Path) -> str:
    m = SYNAPSE_SLICE.match(case_name(path))
    if not m:
        raise DataError(f"{path} is not named caseXXXX_sliceYYY.npz as in the Synapse layout.")
    return m.group(1)


def acdc_files(root: Path):
    slices = sorted((root / "ACDC_training_slices").glob("*.h5")) if (root / "ACDC_training_slices").is_dir() else []
    volumes = sorted((root / "ACDC_training_volumes").glob("*.h5")) if (root / "ACDC_training_volumes").is_dir() else []
    if not slices and not volumes:
        raise DataError(f"{root} has no ACDC_training_slices/*.h5 nor ACDC_training_volumes/*.h5 files.")
    return slices, volumes


def acdc_patient(path: Path) -> int:
    m = ACDC_NAME.match(case_name(path))
    if not m:
        raise DataError(f"{path} is not named patientXXX_frameYY[_slice_Z].h5 as in the ACDC layout.")
    return int(m.group(1))


def shapes_of(files: Sequence[Path]) -> list[tuple]:
    return [_npz_shape(p, "image") if p.suffix == ".npz" else _h5_shape(p, "image") for p in files]


def default_num_labels(layout: str, num_labels: Optional[int]) -> int:
    if num_labels is not None:
        return num_labels
    return SYNAPSE_NUM_LABELS if layout == "synapse" else ACDC_NUM_LABELS
