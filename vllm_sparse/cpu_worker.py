"""vLLM's CPU worker, plus one step at start-up: the KV cache moves onto 2 MiB huge pages.

The CPU platform (:mod:`vllm_sparse.platform`) uses this worker when the plugin's backend is
selected. vLLM allocates (and zeroes) the KV cache in ``initialize_from_config`` inside the
worker's "kv_cache" memory-pool context; here that context advises the fresh buffer
``MADV_HUGEPAGE`` before it is zeroed (:func:`~vllm_sparse.cpu_tuning.huge_page_allocations`), so
its pages fault in as 2 MiB pages with no copy (faulting fresh memory that way adds ~1.7 s per
GiB to start-up on the project's VM). Right after it,
:func:`~vllm_sparse.cpu_tuning.huge_pages` collapses whatever is still on 4 KiB pages (nothing,
normally; collapsing 6 GiB from scratch took 13 s on the 2-core VM) — all before the first
request. Everything else is the stock ``CPUWorker``.
"""

from __future__ import annotations

import logging
import time

from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_sparse.cpu_tuning import huge_page_allocations, huge_pages

logger = logging.getLogger("vllm.sparse")


class SparseCPUWorker(CPUWorker):
    def _maybe_get_memory_pool_context(self, tag: str):
        if tag == "kv_cache":  # vLLM's one torch.zeros of the whole KV cache runs inside this
            return huge_page_allocations()
        return super()._maybe_get_memory_pool_context(tag)

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        start = time.perf_counter()
        seen, done = set(), 0
        for t in self.model_runner.kv_caches:
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                done += huge_pages(t)
        if done:
            logger.info("vllm-sparse: %d MiB of KV cache on huge pages (collapsing what was not: %.1f s)", done >> 20,
                        time.perf_counter() - start)
