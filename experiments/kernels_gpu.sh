#!/usr/bin/env bash
# Issue 5's measurements in one GPU call (about 5 minutes on an H100, compile time included): the kernel and
# runtime tests compiled for real, the kernel benchmark (GEMM, quantizer and its launch variants, KV4) and
# the end-to-end prefill benchmark with a profile of where the time goes.
# Usage: OUT=/path/to/logs [VARIANTS=1] experiments/kernels_gpu.sh   (logs and JSON records land in $OUT;
# VARIANTS=1 also times the quantizer's launch variants)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/kernels_gpu}; mkdir -p "$OUT"
step() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/progress"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after ${SECONDS}s" | tee -a "$OUT/progress"
  tail -n 3 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
step pytest_kernels 240 python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_runtime.py
step bench_kernels 240 python experiments/bench_kernels.py --quick --ms 16 2048 8192 --skip-layouts \
  ${VARIANTS:+--quantizer-variants} --out "$OUT"
step bench_prefill 240 python experiments/bench_prefill.py --batches 1 8 16 64 --reps 3 --profile 8 --out "$OUT"
