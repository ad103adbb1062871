"""Speed and memory benchmark of RWKV-UNet (and smp's Unet(resnet34) when installed), as ``rwkvunet bench``.

    python training/benchmark.py                               # CPU: one 3x256x256 image, T/S/B vs Unet(resnet34)
    python training/benchmark.py --preset cpu --json cpu.json  # the CPU target, interleaved rounds
    python training/benchmark.py --device cuda --preset h100   # the GPU figures (see training/gpu_bench.sh)

All options: ``python training/benchmark.py --help``.
"""
import sys

from rwkvunet.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
