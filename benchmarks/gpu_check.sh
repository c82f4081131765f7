#!/usr/bin/env bash
# One command for a GPU machine: the kernel tests natively on the GPU, then the kernel benchmark.
#
# Needs python with torch (CUDA), triton, numpy and pytest; no vLLM and no install step: the
# checkout's kernels/ and policies/ are imported as vllm_sparse.kernels / .policies directly
# (the lent GPU machine has no vLLM and no network). Results go to $OUT (default
# benchmarks/out, ignored by git): kernels.json, kernels.png, kernels_floor.json and the logs.
#
#   bash benchmarks/gpu_check.sh                       # full grid: 8k/32k/128k x batch 1/16/64
#   bash benchmarks/gpu_check.sh --contexts 32768      # extra arguments go to benchmarks/kernels.py
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONUNBUFFERED=1
# kernel tests in parallel where pytest-xdist is installed (it is on the lent GPU machine): the
# time goes into Triton compiling each kernel variant, which parallelises over the CPU cores
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
mkdir -p "$OUT"

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu_info.txt"

"$PY" -m pytest tests/kernels -q -p no:cacheprovider -rs $XDIST 2>&1 | tee "$OUT/kernel_tests.log" | tail -15
tests=${PIPESTATUS[0]}

"$PY" benchmarks/kernels.py --floor --out "$OUT" > "$OUT/kernels_floor.log" 2>&1
"$PY" benchmarks/kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/kernels.log" | grep -v "^  done"
bench=${PIPESTATUS[0]}

echo "kernel tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
