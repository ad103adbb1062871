#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call under 10 minutes (the step limits add up to 560 s):
#   1. builds the Bi-WKV CUDA kernel from src/bi-wkv (build_local.py, ~1-2 min) so the figures use it;
#   2. the GPU targets: RWKV-UNet-B at 224 (batch 24) and 512 (batch 8), bf16, training and inference
#      images/s and peak memory, smp Unet(resnet34) beside it (bench --preset h100-targets), profiled;
#   3. the host-device synchronisation check of a training step (training/gpu_sync_check.py);
#   4. the kernel's parity, determinism and timings (validate_gpu.py, sanitizer skipped for time).
# Each step has its own time limit and a failed step does not stop the next ones. Results go to $OUT (default
# ./gpu_session): session.log (everything printed), bench.json, profiles.tgz, validate.log; at most 8 files.
# Wheels in .whl/ are installed first (training/gpu_env.sh; gpu_bench.sh says how to make them).
#   OUT=$OUT bash training/gpu_session.sh        (BI_WKV_ARCH=9.0 builds for a named arch instead of this GPU's)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_session}"
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
source training/gpu_env.sh

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report how it ended
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    return 0
}

KERNEL=/tmp/bi-wkv-build
step "build the Bi-WKV kernel" 140 python3 src/bi-wkv/scripts/build_local.py "$KERNEL" ${BI_WKV_ARCH:+--arch "$BI_WKV_ARCH"}
if compgen -G "$KERNEL/build/*" > /dev/null; then
    export RWKVUNET_BI_WKV="$KERNEL"
else
    echo "no kernel build: the figures below use the PyTorch Bi-WKV"
fi
step "GPU targets" 260 python3 -m rwkvunet.commands.bench --device cuda --preset h100-targets \
    --json "$OUT/bench.json" --profile /tmp/profiles
tar czf "$OUT/profiles.tgz" -C /tmp profiles 2>/dev/null || true
step "host-device sync check" 40 python3 training/gpu_sync_check.py
if [ -n "${RWKVUNET_BI_WKV:-}" ]; then
    step "kernel validation" 120 bash -c "python3 src/bi-wkv/scripts/validate_gpu.py --kernel-dir '$KERNEL' \
        --skip-sanitizer --iters 20 > '$OUT/validate.log' 2>&1; rc=\$?; tail -40 '$OUT/validate.log'; exit \$rc"
fi
echo "session done in ${SECONDS}s"
