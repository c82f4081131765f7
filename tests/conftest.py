"""Shared fixtures: real model directories, built once into the asset cache and reused.

The cache is ``$VLLM_SPARSE_CACHE`` or ``~/.cache/vllm-sparse/models`` (see
``vllm_sparse.assets.models``), so re-runs and ``make`` set-up share one copy.
"""

import pytest


@pytest.fixture(scope="session")
def model_cache_dir():
    from vllm_sparse.assets.models import cache_root

    return cache_root()


@pytest.fixture(scope="session")
def smollm2_dir(model_cache_dir):
    from vllm_sparse.assets.models import prepare_model

    return prepare_model("smollm2", model_cache_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(model_cache_dir):
    from vllm_sparse.assets.models import prepare_model

    return prepare_model("tiny-llama", model_cache_dir)
