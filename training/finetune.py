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

from rwkvunet.errors import run_main  # noqa: E402
from rwkvunet.ops.cpu_memory import keep_freed_cpu_memory  # noqa: E402
from rwkvunet.training.finetune import SimulatedCrash, check_trackers, train  # noqa: E402,F401

PROG = "finetune.py"


def main(argv=None) -> int:
    """Run :func:`train` with the errors convention: one line and exit status 2 for a mistake the user can fix."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(PROG, lambda: _own_process_and_train(argv), debug="--debug" in argv)


def _own_process_and_train(argv) -> int:
    keep_freed_cpu_memory()  # the script owns the process: freed CPU activations are kept for reuse
    return train(argv)  # parsed under the name finetune.py


if __name__ == "__main__":
    sys.exit(main())
