#!/usr/bin/env bash
# Every GPU figure of the performance targets in one run (about 6-8 minutes on an H100):
#   RWKV-UNet-B at 224x224, batch 24, bf16 autocast: training and inference images/s, training peak memory;
#   RWKV-UNet-B at 512x512, batch 8: training images/s; T/S/B at 256 batch 8; fp32 and torch.compile runs;
#   smp Unet(resnet34) in the same run when segmentation-models-pytorch is installed.
# Results: a table on stdout (one per group as it finishes), $OUT/bench_h100.json and the operator profile of
# every case in $OUT/profile_h100.tgz (OUT defaults to "."). training/gpu_session.sh is the shorter run that
# also builds the kernel first: use it on a machine lent for minutes.
# The Bi-WKV CUDA kernel is used when it can be loaded (RWKVUNET_BI_WKV=auto, a local build folder, or torch).
# Wheels in .whl/ (for a machine without network: transformers, timm, segmentation-models-pytorch, ...) are
# installed into /tmp/site first; make them on a machine with network (versions of this environment), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl transformers==5.24.0 \
#     huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 timm==1.0.31 \
#     tokenizers==0.23.3 segmentation-models-pytorch==0.6.0 kernels==0.17.2 tomlkit==0.15.2
# Extra arguments go to `rwkvunet bench` (e.g. --steps 10).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
mkdir -p "$OUT"
source training/gpu_env.sh
python3 training/gpu_sync_check.py || true
python3 -m rwkvunet.commands.bench --device cuda --preset h100 --json "$OUT/bench_h100.json" \
    --profile /tmp/profile_h100 "$@"
tar czf "$OUT/profile_h100.tgz" -C /tmp profile_h100  # one file: a device call returns at most 8
