"""Checks that a CUDA training step of the segmenter never waits for the GPU (no host-device synchronisation):
runs forward + loss + backward of RWKV-UNet-B under ``torch.cuda.set_sync_debug_mode("error")``."""
import sys

import torch

from rwkvunet import RWKVUNetConfig, RWKVUNetForSemanticSegmentation


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device", file=sys.stderr)
        return 2
    model = RWKVUNetForSemanticSegmentation(RWKVUNetConfig(variant="b", num_labels=9)).cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    y = torch.randint(0, 9, (2, 224, 224), device="cuda")
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(pixel_values=x, labels=y).loss.backward()  # first call: kernel lookup, cudnn set-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(pixel_values=x, labels=y).loss
            loss.backward()
            print(f"sync check ({mode}): forward + loss + backward ran without host-device synchronisation")
        except RuntimeError as err:
            print(f"sync check ({mode}): FAILED, a synchronising call: {err}")
            return 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
