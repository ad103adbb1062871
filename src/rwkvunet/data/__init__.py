"""Segmentation data: loaders for every supported layout, the paper's splits, joint transforms.

``load_segmentation_dataset(source)`` returns a ``datasets.DatasetDict``; ``transforms`` turns its rows into
tensors for training and evaluation.
"""
from .files import DataError, prepare_mask
from .loading import LAYOUTS, detect_layout, is_volume_split, load_segmentation_dataset
from .splits import ACDC_PATIENTS, SYNAPSE_VALIDATION_CASES, acdc_patient_split, ratio_split

__all__ = [
    "DataError", "prepare_mask", "LAYOUTS", "detect_layout", "is_volume_split", "load_segmentation_dataset",
    "ACDC_PATIENTS", "SYNAPSE_VALIDATION_CASES", "acdc_patient_split", "ratio_split",
]
