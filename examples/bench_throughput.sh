#!/usr/bin/env bash
# `vllm bench throughput` at long input, vLLM's stock backend vs the sparse backend, same machine.
#   bash examples/bench_throughput.sh [MODEL] [INPUT_LEN] [OUTPUT_LEN] [NUM_PROMPTS]
# Default: the prepared SmolLM2-135M-Instruct, 7000 input / 256 output tokens, 8 prompts
# (about 4 minutes per backend on a 2-core CPU). Results land in bench-{stock,sparse}.json.
# DTYPE: bfloat16 where the CPU computes it (or a GPU), float32 on an AVX2-only CPU (bf16 ~100x slower there).
set -euo pipefail
PY=${PY:-.venv/bin/python}
MODEL=${1:-$($PY -m vllm_sparse.assets.models path smollm2)}
IN=${2:-7000}; OUT=${3:-256}; N=${4:-8}
VS=$(dirname "$PY")/vllm-sparse
DTYPE=${DTYPE:-$($PY -c "from vllm_sparse.cpu_tuning import model_dtype; print(model_dtype())")}
common=(bench throughput --model "$MODEL" --dataset-name random --random-input-len "$IN"
        --random-output-len "$OUT" --num-prompts "$N" --max-model-len $((IN + OUT + 16)) --enforce-eager --dtype "$DTYPE")
"$VS" "${common[@]}" --output-json bench-stock.json
"$VS" "${common[@]}" --attention-backend CUSTOM --additional-config '{"vllm_sparse": {}}' --output-json bench-sparse.json
