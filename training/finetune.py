#!/usr/bin/env python
"""Fine-tune RWKV-UNet with Accelerate from a clone of the repository: ``rwkvunet.training.finetune`` under the
name ``finetune.py`` (installed, the same is ``rwkvunet finetune`` and ``accelerate launch -m rwkvunet.finetune``).

    accelerate launch training/finetune.py                                   # RWKV-UNet-T, synthetic set, CPU minutes
    accelerate launch training/finetune.py --config acdc_b --dataset /data/ACDC
    accelerate launch training/finetune.py --dataset kvasir/ --variant s --epochs 300 --resume

Mistakes are one line ``finetune.py: error: ...`` and exit status 2 (``--debug`` shows the traceback).
"""
import os

# On shared or busy CPUs, OpenMP threads that spin while waiting for each other slow training several fold;
# OpenMP reads this when torch loads it, so it is set before the first import of torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

from rwkvunet.training import finetune as _finetune  # noqa: E402
from rwkvunet.training.finetune import SimulatedCrash, check_trackers, train  # noqa: E402,F401

PROG = "finetune.py"


def main(argv=None) -> int:
    return _finetune.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
