"""Example inputs for the page, made by the built-in synthetic generator, so the page is useful without a download."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from ..data.synthetic import make_synthetic_image

#: Seeds of the example image and of the volume's slices.
IMAGE_SEED = 7
VOLUME_SEEDS = range(100, 116)
#: Voxel spacing of the example volume (mm): a typical abdominal CT's.
VOLUME_SPACING = (0.8, 0.8, 2.5)


def example_image(size: int = 128) -> np.ndarray:
    """A grey uint8 synthetic image of ellipses, rectangles and triangles."""
    return make_synthetic_image(IMAGE_SEED, size)[0]


def example_volume(size: int = 64) -> np.ndarray:
    """A float32 (size, size, slices) stack of synthetic images, sliced along axis 2 as NIfTI scans usually are."""
    return np.stack([make_synthetic_image(seed, size)[0] for seed in VOLUME_SEEDS], axis=-1).astype(np.float32)


def write_examples(folder: Path) -> List[Path]:
    """Write the example image (PNG) and, when nibabel is installed, the example volume (NIfTI with a 0.8 x 0.8
    x 2.5 mm spacing) into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "synthetic_shapes.png"
    Image.fromarray(example_image(), mode="L").save(image)
    paths = [image]
    try:
        import nibabel as nib
    except ImportError:
        return paths
    affine = np.diag([*VOLUME_SPACING, 1.0])
    nifti = nib.Nifti1Image(example_volume(), affine)
    nifti.header.set_xyzt_units("mm", "sec")
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    volume = folder / "synthetic_stack.nii.gz"
    nib.save(nifti, str(volume))
    return paths + [volume]
