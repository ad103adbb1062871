"""A Hugging Face Space running the demo page: ``README.md`` (Space metadata), ``app.py``, ``requirements.txt``,
and the model's files when the model is a local folder (a Hub id is loaded by the Space itself)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

from ..errors import PartlyDone, UserError

#: Files of a ``save_pretrained`` folder that loading the model needs (model cards, metrics, plots and
#: checkpoints of a training run stay behind).
MODEL_FILES = ("config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json",
               "pytorch_model*.bin", "pytorch_model.bin.index.json")
MODEL_DIR = "model"

APP = '''"""The rwkvunet demo page for {model_note}: upload an image or a NIfTI volume and see its segmentation."""
from pathlib import Path

from rwkvunet.demo import build_app

MODEL = {model_expr}

demo = build_app(MODEL, title={title!r})

if __name__ == "__main__":
    demo.launch()
'''

CARD = """---
title: {title}
emoji: 🩻
colorFrom: blue
colorTo: green
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: apache-2.0
tags:
- medical-imaging
- image-segmentation
- rwkv-unet
---

# {title}

Upload an image (PNG, JPEG, TIFF, BMP) or a NIfTI volume (`.nii`, `.nii.gz`) and see how {model_note}
segments it: a coloured overlay beside the input with a legend of the labels, a slice slider and per-label
volumes in mL for volumes, and the label map to download (PNG, or NIfTI with the input's affine). The same
page runs locally with `rwkvunet demo {model_cli}`; `rwkvunet predict` writes the same labels.

Made with rwkvunet, a reference implementation of [RWKV-UNet: Improving UNet with Long-Range Cooperation for
Effective Medical Image Segmentation](https://arxiv.org/abs/2501.08458).
"""


def _gradio_version() -> str:
    try:
        from importlib.metadata import version

        return version("gradio")
    except Exception:  # noqa: BLE001 - the card still works without a pinned SDK version
        return "5.0.0"


def default_requirement(onnx: bool = False) -> str:
    from .. import __version__

    return f"rwkvunet[demo,nifti{',onnx' if onnx else ''}]=={__version__}"


def _model_files(folder: Path) -> List[Path]:
    found = sorted({p for pattern in MODEL_FILES for p in folder.glob(pattern) if p.is_file()})
    if not any(p.name == "config.json" for p in found):
        raise UserError(f"{folder} holds no config.json; give a model folder written by save_pretrained")
    return found


def check_space_folder(folder: Path) -> None:
    """Refuse a folder that exists and is not empty: a Space folder is written whole, and nothing is replaced."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "a file" if not folder.is_dir() else "not empty"
        raise UserError(f"--write-space {folder} is {what}; give a new or empty folder (nothing in it is replaced)")


def write_space(model: str, folder: os.PathLike, title: Optional[str] = None,
                requirement: Optional[str] = None) -> Path:
    """Write a complete Space for ``model`` (a local model folder or exported ``.onnx`` file, copied in, or a Hub
    id) into ``folder``."""
    folder = Path(folder)
    check_space_folder(folder)
    local = Path(os.path.expanduser(str(model)))
    exported = local.is_file() and local.suffix.lower() == ".onnx"  # it was taken for a Hub id and not copied
    files = _model_files(local) if local.is_dir() else []
    name = local.name if local.is_dir() else str(model)
    title = title or f"RWKV-UNet: {name}"
    folder.mkdir(parents=True, exist_ok=True)
    if local.is_dir():
        (folder / MODEL_DIR).mkdir()
        for file in files:
            shutil.copy2(file, folder / MODEL_DIR / file.name)
        model_expr, model_note, model_cli = f'str(Path(__file__).resolve().parent / "{MODEL_DIR}")', \
            f"the RWKV-UNet model {name}", f"{MODEL_DIR}/"
    elif exported:
        shutil.copyfile(local, folder / local.name)
        model_expr, model_note, model_cli = f'str(Path(__file__).resolve().parent / "{local.name}")', \
            f"the exported RWKV-UNet model {local.name} (ONNX Runtime)", local.name
    else:
        model_expr, model_note, model_cli = repr(str(model)), f"the RWKV-UNet model `{model}`", str(model)
    (folder / "app.py").write_text(APP.format(model_note=model_note, model_expr=model_expr, title=title))
    (folder / "requirements.txt").write_text((requirement or default_requirement(onnx=exported)) + "\n")
    (folder / "README.md").write_text(CARD.format(
        title=title.replace(":", " -"), gradio_version=_gradio_version(), model_note=model_note,
        model_cli=model_cli))
    return folder


def push_space(folder: os.PathLike, repo_id: str, private: bool = False) -> str:
    """Create the Space ``repo_id`` (if needed) and upload ``folder``; return its URL. Hub problems (no token,
    no network, no rights) raise :class:`PartlyDone` (the folder is written) saying what to do."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="space",
                          commit_message="rwkvunet demo Space")
    except OfflineModeIsEnabled as err:
        raise PartlyDone(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it, or upload {folder} "
                         "yourself") from err
    except (HfHubHTTPError, ConnectionError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PartlyDone(f"cannot push to the Space {repo_id}: {reason}; log in with `hf auth login` (a token "
                         f"with write access), check the id, or upload {folder} yourself") from err
    return str(url)


__all__ = ["MODEL_DIR", "check_space_folder", "default_requirement", "push_space", "write_space"]
