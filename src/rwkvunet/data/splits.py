"""The paper's train / validation / test splits.

* Binary sets (BUSI, CVC, Kvasir, ISIC, GlaS, any image/mask folder): 8:1:1 of the cases, shuffled with
  ``split_seed`` (the paper reports the mean over seeds 0, 1 and 2). Cases are sorted by id first, so a split
  depends only on the seed and the set of ids, not on the file system's order.
* ACDC: by patient id, train 031-100, validation 021-030, test 001-020 (as TransUNet and SSL4MIS).
* Synapse: 18 training cases (``train_npz``) and 12 test volumes (``test_vol_h5``); see
  :data:`SYNAPSE_VALIDATION_CASES`.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

#: ACDC patients of each split in the paper.
ACDC_PATIENTS = {
    "train": tuple(range(31, 101)),
    "validation": tuple(range(21, 31)),
    "test": tuple(range(1, 21)),
}

#: Synapse has no validation split in the paper (it reports the last epoch). The validation split is made of
#: this many training cases (the last ones by id), rebuilt as volumes from their slices; they stay in the
#: training split, so validation scores monitor fitting and are not a held-out estimate.
SYNAPSE_VALIDATION_CASES = 2

#: Split names found in the wild and the name used here.
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "val": "validation", "valid": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}


def ratio_split(case_ids: Sequence[str], seed: int = 0, ratios=(0.8, 0.1, 0.1)) -> dict[str, list[str]]:
    """Shuffle sorted ``case_ids`` with ``seed`` and cut them 8:1:1 (every split non-empty from 3 cases)."""
    ids = sorted(case_ids)
    n = len(ids)
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * ratios[1]))
    n_test = int(round(n * ratios[2]))
    if n >= 3:  # every split asked for gets at least one case
        n_val = max(n_val, 1) if ratios[1] > 0 else 0
        n_test = max(n_test, 1) if ratios[2] > 0 else 0
    n_train = n - n_val - n_test
    cut = [ids[i] for i in order]
    return {"train": cut[:n_train], "validation": cut[n_train:n_train + n_val], "test": cut[n_train + n_val:]}


def acdc_patient_split(patients: Sequence[int]) -> dict[str, list[int]]:
    """Assign ACDC patient numbers to the paper's splits.

    When the folder holds none of the paper's validation and test patients (a subset such as 091-100), the
    patients are cut 70/10/20 in the same order as the paper (lowest ids to test, then validation, the rest
    to training) and a warning says so.
    """
    patients = sorted(set(patients))
    split = {name: [p for p in patients if p in ids] for name, ids in ACDC_PATIENTS.items()}
    if not split["validation"] and not split["test"] and len(patients) >= 3:
        n = len(patients)
        n_test, n_val = max(1, round(0.2 * n)), max(1, round(0.1 * n))
        split = {"test": patients[:n_test], "validation": patients[n_test:n_test + n_val],
                 "train": patients[n_test + n_val:]}
        logger.warning("ACDC folder has none of the paper's validation/test patients (001-030); split its %d "
                       "patients 70/10/20 by id instead: test %s, validation %s.", n, split["test"],
                       split["validation"])
    return split


def synapse_validation_cases(train_cases: Sequence[str]) -> list[str]:
    """The training cases rebuilt as validation volumes (see :data:`SYNAPSE_VALIDATION_CASES`)."""
    cases = sorted(set(train_cases))
    return cases[-SYNAPSE_VALIDATION_CASES:] if len(cases) > SYNAPSE_VALIDATION_CASES else cases[-1:]
