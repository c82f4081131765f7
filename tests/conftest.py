"""Shared fixtures: real model directories, built once into the asset cache and reused.

The cache is ``$VLLM_SPARSE_CACHE`` or ``~/.cache/vllm-sparse/models`` (see
``vllm_sparse.assets.models``), so re-runs and ``make`` set-up share one copy.
"""

import pytest


def _prepared(name, cache_dir):
    from vllm_sparse.assets.models import prepare_model

    return prepare_model(name, cache_dir)


@pytest.fixture(scope="session")
def model_cache_dir():
    from vllm_sparse.assets.models import cache_root

    return cache_root()


@pytest.fixture(scope="session")
def smollm2_dir(model_cache_dir):
    return _prepared("smollm2", model_cache_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(model_cache_dir):
    return _prepared("tiny-llama", model_cache_dir)


@pytest.fixture
def example_package(tmp_path, monkeypatch):
    """``examples/third_party_policy`` pip-installed into a folder on ``sys.path`` (its entry points are
    read once the test calls ``registry.reload_entry_points()``): the policies ``keydiff`` (a decode
    selection) and ``scissorhands`` (an eviction). They leave both registries afterwards."""
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    from vllm_sparse.kernels import selectors
    from vllm_sparse.policies import registry

    pkg = Path(__file__).resolve().parents[1] / "examples" / "third_party_policy"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(tmp_path), str(pkg)], check=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in ("keydiff", "scissorhands"):
        registry._REGISTRY.unregister(name)
        selectors._REGISTRY.unregister(name)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(model_cache_dir):
    return _prepared("tiny-gemma3", model_cache_dir)


@pytest.fixture(scope="session")
def tiny_gemma2_dir(model_cache_dir):
    return _prepared("tiny-gemma2", model_cache_dir)
