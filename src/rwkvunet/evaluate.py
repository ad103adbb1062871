"""``accelerate launch -m rwkvunet.evaluate MODEL --dataset DATA`` (or ``python -m``): score a trained segmenter
from an installed package, as ``rwkvunet evaluate``; see :mod:`rwkvunet.training.evaluate`."""
import sys

from .training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
