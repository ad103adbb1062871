"""``rwkvunet finetune``: fine-tune RWKV-UNet with Accelerate (see :mod:`rwkvunet.training.finetune`).

    rwkvunet finetune                                             # RWKV-UNet-T on the built-in synthetic set
    rwkvunet finetune --config kvasir_seg --dataset Kvasir-SEG/   # a shipped config by name, or a YAML file
    accelerate launch -m rwkvunet.finetune --config acdc_b --dataset /data/ACDC   # several processes
"""
from __future__ import annotations

import argparse

from ..training.arguments import add_arguments as _add_train_arguments
from ..training.arguments import arguments_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_train_arguments(parser, skip=("debug",))


def run(args: argparse.Namespace) -> int:
    from ..training.extra import require_train_extra

    require_train_extra("rwkvunet finetune")
    from ..training.finetune import train

    return train(arguments_from(vars(args)))
