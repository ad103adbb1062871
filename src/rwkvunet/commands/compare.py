"""``rwkvunet compare``: RWKV-UNet and a reference model fine-tuned with identical settings on the same data, then
one table and one plot of curves (see :mod:`rwkvunet.training.compare`).

    rwkvunet compare --dataset my_images_and_masks/ --epochs 50 --seeds 0 1 2 --output-dir cmp
    rwkvunet compare --config kvasir_seg --dataset Kvasir-SEG/ --models rwkvunet-s smp-unet-r34 --output-dir cmp
    accelerate launch -m rwkvunet.cli compare ...          # every run on all processes, one after the other

Every fine-tuning option (``rwkvunet finetune --help``) but ``--model``, ``--seed`` and ``--output-dir`` passes
through to each run.
"""
from __future__ import annotations

import argparse

from ..errors import whole_number
from ..training.arguments import add_arguments as _add_train_arguments

#: Chosen per run by compare itself.
PER_RUN = ("debug", "model", "seed", "output_dir", "resume")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.compare import model_choices

    parser.add_argument("--models", nargs="+", default=["rwkvunet", "smp-unet-r34"], metavar="MODEL",
                        help=f"models to train, each with the same options: {', '.join(model_choices())} "
                             "(rwkvunet: at --variant; default: rwkvunet smp-unet-r34)")
    parser.add_argument("--seeds", nargs="+", type=whole_number(0, 2 ** 32 - 1), default=[0], metavar="SEED",
                        help="one run per model and seed: its --seed, and its --split-seed unless --split-seed is "
                             "given (default: 0); with several seeds the table gives each model's mean and spread")
    parser.add_argument("--output-dir", default=None,
                        help="folder of the runs and the table (default: runs/compare-<dataset>); new, empty, or "
                             "an earlier comparison, whose finished runs are kept and unfinished ones resumed")
    _add_train_arguments(parser, skip=PER_RUN)


def run(args: argparse.Namespace) -> int:
    from ..training.extra import require_train_extra

    require_train_extra("rwkvunet compare")
    from ..training.arguments import arguments_from
    from ..training.compare import compare, dataset_name

    given = vars(args).copy()
    models, seeds, output_dir = given.pop("models"), given.pop("seeds"), given.pop("output_dir")
    fixed_split = "split_seed" in given
    if "variant" in given and "rwkvunet" not in models:
        from ..errors import UserError

        raise UserError(f"--variant {given['variant']} sizes the model named rwkvunet, and --models "
                        f"{' '.join(models)} does not name it (rwkvunet-<variant> carries its own size); add "
                        f"rwkvunet to --models or drop --variant")
    base = arguments_from(given)
    output_dir = output_dir or f"runs/compare-{dataset_name(base.dataset)}"
    compare(base, models, seeds, output_dir, fixed_split=fixed_split)
    return 0
