"""``rwkvunet evaluate``: score a trained segmenter with the paper's metrics (see
:mod:`rwkvunet.training.evaluate`).

    rwkvunet evaluate runs/acdc_b --dataset /data/ACDC --split test --tta --output-dir runs/acdc_b/eval
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.evaluate import add_arguments as _add

    _add(parser)


def run(args: argparse.Namespace) -> int:
    from ..training.extra import require_train_extra

    require_train_extra("rwkvunet evaluate")
    from ..training.evaluate import run as _run

    return _run(args)
