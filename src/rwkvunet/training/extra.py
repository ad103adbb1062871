"""What fine-tuning and evaluation need beyond the base install: the ``train`` extra."""
from __future__ import annotations

import importlib.util

from ..errors import UserError

#: Import name -> distribution of the packages of ``rwkvunet[train]`` that the training code imports.
TRAIN_MODULES = {"accelerate": "accelerate", "datasets": "datasets", "yaml": "pyyaml", "scipy": "scipy",
                 "matplotlib": "matplotlib"}


def require_train_extra(what: str) -> None:
    """Refuse, with the install command, when a package of the ``train`` extra is missing."""
    missing = [dist for module, dist in TRAIN_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}: pip install \"rwkvunet[train]\"")
