"""Save a segmenter together with its code, so that it loads where rwkvunet is not installed.

``AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)`` imports the modules named
by ``auto_map`` from the folder itself, and transformers only follows imports of the form ``from .name import``
between files of that one folder. So the configuration, modeling and image processing modules and everything
they import from this package (layers, encoder, Bi-WKV op, ...) are copied flat into the folder, their
relative imports rewritten to flat ones. The copies are taken from the installed sources at save time, so
they always match the code that produced the weights.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Dict, Optional, Union

__all__ = ["save_with_code", "add_code", "flat_sources", "AUTO_MAP", "PROCESSOR_AUTO_MAP"]

_PACKAGE = __name__.split(".")[0]  # "rwkvunet"
_HERE = __name__.rsplit(".", 1)[0]  # rwkvunet.models.rwkv_unet
ENTRY_MODULES = (
    f"{_HERE}.configuration_rwkv_unet",
    f"{_HERE}.modeling_rwkv_unet",
    f"{_HERE}.image_processing_rwkv_unet",
)
AUTO_MAP = {
    "AutoConfig": "configuration_rwkv_unet.RWKVUNetConfig",
    "AutoModel": "modeling_rwkv_unet.RWKVUNetForSemanticSegmentation",
    "AutoModelForSemanticSegmentation": "modeling_rwkv_unet.RWKVUNetForSemanticSegmentation",
    "AutoImageProcessor": "image_processing_rwkv_unet.RWKVUNetImageProcessor",
}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": AUTO_MAP["AutoImageProcessor"]}

_RELATIVE = re.compile(r"^(?P<indent>[ \t]*)from[ \t]+(?P<dots>\.+)(?P<module>[\w.]*)[ \t]+import\b", re.M)
_ABSOLUTE = re.compile(rf"^[ \t]*(from[ \t]+{_PACKAGE}[\w.]*[ \t]+import|import[ \t]+{_PACKAGE}\b)", re.M)


def _source_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise RuntimeError(f"cannot find the source of {module}; saving with code needs rwkvunet installed from "
                           "source files")
    return Path(spec.origin)


def _flat_name(module: str) -> str:
    """File name (without .py) of a module in the flat folder: its last dotted component."""
    return module.rsplit(".", 1)[-1]


def flat_sources(entry_modules=ENTRY_MODULES) -> Dict[str, str]:
    """``{file name: source}`` for the entry modules and every module of this package they import, with the
    relative imports rewritten to ``from .<file> import``. Raises on anything a flat folder cannot hold."""
    sources: Dict[str, str] = {}
    owners: Dict[str, str] = {}
    pending = list(entry_modules)
    while pending:
        module = pending.pop()
        path = _source_file(module)
        is_package = path.name == "__init__.py"
        name = _flat_name(module) + ".py"
        if name in sources:
            if owners[name] != module:
                raise RuntimeError(f"{owners[name]} and {module} would both be saved as {name}; rename one")
            continue
        text = path.read_text(encoding="utf-8")
        if _ABSOLUTE.search(text):
            raise RuntimeError(f"{module} imports {_PACKAGE} by its absolute name; use relative imports so the "
                               "module can be saved with the weights")
        package = module if is_package else module.rsplit(".", 1)[0]

        def rewrite(match: re.Match) -> str:
            level, target = len(match["dots"]), match["module"]
            if not target:
                raise RuntimeError(f"{module}: 'from {match['dots']} import ...' cannot be flattened; import "
                                   "from the module by name")
            base = package.split(".")
            if level - 1 >= len(base):
                raise RuntimeError(f"{module}: relative import beyond the package")
            absolute = ".".join(base[:len(base) - (level - 1)] + [target])
            pending.append(absolute)
            return f"{match['indent']}from .{_flat_name(absolute)} import"

        sources[name] = _RELATIVE.sub(rewrite, text)
        owners[name] = module
    return sources


def _update_json(path: Path, auto_map: dict) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data["auto_map"] = {**data.get("auto_map", {}), **auto_map}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def add_code(folder: Union[str, Path]) -> list:
    """Copy the code into a saved segmenter folder and point ``auto_map`` at it; returns the files written."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found; save the model there first (model.save_pretrained)")
    written = []
    for name, text in sorted(flat_sources().items()):
        (folder / name).write_text(text, encoding="utf-8")
        written.append(name)
    _update_json(config, AUTO_MAP)
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        _update_json(processor, PROCESSOR_AUTO_MAP)
    return written


def save_with_code(model, processor, folder: Union[str, Path], **save_kwargs) -> Path:
    """``model.save_pretrained`` (+ ``processor.save_pretrained``) plus the code, flat, with ``auto_map``:
    the folder then loads with ``trust_remote_code=True`` without rwkvunet installed (also after
    ``huggingface_hub.upload_folder``)."""
    folder = Path(folder)
    model.save_pretrained(folder, **save_kwargs)
    if processor is not None:
        processor.save_pretrained(folder)
    add_code(folder)
    return folder
