#!/usr/bin/env bash
set -euo pipefail
cd /work/main
PY=.venv/bin/python
MODEL=$($PY -m vllm_sparse.assets.models path smollm2)
VS=.venv/bin/vllm-sparse
DTYPE=$($PY -c "from vllm_sparse.cpu_tuning import model_dtype; print(model_dtype())")
common=(bench throughput --model "$MODEL" --dataset-name random --random-input-len 7000
        --random-output-len 256 --num-prompts 8 --max-model-len 7272 --enforce-eager --dtype "$DTYPE")
for tag in stock1 sparse1 sparse2 stock2; do
  if [[ $tag == stock* ]]; then extra=(); else extra=(--attention-backend CUSTOM --additional-config '{"vllm_sparse": {}}'); fi
  echo "== $tag $(date +%T)"
  "$VS" "${common[@]}" "${extra[@]}" --output-json /tmp/abba/bench-$tag.json 2>&1 | grep -E "Throughput|Total num|Error|error" || true
done
echo "== done $(date +%T)"
