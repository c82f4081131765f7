"""vLLM plugin entry points (declared in pyproject.toml).

* ``vllm.general_plugins`` → :func:`register`: runs in every vLLM process (API server,
  engine core, workers, Ray actors) and registers :class:`~vllm_sparse.backend.SparseAttentionBackend`
  as ``AttentionBackendEnum.CUSTOM`` and the evicting KV-cache spec's block manager
  (:mod:`vllm_sparse.eviction`). Select it with ``--attention-backend CUSTOM`` /
  ``LLM(attention_backend="CUSTOM")``.
* ``vllm.platform_plugins`` → :func:`cpu_platform`: on vLLM's CPU build only, activates a
  subclass of the CPU platform that honours ``CUSTOM`` (the stock CPU platform ignores any
  selected backend). It changes nothing else; on CUDA it returns ``None`` and stays out.
"""

from __future__ import annotations

BACKEND_PATH = "vllm_sparse.backend.SparseAttentionBackend"


def register() -> None:
    """Register the sparse backend on ``AttentionBackendEnum.CUSTOM`` (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    # the evicting KV-cache spec's block manager: the scheduler (engine core) looks it up by spec type
    from vllm_sparse import eviction

    eviction.register()


def cpu_platform() -> str | None:
    """Platform-plugin hook: our CPU platform subclass where vLLM would pick its CPU platform."""
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() != "vllm.platforms.cpu.CpuPlatform":
        return None
    return "vllm_sparse.platform.SparseCpuPlatform"
