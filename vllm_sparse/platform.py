"""vLLM's CPU platform, plus one thing: an explicitly selected ``CUSTOM`` attention backend is honoured.

The stock :class:`vllm.platforms.cpu.CpuPlatform` always answers with ``CPU_ATTN``. Here an
explicit ``CUSTOM`` selection is validated like the CUDA platform does (a ``ValueError``
listing the reasons when the model/config is unsupported) and returned, and the KV block size
becomes the plugin's ``page_size`` (one page per block; the stock CPU default is 128), and the
worker is :class:`vllm_sparse.cpu_worker.SparseCPUWorker` (the stock one, whose KV cache is put
on huge pages at start-up); every other selection goes to the stock code unchanged.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum

logger = init_logger(__name__)


class SparseCpuPlatform(CpuPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        attention = getattr(vllm_config, "attention_config", None)
        if attention is None or attention.backend != AttentionBackendEnum.CUSTOM:
            return
        from vllm_sparse.config import SparseConfig

        sparse = SparseConfig.from_additional_config(vllm_config.additional_config)
        page_size = sparse.page_size
        cache = vllm_config.cache_config
        if cache.user_specified_block_size and cache.block_size != page_size:
            raise ValueError(
                f"vllm-sparse needs --block-size equal to its page_size ({page_size}; one page per KV block); "
                f"got --block-size {cache.block_size}. Drop --block-size or set page_size to the same value."
            )
        cache.block_size = page_size
        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker":  # the stock default, not a user's
            parallel.worker_cls = "vllm_sparse.cpu_worker.SparseCPUWorker"
        if sparse.evict is not None:
            from vllm_sparse.eviction import check_engine_config

            check_engine_config(vllm_config)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if selected_backend != AttentionBackendEnum.CUSTOM:
            return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
        backend_cls = AttentionBackendEnum.CUSTOM.get_class()
        reasons = backend_cls.validate_configuration(device_capability=None, **attn_selector_config._asdict())
        if reasons:
            raise ValueError(
                f"Selected backend {selected_backend} ({backend_cls.__name__}) is not valid for this "
                f"configuration. Reason: {reasons}. {cls._per_kind_fix(attn_selector_config, num_heads)}"
            )
        logger.info_once("Using %s backend (vllm-sparse).", selected_backend)
        return AttentionBackendEnum.CUSTOM.get_path()

    @classmethod
    def _per_kind_fix(cls, attn_selector_config, num_heads) -> str:
        """The layer kind the plugin refused, and the setting that keeps that kind on vLLM's own backend."""
        from vllm.v1.attention.selector import get_attn_spec_kind

        c = attn_selector_config
        kind = get_attn_spec_kind(use_mla=c.use_mla, has_sliding_window=c.has_sliding_window, attn_type=c.attn_type)
        path = super().get_attn_backend_cls(None, c, num_heads)
        stock = next((b.name for b in AttentionBackendEnum if b.name != "CUSTOM" and _path(b) == path), path)
        return (f"These are {kind.value} layers: keep them on vLLM's backend and the others on vllm-sparse with "
                f"--attention-config '{{\"backend\": \"CUSTOM\", \"backend_per_kind\": {{\"{kind.value}\": "
                f"\"{stock}\"}}}}' (AttentionConfig.backend_per_kind), or drop --attention-backend CUSTOM.")


def _path(backend: AttentionBackendEnum) -> str | None:
    try:
        return backend.get_path()
    except ValueError:  # an unregistered CUSTOM slot
        return None
