"""Evaluate a trained RWKV-UNet segmenter from a clone of the repository: ``rwkvunet.training.evaluate`` under the
name ``evaluate.py`` (installed, the same is ``rwkvunet evaluate`` and ``accelerate launch -m rwkvunet.evaluate``).

    python training/evaluate.py runs/acdc_b --dataset /data/ACDC --split test --tta --output-dir runs/acdc_b/eval
    accelerate launch --num_processes 2 training/evaluate.py rwkv-unet/rwkvunet-b-synapse --dataset /data/Synapse

Mistakes are one line ``evaluate.py: error: ...`` and exit status 2 (``--debug`` shows the traceback).
"""
import sys

from rwkvunet.training import evaluate as _evaluate
from rwkvunet.training.evaluate import eval_pixels, load_model, parse_args, run  # noqa: F401

PROG = "evaluate.py"


def main(argv=None) -> int:
    return _evaluate.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
