"""vLLM's CPU worker, plus one step at start-up: the KV cache moves onto 2 MiB huge pages.

The CPU platform (:mod:`vllm_sparse.platform`) uses this worker when the plugin's backend is
selected. vLLM allocates (and zeroes) the KV cache in ``initialize_from_config`` inside the
worker's "kv_cache" memory-pool context; here that context advises the fresh buffer
``MADV_HUGEPAGE`` before it is zeroed (:func:`~vllm_sparse.cpu_tuning.huge_page_allocations`), so
its pages fault in as 2 MiB pages with no copy (faulting fresh memory that way adds ~1.7 s per
GiB to start-up on the project's VM). Right after it,
:func:`~vllm_sparse.cpu_tuning.huge_pages` collapses whatever is still on 4 KiB pages (nothing,
normally; collapsing 6 GiB from scratch took 13 s on the 2-core VM) — all before the first
request. On a CPU without bf16 arithmetic (AVX2 only) it warns when the model runs in bf16/fp16,
which torch computes ~100× slower than float32 there (:func:`~vllm_sparse.cpu_tuning.model_dtype`).
Everything else is the stock ``CPUWorker``.
"""

from __future__ import annotations

import logging
import time

import torch

from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_sparse.cpu_tuning import huge_page_allocations, huge_pages, native_bf16

logger = logging.getLogger("vllm.sparse")


class SparseCPUWorker(CPUWorker):
    def _maybe_get_memory_pool_context(self, tag: str):
        if tag == "kv_cache":  # vLLM's one torch.zeros of the whole KV cache runs inside this
            return huge_page_allocations()
        return super()._maybe_get_memory_pool_context(tag)

    def initialize_from_config(self, kv_cache_config) -> None:
        dtype = self.model_config.dtype
        if dtype in (torch.bfloat16, torch.float16) and not native_bf16():
            logger.warning("vllm-sparse: this CPU has no bf16 arithmetic (no AVX512-BF16 or AMX), so torch runs "
                           "the model's %s matmuls ~100x slower than float32; start with --dtype float32",
                           str(dtype).removeprefix("torch."))
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
