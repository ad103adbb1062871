"""``accelerate launch -m rwkvunet.finetune [options]`` (or ``python -m``): fine-tune RWKV-UNet from an installed
package, as ``rwkvunet finetune``; see :mod:`rwkvunet.training.finetune`."""
import sys

from .training.finetune import main

if __name__ == "__main__":
    sys.exit(main())
